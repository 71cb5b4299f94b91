"""torch.compile with fusion_pass as the backend: Dynamo hands every graph it captures to
the pass, which fuses it and passes it on to an inner compiler.

    torch.compile(model, backend="fusion_pass")                 # by name; inner compiler: Inductor
    backend = fusion_pass.backend(inner="eager")                # or pick the inner compiler
    torch.compile(model, backend=backend); backend.report       # what it fused, once it has run

Dynamo captures the whole model as one graph, so a block's last gated residual also chains
into the next block's LayerNorm + modulate: the counts per family differ from
``fusion_pass.optimize``'s, the totals do not.

    python examples/compile_backend.py                          # tiny, CPU, inner "eager": seconds
    python examples/compile_backend.py --by-name                # also backend="fusion_pass" (Inductor: ~30 s on a CPU)
    python examples/compile_backend.py --config hunyuan3d-2 --device cuda --dtype float16   # inner "inductor"

``backend="fusion_pass"`` is ``fusion_pass.backend(inner="inductor")`` registered under a name;
it keeps one process-wide report (``fusion_pass.dynamo_backend.last_report()``).
"""
from __future__ import annotations

import sys
import time

import torch
from rich.console import Console

import fusion_pass
from fusion_pass.dynamo_backend import INNER_COMPILERS, last_report
from common import DTYPES, build, model_parser
from reference_models import example_inputs, get_config

# max|compiled - eager| / max|eager| allowed per dtype (fused kernels keep fp32 statistics).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def parse_args(argv):
    parser = model_parser(__doc__)
    parser.add_argument("--inner", choices=INNER_COMPILERS,
                        help='compiler the fused graph goes to (default: "inductor" on CUDA, "eager" on the CPU, '
                             "where Inductor takes ~30 s to compile even the tiny model)")
    parser.add_argument("--by-name", action="store_true",
                        help='also compile with backend="fusion_pass", whose inner compiler is Inductor (a second '
                             "compile: ~30 s for the tiny model on a CPU, 60-85 s for Hunyuan3D-2 on a GPU)")
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    args.inner = args.inner or ("inductor" if on_cuda else "eager")
    return args


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def compile_and_run(model, backend, inputs, device):
    """Compile ``model`` with ``backend``, call it once (which compiles), return (output, seconds)."""
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():
        output = inputs.call(compiled)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return output, time.perf_counter() - start


def totals_line(report, config) -> str:
    """Fused sites per family, chained sites counted toward both halves, against the config."""
    totals = report.totals()
    parts = [f"{family} {totals.get(family, 0)}/{expected}" for family, expected in config.expected_sites().items()]
    return "fused/expected: " + ", ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = get_config(args.config)

    model = build(args)
    inputs = example_inputs(config, dtype=dtype, device=device, seed=0)
    with torch.no_grad():
        expected = inputs.call(model)  # eager, unfused

    ok = True
    # A backend object: choose the inner compiler, read its report after the first call.
    backend = fusion_pass.backend(inner=args.inner)
    output, seconds = compile_and_run(model, backend, inputs, device)
    console.print(backend.report)
    error = relative_error(output, expected)
    ok &= error <= TOLERANCE[args.dtype] and backend.report.total > 0
    console.print(f'fusion_pass.backend(inner="{args.inner}"): {backend.graphs_compiled} graph(s), first call '
                  f"(compile + run) {seconds:.1f} s, {totals_line(backend.report, config)}, "
                  f"max relative error vs eager {error:.3g} (tolerance {TOLERANCE[args.dtype]:g})")

    # By name: the backend registered with Dynamo. Its report is process-wide (every model
    # compiled with it adds to it), which is why keeping a backend object is handier.
    if args.by_name:
        torch._dynamo.reset()  # forget the compiled code above, so this call compiles afresh
        output, seconds = compile_and_run(model, "fusion_pass", inputs, device)
        error = relative_error(output, expected)
        ok &= error <= TOLERANCE[args.dtype]
        console.print(f'backend="fusion_pass" (inner "inductor"): first call {seconds:.1f} s, '
                      f"{totals_line(last_report(), config)}, max relative error vs eager {error:.3g}")
    else:
        console.print('backend="fusion_pass" (inner "inductor") skipped: pass --by-name to run it too')
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
