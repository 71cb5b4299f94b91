"""How long each Triton kernel of a first optimized call takes to compile for an H200, measured on this host's
CPU (issue 14, cold set-up: which compile is the first call's critical path?).

Two fresh processes:
1. *record*, under ``TRITON_INTERPRET=1``: the official model of ``--config`` in fp16 on the CPU, optimized,
   called once on few tokens with every fused op's launch intercepted (``launch_kernel`` records the kernel,
   its arguments' types and its constexprs, and launches nothing: the outputs stay unwritten). A kernel's
   block sizes and warps follow from its row width and dtype (``launch.row_settings``), not from the token
   count, so few tokens give the specialisations of the real call; only the integer arguments differ, and
   they are chosen with the real call's divisibility by 16 (``--latents``, ``--cond-tokens``).
2. *compile*: each distinct specialisation compiled for ``GPUTarget("cuda", 90, 32)`` into an empty cache
   (Triton's bundled ptxas; no GPU needed), after Triton's source hash (``triton_key``, which
   ``precompile.warm_triton`` computes during ``optimize()``): one after the other, then in a pool of
   ``--workers`` threads as ``precompile`` does.

Approximation: every tensor counts as 16-byte aligned (torch's allocations and the views the models take
of them are); integers carry their divisibility by 16 from the few-token call.

    python3 benchmarks/kernel_compile_times.py --out DIR [--config hunyuan3d-2] [--workers 2] [--one-body off]

Writes ``kernel_compile_times.md`` and ``.json`` (``kernel_compile_times_two_bodies.*`` with ``--one-body off``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_DTYPES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}


def record(config: str, latents: int, cond_tokens: int) -> list[dict]:
    """The distinct launches of one optimized fp16 call (run with TRITON_INTERPRET=1)."""
    import torch

    import fusion_pass
    import fusion_pass.ops  # noqa: F401 - every op module, whose launch_kernel is replaced below
    from fusion_pass.ops.launch import interpret_on_cpu
    from reference_models import example_inputs, load_official

    launches: dict[str, dict] = {}

    def recorder(kernel, call, args, *, traced=False):
        def describe(value):
            if isinstance(value, torch.Tensor):
                return ["tensor", str(value.dtype)]
            return [type(value).__name__, value]

        entry = {"module": kernel.fn.__module__, "name": kernel.fn.__name__,
                 "args": [describe(a) for a in (*args, *call.tail)],
                 "constexprs": dict(call.constexprs), "num_warps": call.num_warps}
        specialisation = {**entry, "args": [[kind, value if kind in ("NoneType", "int") and value in (None, 1)
                                              else None] for kind, value in entry["args"]]}  # what compiles
        launches.setdefault(json.dumps(specialisation, sort_keys=True, default=str), entry)

    for name, module in list(sys.modules.items()):
        if name.startswith("fusion_pass.ops.") and hasattr(module, "launch_kernel"):
            module.launch_kernel = recorder
    torch.set_grad_enabled(False)
    model = load_official(config, dtype=torch.float16).eval()
    inputs = example_inputs(config, latents=latents, cond_tokens=cond_tokens, dtype=torch.float16, seed=0)
    fusion_pass.optimize(model)
    with interpret_on_cpu():
        inputs.call(model)
    return list(launches.values())


def source_of(kernel, launch: dict):
    """``triton.compiler.ASTSource`` of one recorded launch: Triton's specialisation of its arguments (None
    and 1 become constants; tensors, 16-byte aligned as torch allocates them, and integers divisible by 16
    carry the ``D`` divisibility attribute)."""
    import triton

    backend_attr = _cuda_attr()
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, (kind, value)) in enumerate(zip(kernel.arg_names, launch["args"])):
        if kind == "tensor":
            signature[name], attrs[(index,)] = "*" + _DTYPES[value], backend_attr
        elif kind == "NoneType" or (kind == "int" and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif kind == "bool":
            signature[name] = "i1"
        elif kind == "int":
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = backend_attr
        else:
            signature[name] = "fp32"
    for name, value in launch["constexprs"].items():
        signature[name], constexprs[name] = "constexpr", value
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _cuda_attr():
    """The CUDA backend's parsed ``D`` (divisible by 16) attribute."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    return CUDABackend(GPUTarget("cuda", 90, 32)).parse_attr("D")


