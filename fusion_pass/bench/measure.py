"""Measuring one mode: set it up, warm it up, time it, take its memory, errors and kernel profile."""
from __future__ import annotations

import gc
import time
from typing import Any

import torch

from .e2e import _e2e_candidates
from .modes import Group, PREPARE, _sync
from .output import _one_line
from .profiling import _profile
from .settings import _matches
from .spec import MODES
from .timing import _dynamo_counts, _mb, rel_err, _summary, _time_steps


def _measure(group: Group, mode: str) -> dict[str, Any]:
    """Prepare ``mode``, time it, take its memory, errors and kernel profile."""
    settings = group.settings
    cuda = settings.cuda
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # so that the growth of reserved memory is this mode's
        base = torch.cuda.memory_allocated()
        reserved_base = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
    dynamo_before = _dynamo_counts()
    wall_start = time.perf_counter()

    prepared = PREPARE[mode](group)
    start = time.perf_counter()
    out = prepared.step(group.inputs)
    _sync(settings)
    first_call_s = time.perf_counter() - start
    del out
    setup_s = prepared.setup_s + (first_call_s if prepared.first_call_in_setup else 0.0)
    for _ in range(settings.warmup - 1):
        prepared.step(group.inputs)
    _sync(settings)
    record: dict[str, Any] = {"status": "ok", "what": MODES[mode].what}
    if cuda:
        setup_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()

    times = _time_steps(prepared.step, group.inputs, settings)

    if cuda:
        steady_peak = torch.cuda.max_memory_allocated() - base
        record["peak_mb"] = _mb(max(setup_peak, steady_peak))
        record["steady_peak_mb"] = _mb(steady_peak)
        # what the mode holds from the device: CUDA-graph pools count here in full (replays reuse
        # memory the allocator sees as free, so they are invisible to max_memory_allocated)
        record["reserved_mb"] = _mb(torch.cuda.memory_reserved() - reserved_base)
    out = prepared.step(group.inputs).to(torch.float32, copy=True)  # CUDA-graph outputs are overwritten
    _sync(settings)
    record["step_ms"] = _summary(times, "cuda-events" if cuda else "host perf_counter")
    record["setup_s"] = round(setup_s, 3)
    record["setup_what"] = prepared.setup_what
    record["first_call_s"] = round(first_call_s, 3)
    record["err_vs_eager"] = rel_err(out, group.ref_eager)
    record["err_vs_fp32"] = rel_err(out, group.ref_fp32)
    if settings.profile:
        try:  # a profiler failure costs the kernel figures, not the timings
            record["profile"] = _profile(prepared.step, group.inputs, settings)
        except Exception as exc:  # noqa: BLE001
            record["profile_error"] = _one_line(exc)
    record.update(prepared.extra)
    if prepared.after is not None:
        record.update(prepared.after())
    if MODES[mode].compiles:
        record["dynamo"] = {k: v - dynamo_before.get(k, 0) for k, v in _dynamo_counts().items()}
    record["wall_s"] = round(time.perf_counter() - wall_start, 2)
    if mode in _e2e_candidates(settings) and _matches(settings.e2e_groups, group.config, group.dtype):
        group.keep[mode] = prepared
    return record
