"""The Triton specialisations a model call launches, each compiled for a GPU on any machine.

Triton compiles for a target it is told (``GPUTarget("cuda", 90, 32)``: an H200) without a GPU, with the
ptxas its wheel bundles; the CPU interpreter, which the CPU tests run our kernels on, accepts code the
compiler rejects. Two steps, in two processes:

- :func:`record_launches` (``TRITON_INTERPRET=1``, set before Triton is imported): runs a model call
  with every fused op's ``launch_kernel`` replaced by a recorder, inside ``interpret_on_cpu()`` so CPU
  tensors take the kernel path; nothing launches (outputs stay unwritten). A launch is a JSON-able dict:
  the kernel's module and name, each argument's kind (``["tensor", dtype]`` or ``[type, value]``), the
  constexprs and the warps; one per specialisation (arguments that Triton does not specialise on, such
  as a row count, are compared only by kind, except None and 1, which become constants).
- :func:`compile_launches` (no interpreter: :func:`compile_in_subprocess` starts that process): each
  launch as Triton's ``ASTSource``, compiled for the target: the seconds it took, or the error.

Triton's specialisation, as its ``JITFunction`` makes it: None and integers equal to 1 are constants;
tensors count as 16-byte aligned (torch's allocations, and the views the models take of them at
multiples of 16 bytes, are) and integers divisible by 16 carry the divisibility attribute.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

H200 = ("cuda", 90, 32)  # (backend, compute capability, warp size)
_DTYPES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.float64": "fp64"}


def record_launches(call: Callable[[], Any]) -> list[dict]:
    """The distinct kernel launches of ``call()`` (needs ``TRITON_INTERPRET=1``; see the module docstring)."""
    import torch

    import fusion_pass.ops  # noqa: F401 - every op module, whose launch_kernel is replaced below
    from fusion_pass.ops.launch import cpu_kernels_enabled, interpret_on_cpu

    launches: dict[str, dict] = {}

    def describe(value) -> list:
        if isinstance(value, torch.Tensor):
            return ["tensor", str(value.dtype)]
        return [type(value).__name__, value]

    def recorder(kernel, kernel_call, args, *, traced=False):
        launch = {"module": kernel.fn.__module__, "name": kernel.fn.__name__,
                  "args": [describe(a) for a in (*args, *kernel_call.tail)],
                  "constexprs": dict(kernel_call.constexprs), "num_warps": kernel_call.num_warps}
        launches.setdefault(json.dumps(_specialisation(launch), sort_keys=True, default=str), launch)

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("fusion_pass.ops.") and hasattr(m, "launch_kernel")]
    originals = [m.launch_kernel for m in modules]
    for module in modules:
        module.launch_kernel = recorder
    try:
        with interpret_on_cpu():
            if not cpu_kernels_enabled():
                raise RuntimeError("record_launches needs TRITON_INTERPRET=1, set before triton is imported")
            call()
    finally:
        for module, original in zip(modules, originals):
            module.launch_kernel = original
    return list(launches.values())


def _specialisation(launch: dict) -> dict:
    """What a launch compiles to: its values replaced by their specialisation (kind; None and 1 kept, and
    an integer's divisibility by 16)."""
    def key(kind, value):
        if kind == "int":
            return [kind, value if value == 1 else value % 16 == 0]
        return [kind, value if kind in ("tensor", "NoneType") else None]

    return {**launch, "args": [key(kind, value) for kind, value in launch["args"]]}


def ast_source(kernel, launch: dict):
    """``triton.compiler.ASTSource`` of ``kernel`` (a ``JITFunction``) for one recorded launch."""
    import triton
    from triton.backends.nvidia.compiler import CUDABackend

    divisible = CUDABackend(triton.backends.compiler.GPUTarget(*H200)).parse_attr("D")  # by 16
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, (kind, value)) in enumerate(zip(kernel.arg_names, launch["args"])):
        if kind == "tensor":
            signature[name], attrs[(index,)] = "*" + _DTYPES[value], divisible
        elif kind == "NoneType" or (kind == "int" and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif kind == "bool":
            signature[name] = "i1"
        elif kind == "int":
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = divisible
        else:
            signature[name] = "fp32"
    for name, value in launch["constexprs"].items():
        signature[name], constexprs[name] = "constexpr", value
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_launches(launches: list[dict], workers: int = 1, target: tuple = H200) -> list[dict]:
    """Compile each launch for ``target`` (in this process, which must not run the interpreter), one after
    the other (``workers`` 1) or in a pool of threads, after Triton's source hash (``triton_key``, once per
    process): per launch ``{"seconds": ...}`` or ``{"error": ...}``, and the PTX's line count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.cache import triton_key

    triton_key()
    kernels = [getattr(importlib.import_module(launch["module"]), launch["name"]) for launch in launches]

    def compile_one(index: int) -> dict:
        source = ast_source(kernels[index], launches[index])
        start = time.perf_counter()
        try:
            compiled = triton.compile(source, target=GPUTarget(*target),
                                      options={"num_warps": launches[index]["num_warps"]})
        except Exception as exc:  # noqa: BLE001 - reported per launch
            return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        return {"seconds": time.perf_counter() - start, "ptx_lines": compiled.asm["ptx"].count("\n")}

    if workers == 1:
        return [compile_one(i) for i in range(len(launches))]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, range(len(launches))))


def compile_in_subprocess(launches: list[dict], workers: int = 1, cache_dir: str | None = None) -> dict:
    """:func:`compile_launches` in a fresh process without the interpreter (``cache_dir``: its
    ``TRITON_CACHE_DIR``, an empty one for cold compiles): ``{"results": [...], "wall_s": ...}``."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = cache_dir
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    child = subprocess.run([sys.executable, "-m", "fusion_pass.bench.kernel_specs", str(workers)],
                           input=json.dumps(launches), env=env, capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"the compile process failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def _main() -> None:
    """``python -m fusion_pass.bench.kernel_specs WORKERS`` with launches as JSON on stdin."""
    launches = json.loads(sys.stdin.read())
    start = time.perf_counter()
    results = compile_launches(launches, int(sys.argv[1]))
    print(json.dumps({"results": results, "wall_s": time.perf_counter() - start}))


if __name__ == "__main__":
    _main()
