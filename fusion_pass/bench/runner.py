"""The run: plan the (group, mode) items, keep to the time budget, measure each, write as it goes."""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .e2e import _run_e2e
from .environment import _environment
from .measure import _measure
from .modes import Group, _build, _call, _make_inputs
from .output import _one_line, _print_summary, _short_line, _write_outputs
from .profiling import _init_cupti, _profile_text
from .settings import Settings, UsageError, _matches, _settings, _settings_dict, add_arguments
from .spec import DTYPES, GROUP_OPEN_S, MODES, REFERENCE_BLOCKS
from .targets import _targets
from .timing import rel_err


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop, but write what was measured. A BaseException, so
    that no ``except Exception`` on the way (ours or a library's) swallows it."""


@dataclass
class Item:
    config: str
    dtype: str
    mode: str  # a mode name or "e2e"
    priority: int
    estimate_s: float


class Budget:
    """Skips compile modes that would not fit: an item runs only if its estimate plus every later
    item of a more important priority (or of priority 0) still fits. Estimates learn from
    measured wall times (one correction factor for compile modes, one for the rest)."""

    def __init__(self, seconds: float, start: float):
        self.seconds = seconds
        self.start = start
        self.ratio = {True: [], False: []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def estimate(self, item: Item) -> float:
        compiles = item.mode != "e2e" and MODES[item.mode].compiles
        seen = self.ratio[compiles]
        factor = min(3.0, max(0.3, sum(seen) / len(seen))) if seen else 1.0
        return item.estimate_s * factor

    def learn(self, item: Item, seconds: float) -> None:
        compiles = item.mode != "e2e" and MODES[item.mode].compiles
        if item.estimate_s > 0:
            self.ratio[compiles].append(seconds / item.estimate_s)

    def may_spend(self, seconds: float, later: list[Item]) -> str | None:
        """None if ``seconds`` of optional work fit beside every later priority-0/1 item."""
        if math.isinf(self.seconds):
            return None
        left = self.seconds - self.elapsed()
        reserve = sum(self.estimate(j) for j in later if j.priority <= 1)
        if seconds + reserve > left:
            return f"time budget: needs ~{seconds:.0f} s (+{reserve:.0f} s kept), {max(left, 0):.0f} s left"
        return None

    def refusal(self, item: Item, later: list[Item]) -> str | None:
        if math.isinf(self.seconds):
            return None
        left = self.seconds - self.elapsed()
        need = self.estimate(item)
        if item.priority == 0:
            return None if left > 0 else f"time budget of {self.seconds:.0f} s spent"
        reserve = sum(self.estimate(j) for j in later if j.priority == 0 or j.priority < item.priority)
        if need + reserve > left:
            return (f"time budget: needs ~{need:.0f} s (+{reserve:.0f} s kept for more important items), "
                    f"{max(left, 0):.0f} s left of {self.seconds:.0f} s")
        return None


def _plan(settings: Settings) -> tuple[list[Item], list[str]]:
    """Every (group, mode) to run, in order, with the notes on what was left out."""
    from reference_models import get_config

    items: list[Item] = []
    notes: list[str] = []
    sizes = {c: get_config(c).depth + get_config(c).depth_single_blocks for c in settings.configs}
    for config in settings.configs:
        cfg = get_config(config)
        scale = sizes[config] / REFERENCE_BLOCKS
        tokens = (settings.latent_tokens or cfg.latent_tokens) + (settings.cond_tokens or cfg.cond_tokens)
        work = scale * max(0.2, tokens / 4442)  # eager step time relative to Hunyuan3D-2's
        small = (len(sizes) > 1 and sizes[config] == min(sizes.values())) or "mini" in config
        for dtype in settings.dtypes:
            first = len(items)
            for mode in settings.modes:
                spec = MODES[mode]
                if spec.compiles and not _matches(settings.compile_groups, config, dtype):
                    continue
                if mode in settings.mode_groups and not _matches(settings.mode_groups[mode], config, dtype):
                    continue
                priority = spec.priority[1 if small else 0]
                # compile time grows faster than the block count (26 s for 24 blocks, 84 s for 48)
                cost = spec.estimate_s * (scale ** 1.5 if spec.compiles else work)
                items.append(Item(config, dtype, mode, priority, 3 + cost))
            if _matches(settings.e2e_groups, config, dtype):
                # five modes at ~1x eager each (fp32 e2e is budgeted on its own, at the time)
                items.append(Item(config, dtype, "e2e", 0, 5 + settings.e2e_steps * 0.08 * work * 5))
            if len(items) > first:  # building the model and the two references happens first
                items[first].estimate_s += GROUP_OPEN_S * scale
    compile_modes = [m for m in settings.modes if MODES[m].compiles]
    if compile_modes and settings.compile_groups != ["all"]:
        notes.append(f"torch.compile modes ({', '.join(compile_modes)}) ran only in groups matching "
                     f"--compile-groups {','.join(settings.compile_groups)} (a 1.1B compile takes 60-85 s); "
                     "pass --compile-groups all for every group")
    return items, notes


def run(args: argparse.Namespace) -> int:
    """``fusion-pass bench``: returns the exit status (see the module docstring)."""
    from rich.console import Console

    console = Console(stderr=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=170)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("bench needs a CUDA GPU (or --allow-cpu for a tiny smoke run on the CPU)", file=sys.stderr)
        return 2
    try:
        settings = _settings(args, cuda)
    except UsageError as exc:
        print(f"fusion-pass bench: error: {exc}", file=sys.stderr)
        return 2
    budget = Budget(settings.budget_s, started)

    items, notes = _plan(settings)
    if not settings.official and args.model is None and cuda:
        notes.append("hy3dgen is not installed: measured reference_models' twin, not the official file")
    results: dict[str, Any] = {
        "schema": 1,
        "env": _environment(settings),
        "argv": list(getattr(sys, "orig_argv", sys.argv)),
        "settings": _settings_dict(settings),
        "groups": [],
        "targets": [],
        "notes": notes,
        "status": "running",
    }
    profiles = {"eager": [], "optimize": []}
    settings.out.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    status = 0
    try:
        with _compile_environment(settings):
            status = _run_items(settings, items, results, profiles, console, budget)
        results["status"] = "complete"
    except (Interrupted, KeyboardInterrupt) as exc:
        cause = "SIGTERM" if isinstance(exc, Interrupted) else "Ctrl-C"
        results["status"] = f"interrupted by {cause} during {results.pop('current', 'set-up')}"
        console.print(f"[bold red]{results['status']}: writing what was measured[/bold red]")
        status = 124
    finally:
        signal.signal(signal.SIGTERM, previous)
        results["targets"] = _targets(results)
        _write_outputs(results, profiles, settings, console, chart=True)
        _print_summary(results, console)
    return status


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Interrupted()


@contextlib.contextmanager
def _compile_environment(settings: Settings):
    """For the run only, restored after: fresh Inductor/Triton cache folders (cold compiles), and
    Dynamo recompile limits raised. Each group compiles the same forward up to five times (once
    per backend); past the default limit (8) Dynamo would silently run a later mode eagerly."""
    import torch._dynamo.config as dynamo_config

    saved_env = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    limits = [name for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                                "accumulated_cache_size_limit") if hasattr(dynamo_config, name)]
    saved_limits = {name: getattr(dynamo_config, name) for name in limits}
    cache = None
    try:
        if settings.fresh_compile_cache:
            cache = tempfile.mkdtemp(prefix="fusion_pass_bench_cache_")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
            os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        for name in limits:
            setattr(dynamo_config, name, max(saved_limits[name], 256))
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, value in saved_limits.items():
            setattr(dynamo_config, name, value)
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


def _run_items(settings, items, results, profiles, console, budget: "Budget") -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    failures = 0
    fp32_models: dict[str, nn.Module] = {}
    groups: dict[str, Group] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    if settings.cuda and settings.profile:
        _init_cupti()
    with progress:
        task = progress.add_task("bench", total=len(items))
        for index, item in enumerate(items):
            start = time.perf_counter()
            key = f"{item.config}/{item.dtype}"
            progress.update(task, description=f"{key} {item.mode}")
            if key not in groups:
                try:
                    _open_group(item.config, item.dtype, settings, fp32_models, results, groups, console)
                except Exception as exc:  # noqa: BLE001 - record it; the other groups still run
                    groups[key] = None
                    results["groups"].append({"config": item.config, "dtype": item.dtype, "status": "error",
                                              "error": _one_line(exc), "modes": {},
                                              "traceback": traceback.format_exc(limit=-6)[-3000:]})
                    console.log(f"[{key}] [bold red]set-up failed[/bold red]: {_one_line(exc)}")
                    failures += 1
            group = groups[key]
            record = _group_record(results, key)
            refusal = budget.refusal(item, items[index + 1:]) if group is not None else "the group's set-up failed"
            if refusal is not None:
                if item.mode == "e2e":
                    record["e2e"] = {"status": "skipped", "reason": refusal}
                else:
                    record["modes"][item.mode] = {"status": "skipped", "reason": refusal, "what": MODES[item.mode].what}
                console.log(f"[{key}] {item.mode}: [yellow]skipped: {refusal}[/yellow]")
            else:
                results["current"] = f"{key} {item.mode}"
                if item.mode == "e2e":
                    later = items[index + 1:]
                    record["e2e"] = outcome = _safe_e2e(group, record["modes"], console,
                                                        lambda seconds: budget.may_spend(seconds, later))
                else:
                    outcome = _safe_measure(group, item.mode, console)
                    record["modes"][item.mode] = outcome
                    failures += outcome["status"] == "error"
                    if item.mode in profiles and "profile" in outcome:
                        profiles[item.mode].append(_profile_text(key, item.mode, outcome["profile"]))
                results.pop("current", None)
                if outcome["status"] == "ok":  # a quick failure says nothing about the time a success takes
                    budget.learn(item, time.perf_counter() - start)
            results["elapsed_s"] = round(budget.elapsed(), 1)
            progress.advance(task)
            last_of_group = index + 1 == len(items) or f"{items[index + 1].config}/{items[index + 1].dtype}" != key
            if last_of_group:
                closing = groups.pop(key)
                if closing is not None:
                    _close_group(closing, settings)
                if index + 1 == len(items) or items[index + 1].config != item.config:
                    fp32_models.pop(item.config, None)
                    _free(settings)
            _write_outputs(results, profiles, settings, console, chart=False)
    return 3 if failures else 0


def _safe_measure(group: Group, mode: str, console) -> dict[str, Any]:
    spec = MODES[mode]
    if spec.needs_cuda and not group.settings.cuda:
        return {"status": "skipped", "reason": "needs CUDA", "what": spec.what}
    try:
        record = _measure(group, mode)
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a failing mode is recorded and the run goes on
        console.log(f"[{group.key}] {mode}: [bold red]ERROR[/bold red] {_one_line(exc)}")
        return {"status": "error", "what": spec.what, "error": _one_line(exc),
                "traceback": traceback.format_exc(limit=-6)[-3000:]}
    console.log(f"[{group.key}] {mode}: {_short_line(record)}")
    return record


def _safe_e2e(group: Group, modes: dict[str, Any], console, may_spend) -> dict[str, Any]:
    try:
        return _run_e2e(group, modes, console, may_spend)
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001
        console.log(f"[{group.key}] e2e: [bold red]ERROR[/bold red] {_one_line(exc)}")
        return {"status": "error", "error": _one_line(exc), "traceback": traceback.format_exc(limit=-6)[-3000:]}


def _open_group(config, dtype, settings, fp32_models, results, groups, console) -> Group:
    from reference_models import get_config

    cfg = get_config(config)
    overrides = {k: v for k, v in (("latent_tokens", settings.latent_tokens), ("cond_tokens", settings.cond_tokens))
                 if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if config not in fp32_models:
        _free(settings)
        fp32_models[config] = _build(cfg, settings)
    fp32 = fp32_models[config]
    model = copy.deepcopy(fp32).to(DTYPES[dtype])
    inputs = _make_inputs(cfg, settings, dtype, settings.seed)
    ref_eager = _call(model, inputs).float()
    ref_fp32 = _call(fp32, inputs.map(lambda t: t.float() if t.is_floating_point() else t)).float()
    group = Group(config, dtype, cfg, model, inputs, ref_eager, ref_fp32, settings, fp32)
    groups[group.key] = group
    params = sum(p.numel() for p in model.parameters())
    results["groups"].append({
        "config": config, "dtype": dtype,
        "model": "official hy3dgen file" if settings.official else "reference_models (ours)",
        "parameters": params,
        "shapes": {"x": list(inputs.x.shape), "t": list(inputs.t.shape),
                   "cond": list(inputs.contexts["main"].shape)},
        "blocks": {"double": cfg.depth, "single": cfg.depth_single_blocks},
        "eager_vs_fp32": rel_err(ref_eager, ref_fp32),
        "modes": {},
    })
    console.log(f"[{group.key}] {params / 1e9:.2f}B parameters, x {tuple(inputs.x.shape)}, "
                f"cond {tuple(inputs.contexts['main'].shape)}; "
                f"eager err vs fp32 {results['groups'][-1]['eager_vs_fp32']:.2e}")
    return group


def _close_group(group: Group, settings: Settings) -> None:
    group.keep.clear()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()  # drops this group's compiled code (and its recompile counts)
    _free(settings)


def _free(settings: Settings) -> None:
    gc.collect()
    if settings.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _group_record(results, key: str) -> dict[str, Any]:
    return next(g for g in results["groups"] if f"{g['config']}/{g['dtype']}" == key)


def main(argv: list[str] | None = None) -> int:
    """``python -m fusion_pass.bench ...`` (the same as ``fusion-pass bench ...``)."""
    import fusion_pass.bench as package  # its docstring is the --help text

    parser = argparse.ArgumentParser(prog="fusion-pass bench", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --no-e2e must not mean --no-e2e-fp32
    add_arguments(parser)
    return run(parser.parse_args(argv))
