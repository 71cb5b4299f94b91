"""Host time of ``optimize()`` alone (capture, normalize, match, rewrite, install) on a warm process.

    python3 benchmarks/optimize_time.py --out DIR [--config hunyuan3d-2] [--repeat 7] [--device cpu]

Builds the official model of ``--config`` (random weights; fp32 on the CPU, fp16 on CUDA), runs one
``optimize()`` + ``restore()`` to import and warm everything, then times ``repeat`` more, each
followed by a young-generation garbage collection (the one the next allocations would trigger:
work that pausing the collector during ``optimize()`` only moves, which belongs in its cost).
No call of the model: the first call's costs are ``setup_profile.py``'s. Writes
``optimize_time.json`` and ``optimize_time.md``.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="hunyuan3d-2")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--collector-off", action="store_true",
                        help="the garbage collector disabled around each optimize() by this script (the explicit "
                             "collections after it still run): what collections during optimize() cost")
    args = parser.parse_args(argv)
    import fusion_pass
    import fusion_pass.ops  # noqa: F401 - imported here, not timed
    from fusion_pass.bench.environment import environment, environment_line
    from reference_models import load_official

    torch.set_grad_enabled(False)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = load_official(args.config, device=args.device, dtype=dtype).eval()
    fusion_pass.optimize(model)
    fusion_pass.restore(model)
    seconds = []
    for _ in range(args.repeat):
        if args.collector_off:
            gc.disable()
        start = time.perf_counter()
        fusion_pass.optimize(model)
        gc.enable()
        gc.collect(0)
        gc.collect(1)
        seconds.append(time.perf_counter() - start)
        fusion_pass.restore(model)
    result = {"config": args.config, "device": args.device, "collector_off": args.collector_off,
              "environment": environment(args.device == "cuda"),
              "median_s": round(statistics.median(seconds), 3), "seconds": [round(s, 3) for s in seconds]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimize_time.json").write_text(json.dumps(result, indent=1))
    text = (f"# optimize() host time, {args.config} on {args.device}"
            f"{', the collector disabled around it' if args.collector_off else ''}\n\nenvironment: "
            f"{environment_line(result['environment'])}\n\nmedian {result['median_s']} s over {args.repeat} "
            f"(each with the young-generation collections after it): {result['seconds']}\n")
    (args.out / "optimize_time.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
