"""Tiny random configs of the ten diffusers transformers of issues 12 and 13, with example inputs.

Each builder returns ``(model, kwargs)``: the model in eval mode, fp32, random weights, and keyword
inputs for one forward (``return_dict=False``). Sizes are the smallest the model classes accept
(2 heads, head dims of 8-20, one block of each kind); Flux, SD3 and HunyuanVideo use guidance or
qk-norm options so that every block kind of the real checkpoints is present (SD3 with SD3.5's dual
attention in its first block and ``qk_norm="rms_norm"``). diffusers==0.42.1 (the test extras).
"""
from __future__ import annotations

from typing import Callable

import diffusers
import torch


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def flux(gen):
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True,
    )
    image, text = 16, 8
    return model, dict(
        hidden_states=_randn(gen, 1, image, 4), encoder_hidden_states=_randn(gen, 1, text, 32),
        pooled_projections=_randn(gen, 1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.randint(0, 4, (image, 3), generator=gen).float(), txt_ids=torch.zeros(text, 3),
    )


def sd3(gen):
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    return model, dict(hidden_states=_randn(gen, 1, 4, 8, 8), encoder_hidden_states=_randn(gen, 1, 6, 16),
                       pooled_projections=_randn(gen, 1, 16), timestep=torch.tensor([10]))


def wan(gen):
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )
    return model, dict(hidden_states=_randn(gen, 1, 4, 2, 8, 8), timestep=torch.tensor([10]),
                       encoder_hidden_states=_randn(gen, 1, 6, 16))


def hunyuan_video(gen):
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    return model, dict(hidden_states=_randn(gen, 1, 4, 1, 4, 4), timestep=torch.tensor([10]),
                       encoder_hidden_states=_randn(gen, 1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
                       pooled_projections=_randn(gen, 1, 8), guidance=torch.tensor([3.5]))


def cogvideox(gen):
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6,
    )
    return model, dict(hidden_states=_randn(gen, 1, 3, 4, 8, 8), encoder_hidden_states=_randn(gen, 1, 6, 16),
                       timestep=torch.tensor([10]))


def ltx(gen):
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, caption_channels=16,
    )
    frames, height, width = 2, 4, 4
    return model, dict(hidden_states=_randn(gen, 1, frames * height * width, 4),
                       encoder_hidden_states=_randn(gen, 1, 6, 16), timestep=torch.tensor([10]),
                       encoder_attention_mask=torch.ones(1, 6), num_frames=frames, height=height, width=width)


def sana(gen):
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8,
    )
    return model, dict(hidden_states=_randn(gen, 1, 4, 8, 8), encoder_hidden_states=_randn(gen, 1, 6, 16),
                       timestep=torch.tensor([10]))


def pixart(gen):
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16, norm_num_groups=1,
    )
    return model, dict(hidden_states=_randn(gen, 1, 4, 8, 8), encoder_hidden_states=_randn(gen, 1, 6, 16),
                       timestep=torch.tensor([10]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def qwen_image(gen):
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )
    return model, dict(hidden_states=_randn(gen, 1, 16, 16), encoder_hidden_states=_randn(gen, 1, 6, 16),
                       encoder_hidden_states_mask=torch.ones(1, 6), timestep=torch.tensor([0.5]),
                       img_shapes=[(1, 4, 4)])


def dit(gen):
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1, sample_size=8,
        patch_size=2, norm_num_groups=1, num_embeds_ada_norm=10,
    )
    return model, dict(hidden_states=_randn(gen, 1, 4, 8, 8), timestep=torch.tensor([10]),
                       class_labels=torch.tensor([1]))


BUILDERS: dict[str, Callable] = {
    "flux": flux, "sd3": sd3, "wan": wan, "hunyuan_video": hunyuan_video, "cogvideox": cogvideox, "ltx": ltx,
    "sana": sana, "pixart": pixart, "qwen_image": qwen_image, "dit": dit,
}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """``(model, forward kwargs)`` of the tiny ``name`` model, from ``seed``."""
    torch.manual_seed(seed)
    model, inputs = BUILDERS[name](torch.Generator().manual_seed(seed))
    return model.eval(), {**inputs, "return_dict": False}
