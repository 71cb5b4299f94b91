"""What the per-call checks of ``optimize()``'s installed forward cost on Hunyuan3D-2, against its step.

    python3 benchmarks/call_checks_bench.py --out OUT_DIR

The official file (hy3dgen), random weights, fp16, B=2, 3072 + 1370 tokens on the GPU (or the
meta-free CPU twin with ``--config tiny`` for a smoke run). Measures, in one process: the host time
of the checks the installed forward runs before its graph (the subtree snapshot comparison and the
argument-pattern check), averaged over 1,000 calls; the step (CUDA events, median of 20 after
warm-up) of ``optimize()``; and ``optimize()``'s own set-up time. Writes ``call_checks.json`` and
``call_checks.md``. The README's "What is checked on every call" quotes it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fusion_pass.bench.environment import environment, environment_line
from fusion_pass.bench.timing import rel_err, time_calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="hunyuan3d-2")
    args = parser.parse_args(argv)
    import fusion_pass
    from reference_models import example_inputs, load_official

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = load_official(args.config, device=device, dtype=dtype).eval()
    inputs = example_inputs(args.config, device=device, dtype=dtype, seed=0)
    start = time.perf_counter()
    fusion_pass.optimize(model)
    setup_s = time.perf_counter() - start
    step_ms = time_calls(lambda: inputs.call(model), 20, cuda, warmup=3)
    forward = model.__dict__["forward"]
    repeats = 1000
    start = time.perf_counter()
    for _ in range(repeats):
        forward.guard.holds()
        forward.signature.required_values(inputs.args, inputs.kwargs)
    checks_us = (time.perf_counter() - start) / repeats * 1e6
    step = statistics.median(step_ms)
    result = {"config": args.config, "dtype": str(dtype), "environment": environment(cuda),
              "modules_watched": forward.guard.modules, "checks_us": round(checks_us, 1), "step_ms": round(step, 3),
              "checks_share_of_step": checks_us / 1e3 / step, "optimize_setup_s": round(setup_s, 3),
              "fallbacks": fusion_pass.report(model).fallbacks}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "call_checks.json").write_text(json.dumps(result, indent=2))
    (args.out / "call_checks.md").write_text(
        f"# Per-call checks of optimize()'s installed forward, {args.config} {dtype}\n\n"
        f"environment: {environment_line(result['environment'])}\n\n"
        f"| modules watched | checks us/call | optimize() step ms | checks / step | optimize() set-up s |\n|---|---|---|---|---|\n"
        f"| {result['modules_watched']} | {checks_us:.1f} | {step:.2f} | {100 * result['checks_share_of_step']:.2f} % | "
        f"{setup_s:.2f} |\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
