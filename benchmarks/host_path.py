"""Host time per call of each fused op's own Python, Triton's launcher stubbed out (CPU or CUDA).

    PYTHONPATH=. python benchmarks/host_path.py [--out docs/bench/run22-host-path] [--label after]
    PYTHONPATH=. python benchmarks/host_path.py --device cuda [--out DIR] [--label h200]
    python benchmarks/host_path.py --compare before1.json after1.json [--compare before2.json after2.json]

Times what `optimize()`'s graphs run per fused call (`fusion_pass.ops.direct`: the op's body) up
to the call of Triton's launcher, on the small (L = 1) fp16 inputs of `ops_bench.py`'s host
table: the steady state, in which `launch_kernel` reuses a compiled kernel.

On the CPU (the default; no GPU is used): the kernels are real `JITFunction`s (TRITON_INTERPRET
unset when `fusion_pass.ops` is imported), and the planners take the kernel path for CPU tensors
(`interpret_on_cpu`, with TRITON_INTERPRET set afterwards, which is all
`launch.cpu_kernels_enabled` reads); `JITFunction.run` (Triton's per-call binding, which would
compile for a GPU on a signature's first launch) returns a stand-in compiled kernel whose launcher
does nothing but count its arguments; `torch.cuda.current_device` returns 0.
With `--device cuda`: real launches, and the same body again with the kept compiled kernels'
launchers replaced by that counting no-op; their difference is Triton's launcher and the driver.

Columns: the least-disturbed estimate on a shared machine, the minimum over REPEATS runs of CALLS
calls each (the median in brackets):
- body: the op's body, launcher stubbed (our Python);
- plan + alloc: the body with the ops' `launch_kernel` itself replaced by a no-op (operand checks,
  keys, memoised plans, output allocation);
- launch step: their difference (launch key, compiled-kernel lookup, argument assembly);
- Triton launcher (CUDA only): the body with real launches minus the body;
- torch.ops: the call through the dispatcher (Dynamo/Inductor graphs), launcher stubbed on the
  CPU, real on CUDA;
- launcher args: how many arguments Triton's launcher receives per call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the kernels must be JITFunctions (see the docstring)")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops_bench import model_workloads, workloads  # noqa: E402

from fusion_pass.ops import interpret_on_cpu, launch  # noqa: E402
from fusion_pass.ops.direct import direct_call  # noqa: E402

CALLS = 1000
REPEATS = 15
OP_MODULES = ("layernorm_modulate", "qk_rmsnorm", "qk_rmsnorm_cat", "qk_rmsnorm_rope", "qk_layernorm", "gelu_cat")


LAUNCHER_ARGS = [0]  # arguments the last stubbed launcher call received


def stub_launcher(*args, stream=None) -> None:
    """Stands in for a compiled kernel's launcher (`CompiledKernel[grid]`): counts its arguments."""
    LAUNCHER_ARGS[0] = len(args)


class StubCompiled:
    """Stands in for a `CompiledKernel`: `[grid]` gives `stub_launcher`."""

    def __getitem__(self, grid):
        return stub_launcher


def stub_triton() -> None:
    """Triton's per-call binding returns the stand-in compiled kernel; no CUDA device is queried."""
    triton.runtime.jit.JITFunction.run = lambda self, *args, grid, warmup, **kwargs: StubCompiled()
    torch.cuda.current_device = lambda: 0


@contextmanager
def launchers_stubbed():
    """The compiled kernels `launch_kernel` keeps launch through `stub_launcher` (CUDA mode)."""
    kept = dict(launch._COMPILED)
    launch._COMPILED.update({key: (kernel, stub_launcher, tail) for key, (kernel, _, tail) in kept.items()})
    try:
        yield
    finally:
        launch._COMPILED.update(kept)


def per_call_us(fn) -> tuple[float, float]:
    """(min, median) over REPEATS of the mean host time of CALLS calls of `fn`, in us (on CUDA,
    synchronised between repeats, outside the timing)."""
    for _ in range(50):
        fn()
    samples = []
    for _ in range(REPEATS):
        synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        samples.append((time.perf_counter() - start) / CALLS * 1e6)
    synchronize()
    return min(samples), statistics.median(samples)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def without_launch(fn):
    """`fn` with every op module's `launch_kernel` a no-op, for as long as it runs."""
    modules = [import_module(f"fusion_pass.ops.{name}") for name in OP_MODULES]

    def call():
        real = [m.launch_kernel for m in modules]
        for m in modules:
            m.launch_kernel = lambda *args, **kwargs: None
        try:
            return fn()
        finally:
            for m, launch in zip(modules, real):
                m.launch_kernel = launch

    return call


