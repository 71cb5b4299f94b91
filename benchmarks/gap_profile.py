"""Where the GPU idles inside an optimized step: the gaps between consecutive kernels (issue 14).

Run 19's profile had 41.2 ms of kernels in a 44.9 ms Hunyuan3D-2 step (fp16, ``cuda_graphs=True``): 3.7 ms
in which no kernel ran. This script profiles steps with ``torch.profiler`` (CUDA activity), orders the
kernels of the middle step by start time and reports the idle time between consecutive kernels: the total,
a histogram of gap sizes, and the largest gaps with the kernels on each side; per mode, side by side.

    python3 benchmarks/gap_profile.py --out DIR [--config hunyuan3d-2] [--modes optimize+cudagraph+levers,eager]

Writes ``gap_profile.md`` and ``gap_profile.json`` (CUDA only).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def kernel_events(step, steps: int = 3):
    """Kernels (name, start us, end us) of the middle one of ``steps`` profiled calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            with record_function(f"step{i}"):
                step()
            torch.cuda.synchronize()
    events = prof.events()
    marks = sorted((e for e in events if e.name.startswith("step") and e.device_type.name == "CPU"),
                   key=lambda e: e.time_range.start)
    # (the step markers have a GPU range of their own, spanning the step: not a kernel)
    kernels = sorted({(e.name, e.time_range.start, e.time_range.end) for e in events
                      if e.device_type.name == "CUDA" and not e.name.startswith("step")}, key=lambda k: k[1])
    if len(marks) < 2:
        return kernels
    # the kernels launched after the middle step began and before the next one began
    lo, hi = marks[steps // 2].time_range.start, marks[steps // 2 + 1].time_range.start
    first = next(i for i, k in enumerate(kernels) if k[1] >= lo)
    last = next((i for i, k in enumerate(kernels) if k[1] >= hi), len(kernels))
    return kernels[first:last]


def gap_summary(kernels, top: int = 15) -> dict:
    busy = sum(end - start for _, start, end in kernels)
    gaps = [(kernels[i + 1][1] - kernels[i][2], kernels[i][0], kernels[i + 1][0]) for i in range(len(kernels) - 1)]
    bins = [(0, 2), (2, 5), (5, 10), (10, 50), (50, 200), (200, 1e9)]
    hist = {f"{lo}-{hi if hi < 1e9 else 'inf'} us": [sum(1 for g, *_ in gaps if lo <= g < hi),
                                                       round(sum(g for g, *_ in gaps if lo <= g < hi) / 1000, 3)]
            for lo, hi in bins}
    span = kernels[-1][2] - kernels[0][1] if kernels else 0.0
    return {"kernels": len(kernels), "span_ms": round(span / 1000, 3), "busy_ms": round(busy / 1000, 3),
            "idle_ms": round(sum(max(g, 0) for g, *_ in gaps) / 1000, 3),
            "histogram (count, ms)": hist,
            "largest": [(round(g, 1), a[:70], b[:70]) for g, a, b in sorted(gaps, reverse=True)[:top]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="hunyuan3d-2")
    parser.add_argument("--modes", default="optimize+cudagraph+levers,optimize+cudagraph,eager")
    args = parser.parse_args(argv)
    import fusion_pass
    from fusion_pass.bench.environment import environment, environment_line
    from fusion_pass.bench.timing import time_calls
    from patterns import FAMILY_NAMES, OPT_IN_NAMES
    from reference_models import example_inputs, load_official

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = load_official(args.config, device="cuda", dtype=torch.float16).eval()
    inputs = example_inputs(args.config, device="cuda", dtype=torch.float16, seed=0)
    results = {"config": args.config, "environment": environment(True), "modes": {}}
    for mode in args.modes.split(","):
        fusion_pass.restore(model)
        if mode != "eager":
            options = set(mode.split("+")[1:])
            fusion_pass.optimize(model, cuda_graphs="cudagraph" in options,
                                 patterns=[*FAMILY_NAMES, *OPT_IN_NAMES] if "levers" in options else None)
        for _ in range(5):
            inputs.call(model)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(15):
            start.record()
            inputs.call(model)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        summary = gap_summary(kernel_events(lambda: inputs.call(model)))
        summary["step_ms (median of 15, no profiler)"] = round(sorted(times)[7], 3)
        # the bench's way (time_calls: events around each call, no sync between calls) and 20 calls
        # back to back between one pair of events: where the host keeps ahead, both are GPU time
        summary["step_ms (bench's time_calls, median of 15)"] = round(sorted(time_calls(lambda: inputs.call(model), 15, True))[7], 3)
        start.record()
        for _ in range(20):
            inputs.call(model)
        end.record()
        torch.cuda.synchronize()
        summary["step_ms (20 back to back, one event pair)"] = round(start.elapsed_time(end) / 20, 3)
        results["modes"][mode] = summary
        print(mode, json.dumps(summary), flush=True)
    fusion_pass.restore(model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gap_profile.json").write_text(json.dumps(results, indent=1))
    lines = [f"# GPU idle time between kernels, {args.config} fp16", "",
             f"environment: {environment_line(results['environment'])}", ""]
    for mode, s in results["modes"].items():
        steps = "; ".join(f"{k.removeprefix('step_ms ')} {v} ms" for k, v in s.items() if k.startswith("step_ms"))
        lines += [f"## {mode}", "", f"step: {steps}", "", "profiled step: "
                  f"{s['kernels']} kernels, span {s['span_ms']} ms, busy {s['busy_ms']} ms, idle {s['idle_ms']} ms", "",
                  "| gap | count | ms |", "|---|---|---|"]
        lines += [f"| {k} | {c} | {ms} |" for k, (c, ms) in s["histogram (count, ms)"].items()]
        lines += ["", "| largest gaps us | after | before |", "|---|---|---|"]
        lines += [f"| {g} | {a} | {b} |" for g, a, b in s["largest"]]
        lines.append("")
    (args.out / "gap_profile.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
