"""Where a Flux-shaped model's ``optimize()`` + first call goes, at Flux-dev's block counts (19 double and 38
single blocks) with tiny widths, so that it runs on a CPU in seconds.

    python3 benchmarks/flux_setup_split.py --out DIR [--device cpu|cuda]

One process: an eager call first, then ``optimize()`` + the first call timed without a profiler, then
(after ``restore`` and a Dynamo reset) the same under cProfile, split into the root's trace at the call's
shapes (``shapes.py``'s fake runs of the blocks) and Dynamo's compiles of the block classes (cumulative
times: the profiler inflates both). Also the compiles per block class and Dynamo's reasons for each
recompile. Writes ``flux_setup_split.json`` and ``flux_setup_split.md``.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import logging
import pstats
import sys
import time
from pathlib import Path

import torch

CONFIG = dict(patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
              axes_dims_rope=(4, 6, 6))


def cumulative(stats: pstats.Stats, file_part: str, function: str) -> float:
    """The largest cumulative time of a function (the outermost call of a recursive one)."""
    return max((row[3] for (file, _, name), row in stats.stats.items() if file_part in file and name == function),
               default=0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from diffusers import FluxTransformer2DModel

    import fusion_pass
    from flux_bench import make_inputs
    from fusion_pass.bench.environment import environment, environment_line

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = FluxTransformer2DModel(**CONFIG).to(device).eval()
    inputs = make_inputs(CONFIG, 64, 16, device, torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model(**inputs)
    recompiles: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: recompiles.append(record.getMessage().strip().splitlines()[-1].strip())
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(handler)
    start = time.perf_counter()
    fusion_pass.optimize(model)
    model(**inputs)
    sync()
    setup_s = time.perf_counter() - start
    compiles = {cls.__name__: len(c.graph_reports) for cls, c in model._fusion_pass_report.class_compiles.items()}
    logging.getLogger("torch._dynamo.guards.__recompiles").removeHandler(handler)
    fusion_pass.restore(model)
    torch._dynamo.reset()
    profiler = cProfile.Profile()
    profiler.enable()
    start = time.perf_counter()
    fusion_pass.optimize(model)
    model(**inputs)
    sync()
    profiled_s = time.perf_counter() - start
    profiler.disable()
    stats = pstats.Stats(profiler)
    result = {"environment": environment(device.type == "cuda"), "config": CONFIG, "setup_s": round(setup_s, 2),
              "under_cprofile_s": round(profiled_s, 2),
              "root_fake_runs_s (cProfile)": round(cumulative(stats, "fusion_pass/shapes.py", "_run_module"), 2),
              "dynamo_compiles_s (cProfile)": round(cumulative(stats, "torch/_dynamo/convert_frame.py", "_compile"), 2),
              "compiles_per_block_class": compiles, "recompile_reasons": recompiles}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flux_setup_split.json").write_text(json.dumps(result, indent=1))
    lines = [f"# optimize() + first call, Flux with 19 + 38 blocks and tiny widths, {args.device}", "",
             f"environment: {environment_line(result['environment'])}", ""]
    lines += [f"- {k}: {v}" for k, v in result.items() if k not in ("environment", "config")]
    (args.out / "flux_setup_split.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
