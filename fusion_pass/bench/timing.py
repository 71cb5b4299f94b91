"""How a step is timed: CUDA events around each call (host timers on the CPU), medians and
percentiles, relative errors, memory in MB, Dynamo's counters."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: modes imports this module
    from .modes import StepInputs
    from .settings import Settings


def _time_steps(step, inputs: StepInputs, settings: Settings) -> list[float]:
    """Milliseconds per step of ``step(inputs)`` (see :func:`time_calls`)."""
    return time_calls(lambda: step(inputs), settings.repeat, settings.cuda)


def time_calls(call, repeat: int, cuda: bool, warmup: int = 0) -> list[float]:
    """Milliseconds per ``call()``, ``repeat`` times after ``warmup`` untimed calls: CUDA events
    around each call (no sync between calls), or host time without CUDA. Also used by the model
    scripts in ``benchmarks/``."""
    for _ in range(warmup):
        call()
    if not cuda:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def kernel_us(call, reps: int = 20, rounds: int = 5, warmup: int = 3) -> float:
    """Microseconds of GPU time per ``call()``: ``reps`` calls captured in one CUDA graph (no host
    time between kernels), replayed ``rounds`` times between CUDA events after ``warmup`` calls;
    the median (the ops and kernel probes in ``benchmarks/``)."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    graph.replay()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        per.append(start.elapsed_time(end) * 1000 / reps)
    return percentile(per, 0.5)


def _summary(times: list[float], timer: str) -> dict[str, Any]:
    return {"median": round(percentile(times, 0.5), 4), "p10": round(percentile(times, 0.1), 4),
            "p90": round(percentile(times, 0.9), 4), "n": len(times), "timer": timer}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref||, in float32."""
    out, ref = out.detach().float(), ref.detach().float()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def _mb(nbytes: int) -> float:
    return round(nbytes / 2**20, 1)


def _dynamo_counts() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}
