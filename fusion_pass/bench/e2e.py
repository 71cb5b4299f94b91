"""End to end: the official flow-matching Euler loop with CFG, per mode, against eager and float32."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor

from .modes import Group, StepInputs, _call, _sync
from .output import _one_line
from .settings import Settings
from .spec import DTYPES, E2E_BEST_OF, E2E_MODES
from .timing import _dynamo_counts, rel_err


def _e2e_candidates(settings: Settings) -> set[str]:
    return set(E2E_MODES) | {m for family in E2E_BEST_OF for m in family}


def _e2e_modes(group: Group, results: dict[str, Any]) -> list[str]:
    chosen = [m for m in E2E_MODES if m in group.keep]
    for family in E2E_BEST_OF:
        ran = [m for m in family if m in group.keep and results.get(m, {}).get("status") == "ok"]
        if ran:
            chosen.append(min(ran, key=lambda m: results[m]["step_ms"]["median"]))
    return chosen


def _denoise(step, model_dtype: torch.dtype, latents: Tensor, cond: Tensor, settings: Settings,
             guidance_embed: bool) -> Tensor:
    """The official flow-matching Euler loop (hy3dgen's Hunyuan3DDiTFlowMatchingPipeline and
    FlowMatchEulerDiscreteScheduler, shift 1): sigmas = linspace(0, 1, steps), t = sigma passed as
    ``t.expand(B).to(dtype) / 1000`` with t = 1000 sigma, CFG over a doubled batch (cond first),
    and ``x += (sigma_next - sigma) * v`` in float32, cast back to the model's dtype."""
    device = latents.device
    sigmas = torch.linspace(0, 1, settings.e2e_steps, dtype=torch.float64).to(device=device, dtype=torch.float32)
    timesteps = sigmas * 1000
    sigmas = torch.cat([sigmas, torch.ones(1, device=device)])
    kwargs = {}
    if guidance_embed:
        kwargs["guidance"] = torch.full((latents.shape[0],), settings.guidance_scale, device=device, dtype=model_dtype)
    for i, t in enumerate(timesteps):
        x = latents if guidance_embed else torch.cat([latents] * 2)
        timestep = t.expand(x.shape[0]).to(latents.dtype) / 1000
        pred = step(StepInputs(x, timestep, {"main": cond}, kwargs))
        if not guidance_embed:
            pred_cond, pred_uncond = pred.chunk(2)
            pred = pred_uncond + settings.guidance_scale * (pred_cond - pred_uncond)
        latents = (latents.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * pred).to(pred.dtype)
    return latents


def _run_e2e(group: Group, results: dict[str, Any], console,
             may_spend: Callable[[float], str | None]) -> dict[str, Any]:
    settings = group.settings
    cfg = group.cfg
    guidance_embed = bool(getattr(cfg, "guidance_embed", False))
    if not guidance_embed and settings.batch % 2:
        return {"status": "skipped", "reason": "CFG needs an even --batch"}
    dtype = DTYPES[group.dtype]
    generator = torch.Generator().manual_seed(settings.seed + 7)
    n = settings.batch if guidance_embed else settings.batch // 2
    latents0 = torch.randn(n, group.inputs.x.shape[1], group.inputs.x.shape[2], generator=generator)
    cond = torch.randn(settings.batch, *group.inputs.contexts["main"].shape[1:], generator=generator)
    latents0 = latents0.to(settings.device, dtype)
    cond = cond.to(settings.device, dtype)
    record: dict[str, Any] = {"steps": settings.e2e_steps, "guidance_scale": settings.guidance_scale,
                              "timer": "host wall time, synchronized", "modes": {}}
    finals: dict[str, Tensor] = {}
    for mode in _e2e_modes(group, results):
        try:
            graphs_before = _dynamo_counts().get("graphs", 0)
            _sync(settings)
            start = time.perf_counter()
            with torch.no_grad():
                final = _denoise(group.keep[mode].step, dtype, latents0, cond, settings, guidance_embed)
            _sync(settings)
            seconds = time.perf_counter() - start
            finals[mode] = final.float()
            entry = {"status": "ok", "total_s": round(seconds, 3),
                     "per_step_ms": round(1e3 * seconds / settings.e2e_steps, 3)}
            recompiled = _dynamo_counts().get("graphs", 0) - graphs_before
            if recompiled:
                entry["recompiled"] = f"{recompiled} new Dynamo graph(s): the time includes a compile"
            record["modes"][mode] = entry
            console.log(f"[{group.key}] e2e {mode}: {seconds:.2f} s for {settings.e2e_steps} steps"
                        + (f" [yellow]({entry['recompiled']})[/yellow]" if recompiled else ""))
        except Exception as exc:  # noqa: BLE001 - record it and go on
            record["modes"][mode] = {"status": "error", "error": _one_line(exc)}
            console.log(f"[{group.key}] e2e {mode}: [red]{_one_line(exc)}[/red]")
    fp32_refusal = None
    if settings.e2e_fp32 and "eager" in record["modes"] and record["modes"]["eager"]["status"] == "ok":
        # float32 runs ~8x slower than fp16/bf16 eager (no tensor cores without TF32)
        fp32_refusal = may_spend(8 * record["modes"]["eager"]["total_s"])
        if fp32_refusal:
            record["fp32"] = f"skipped: {fp32_refusal}"
    if settings.e2e_fp32 and not fp32_refusal:
        model32 = group.fp32_model
        start = time.perf_counter()
        with torch.no_grad():
            final32 = _denoise(lambda inputs: _call(model32, inputs), torch.float32, latents0.float(), cond.float(),
                               settings, guidance_embed)
        _sync(settings)
        finals["float32"] = final32
        record["fp32_total_s"] = round(time.perf_counter() - start, 3)
    eager = finals.get("eager")
    for mode, final in finals.items():
        if mode == "float32":
            continue
        entry = record["modes"][mode]
        if eager is not None:
            entry["err_vs_eager"] = rel_err(final, eager)
        if "float32" in finals:
            entry["err_vs_fp32"] = rel_err(final, finals["float32"])
        if eager is not None and mode != "eager":
            entry["speedup_vs_eager"] = round(record["modes"]["eager"]["total_s"] / entry["total_s"], 3)
    record["status"] = "ok"
    return record
