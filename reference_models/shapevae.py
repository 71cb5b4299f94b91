"""hy3dgen's ShapeVAE decoder parts (the same ``hy3dgen==2.0.2`` wheel as the DiT), loaded by path.

``hy3dgen/shapegen/models/autoencoders/`` imports its siblings relatively (``.attention_processors``,
``...utils.logger``) and its ``model.py`` imports scikit-image for surface extraction; the package
``__init__``s import pymeshlab, trimesh, cv2, diffusers and transformers. So the folder is mounted
as a private package whose ``utils`` holds only a logger, and only ``attention_blocks`` (the
transformer and the geometry decoder) and ``volume_decoders`` are imported. ``ShapeVAEDecoder``
assembles what ``ShapeVAE.decode`` + its volume decoding run, from those classes, unmodified.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
import types
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from .official import official_file

_PACKAGE = "_fusion_pass_shapevae"


@functools.cache
def autoencoder_module(name: str) -> ModuleType:
    """``attention_blocks`` or ``volume_decoders`` of the installed wheel's autoencoders folder."""
    folder = official_file().parents[1] / "autoencoders"
    for package, path in ((_PACKAGE, []), (f"{_PACKAGE}.models", []), (f"{_PACKAGE}.models.autoencoders", [str(folder)])):
        module = sys.modules.setdefault(package, types.ModuleType(package))
        module.__path__ = path
    utils = sys.modules.setdefault(f"{_PACKAGE}.utils", types.ModuleType(f"{_PACKAGE}.utils"))
    utils.logger = logging.getLogger("hy3dgen")
    return importlib.import_module(f"{_PACKAGE}.models.autoencoders.{name}")


@dataclass(frozen=True)
class ShapeVAEConfig:
    """Hunyuan3D-2's VAE (``hunyuan3d-vae-v2-0`` config as published: 3072 latents of 64 channels,
    width 1024, 16 heads, 16 decoder layers, q/k LayerNorm, no qkv bias, Fourier 8 freqs without pi)."""

    num_latents: int = 3072
    embed_dim: int = 64
    width: int = 1024
    heads: int = 16
    num_decoder_layers: int = 16
    num_freqs: int = 8
    include_pi: bool = False
    qkv_bias: bool = False
    qk_norm: bool = True


class ShapeVAEDecoder(nn.Module):
    """``post_kl`` -> ``Transformer`` (``ShapeVAE.decode``) and the ``CrossAttentionDecoder`` that the
    volume decoders call per chunk of query points (``geo_decoder``)."""

    def __init__(self, cfg: ShapeVAEConfig = ShapeVAEConfig()):
        super().__init__()
        blocks = autoencoder_module("attention_blocks")
        self.post_kl = nn.Linear(cfg.embed_dim, cfg.width)
        self.transformer = blocks.Transformer(n_ctx=cfg.num_latents, width=cfg.width, layers=cfg.num_decoder_layers,
                                              heads=cfg.heads, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm)
        self.geo_decoder = blocks.CrossAttentionDecoder(
            fourier_embedder=blocks.FourierEmbedder(num_freqs=cfg.num_freqs, include_pi=cfg.include_pi),
            out_channels=1, num_latents=cfg.num_latents, mlp_expand_ratio=4, downsample_ratio=1,
            enable_ln_post=True, width=cfg.width, heads=cfg.heads, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
            label_type="binary")

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, num_latents, embed_dim] -> [B, num_latents, width] (``ShapeVAE.forward``/``decode``)."""
        return self.transformer(self.post_kl(latents))

    def volume(self, latents: torch.Tensor, octree_resolution: int, num_chunks: int = 8000) -> torch.Tensor:
        """The dense grid's logits ([B, R+1, R+1, R+1]) by hy3dgen's ``VanillaVolumeDecoder``."""
        decoder = autoencoder_module("volume_decoders").VanillaVolumeDecoder()
        return decoder(latents, self.geo_decoder, num_chunks=num_chunks, octree_resolution=octree_resolution,
                       enable_pbar=False)
