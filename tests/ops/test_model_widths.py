"""Every fused op takes its kernel at the widths of the models people run, not silently its reference.

The report counts a matched site as fused (a graph rewrite); an op that declines its kernel at
run time runs its PyTorch reference (`gelu_cat` did on Flux-dev's 12288-wide MLP half until its
rows were cut into column chunks). Each op that a model's families emit is called here at that
model's real widths, in the layout the model passes it (recorded from the Dynamo graphs of the
tiny models of `reference_models/diffusers_tiny.py`: `[B, 1, D]` modulation chunks; q/k as
`[B, H, L, D]` views, `[B, L, H, D]` projections or `[B, L, H * D]` rows normed across heads), under
the interpreter with two tokens (only widths and layouts decide), and must launch its kernel once
and match its reference.

Audit result (diffusers 0.42.1): every op takes its kernel at every width below; none runs its
reference. No q/k op meets a head dim of 72 (PixArt, DiT-XL/2 have no q/k norm); widths that are
not powers of two (hidden sizes 1152, 1536, 2240, 2432, 3072, 5120; Wan 14B's q/k rows across
heads, 5120) are masked columns of a power-of-two block, as any width is; the widest row, Flux's and
HunyuanVideo's 12288-wide MLP half, is cut into column chunks by gelu_cat.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fusion_pass.ops as ops
from ops_testing import OP_CASES, outputs, randn, rope_tables, sequence_major

# The interpreter's numpy exp overflows to inf for very negative inputs of GELU's tanh form, as meant.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@dataclass(frozen=True)
class Widths:
    hidden: int  # the residual stream, what the modulations, gates and norms of a block see
    heads: int
    head_dim: int
    mlp: int = 0  # the single-stream blocks' MLP half, `cat((attn, gelu(mlp)))` (0: none)


# Each model's published transformer config; `diffusers 0.42.1 defaults` are the `@register_to_config`
# defaults of the model class in diffusers/models/transformers/, which are the named checkpoint's.
MODELS = {
    # reference_models.configs.DiTConfig defaults (Hunyuan3D-2 dit-v2-0): hidden 1024, 16 heads, mlp_ratio 4.
    "hunyuan3d-2": Widths(1024, 16, 64, mlp=4096),
    # reference_models.shapevae.ShapeVAEConfig (hunyuan3d-vae-v2-0 as published): width 1024, 16 heads.
    "shapevae": Widths(1024, 16, 64),
    # FluxTransformer2DModel, diffusers 0.42.1 defaults = FLUX.1-dev's transformer/config.json:
    # num_attention_heads 24, attention_head_dim 128; FluxSingleTransformerBlock mlp_ratio 4.0 -> 12288.
    "flux-dev": Widths(3072, 24, 128, mlp=12288),
    # stabilityai/stable-diffusion-3-medium-diffusers (and -3.5-medium) transformer/config.json:
    # num_attention_heads 24, attention_head_dim 64 (3.5-medium: qk_norm "rms_norm", dual attention).
    "sd3-medium": Widths(1536, 24, 64),
    # stabilityai/stable-diffusion-3.5-large transformer/config.json: num_attention_heads 38,
    # attention_head_dim 64, qk_norm "rms_norm".
    "sd3.5-large": Widths(2432, 38, 64),
    # Wan-AI Wan2.1-T2V-1.3B (config.json: dim 1536, num_heads 12, ffn_dim 8960; diffusers: 12 x 128,
    # qk_norm "rms_norm_across_heads").
    "wan2.1-1.3b": Widths(1536, 12, 128),
    # WanTransformer3DModel, diffusers 0.42.1 defaults = Wan2.1-T2V-14B: 40 heads x 128, ffn_dim 13824.
    "wan2.1-14b": Widths(5120, 40, 128),
    # HunyuanVideoTransformer3DModel, diffusers 0.42.1 defaults (hunyuanvideo-community/HunyuanVideo):
    # 24 heads x 128, mlp_ratio 4.0 (single blocks: proj_mlp 12288), qk_norm "rms_norm".
    "hunyuan-video": Widths(3072, 24, 128, mlp=12288),
    # THUDM/CogVideoX-5b transformer/config.json: num_attention_heads 48, attention_head_dim 64,
    # norm_elementwise_affine true (q/k LayerNorms, affine).
    "cogvideox-5b": Widths(3072, 48, 64),
    # LTXVideoTransformer3DModel, diffusers 0.42.1 defaults (Lightricks/LTX-Video): 32 heads x 64,
    # qk_norm "rms_norm_across_heads".
    "ltx-video": Widths(2048, 32, 64),
    # SanaTransformer2DModel, diffusers 0.42.1 defaults (Sana 1600M): 70 heads x 32, qk_norm None.
    "sana-1600m": Widths(2240, 70, 32),
    # PixArtTransformer2DModel defaults (PixArt-alpha and -sigma XL/2): 16 heads x 72, no q/k norm.
    "pixart": Widths(1152, 16, 72),
    # QwenImageTransformer2DModel, diffusers 0.42.1 defaults (Qwen/Qwen-Image): 24 heads x 128.
    "qwen-image": Widths(3072, 24, 128),
    # DiTTransformer2DModel defaults (facebook/DiT-XL-2-256 and -512): 16 heads x 72, no q/k norm.
    "dit-xl-2": Widths(1152, 16, 72),
}

TOKENS = 2


Make = Callable[[Widths, torch.dtype, str], tuple]
"""Builds an op's arguments at a model's widths, in a dtype, on a device."""


def _rows(op: str, affine: bool = False) -> Make:
    """A row op over `[1, L, hidden]` with `[1, 1, hidden]` modulation chunks (affine LayerNorm: CogVideoX)."""
    def make(w: Widths, dtype: torch.dtype, device: str) -> tuple:
        extra = (affine,) if affine else ()
        return OP_CASES[op].make_args((1, TOKENS, w.hidden), dtype, "chunk", device, *extra)
    return make


def _heads_first(op: str) -> Make:
    """q/k as `[B, H, L, D]` views of one qkv projection (SD3, CogVideoX, Hunyuan3D-2, ShapeVAE)."""
    return lambda w, dtype, device: OP_CASES[op].make_args((1, w.heads, TOKENS, w.head_dim), dtype, "unused", device)


def _weight(d: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return randn(d, dtype=dtype, scale=0.5, mean=1.0, device=device)


def _tables(d: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved cos/sin `[L, d]`, fp32 as diffusers' position embedders make them."""
    return rope_tables(TOKENS, d, "interleaved", torch.promote_types(dtype, torch.float32), device)


