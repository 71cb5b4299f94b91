"""The kernel profile of one step: torch.profiler, kernels sorted into GEMM / attention / other."""
from __future__ import annotations

import contextlib
import re
from typing import Any

import torch

from .modes import StepInputs, _sync
from .settings import Settings


# Kernel classes by name: cuBLAS/cuBLASLt (gemm, gemv, nvjet, xmma, cutlass, splitK), SDPA's flash,
# memory-efficient and cuDNN kernels; on the CPU the aten ops. Triton kernels (Inductor's
# triton_poi/red/per_fused_..., whose names list the ops they fused, and ours) count as "other",
# except Inductor's GEMM templates (triton_tem_).
GEMM_RE = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk|wgmma|^triton_tem_|"
                     r"^aten::(linear|mm|bmm|addmm|baddbmm)$", re.I)

ATTENTION_RE = re.compile(r"flash|fmha|attention|sdpa", re.I)


def _profile(step, inputs: StepInputs, settings: Settings, top: int = 20) -> dict[str, Any]:
    """One step under torch.profiler: kernels (CUDA) or top-level aten ops (CPU), their time,
    the GEMM + attention share, and the ``top`` rows by total time (under "top20")."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # CUDA activity alone on a GPU: the kernels are what is counted, and skipping the CPU ops
    # keeps the trace's post-processing to a fraction of a second for 2,400 kernels
    activities = [ProfilerActivity.CUDA] if settings.cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step(inputs)
        _sync(settings)
    events = prof.events()
    if settings.cuda:
        kernels = [e for e in events
                   if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
        unit = "kernels"
    else:
        kernels = [e for e in events if e.device_type == DeviceType.CPU and "::" in e.name and not _has_op_parent(e)]
        unit = "top-level ops (CPU)"
    rows: dict[str, list[float]] = {}
    for event in kernels:
        rows.setdefault(event.name, []).append(event.time_range.elapsed_us())
    total_us = sum(sum(v) for v in rows.values())
    gemm_attn_us = sum(sum(v) for name, v in rows.items() if _kernel_class(name) != "other")
    table = sorted(((sum(v), len(v), name) for name, v in rows.items()), reverse=True)[:top]
    return {
        "unit": unit,
        "kernels": len(kernels),
        "kernel_ms": round(total_us / 1e3, 3),
        "gemm_attn_ms": round(gemm_attn_us / 1e3, 3),
        "other_ms": round((total_us - gemm_attn_us) / 1e3, 3),
        "gemm_attn_fraction": round(gemm_attn_us / total_us, 4) if total_us else None,
        "top20": [{"name": name, "calls": calls, "total_us": round(us, 1), "class": _kernel_class(name)}
                  for us, calls, name in table],
    }


def _has_op_parent(event) -> bool:
    """Whether a dispatcher op (aten::, fusion_pass::, ...) encloses this CPU event."""
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if "::" in parent.name:
            return True
        parent = getattr(parent, "cpu_parent", None)
    return False


def _kernel_class(name: str) -> str:
    if name.startswith("triton_") and not name.startswith("triton_tem_"):
        return "other"
    if ATTENTION_RE.search(name):
        return "attention"
    if GEMM_RE.search(name):
        return "gemm"
    return "other"


def _profile_text(group_key: str, mode: str, profile: dict[str, Any]) -> str:
    total = profile["kernel_ms"]
    lines = [f"== {group_key} / {mode}: {profile['kernels']} {profile['unit']} per step, {total:.3f} ms in them; "
             f"GEMM+attention {profile['gemm_attn_ms']:.3f} ms ({100 * (profile['gemm_attn_fraction'] or 0):.1f} %), "
             f"rest {profile['other_ms']:.3f} ms ==",
             f"{'#':>3} {'total ms':>9} {'calls':>6} {'mean us':>9} {'%':>6}  {'class':<9} name"]
    for i, row in enumerate(profile["top20"], 1):
        share = 100 * row["total_us"] / 1e3 / total if total else 0.0
        name = row["name"] if len(row["name"]) <= 110 else row["name"][:107] + "..."
        lines.append(f"{i:>3} {row['total_us'] / 1e3:>9.3f} {row['calls']:>6} {row['total_us'] / row['calls']:>9.1f} "
                     f"{share:>6.1f}  {row['class']:<9} {name}")
    return "\n".join(lines) + "\n\n"


def _init_cupti() -> None:
    """Start the CUDA profiler once before any CUDA graph is captured: kernels of graphs captured
    before CUPTI's first initialisation can be missing from later profiles."""
    from torch.profiler import ProfilerActivity, profile

    with contextlib.suppress(Exception), profile(activities=[ProfilerActivity.CUDA]):
        torch.ones(8, device="cuda").add_(1)
        torch.cuda.synchronize()


def write_cprofile(profiler, path, top: int) -> None:
    """A `cProfile.Profile`'s `top` costliest functions, by cumulative and by own time, as pstats prints them."""
    import io
    import pstats
    from pathlib import Path

    text = io.StringIO()
    for order in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(top)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text.getvalue())