def measure(device: str) -> list[dict]:
    small = [*workloads(2, 1, torch.float16, device=device),
             *(w for w, _, _ in model_workloads(torch.float16, 1, 1, 1, device=device))]
    rows = []
    for w in small:
        overload = getattr(torch.ops.fusion_pass, w.op).default
        direct = direct_call(overload)
        direct(*w.args)  # a signature's first call: Triton binds (and compiles); the compiled kernel is kept
        real = per_call_us(lambda: direct(*w.args)) if device == "cuda" else None
        LAUNCHER_ARGS[0] = 0
        with launchers_stubbed():
            direct(*w.args)
            if LAUNCHER_ARGS[0] == 0:
                raise RuntimeError(f"{w.op} did not reach a compiled kernel's launcher (reference path?)")
            body = per_call_us(lambda: direct(*w.args))
            plan = without_launch(lambda: per_call_us(lambda: direct(*w.args)))()
            dispatched = per_call_us(lambda: overload(*w.args)) if device == "cpu" else None
        if device == "cuda":
            dispatched = per_call_us(lambda: overload(*w.args))
        shapes = " ".join("x".join(map(str, a.shape)) for a in w.args[:2] if isinstance(a, torch.Tensor))
        rows.append(dict(op=w.op, shapes=shapes, body_us=body[0], body_median_us=body[1], plan_us=plan[0],
                         plan_median_us=plan[1], launch_us=body[0] - plan[0],
                         triton_launcher_us=None if real is None else real[0] - body[0],
                         torch_ops_us=dispatched[0], launcher_args=LAUNCHER_ARGS[0]))
    return rows


def triton_launcher(row: dict) -> str:
    us = row.get("triton_launcher_us")
    return "-" if us is None else f"{us:.1f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Host time per fused call, our Python only ({meta['label']}, {meta['device']})",
        "",
        f"{meta['machine']}; python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}; "
        f"{meta['threads']} torch thread{'s' if meta['threads'] > 1 else ''}; {meta['device']}. "
        f"Min of {REPEATS} x {CALLS} calls (median in brackets), "
        "Triton's launcher stubbed (`benchmarks/host_path.py`).",
        "",
        "| op | q/x, k/y shapes | body us | plan + alloc us | launch step us | Triton launcher us | torch.ops us "
        "| launcher args |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['op']} | {r['shapes']} | {r['body_us']:.1f} ({r['body_median_us']:.1f}) | {r['plan_us']:.1f} "
        f"({r['plan_median_us']:.1f}) | {r['launch_us']:.1f} | {triton_launcher(r)} | {r['torch_ops_us']:.1f} | "
        f"{r['launcher_args']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def best_of(paths: list[Path]) -> tuple[dict, list[dict]]:
    """(meta, rows) of several runs of one version: per op, each time the smallest of the runs
    (the launch step: their difference)."""
    runs = [json.loads(p.read_text()) for p in paths]
    rows = []
    for group in zip(*(run["rows"] for run in runs)):
        body, plan = min(r["body_us"] for r in group), min(r["plan_us"] for r in group)
        rows.append({**group[0], "body_us": body, "plan_us": plan, "launch_us": body - plan})
    return runs[0], rows


def comparison(before: list[Path], after: list[Path]) -> str:
    """Markdown: body time per op of two versions (each the best of its runs), and the change."""
    (meta, old), (_, new) = best_of(before), best_of(after)
    lines = [
        f"# Host time per fused call, our Python only: {meta['label'].rstrip('0123456789')} vs "
        f"{json.loads(after[0].read_text())['label'].rstrip('0123456789')}",
        "",
        f"{meta['machine']}; python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}. Per op, the "
        f"smallest of {len(before)} and {len(after)} interleaved runs of `benchmarks/host_path.py` (each the min of "
        f"{REPEATS} x {CALLS} calls), Triton's launcher stubbed (`benchmarks/host_path.py`).",
        "",
        "| op | q/x, k/y shapes | launcher args | body us before | after | plan + alloc before | after | "
        "launch step before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {o['op']} | {o['shapes']} | {n['launcher_args']} | {o['body_us']:.1f} | {n['body_us']:.1f} | "
        f"{o['plan_us']:.1f} | {n['plan_us']:.1f} | {o['launch_us']:.1f} | {n['launch_us']:.1f} |"
        for o, n in zip(old, new, strict=True)
    ]
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for host_path_<label>.json / .md (else print only)")
    parser.add_argument("--label", default="current", help="names the result files (e.g. before, after)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compare", type=Path, nargs=2, action="append", metavar=("BEFORE", "AFTER"),
                        help="print a comparison of two result files (repeat for several runs) and exit")
    options = parser.parse_args()
    if options.compare:
        print(comparison([b for b, _ in options.compare], [a for _, a in options.compare]), end="")
        return
    device = options.device
    if device == "cpu":
        stub_triton()
        os.environ["TRITON_INTERPRET"] = "1"  # read per call by cpu_kernels_enabled; the kernels stay JITFunctions
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA device")
    meta = dict(label=options.label, machine=f"{cpu_name()}, {os.cpu_count()} cores", python=platform.python_version(),
                torch=torch.__version__, triton=triton.__version__, threads=torch.get_num_threads(),
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    with interpret_on_cpu(), torch.no_grad():
        rows = measure(device)
    text = markdown(meta, rows)
    print(text)
    if options.out:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / f"host_path_{options.label}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        (options.out / f"host_path_{options.label}.md").write_text(text)


if __name__ == "__main__":
    main()
