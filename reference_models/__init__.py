"""Hunyuan3D-2 shape DiTs for fusion_pass: our clean-room twin, the official file, configs, inputs.

    model = build_model("tiny")                     # ours, random weights
    official = load_official("tiny")                # the installed hy3dgen file, same structure
    official.load_state_dict(model.state_dict())    # strict: names and shapes agree
    out = example_inputs("tiny", seed=0).call(model)

Full-size models have 0.6-1.1B parameters: random initialisation on the CPU takes a while and fp32
needs 4.4 GB. Pass device="meta" for structure-only uses (module tree, state_dict keys and shapes).
"""

from __future__ import annotations

from typing import Optional

import torch

from .configs import CONFIGS, DiTConfig, get_config, instantiate
from .hunyuan3d_dit import Hunyuan3DDiT
from .inputs import DiTInputs, example_inputs
from .official import INSTALL_HINT, load_official, official_file, official_module

__all__ = [
    "CONFIGS",
    "DiTConfig",
    "DiTInputs",
    "Hunyuan3DDiT",
    "INSTALL_HINT",
    "build_model",
    "example_inputs",
    "get_config",
    "load_official",
    "official_file",
    "official_module",
]


def build_model(
    config: str | DiTConfig,
    *,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> Hunyuan3DDiT:
    """Our `Hunyuan3DDiT` built from a named config or a DiTConfig, randomly initialised.

    `device="meta"` gives structure only, instantly (see `configs.instantiate`).
    """
    return instantiate(Hunyuan3DDiT, config, device=device, dtype=dtype)
