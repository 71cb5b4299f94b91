"""Tiny random configs of the ten diffusers transformers of issues 12 and 13 (diffusers 0.42.1),
shared by the capture, mutation and pattern tests, ``scripts/diffusers_table.py`` and the CLI
(``fusion-pass inspect diffusers:flux``). Needs diffusers (the test extra): imported on demand,
never by ``reference_models`` itself.

``MODELS[name]`` is a :class:`TinyModel`: ``build(seed)`` makes the model (seeded, fp32, eval mode,
well under a second), ``inputs(seed)`` the keyword inputs of one call (``return_dict=False``),
``optional(seed)`` extra keyword inputs a user passes on some calls only (masks, guidance,
controlnet residuals, attention kwargs), ``blocks`` the dotted paths of the ``ModuleList``s holding
its transformer blocks (lengths from the config: ``num_layers``, ``num_single_layers``,
``num_refiner_layers``), and ``expected_sites(name, model.config)`` the fusable sites of its code,
derived from the config and diffusers' source.

Sizes are the smallest the model classes accept (2 heads, head dims of 8-16, one block of each
kind); Flux, SD3 and HunyuanVideo use guidance or qk-norm options so that every block kind of the
real checkpoints is present (SD3 with SD3.5's dual attention in its first block and
``qk_norm="rms_norm"``). SD3 has two blocks (its last is ``context_pre_only``), Sana two (its
controlnet residuals are added after blocks 1.., never after block 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import diffusers
import torch


@dataclass(frozen=True)
class TinyModel:
    name: str
    config: Callable[[], torch.nn.Module]  # the tiny model, built from the global RNG
    example: Callable[[torch.Generator], dict]  # required inputs, drawn from the generator
    extra: Callable[[torch.Generator], dict]  # optional inputs, drawn from the generator
    blocks: tuple[str, ...]

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.config().eval()

    def inputs(self, seed: int = 0) -> dict:
        return {**self.example(torch.Generator().manual_seed(seed)), "return_dict": False}

    def optional(self, seed: int = 0) -> dict:
        return self.extra(torch.Generator().manual_seed(seed + 1))

    def block_count(self, model: torch.nn.Module) -> int:
        """Blocks the config asks for: the lengths of the block lists (``num_layers`` etc.)."""
        return sum(len(model.get_submodule(path)) for path in self.blocks)


def cast_inputs(inputs: dict, dtype: torch.dtype, device: torch.device | str | None = None) -> dict:
    """Keyword inputs with their floating tensors in ``dtype`` (position ids, ``*_ids``, stay as they
    are: diffusers computes RoPE tables from them) and every tensor on ``device`` (None: where it is)."""
    return {key: value.to(device=device, dtype=dtype)
            if torch.is_tensor(value) and value.is_floating_point() and not key.endswith("_ids")
            else value.to(device) if torch.is_tensor(value) and device is not None else value
            for key, value in inputs.items()}


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _text_mask(tokens: int) -> torch.Tensor:
    """A text mask with the last two tokens padded out."""
    mask = torch.ones(1, tokens)
    mask[:, -2:] = 0
    return mask


# --- Flux: 1 double + 1 single block, guidance ---------------------------------------------------

def _flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True,
    )


def _flux_inputs(gen):
    image, text = 16, 8
    return dict(
        hidden_states=_randn(gen, 1, image, 4), encoder_hidden_states=_randn(gen, 1, text, 32),
        pooled_projections=_randn(gen, 1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.randint(0, 4, (image, 3), generator=gen).float(), txt_ids=torch.zeros(text, 3),
    )


def _flux_optional(gen):
    # one residual per block: (batch, image tokens, heads * head dim)
    return dict(joint_attention_kwargs={}, controlnet_block_samples=[_randn(gen, 1, 16, 32)],
                controlnet_single_block_samples=[_randn(gen, 1, 16, 32)])


# --- SD3: SD3.5's dual attention in block 0, qk_norm, block 1 context_pre_only --------------------

def _sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def _sd3_inputs(gen):
    return dict(hidden_states=_randn(gen, 1, 4, 8, 8), encoder_hidden_states=_randn(gen, 1, 6, 16),
                pooled_projections=_randn(gen, 1, 16), timestep=torch.tensor([10]))


def _sd3_optional(gen):
    # added after the blocks that are not context_pre_only: (batch, (8 / 2)^2 patches, heads * head dim)
    return dict(block_controlnet_hidden_states=[_randn(gen, 1, 16, 16)], joint_attention_kwargs={})


# --- Wan ------------------------------------------------------------------------------------------

def _wan():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )


def _wan_inputs(gen):
    return dict(hidden_states=_randn(gen, 1, 4, 2, 8, 8), timestep=torch.tensor([10]),
                encoder_hidden_states=_randn(gen, 1, 6, 16))


# --- HunyuanVideo: 1 double, 1 single, 1 token-refiner block, guidance ----------------------------

def _hunyuan_video():
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )


def _hunyuan_video_inputs(gen):
    return dict(hidden_states=_randn(gen, 1, 4, 1, 4, 4), timestep=torch.tensor([10]),
                encoder_hidden_states=_randn(gen, 1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
                pooled_projections=_randn(gen, 1, 8), guidance=torch.tensor([3.5]))


# --- CogVideoX: 9 frames, 4x temporal compression -> 3 latent frames -----------------------------

def _cogvideox():
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6,
    )


def _cogvideox_inputs(gen):
    return dict(hidden_states=_randn(gen, 1, 3, 4, 8, 8), encoder_hidden_states=_randn(gen, 1, 6, 16),
                timestep=torch.tensor([10]))


# --- LTX-Video ------------------------------------------------------------------------------------

def _ltx():
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, caption_channels=16,
    )


def _ltx_inputs(gen):
    frames, height, width = 2, 4, 4
    return dict(hidden_states=_randn(gen, 1, frames * height * width, 4), encoder_hidden_states=_randn(gen, 1, 6, 16),
                timestep=torch.tensor([10]), encoder_attention_mask=torch.ones(1, 6), num_frames=frames,
                height=height, width=width)


def _ltx_optional(gen):
    return dict(attention_kwargs={}, rope_interpolation_scale=(1.0, 1.0, 1.0))


# --- Sana: 2 blocks (controlnet residuals join after block 1) -------------------------------------

def _sana():
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8,
    )


def _sana_inputs(gen):
    return dict(hidden_states=_randn(gen, 1, 4, 8, 8), encoder_hidden_states=_randn(gen, 1, 6, 16),
                timestep=torch.tensor([10]))


def _sana_optional(gen):
    # residual i is added after block i + 1: (batch, 8 * 8 patches of size 1, heads * head dim)
    return dict(encoder_attention_mask=_text_mask(6), attention_kwargs={},
                controlnet_block_samples=(_randn(gen, 1, 64, 16),))


# --- PixArt, DiT, QwenImage -----------------------------------------------------------------------

def _pixart():
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16, norm_num_groups=1,
    )


def _pixart_inputs(gen):
    return dict(hidden_states=_randn(gen, 1, 4, 8, 8), encoder_hidden_states=_randn(gen, 1, 6, 16),
                timestep=torch.tensor([10]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _pixart_optional(gen):
    return dict(encoder_attention_mask=_text_mask(6), cross_attention_kwargs={})


def _qwen_image():
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )


def _qwen_image_inputs(gen):
    return dict(hidden_states=_randn(gen, 1, 16, 16), encoder_hidden_states=_randn(gen, 1, 6, 16),
                encoder_hidden_states_mask=torch.ones(1, 6), timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)])


def _qwen_image_optional(gen):
    # one residual per block: (batch, image tokens, heads * head dim)
    return dict(attention_kwargs={}, controlnet_block_samples=[_randn(gen, 1, 16, 32)])


def _dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1, sample_size=8,
        patch_size=2, norm_num_groups=1, num_embeds_ada_norm=10,
    )


def _dit_inputs(gen):
    return dict(hidden_states=_randn(gen, 1, 4, 8, 8), timestep=torch.tensor([10]), class_labels=torch.tensor([1]))


def _attention_kwargs(gen):
    return dict(attention_kwargs={})


def _cross_attention_kwargs(gen):
    return dict(cross_attention_kwargs={})


_BLOCKS = ("transformer_blocks",)
MODELS: dict[str, TinyModel] = {m.name: m for m in (
    TinyModel("flux", _flux, _flux_inputs, _flux_optional, ("transformer_blocks", "single_transformer_blocks")),
    TinyModel("sd3", _sd3, _sd3_inputs, _sd3_optional, _BLOCKS),
    TinyModel("wan", _wan, _wan_inputs, _attention_kwargs, ("blocks",)),
    TinyModel("hunyuan_video", _hunyuan_video, _hunyuan_video_inputs, _attention_kwargs,
              ("transformer_blocks", "single_transformer_blocks", "context_embedder.token_refiner.refiner_blocks")),
    TinyModel("cogvideox", _cogvideox, _cogvideox_inputs, _attention_kwargs, _BLOCKS),
    TinyModel("ltx", _ltx, _ltx_inputs, _ltx_optional, _BLOCKS),
    TinyModel("sana", _sana, _sana_inputs, _sana_optional, _BLOCKS),
    TinyModel("pixart", _pixart, _pixart_inputs, _pixart_optional, _BLOCKS),
    TinyModel("qwen_image", _qwen_image, _qwen_image_inputs, _qwen_image_optional, _BLOCKS),
    TinyModel("dit", _dit, _dit_inputs, _cross_attention_kwargs, _BLOCKS),
)}


@dataclass(frozen=True)
class Sites:
    """Sites in a model's code: ``modulations`` are ``LN(x) * (1 + scale) + shift``, ``gates``
    ``x + gate * f(...)``, ``qk`` q/k RMSNorm pairs feeding one attention, ``qk_rope`` those of them
    that diffusers' real-valued RoPE rotates right after the norm (``modulations`` count RMSNorms
    modulated the same way), ``qk_layernorm`` q/k LayerNorm pairs. ``norms_left``: the
    LayerNorm/RMSNorm calls that stay in the graph once every site is fused."""

    modulations: int
    gates: int
    qk: int
    norms_left: int
    qk_rope: int = 0  # q/k pairs among ``qk`` rotated right after their norms, one table (qk_rmsnorm_rope)
    qk_cat_rope: int = 0  # joint attentions whose two streams' q/k pairs (among ``qk``) are concatenated,
    # then rotated by one table (qk_rmsnorm_cat_rope: one site folds two pairs)
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
        # double blocks concatenate text and image q/k (`torch.cat([encoder_query, query], dim=1)`) between
        # norm and RoPE: one joint site each, folding its two pairs.
        return Sites(4 * c.num_layers + c.num_single_layers + 1, 4 * c.num_layers + c.num_single_layers,
                     2 * c.num_layers + c.num_single_layers, 0, qk_rope=c.num_single_layers,
                     qk_cat_rope=c.num_layers)
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
        # tokens (`query[:, :, :-encoder_len]`), not the norm's whole output. The double blocks concatenate
        # the rotated image q/k with the text q/k after RoPE (`torch.cat([query, encoder_query], dim=2)`):
        # no qk_cat_rope (RoPE is not over the joint sequence).
        return Sites(4 * c.num_layers + c.num_single_layers + 1,
                     4 * c.num_layers + c.num_single_layers + 2 * c.num_refiner_layers,
                     2 * c.num_layers + c.num_single_layers, 2 * c.num_refiner_layers, qk_rope=c.num_layers)
    if name == "cogvideox":
        # CogVideoXBlock: norm1 and norm2 (CogVideoXLayerNormZero: `norm(x) * (1 + scale)[:, None, :] + shift`
        # on the video and the text stream each), 4 gates; q/k LayerNorms (qk_norm="layer_norm"), one pair.
        # norm_final (affine LayerNorm, unmodulated); norm_out: AdaLayerNorm `(1 + scale)[:, None, :]`.
        return Sites(4 * c.num_layers + 1, 4 * c.num_layers, 0, 1, qk_layernorm=c.num_layers)
    if name == "ltx":
        # LTXVideoTransformerBlock: norm1/norm2 are RMSNorms (elementwise_affine=False) modulated
        # `norm(x) * (1 + scale) + shift` (rmsnorm_scale_shift, counted as modulations), gates on attn1
        # and ff, q/k pairs of attn1 and attn2 (rms_norm_across_heads), attn1's rotated (LTX's
        # apply_rotary_emb, interleaved, over all heads). norm_out: LayerNorm `* (1 + scale) + shift`.
        return Sites(2 * c.num_layers + 1, 2 * c.num_layers, 2 * c.num_layers, 0, qk_rope=c.num_layers)
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
        # norm_out: AdaLayerNormContinuous. Each stream is rotated on its own (complex form,
        # apply_rotary_emb_qwen(use_real=False), its own table) before the joint cat: no qk_rope, no qk_cat_rope.
        return Sites(4 * c.num_layers + 1, 4 * c.num_layers, 2 * c.num_layers, 1)
    raise KeyError(name)
