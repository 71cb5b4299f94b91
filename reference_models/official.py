"""The official Hunyuan3D DiT file from the installed `hy3dgen` wheel, loaded by path.

Importing `hy3dgen.shapegen...` would run package `__init__`s that need pymeshlab, trimesh, cv2,
diffusers and transformers; the DiT file itself needs only torch and einops. So the file is found
from `hy3dgen`'s package location without importing the package, and executed on its own under a
private module name.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch import nn

from .configs import DiTConfig, instantiate

INSTALL_HINT = "pip install --no-deps hy3dgen==2.0.2"
_DIT_FILE = Path("shapegen", "models", "denoisers", "hunyuan3ddit.py")
_MODULE_NAME = "_fusion_pass_official_hunyuan3ddit"


def official_file() -> Path:
    """Path of `hunyuan3ddit.py` in the installed `hy3dgen`; ModuleNotFoundError says how to install."""
    spec = importlib.util.find_spec("hy3dgen")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the official Hunyuan3D DiT needs the hy3dgen package; install it without its "
            f"dependencies: {INSTALL_HINT}",
            name="hy3dgen",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DIT_FILE
    if not path.is_file():
        raise ModuleNotFoundError(f"hy3dgen is installed but has no {_DIT_FILE}; reinstall: {INSTALL_HINT}")
    return path


def official_module() -> ModuleType:
    """The official DiT module (classes `Hunyuan3DDiT`, `DoubleStreamBlock`, ...), loaded once per path."""
    return _load_by_path(official_file())


@functools.cache
def _load_by_path(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODULE_NAME]
        raise
    return module


def load_official(
    config: str | DiTConfig,
    *,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """The official `Hunyuan3DDiT` built from a named config or a DiTConfig, randomly initialised.

    `device="meta"` gives structure only (see `configs.instantiate`).
    """
    return instantiate(official_module().Hunyuan3DDiT, config, device=device, dtype=dtype)