def _sequence_major(w: Widths, dtype: torch.dtype, device: str) -> tuple:
    """qk_rmsnorm of `[B, L, H, D]` projections (HunyuanVideo's single blocks and text q/k, QwenImage)."""
    q, k = (sequence_major(1, TOKENS, w.heads, w.head_dim, dtype, device) for _ in "qk")
    return (q, k, _weight(w.head_dim, dtype, device), _weight(w.head_dim, dtype, device), 1e-6)


def _across_heads(w: Widths, dtype: torch.dtype, device: str) -> tuple:
    """qk_rmsnorm of `[B, L, H * D]` rows (Wan, LTX: `rms_norm_across_heads`); k of cross-attention
    has the text's tokens."""
    q, k = (randn(1, length, w.hidden, dtype=dtype, device=device) for length in (TOKENS, TOKENS + 1))
    return (q, k, _weight(w.hidden, dtype, device), _weight(w.hidden, dtype, device), 1e-6)


def _rope_sequence_major(w: Widths, dtype: torch.dtype, device: str) -> tuple:
    """qk_rmsnorm_rope of `[B, L, H, D]` projections with `[1, L, 1, D]` tables (Flux's single blocks,
    HunyuanVideo's double blocks: diffusers' interleaved real form)."""
    q, k, q_weight, k_weight, eps = _sequence_major(w, dtype, device)
    cos, sin = _tables(w.head_dim, dtype, device)
    return (q, k, q_weight, k_weight, eps, cos[None, :, None], sin[None, :, None], True)


