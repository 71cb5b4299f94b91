"""Site counts and the tiny configs they are derived from (tests/diffusers_models.py holds the capture tests' fixtures: other configs, with optional inputs). Tiny random configs of the ten diffusers transformers of issues 12 and 13, with example inputs.

Each builder returns ``(model, kwargs)``: the model in eval mode, fp32, random weights, and keyword
inputs for one forward (``return_dict=False``). Sizes are the smallest the model classes accept
(2 heads, head dims of 8-20, one block of each kind); Flux, SD3 and HunyuanVideo use guidance or
qk-norm options so that every block kind of the real checkpoints is present (SD3 with SD3.5's dual
attention in its first block and ``qk_norm="rms_norm"``). diffusers==0.42.1 (the test extras).
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Sites:
    """Sites in a model's code: ``modulations`` are ``LN(x) * (1 + scale) + shift``, ``gates``
    ``x + gate * f(...)``, ``qk`` q/k RMSNorm pairs feeding one attention, ``qk_rope`` those of them
    that diffusers' real-valued RoPE rotates right after the norm. ``unsupported``: sites
    of a family no fused op covers yet (``rms_modulate``: an RMSNorm modulated), ``qk_layernorm``
    q/k LayerNorm pairs. ``norms_left``: the LayerNorm/RMSNorm calls that stay in the graph
    once every supported site is fused (the unsupported sites' norms among them)."""

    modulations: int
    gates: int
    qk: int
    norms_left: int
    unsupported: dict = field(default_factory=dict)
    qk_rope: int = 0  # q/k pairs among ``qk`` rotated right after their norms, one table (qk_rmsnorm_rope)
    qk_layernorm: int = 0  # q/k LayerNorm pairs feeding one attention


def expected_sites(name: str, config) -> Sites:
    """The sites of the tiny ``name`` model's code, from its config (diffusers 0.42.1)."""
    c = config
    if name == "flux":
        # FluxTransformerBlock: norm1 + norm1_context (AdaLayerNormZero) and the two norm2 modulations
        # `norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]`; 4 gates (attn, ff, context attn,
        # context ff); q/k pairs: norm_q/norm_k and norm_added_q/norm_added_k. FluxSingleTransformerBlock:
        # 1 modulation (AdaLayerNormZeroSingle), 1 gate, 1 q/k pair. norm_out: AdaLayerNormContinuous.
        # RoPE (FluxAttnProcessor, apply_rotary_emb interleaved) right after the single blocks' norms; the
        # double blocks concatenate text and image q/k between norm and RoPE.
        return Sites(4 * c.num_layers + c.num_single_layers + 1, 4 * c.num_layers + c.num_single_layers,
                     2 * c.num_layers + c.num_single_layers, 0, qk_rope=c.num_single_layers)
    if name == "sd3":
        # JointTransformerBlock: norm1 (SD35AdaLayerNormZeroX: one LayerNorm, two modulations, in dual-attention
        # layers; AdaLayerNormZero otherwise), norm1_context (AdaLayerNormZero, or AdaLayerNormContinuous in the
        # last, context_pre_only block), norm2, and norm2_context unless context_pre_only. Gates: gate_msa,
        # gate_msa2 (dual), gate_mlp, and c_gate_msa + c_gate_mlp unless context_pre_only. q/k pairs
        # (qk_norm="rms_norm", diffusers RMSNorm): attn's image and added pairs, attn2's one pair (dual).
        # SD3Transformer2DModel builds its last block with context_pre_only=True (`i == num_layers - 1`).
        dual, pre_only, layers = len(c.dual_attention_layers), 1, c.num_layers
        return Sites(layers * 3 + dual + (layers - pre_only) + 1, layers * 2 + dual + 2 * (layers - pre_only),
                     2 * layers + dual, 0)
    if name == "wan":
        # WanTransformerBlock: norm1 and norm3 modulated (FP32LayerNorm, cast to fp32 and back), norm2 the
        # affine cross-attention norm (unmodulated); gates on attn1 and ffn; q/k pairs of attn1 and attn2
        # (qk_norm="rms_norm_across_heads": one RMSNorm over all heads; RoPE follows per head, written in place:
        # no qk_rmsnorm_rope). norm_out: FP32LayerNorm modulated.
        return Sites(2 * c.num_layers + 1, 2 * c.num_layers, 2 * c.num_layers, c.num_layers)
    if name == "hunyuan_video":
        # HunyuanVideoTransformerBlock: 4 modulations, 4 gates, 2 q/k pairs (image and added); single block:
        # 1 modulation, 1 gate, 1 q/k pair; the token refiner's blocks: 2 gates (HunyuanVideoAdaNorm) after
        # two unmodulated affine LayerNorms, attention without q/k norms. norm_out: AdaLayerNormContinuous.
        # RoPE right after the double blocks' image q/k norms; the single blocks rotate only the image
        # tokens (`query[:, :, :-encoder_len]`), not the norm's whole output.
        return Sites(4 * c.num_layers + c.num_single_layers + 1,
                     4 * c.num_layers + c.num_single_layers + 2 * c.num_refiner_layers,
                     2 * c.num_layers + c.num_single_layers, 2 * c.num_refiner_layers, qk_rope=c.num_layers)
    if name == "cogvideox":
        # CogVideoXBlock: norm1 and norm2 (CogVideoXLayerNormZero: `norm(x) * (1 + scale)[:, None, :] + shift`
        # on the video and the text stream each), 4 gates; q/k LayerNorms (qk_norm="layer_norm"), one pair.
        # norm_final (affine LayerNorm, unmodulated); norm_out: AdaLayerNorm `(1 + scale)[:, None, :]`.
        return Sites(4 * c.num_layers + 1, 4 * c.num_layers, 0, 1, qk_layernorm=c.num_layers)
    if name == "ltx":
        # LTXVideoTransformerBlock: norm1/norm2 are RMSNorms modulated `norm(x) * (1 + scale) + shift`
        # (rms modulation: no fused op yet), gates on attn1 and ff, q/k pairs of attn1 and attn2
        # (rms_norm_across_heads), attn1's rotated (LTX's apply_rotary_emb, interleaved, over all heads).
        # norm_out: LayerNorm `* (1 + scale) + shift`.
        return Sites(1, 2 * c.num_layers, 2 * c.num_layers, 2 * c.num_layers, {"rms_modulate": 2 * c.num_layers},
                     qk_rope=c.num_layers)
    if name == "sana":
        # SanaTransformerBlock: norm1, norm2 modulated, 2 gates, no q/k norms (qk_norm=None);
        # caption_norm (RMSNorm on the text input); norm_out: SanaModulatedNorm.
        return Sites(2 * c.num_layers + 1, 2 * c.num_layers, 0, 1)
    if name in ("pixart", "dit"):
        # BasicTransformerBlock (ada_norm_single / ada_norm_zero): norm1 and norm2 modulated, 2 gates,
        # no q/k norms; the output norm modulated (`norm_out(x) * (1 + scale) + shift`).
        return Sites(2 * c.num_layers + 1, 2 * c.num_layers, 0, 0)
    if name == "qwen_image":
        # QwenImageTransformerBlock: img/txt norm1 and norm2 modulated (4), 4 gates, q/k pairs: image and
        # added (QwenDoubleStreamAttnProcessor2_0, diffusers RMSNorm); txt_norm (RMSNorm on the text input);
        # norm_out: AdaLayerNormContinuous.
        return Sites(4 * c.num_layers + 1, 4 * c.num_layers, 2 * c.num_layers, 1)
    raise KeyError(name)
