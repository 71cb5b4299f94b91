"""Why a model root FX cannot trace is not compiled whole with its blocks as nested compile regions.

    PYTHONPATH=. python3 scripts/nested_region_repro.py

Tried for issue 12 (the final ``norm_out`` modulation in the root forward of PixArt, DiT, LTX
and Wan): ``torch.compile(root, fullgraph=True)`` with each block's forward wrapped in
``torch.compiler.nested_compile_region`` keeps the graph near one block per class (a 24-block tiny
PixArt: 3.97 s vs 5.99 s inlined, 2-core CPU) and fuses the root's own sites. But on torch
2.13.0+cpu the reuse of a region can be wrong: in a tiny SD3 (diffusers 0.42.1) whose two blocks'
``ff.net[0]`` (diffusers ``GELU``: a ``Linear`` then GELU) are wrapped, the second call of the
region is passed the *first* block's parameters (the graph's ``invoke_subgraph_1`` reads
``transformer_blocks[0].ff...weight``), and the output differs from eager (relative error ~4e-2);
Flux, CogVideoX and HunyuanVideo blocks fail outright ("Higher order ops do not support
aliasing"). Printed: the relative error of each setting against eager (0 when sound).
"""
from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference_models.diffusers_tiny import MODELS  # noqa: E402


def compiled_error(paths: list[str]) -> float:
    tiny = MODELS["sd3"]
    original = tiny.build()
    model = copy.deepcopy(original)
    regions = {}
    for path in paths:
        block = model.get_submodule(path)
        cls = type(block)
        regions.setdefault(cls, torch.compiler.nested_compile_region(cls.forward))
        block.forward = types.MethodType(regions[cls], block)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lambda gm, example_inputs: gm.forward, fullgraph=True)
    with torch.no_grad():
        out, ref = compiled(**tiny.inputs())[0], original(**tiny.inputs())[0]
    return ((out - ref).norm() / ref.norm()).item()


if __name__ == "__main__":
    print("torch", torch.__version__)
    for paths in (["transformer_blocks.0", "transformer_blocks.1"],
                  ["transformer_blocks.0.ff.net.0", "transformer_blocks.0.ff_context.net.0"],
                  ["transformer_blocks.0.ff.net.0", "transformer_blocks.1.ff.net.0"]):
        print(f"{compiled_error(paths):.3e}  regions: {', '.join(paths)}")
