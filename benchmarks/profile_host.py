"""Where the host time of one optimized denoising step goes (cProfile), on a CUDA machine.

    python3 benchmarks/profile_host.py [--config hunyuan3d-2] [--dtype float16] [--steps 5]

Prints wall time per step for eager and optimize (synchronised), then the top functions by
own time of the optimized step under cProfile.
"""
import argparse
import cProfile
import copy
import io
import pstats
import time

import torch

import fusion_pass
from reference_models import example_inputs, load_official


def wall_ms(model, inputs, steps):
    with torch.no_grad():
        for _ in range(3):
            inputs.call(model)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            inputs.call(model)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="hunyuan3d-2")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    eager = load_official(args.config, device="cuda", dtype=dtype)
    inputs = example_inputs(args.config, dtype=dtype, device="cuda", seed=0)
    fused = fusion_pass.optimize(copy.deepcopy(eager))
    print(f"{args.config} {args.dtype}: eager {wall_ms(eager, inputs, args.steps):.1f} ms/step, "
          f"optimize {wall_ms(fused, inputs, args.steps):.1f} ms/step (wall, synchronised)")
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for _ in range(args.steps):
            inputs.call(fused)
        torch.cuda.synchronize()
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
    print(text.getvalue()[-9000:])


if __name__ == "__main__":
    main()
