"""Random inputs of the shapes a Hunyuan3D DiT sees in one denoising step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .configs import DiTConfig, get_config

DEFAULT_GUIDANCE = 5.0
"""Guidance scale of the official pipeline, fed to guidance-distilled (turbo) models."""


@dataclass(frozen=True, eq=False)
class DiTInputs:
    """One call's inputs: `model(x, t, contexts, **kwargs)`.

    x [B, latent_tokens, in_channels]; t [B]; contexts {"main": [B, cond_tokens, context_in_dim]};
    kwargs {"guidance": [B]} for guidance_embed configs, else empty.
    """

    x: Tensor
    t: Tensor
    contexts: dict[str, Tensor]
    kwargs: dict[str, Tensor]

    @property
    def args(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The positional arguments, e.g. for `torch.export.export(model, inputs.args, inputs.kwargs)`."""
        return self.x, self.t, self.contexts

    def call(self, model: nn.Module) -> Any:
        """`model(*self.args, **self.kwargs)`."""
        return model(*self.args, **self.kwargs)


def example_inputs(
    config: str | DiTConfig,
    batch: int = 2,
    *,
    latents: Optional[int] = None,
    cond_tokens: Optional[int] = None,
    guidance: float = DEFAULT_GUIDANCE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: Optional[int] = None,
) -> DiTInputs:
    """Standard-normal x and condition, t uniform in [0, 1), guidance = `guidance` when needed.

    Token counts default to the config's. Values are drawn in fp32 on the CPU (from `seed` when given,
    else from the global generator) and then cast and moved, so a seed gives the same values in every
    dtype and on every device (on "meta", shapes only). batch=2 matches classifier-free guidance.
    guidance has `dtype` too: the model embeds it without casting, so it must match the weights.
    """
    config = get_config(config)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def draw(sample, *shape: int) -> Tensor:
        return sample(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    latent_tokens = config.latent_tokens if latents is None else latents
    cond_tokens = config.cond_tokens if cond_tokens is None else cond_tokens
    x = draw(torch.randn, batch, latent_tokens, config.in_channels)
    t = draw(torch.rand, batch)
    cond = draw(torch.randn, batch, cond_tokens, config.context_in_dim)
    kwargs = {"guidance": torch.full((batch,), guidance, dtype=dtype, device=device)} if config.guidance_embed else {}
    return DiTInputs(x=x, t=t, contexts={"main": cond}, kwargs=kwargs)
