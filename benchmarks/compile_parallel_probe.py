"""Is Triton's compile held back by the GIL? (issue 14, cold set-up: should the first call's parallel compile
use processes instead of threads?)

Compiles ``N`` specialisations of a LayerNorm + modulation row kernel for an H200 (``GPUTarget("cuda", 90,
32)``: Triton compiles to a cubin with its bundled ptxas, no GPU needed) into an empty cache, three ways in
fresh processes: one after the other, in a pool of ``--workers`` threads (what ``fusion_pass.precompile``
uses) and in a pool of as many already-started processes. Threads as fast as processes: the compile
releases the GIL where it spends its time (MLIR/LLVM passes, ptxas), and a process pool is no lever. The
fourth way computes Triton's source hash first, as ``fusion_pass.precompile`` has it done during ``optimize()``.

    python3 benchmarks/compile_parallel_probe.py --out DIR [--n 6] [--workers 2]

Writes ``compile_parallel_probe.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import triton
import triton.language as tl


@triton.jit
def _row_kernel(x_ptr, y_ptr, shift_ptr, scale_ptr, n_cols, stride, eps, BLOCK: tl.constexpr, K: tl.constexpr):
    """y = LN(x) * (1 + scale_k) + shift_k, K times (K: a distinct specialisation per compile)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / n_cols
    d = tl.where(mask, x - mean, 0.0)
    y = d * tl.rsqrt(tl.sum(d * d, 0) / n_cols + eps)
    for i in tl.static_range(K):
        s = tl.load(scale_ptr + i * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(shift_ptr + i * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        y = y * (1 + s) + b
    tl.store(y_ptr + row * stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def compile_one(k: int) -> float:
    """Seconds to compile the specialisation ``K = 2 + k`` for sm_90."""
    from triton.backends.compiler import GPUTarget

    signature = {"x_ptr": "*fp16", "y_ptr": "*fp16", "shift_ptr": "*fp16", "scale_ptr": "*fp16", "n_cols": "i32",
                 "stride": "i32", "eps": "fp32", "BLOCK": "constexpr", "K": "constexpr"}
    source = triton.compiler.ASTSource(fn=_row_kernel, signature=signature, constexprs={"BLOCK": 1024, "K": 2 + k})
    start = time.perf_counter()
    triton.compile(source, target=GPUTarget("cuda", 90, 32))
    return time.perf_counter() - start


def run_one_way(way: str, n: int, workers: int) -> dict:
    """In this process (fresh, empty cache): ``n`` compiles ``way`` (serial, threads, processes; threads
    after Triton's source hash, ``triton_key``, which ``precompile.warm_triton`` computes ahead)."""
    hashed = {}
    if way == "threads, triton_key first":
        from triton.runtime.cache import triton_key

        start = time.perf_counter()
        triton_key()
        hashed = {"triton_key_s": round(time.perf_counter() - start, 3)}
        way = "threads"
    if way == "serial":
        start = time.perf_counter()
        each = [compile_one(k) for k in range(n)]
    else:
        pool_class = ThreadPoolExecutor if way == "threads" else ProcessPoolExecutor
        with pool_class(workers) as pool:
            list(pool.map(abs, range(workers)))  # workers started before the clock
            start = time.perf_counter()
            each = list(pool.map(compile_one, range(n)))
    return {"way": way, "wall_s": round(time.perf_counter() - start, 3), "each_s": [round(e, 3) for e in each], **hashed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--way", help=argparse.SUPPRESS)  # (the child process's job)
    args = parser.parse_args(argv)
    if args.way:
        print(json.dumps(run_one_way(args.way, args.n, args.workers)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fusion_pass.bench.environment import environment, environment_line

    results = []
    for way in ("serial", "threads", "processes", "threads, triton_key first"):
        with tempfile.TemporaryDirectory() as cache:  # an empty Triton cache for each way
            env = {**os.environ, "TRITON_CACHE_DIR": cache}
            child = subprocess.run([sys.executable, __file__, "--way", way, "--n", str(args.n), "--workers",
                                    str(args.workers)], env=env, capture_output=True, text=True, check=True)
            results.append({**json.loads(child.stdout.strip().splitlines()[-1]), "way": way})
    serial = results[0]["wall_s"]
    data = {"environment": environment(False), "n": args.n, "workers": args.workers, "results": results}
    lines = [f"# Triton compiles for sm_90 on this host's CPU: serial, threads, processes ({args.n} kernels, "
             f"{args.workers} workers)", "", f"environment: {environment_line(data['environment'])}", "",
             "| way | wall s | x serial | each compile s |", "|---|---|---|---|"]
    lines += [f"| {r['way']} | {r['wall_s']} | {serial / r['wall_s']:.2f} | {r['each_s']} |" for r in results]
    lines += ["", f"`triton_key()` itself, before the clock of the last way: {results[-1].get('triton_key_s')} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile_parallel_probe.md").write_text(text)
        (args.out / "compile_parallel_probe.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
