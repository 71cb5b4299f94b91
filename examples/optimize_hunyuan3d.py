"""Optimize the Hunyuan3D-2 DiT in place with one call, check that it computes what it did
before, and that its checkpoints did not change.

    python examples/optimize_hunyuan3d.py                 # tiny config on the CPU: seconds
    python examples/optimize_hunyuan3d.py --official      # the installed hy3dgen file instead of ours
    python examples/optimize_hunyuan3d.py --config hunyuan3d-2 --device cuda --dtype float16

The model is built with random weights (the pass does not care about their values); with a
real checkpoint, load it before or after ``optimize`` -- the state_dict is the same either way.
"""
from __future__ import annotations

import copy
import io
import sys

import torch
from rich.console import Console

import fusion_pass
from common import DTYPES, build, model_parser
from reference_models import example_inputs

# max|optimized - original| / max|original| allowed per dtype: the fused kernels keep their
# statistics in fp32 where eager PyTorch rounds every intermediate to the model's dtype.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def parse_args(argv):
    parser = model_parser(__doc__)
    parser.add_argument("--batch", type=int, default=2, help="batch size; 2 is classifier-free guidance (default: %(default)s)")
    return parser.parse_args(argv)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build(args)
    original = copy.deepcopy(model)  # an unoptimized twin with the same weights

    # The one line: rewrite the model's forward to call fused kernels, in place.
    fusion_pass.optimize(model)
    console.print(fusion_pass.report(model))

    # Same outputs as the original, on the inputs of one denoising step.
    inputs = example_inputs(args.config, batch=args.batch, dtype=dtype, device=device, seed=0)
    with torch.inference_mode():
        expected = inputs.call(original)
        actual = inputs.call(model)
    error = relative_error(actual, expected)
    outputs_ok = error <= TOLERANCE[args.dtype]
    console.print(f"outputs: max relative error vs the unoptimized model {error:.3g} "
                  f"(tolerance {TOLERANCE[args.dtype]:g}): {'ok' if outputs_ok else 'TOO LARGE'}")

    # Checkpoints: the optimized model saves exactly the keys, shapes and values of the original,
    # and they load strictly into a fresh, unoptimized model that then computes the original output.
    state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = build(args)  # same seed, but the weights come from the checkpoint below
    fresh.load_state_dict(torch.load(buffer, map_location=device), strict=True)
    with torch.inference_mode():
        reloaded = inputs.call(fresh)
    same_keys = list(state) == list(original.state_dict())
    reload_error = relative_error(reloaded, expected)
    round_trip_ok = same_keys and reload_error <= TOLERANCE[args.dtype]
    console.print(f"state_dict round trip: {len(state)} tensors ({buffer.getbuffer().nbytes / 1e6:.1f} MB), "
                  f"same keys as the original: {same_keys}; loaded strictly into a fresh unoptimized model, "
                  f"whose output differs from the original's by {reload_error:.3g}: "
                  f"{'ok' if round_trip_ok else 'FAILED'}")

    return 0 if outputs_ok and round_trip_ok else 1


if __name__ == "__main__":
    sys.exit(main())
