"""Named Hunyuan3D-2 DiT configurations, the fusion sites each implies, and model construction."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, TypeVar

import torch
from torch import nn

MULTIVIEW_VIEWS = 4
"""Views assumed for hunyuan3d-2mv (front, left, back, right); each adds 1370 condition tokens."""

Model = TypeVar("Model", bound=nn.Module)


@dataclass(frozen=True)
class DiTConfig:
    """Constructor arguments of `Hunyuan3DDiT` plus the token counts of a typical input.

    The defaults are Hunyuan3D-2 (dit-v2-0). `sum(axes_dim)` must equal `hidden_size // num_heads`
    (the model checks it although it has no positional embedding).
    """

    in_channels: int = 64
    context_in_dim: int = 1536
    hidden_size: int = 1024
    mlp_ratio: float = 4.0
    num_heads: int = 16
    depth: int = 16
    depth_single_blocks: int = 32
    axes_dim: tuple[int, ...] = (64,)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False
    latent_tokens: int = 3072
    cond_tokens: int = 1370

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `Hunyuan3DDiT(...)` (ours or the official one)."""
        kwargs = asdict(self)
        del kwargs["latent_tokens"], kwargs["cond_tokens"]
        kwargs["axes_dim"] = list(self.axes_dim)
        return kwargs

    def expected_sites(self) -> dict[str, int]:
        """Fusion sites in a whole-model graph, by pattern family.

        layernorm_modulate: 4 per double block (2 streams x 2 norms), 1 per single block, 1 final.
        residual_gate: 4 per double block, 1 per single block.
        qk_rmsnorm (q/k pairs): 2 per double block, 1 per single block.
        gelu_cat: 1 per single block (`linear2(cat(attn, gelu(mlp)))`).
        qk_rmsnorm_cat: 1 per double block (both streams' q/k norms and the q, k, v cats; its two
        q/k pairs still count as qk_rmsnorm sites, folded into this call).
        """
        return {
            "layernorm_modulate": 4 * self.depth + self.depth_single_blocks + 1,
            "residual_gate": 4 * self.depth + self.depth_single_blocks,
            "qk_rmsnorm": 2 * self.depth + self.depth_single_blocks,
            "gelu_cat": self.depth_single_blocks,
            "qk_rmsnorm_cat": self.depth,
        }


_HUNYUAN3D_2 = DiTConfig()

CONFIGS: dict[str, DiTConfig] = {
    "hunyuan3d-2": _HUNYUAN3D_2,
    # 512 latent tokens is what the mini pipeline is believed to use; not confirmed.
    "hunyuan3d-2mini": replace(_HUNYUAN3D_2, depth=8, depth_single_blocks=16, latent_tokens=512),
    "hunyuan3d-2mv": replace(_HUNYUAN3D_2, cond_tokens=1370 * MULTIVIEW_VIEWS),
    "hunyuan3d-2-turbo": replace(_HUNYUAN3D_2, guidance_embed=True),
    # Every code path of the full model at a size CPU tests can run: head width 16 = sum(axes_dim).
    "tiny": DiTConfig(
        in_channels=8,
        context_in_dim=32,
        hidden_size=64,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(16,),
        latent_tokens=16,
        cond_tokens=8,
    ),
}


def get_config(config: str | DiTConfig) -> DiTConfig:
    """The config named `config` (a DiTConfig is returned as is); KeyError lists the names."""
    if isinstance(config, DiTConfig):
        return config
    try:
        return CONFIGS[config]
    except KeyError:
        raise KeyError(f"unknown DiT config {config!r}; valid names: {', '.join(CONFIGS)}") from None


def instantiate(
    model_cls: type[Model],
    config: str | DiTConfig,
    *,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> Model:
    """`model_cls(**config.model_kwargs())` with its parameters created on `device`, then cast.

    `device="meta"` allocates nothing and initialises nothing (instant even for 1.1B parameters):
    enough for structure, state_dict keys/shapes and fake-tensor tracing, not for running.
    """
    kwargs = get_config(config).model_kwargs()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = model_cls(**kwargs)
    return model.to(dtype=dtype) if dtype is not None else model
