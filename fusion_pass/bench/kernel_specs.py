"""The Triton specialisations a model call launches, each compiled for a GPU on any machine.

Triton compiles for a target it is told (``GPUTarget("cuda", 90, 32)``: an H200) without a GPU, with the
ptxas its wheel bundles; the CPU interpreter, which the CPU tests run our kernels on, accepts code the
compiler rejects. Two steps, in two processes:

- :func:`record_launches` (``TRITON_INTERPRET=1``, set before Triton is imported): runs a model call
  with every fused op's ``launch_kernel`` replaced by a recorder, inside ``interpret_on_cpu()`` so CPU
  tensors take the kernel path; nothing launches (outputs stay unwritten). A launch is a JSON-able dict:
  the kernel's module and name, each argument (``["tensor", dtype, 16-byte aligned]`` or ``[type,
  value]``), the constexprs and the warps; one per specialisation (launches that differ only in what
  Triton does not specialise on, such as a row count's value beyond its type and divisibility by 16,
  count as one).
- :func:`compile_launches` (no interpreter: :func:`compile_in_subprocess` starts that process): each
  launch as Triton's ``ASTSource``, compiled for the target: the seconds it took, or the error.

Triton's specialisation, as its ``JITFunction`` makes it: None and integers equal to 1 are constants; an
integer is i32 or i64 by its range; tensors whose data is 16-byte aligned and integers divisible by 16 carry
the divisibility attribute (recorded on the CPU call: its tensors' alignment is the real one).
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
            return ["tensor", str(value.dtype), value.data_ptr() % 16 == 0]
        return [type(value).__name__, value]

    def recorder(kernel, kernel_call, args, *, traced=False):
        launch = {"module": kernel.fn.__module__, "name": kernel.fn.__name__,
                  "args": [describe(a) for a in (*args, *kernel_call.tail)],  # [kind, value] or [tensor, dtype, aligned]
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
    """What a launch compiles to: its integers replaced by their specialisation (1, or the type and the
    divisibility by 16), floats by their kind."""
    def key(arg):
        kind, value = arg[:2]
        if kind == "int":
            return [kind, value if value == 1 else [_int_type(value), value % 16 == 0]]
        return arg if kind in ("tensor", "NoneType", "bool") else [kind]

    return {**launch, "args": [key(arg) for arg in launch["args"]]}


def _int_type(value: int) -> str:
    return "i32" if -2**31 <= value < 2**31 else "i64"


def ast_source(kernel, launch: dict):
    """``triton.compiler.ASTSource`` of ``kernel`` (a ``JITFunction``) for one recorded launch."""
    import triton
    from triton.backends.nvidia.compiler import CUDABackend

    divisible = CUDABackend(triton.backends.compiler.GPUTarget(*H200)).parse_attr("D")  # by 16
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, arg) in enumerate(zip(kernel.arg_names, launch["args"])):
        kind, value = arg[:2]
        if kind == "tensor":
            signature[name] = "*" + _DTYPES[value]
            if arg[2]:  # 16-byte aligned
                attrs[(index,)] = divisible
        elif kind == "NoneType" or (kind == "int" and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif kind == "bool":
            signature[name] = "u1"
        elif kind == "int":
            signature[name] = _int_type(value)
            if value % 16 == 0:
                attrs[(index,)] = divisible
        elif kind == "float":
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch['name']}: argument {name} of type {kind}, which Triton does not take")
    for name, value in launch["constexprs"].items():
        signature[name], constexprs[name] = "constexpr", value
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_launches(launches: list[dict], workers: int = 1, target: tuple = H200) -> list[dict]:
    """Compile each launch for ``target`` (in this process, which must not run the interpreter), one after
    the other (``workers`` 1) or in a pool of threads, after Triton's source hash (``triton_key``, once per
    process): per launch ``{"seconds": ...}`` (with the PTX's lines and vectorised global loads and stores)
    or ``{"error": ...}``."""
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
        ptx = compiled.asm["ptx"]
        return {"seconds": time.perf_counter() - start, "ptx_lines": ptx.count("\n"),
                "vector_loads": ptx.count("ld.global.v"), "vector_stores": ptx.count("st.global.v")}

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
