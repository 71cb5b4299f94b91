"""Where ``optimize()``'s set-up goes on an empty Triton cache (issue 14: <= 2 s), and whether
compiling the fused kernels in threads would shorten it.

    python3 benchmarks/setup_profile.py --out OUT_DIR [--config hunyuan3d-2] [--threads 16]

In one fresh process, on the official Hunyuan3D-2 file (random weights, fp16, B=2, its
example inputs), with ``TRITON_CACHE_DIR`` pointing at a new empty folder before Triton is
imported: the time of ``import fusion_pass``, of ``optimize()``, of the first call (capture on
first call and every Triton compile of the fused kernels) and of the second call; each Triton
compile (kernel, seconds). Then the same compiles again, each time into a new empty cache: one
after the other, and from ``--threads`` threads at once (``concurrent.futures``; what Triton's
own ``AsyncCompileMode`` would use), to see whether Triton's compiler runs in parallel threads
on this machine. ``--no-precompile`` turns off the first call's parallel dry run
(``fusion_pass/precompile.py``) to compare. Writes ``setup_profile.json`` and ``setup_profile.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="hunyuan3d-2")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--no-precompile", action="store_true",
                        help="FUSION_PASS_PRECOMPILE=0: no parallel dry run on the first call (fusion_pass/precompile.py)")
    parser.add_argument("--eager-first", action="store_true",
                        help="call the model eagerly twice before optimize(), as a pipeline that ran eagerly would: "
                             "CUDA's, cuBLAS's and cuDNN's own first-use costs are then outside optimize()'s")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also write setup_cprofile.txt: the N costliest functions (cumulative and own time) "
                             "of optimize() + the first call, main thread only; the timings then include "
                             "cProfile's overhead")
    args = parser.parse_args(argv)
    if args.no_precompile:
        os.environ["FUSION_PASS_PRECOMPILE"] = "0"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fp_triton_cache_")
    start = time.perf_counter()
    import torch
    import triton
    import triton.compiler

    compiles: list[tuple] = []  # (src, target, options, seconds)
    original = triton.compiler.compile

    def timed_compile(src, target=None, options=None, _env_vars=None):
        began = time.perf_counter()
        kernel = original(src, target=target, options=options, _env_vars=_env_vars)
        compiles.append((src, target, options, time.perf_counter() - began))
        return kernel

    # a JITFunction binds `triton.compiler.compile` at its first launch on a device: patched before any
    triton.compiler.compile = timed_compile
    loads: list[float] = []  # CompiledKernel._init_handles: binary load and launcher, at a kernel's first launch
    init_handles = triton.compiler.CompiledKernel._init_handles

    def timed_init_handles(self):
        began = time.perf_counter()
        init_handles(self)
        loads.append(time.perf_counter() - began)

    triton.compiler.CompiledKernel._init_handles = timed_init_handles
    import_torch_s = time.perf_counter() - start
    start = time.perf_counter()
    import fusion_pass
    from fusion_pass.bench.environment import environment, environment_line
    from fusion_pass.bench.profiling import write_cprofile

    import_s = time.perf_counter() - start
    start = time.perf_counter()
    from reference_models import example_inputs, load_official

    reference_s = time.perf_counter() - start
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = load_official(args.config, device=device, dtype=dtype).eval()
    inputs = example_inputs(args.config, device=device, dtype=dtype, seed=0)
    sync()
    timings = {"import torch + triton s": import_torch_s, "import fusion_pass s": import_s,
               "import reference_models (hy3dgen) s": reference_s}
    if args.eager_first:
        for name in ("eager first call s", "eager second call s"):
            start = time.perf_counter()
            inputs.call(model)
            sync()
            timings[name] = time.perf_counter() - start
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    fusion_pass.optimize(model)
    timings["optimize() s"] = time.perf_counter() - start
    start = time.perf_counter()
    inputs.call(model)
    sync()
    timings["first call s"] = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        write_cprofile(profiler, args.out / "setup_cprofile.txt", args.cprofile)
    timings["  of which capture + fuse (report.seconds, optimize() included) s"] = fusion_pass.report(model).seconds
    start = time.perf_counter()
    inputs.call(model)
    sync()
    timings["second call s"] = time.perf_counter() - start
    timings["Triton compiles in the first call s (summed over threads)"] = sum(c[3] for c in compiles)
    timings["kernel loads (_init_handles) s (summed over threads)"] = sum(loads)
    timings["the first kernel load s"] = loads[0] if loads else 0.0
    per_kernel = Counter()
    for src, _, _, seconds in compiles:
        per_kernel[getattr(getattr(src, "fn", None), "__name__", str(src))] += seconds

    def recompile_all(threads: int) -> float:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fp_triton_cache_")
        knobs = getattr(triton, "knobs", None)
        if knobs is not None and hasattr(knobs, "cache"):
            try:
                knobs.cache.dir = os.environ["TRITON_CACHE_DIR"]
            except Exception:  # noqa: BLE001 - older knobs: the environment variable is read at each compile
                pass
        began = time.perf_counter()
        if threads == 1:
            for src, target, options, _ in compiles:
                original(src, target=target, options=options)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda c: original(c[0], target=c[1], options=c[2]), compiles))
        return time.perf_counter() - began

    replay = {"serial s": recompile_all(1), f"{args.threads} threads s": recompile_all(args.threads)} if compiles else {}
    result = {"config": args.config, "dtype": str(dtype), "precompile": not args.no_precompile,
              "eager_first": args.eager_first, "cprofile": bool(args.cprofile),
              "environment": environment(cuda), "compiles": len(compiles),
              "timings": timings, "seconds_per_kernel": dict(per_kernel.most_common()), "replay": replay}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "setup_profile.json").write_text(json.dumps(result, indent=2, default=str))
    lines = [f"# optimize() set-up on an empty Triton cache, {args.config} {dtype}, "
             f"precompile {'off' if args.no_precompile else 'on'}"
             + (", after two eager calls" if args.eager_first else "")
             + (", under cProfile" if args.cprofile else ""), "",
             f"environment: {environment_line(result['environment'])}", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in timings.items()]
    lines += ["", f"{len(compiles)} Triton compiles; seconds per kernel: "
              + ", ".join(f"{name} {seconds:.2f}" for name, seconds in per_kernel.most_common()), ""]
    lines += ["The same compiles again into an empty cache: " + ", ".join(f"{k} {v:.2f}" for k, v in replay.items())]
    (args.out / "setup_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