def _rope_across_heads(w: Widths, dtype: torch.dtype, device: str) -> tuple:
    """qk_rmsnorm_rope of `[B, L, H * D]` rows with `[1, L, H * D]` tables (LTX-Video's attn1)."""
    q, k = (randn(1, TOKENS, w.hidden, dtype=dtype, device=device) for _ in "qk")
    cos, sin = _tables(w.hidden, dtype, device)
    return (q, k, _weight(w.hidden, dtype, device), _weight(w.hidden, dtype, device), 1e-6, cos[None], sin[None], True)


def _joint_rope(w: Widths, dtype: torch.dtype, device: str) -> tuple:
    """qk_rmsnorm_cat_rope of two `[B, L, H, D]` streams joined on the tokens (Flux's double blocks)."""
    return OP_CASES["qk_rmsnorm_cat_rope"].make_args((1, TOKENS, w.heads, w.head_dim), dtype, "unused", device)


def _joint_qkv(w: Widths, dtype: torch.dtype, device: str) -> tuple:
    """qk_rmsnorm_cat of two streams' `[B, H, L, D]` q, k, v views joined on the tokens
    (Hunyuan3D-2's double blocks: text, then image; q/k cast to v's dtype)."""
    streams = []
    for length in (TOKENS, TOKENS + 1):
        qkv = randn(1, length, 3 * w.heads * w.head_dim, dtype=dtype, scale=2.0, mean=0.5, device=device)
        streams += qkv.reshape(1, length, 3, w.heads, w.head_dim).permute(2, 0, 3, 1, 4)
    return (*streams, *(_weight(w.head_dim, dtype, device) for _ in range(4)), 1e-6, 2, True)


def _gelu_cat(w: Widths, dtype: torch.dtype, device: str) -> tuple:
    """The single blocks' `cat((attn, gelu(mlp)), -1)`: attn `[1, L, hidden]`, mlp the strided
    `[1, L, mlp]` split of linear1's output."""
    linear1 = randn(1, TOKENS, 3 * w.hidden + w.mlp, dtype=dtype, scale=3.0, device=device)
    attn = randn(1, TOKENS, w.hidden, dtype=dtype, scale=2.0, device=device)
    return attn, linear1[..., 3 * w.hidden:], -1, "tanh"


ROWS = [("layernorm_scale_shift", _rows("layernorm_scale_shift")), ("residual_gate", _rows("residual_gate")),
        ("residual_gate_layernorm_scale_shift", _rows("residual_gate_layernorm_scale_shift"))]
AFFINE_ROWS = [("layernorm_scale_shift", _rows("layernorm_scale_shift", affine=True)),
               ("residual_gate", _rows("residual_gate")),
               ("residual_gate_layernorm_scale_shift", _rows("residual_gate_layernorm_scale_shift", affine=True))]