def compile_all(launches: list[dict], workers: int) -> dict:
    """Compile times of ``launches``, one after the other (``workers`` 1) or in a pool of ``workers`` threads
    (run with an empty TRITON_CACHE_DIR, without the interpreter); and the wall time of all."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.cache import triton_key

    triton_key()
    target = GPUTarget("cuda", 90, 32)
    kernels = [getattr(importlib.import_module(launch["module"]), launch["name"]) for launch in launches]

    def compile_one(index: int) -> float:
        source = source_of(kernels[index], launches[index])
        start = time.perf_counter()
        triton.compile(source, target=target, options={"num_warps": launches[index]["num_warps"]})
        return time.perf_counter() - start

    start = time.perf_counter()
    if workers == 1:
        each = [compile_one(i) for i in range(len(launches))]
    else:
        with ThreadPoolExecutor(workers) as pool:
            each = list(pool.map(compile_one, range(len(launches))))
    return {"each_s": each, "wall_s": time.perf_counter() - start}


def _switches(constexprs: dict) -> str:
    """The constexprs that are switches or sizes (``HAS_GATE=1``, ``BLOCK_D=1024``), not stride placeholders."""
    return ", ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items()
                     if k.isupper() or k.startswith("BLOCK"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--config", default="hunyuan3d-2")
    parser.add_argument("--latents", type=int, default=16, help="2 x 16 latent rows: divisible by 16, as 2 x 3072")
    parser.add_argument("--cond-tokens", type=int, default=10,
                        help="2 x 10 condition rows and 2 x 26 joint rows: not divisible by 16, as 2 x 1370 and 2 x 4442")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one-body", choices=("as-planned", "off"), default="as-planned",
                        help="off: compile qk_rmsnorm_cat with one tile body per stream (ONE_BODY=False), as before")
    parser.add_argument("--phase", choices=("record", "compile"), help=argparse.SUPPRESS)
    parser.add_argument("--launches", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.phase == "record":
        args.launches.write_text(json.dumps(record(args.config, args.latents, args.cond_tokens)))
        return 0
    if args.phase == "compile":
        print(json.dumps(compile_all(json.loads(args.launches.read_text()), args.workers)))
        return 0  # (--workers 1: one after the other)

    from fusion_pass.bench.environment import environment, environment_line

    with tempfile.TemporaryDirectory() as scratch:
        launches_file = Path(scratch) / "launches.json"
        me = [sys.executable, __file__, "--config", args.config, "--latents", str(args.latents),
              "--cond-tokens", str(args.cond_tokens), "--launches", str(launches_file)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([*me, "--phase", "record"], env={**env, "TRITON_INTERPRET": "1"}, check=True)
        launches = json.loads(launches_file.read_text())
        for launch in launches:
            if args.one_body == "off" and "ONE_BODY" in launch["constexprs"]:
                launch["constexprs"]["ONE_BODY"] = False
        launches_file.write_text(json.dumps(launches))
        env.pop("TRITON_INTERPRET", None)
        runs = {}
        for way, workers in (("serial", 1), ("threads", args.workers)):
            cache = tempfile.mkdtemp(dir=scratch)  # an empty cache for each way
            child = subprocess.run([*me, "--workers", str(workers), "--phase", "compile"],
                                   env={**env, "TRITON_CACHE_DIR": cache}, capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"the {way} compiles failed:\n{child.stderr[-3000:]}")
            runs[way] = json.loads(child.stdout.strip().splitlines()[-1])
    times = {"serial_s": runs["serial"]["each_s"], "serial_wall_s": runs["serial"]["wall_s"],
             "threads_s": runs["threads"]["each_s"], "threads_wall_s": runs["threads"]["wall_s"]}
    rows = sorted(zip(launches, times["serial_s"], times["threads_s"]), key=lambda r: -r[1])
    data = {"environment": environment(False), "config": args.config, "workers": args.workers, "one_body": args.one_body,
            "launches": launches, **times}
    lines = [f"# Compile time of each Triton kernel of a first optimized {args.config} call (fp16), for sm_90, "
             "on this host's CPU", "", f"environment: {environment_line(data['environment'])}", "",
             f"{len(launches)} distinct specialisations; one after the other {times['serial_wall_s']:.2f} s, "
             f"{args.workers} threads {times['threads_wall_s']:.2f} s (after triton_key); qk_rmsnorm_cat's one tile "
             f"body for both streams: {args.one_body}.", "",
             "| kernel | constexprs | warps | compile s (serial) | compile s (in threads) |", "|---|---|---|---|---|"]
    lines += [f"| {launch['name']} | {_switches(launch['constexprs'])} | {launch['num_warps']} | {serial:.3f} | "
              f"{threaded:.3f} |" for launch, serial, threaded in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "kernel_compile_times" + ("_two_bodies" if args.one_body == "off" else "")
        (args.out / f"{stem}.md").write_text(text)
        (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