# The ops each model's families emit (the Dynamo graphs of its tiny config; the model's code says why:
# `reference_models.diffusers_tiny.expected_sites`).
MODEL_OPS: dict[str, list[tuple[str, Make]]] = {
    "hunyuan3d-2": [*ROWS, ("qk_rmsnorm", _heads_first("qk_rmsnorm")), ("qk_rmsnorm_cat", _joint_qkv),
                    ("gelu_cat", _gelu_cat)],
    "shapevae": [("residual_add_layernorm", _rows("residual_add_layernorm")),
                 ("qk_layernorm", _heads_first("qk_layernorm"))],
    "flux-dev": [*ROWS, ("qk_rmsnorm_rope", _rope_sequence_major), ("qk_rmsnorm_cat_rope", _joint_rope),
                 ("gelu_cat", _gelu_cat)],
    "sd3-medium": [*ROWS, ("qk_rmsnorm", _heads_first("qk_rmsnorm"))],
    "sd3.5-large": [*ROWS, ("qk_rmsnorm", _heads_first("qk_rmsnorm"))],
    "wan2.1-1.3b": [*ROWS, ("qk_rmsnorm", _across_heads)],
    "wan2.1-14b": [*ROWS, ("qk_rmsnorm", _across_heads)],
    "hunyuan-video": [*ROWS, ("qk_rmsnorm", _sequence_major), ("qk_rmsnorm_rope", _rope_sequence_major),
                      ("gelu_cat", _gelu_cat)],
    "cogvideox-5b": [*AFFINE_ROWS, ("qk_layernorm", _heads_first("qk_layernorm"))],
    "ltx-video": [("rmsnorm_scale_shift", _rows("rmsnorm_scale_shift")), *ROWS[1:], ("qk_rmsnorm", _across_heads),
                  ("qk_rmsnorm_rope", _rope_across_heads)],
    "sana-1600m": ROWS,
    "pixart": ROWS,
    "qwen-image": [*ROWS, ("qk_rmsnorm", _sequence_major)],
    "dit-xl-2": ROWS,
}

REFERENCES = {"gelu_cat": ops.reference_gelu_cat, "qk_rmsnorm_cat": ops.reference_qk_rmsnorm_cat}
OPS = {"gelu_cat": ops.gelu_cat, "qk_rmsnorm_cat": ops.qk_rmsnorm_cat}


def _cases() -> list:
    """One case per distinct (op, layout, widths), listing every model that calls it so."""
    cases: dict[tuple, list[str]] = {}
    for model, model_ops in MODEL_OPS.items():
        for op, make in model_ops:
            cases.setdefault((op, make, MODELS[model]), []).append(model)
    return [pytest.param(op, make, widths, id=f"{op}-{'+'.join(models)}") for (op, make, widths), models in cases.items()]


def _run(op: str, args: tuple) -> tuple[tuple, tuple]:
    fused_op, reference = OPS.get(op) or OP_CASES[op].op, REFERENCES.get(op) or OP_CASES[op].reference
    return outputs(fused_op(*args)), outputs(reference(*args))


@pytest.mark.parametrize("op, make_args, widths", _cases())
def test_model_widths_take_the_kernel(interpreted, fresh_reference_runs, op, make_args, widths):
    fused, reference = _run(op, make_args(widths, torch.float32, "cpu"))
    declined = [(run.op, run.reason) for run in fresh_reference_runs.reference_runs()]
    assert interpreted.count == 1 and not declined, declined
    for actual, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("op, make_args, widths", _cases())
def test_model_widths_take_the_kernel_on_the_gpu_in_bf16(cuda, launches, fresh_reference_runs, op, make_args, widths):
    """The same on CUDA in bf16, the dtype these models run in: each kernel compiles at the real width."""
    fused, reference = _run(op, make_args(widths, torch.bfloat16, "cuda"))
    declined = [(run.op, run.reason) for run in fresh_reference_runs.reference_runs()]
    assert launches.count == 1 and not declined, declined
    for actual, expected in zip(fused, reference, strict=True):
        unit = torch.finfo(expected.dtype).eps * expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=8 * unit)  # kernel: 1 rounding, reference: several


def test_every_model_and_op_is_audited():
    """The table covers the ten diffusers models and every fused kernel op."""
    diffusers_models = {"flux-dev", "sd3-medium", "sd3.5-large", "wan2.1-1.3b", "wan2.1-14b", "hunyuan-video",
                        "cogvideox-5b", "ltx-video", "sana-1600m", "pixart", "qwen-image", "dit-xl-2"}
    assert diffusers_models <= set(MODEL_OPS)
    kernel_ops = {*OP_CASES, "gelu_cat", "qk_rmsnorm_cat"}
    assert {op for model_ops in MODEL_OPS.values() for op, _ in model_ops} == kernel_ops
