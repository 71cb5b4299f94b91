"""LayerNorm + adaLN modulation, optionally preceded by a gated residual, in one row-wise kernel.

Ops (x, residual, y: `[..., D]`, normalised over the last dim D; shift, scale, gate broadcast to
x, typically `[B, 1, D]` chunk views of a `[B, 1, 6D]` modulation; weight, bias: `[D]` or None):

    fusion_pass::layernorm_scale_shift(x, shift, scale, eps, weight, bias) -> out
        out = layer_norm(x) * (1 + scale) + shift
    fusion_pass::residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps,
                                                     weight, bias) -> (r, normed)
        r = residual + gate * y;  normed = layer_norm(r) * (1 + scale) + shift

with `layer_norm(x) = (x - mean) / sqrt(var + eps) * weight + bias` (biased variance). Dtypes
and shapes are those of the unfused expression: fp16 x with an fp32 scale gives an fp32 out.
The kernel (fp16/bf16/fp32) computes in fp32 and rounds once per output; it normalises the
rounded r that it returns, as the unfused expression does. Anything else (other dtypes, an
operand that adds dims, D > MAX_BLOCK, CPU tensors outside `interpret_on_cpu()`) runs the
reference. `residual_gate.py` reuses the kernel with NORMALIZE off.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .launch import on_device_of, promoted_dtype, row_layout, row_settings, rows_fit_kernel, strided_args
from .reference_autograd import register_reference_autograd
from .row_access import load_row_f32, row_offsets, row_tile, store_row


class ResidualNormOut(NamedTuple):
    residual: Tensor  # r = residual + gate * y
    normed: Tensor  # layer_norm(r) * (1 + scale) + shift


@triton.jit
def _residual_norm_modulate_kernel(
    X, x_s0, x_s1, x_sc,  # [rows, D] x, or the residual when HAS_RESIDUAL
    Y, y_s0, y_s1, y_sc,  # [rows, D] y of r = x + gate * y (read when HAS_RESIDUAL)
    GATE, g_s0, g_s1, g_sc,  # gate broadcast to [rows, D], stride 0 where broadcast
    SHIFT, sh_s0, sh_s1, sh_sc,  # shift broadcast to [rows, D] (read when NORMALIZE)
    SCALE, sc_s0, sc_s1, sc_sc,  # scale broadcast to [rows, D] (read when NORMALIZE)
    W, w_s0, w_s1, w_sc,  # LayerNorm weight [D] broadcast to [rows, D] (HAS_WEIGHT)
    B, b_s0, b_s1, b_sc,  # LayerNorm bias [D] broadcast to [rows, D] (HAS_BIAS)
    R_OUT, r_s0, r_s1, r_sc,  # [rows, D] r, written when HAS_RESIDUAL
    OUT, o_s0, o_s1, o_sc,  # [rows, D] modulated LayerNorm, written when NORMALIZE
    n_rows,  # rows in all
    n_inner,  # rows per outer index: row r is (r // n_inner, r % n_inner)
    n_cols,  # D
    eps,  # LayerNorm epsilon
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next_power_of_2(D)
    HAS_RESIDUAL: tl.constexpr,  # x := x + gate * y first, and store it to R_OUT
    NORMALIZE: tl.constexpr,  # compute and store the modulated LayerNorm
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """BLOCK_ROWS rows per program, each:

        x      = x + gate * y                              (HAS_RESIDUAL; stored, rounded, to R_OUT)
        mean   = sum(x) / D;  var = sum((x - mean)^2) / D;  rstd = 1 / sqrt(var + eps)
        out    = ((x - mean) * rstd * w + b) * (1 + scale) + shift           (NORMALIZE)

    All arithmetic in fp32; each output is rounded once, on store.
    """
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    outer, inner, cols, mask = row_tile(first_row, n_rows, n_inner, n_cols, BLOCK_ROWS, BLOCK_D)
    x = load_row_f32(X, row_offsets(outer, inner, x_s0, x_s1, x_sc, cols), mask)
    if HAS_RESIDUAL:
        y = load_row_f32(Y, row_offsets(outer, inner, y_s0, y_s1, y_sc, cols), mask)
        gate = load_row_f32(GATE, row_offsets(outer, inner, g_s0, g_s1, g_sc, cols), mask)
        x = x + gate * y
        store_row(R_OUT, row_offsets(outer, inner, r_s0, r_s1, r_sc, cols), mask, x)
        # Normalise r as stored, like the unfused layer_norm(r) does.
        x = x.to(R_OUT.dtype.element_ty).to(tl.float32)
    if NORMALIZE:
        mean = tl.sum(x, axis=1)[:, None] / n_cols
        diff = tl.where(mask, x - mean, 0.0)
        var = tl.sum(diff * diff, axis=1)[:, None] / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        normed = diff * rstd
        if HAS_WEIGHT:
            normed = normed * load_row_f32(W, row_offsets(outer, inner, w_s0, w_s1, w_sc, cols), mask)
        if HAS_BIAS:
            normed = normed + load_row_f32(B, row_offsets(outer, inner, b_s0, b_s1, b_sc, cols), mask)
        shift = load_row_f32(SHIFT, row_offsets(outer, inner, sh_s0, sh_s1, sh_sc, cols), mask)
        scale = load_row_f32(SCALE, row_offsets(outer, inner, sc_s0, sc_s1, sc_sc, cols), mask)
        store_row(OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, cols), mask, normed * (1.0 + scale) + shift)


def launch_residual_norm_modulate(
    x: Tensor,
    *,
    y: Tensor | None = None,
    gate: Tensor | None = None,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    r_out: Tensor | None = None,
    out: Tensor | None = None,
    eps: float = 0.0,
    launch: bool = True,
) -> bool:
    """Run the kernel over rows of `x` (`[..., D]`); operands broadcast into x's shape.

    Pass y, gate and r_out for the gated residual; shift, scale and out (weight, bias optional)
    for the modulated LayerNorm. With `launch=False` (fake tensors) only checks the layout.
    Returns False, launching nothing, when an operand does not broadcast into x's shape or the
    rows do not coalesce into two row dims (`row_layout`).
    """
    slots = (x, y, gate, shift, scale, weight, bias, r_out, out)
    layout = row_layout(x.shape, *(t for t in slots if t is not None))
    if layout is None:
        return False
    if not launch:
        return True
    n_cols = x.shape[-1]
    settings = row_settings(n_cols, x.element_size())
    with on_device_of(x):
        _residual_norm_modulate_kernel[(triton.cdiv(layout.n_rows, settings.block_rows),)](
            *strided_args(slots, layout),
            layout.n_rows,
            layout.n_inner,
            n_cols,
            eps,
            BLOCK_ROWS=settings.block_rows,
            BLOCK_D=settings.block_size,
            HAS_RESIDUAL=y is not None,
            NORMALIZE=out is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            num_warps=settings.num_warps,
        )
    return True


def reference_layernorm_scale_shift(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps) * (1 + scale) + shift


def reference_residual_gate_layernorm_scale_shift(
    residual: Tensor,
    y: Tensor,
    gate: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r = residual + gate * y
    return r, reference_layernorm_scale_shift(r, shift, scale, eps, weight, bias)


def _fits(x: Tensor, operands: tuple[Tensor, ...], weight: Tensor | None, bias: Tensor | None, norm_dtype: torch.dtype) -> bool:
    """Kernel conditions plus F.layer_norm's: weight/bias `[D]` in the normalised dtype."""
    params = [p for p in (weight, bias) if p is not None]
    return rows_fit_kernel(x, *operands, *params) and all(
        p.shape == x.shape[-1:] and p.dtype == norm_dtype for p in params
    )


def _layernorm_scale_shift(x, shift, scale, eps, weight, bias, launch: bool) -> Tensor:
    """The op's body (`launch=True`) and fake impl (`launch=False`): kernel or reference."""
    if _fits(x, (shift, scale), weight, bias, x.dtype):
        out = torch.empty_like(x, dtype=promoted_dtype(x.dtype, scale, shift))
        operands = dict(shift=shift, scale=scale, weight=weight, bias=bias, out=out)
        if launch_residual_norm_modulate(x, **operands, eps=eps, launch=launch):
            return out
    return reference_layernorm_scale_shift(x, shift, scale, eps, weight, bias)


def _residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps, weight, bias, launch: bool):
    """The op's body (`launch=True`) and fake impl (`launch=False`): kernel or reference."""
    r_dtype = promoted_dtype(residual.dtype, gate, y)
    if _fits(residual, (y, gate, shift, scale), weight, bias, r_dtype):
        r = torch.empty_like(residual, dtype=r_dtype)
        normed = torch.empty_like(residual, dtype=promoted_dtype(r_dtype, scale, shift))
        operands = dict(y=y, gate=gate, shift=shift, scale=scale, weight=weight, bias=bias, r_out=r, out=normed)
        if launch_residual_norm_modulate(residual, **operands, eps=eps, launch=launch):
            return r, normed
    return reference_residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps, weight, bias)


@torch.library.custom_op("fusion_pass::layernorm_scale_shift", mutates_args=())
def layernorm_scale_shift(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """`F.layer_norm(x, (D,), weight, bias, eps) * (1 + scale) + shift` in one kernel."""
    return _layernorm_scale_shift(x, shift, scale, eps, weight, bias, launch=True)


@layernorm_scale_shift.register_fake
def _(x, shift, scale, eps, weight=None, bias=None):
    return _layernorm_scale_shift(x, shift, scale, eps, weight, bias, launch=False)


@torch.library.custom_op("fusion_pass::residual_gate_layernorm_scale_shift", mutates_args=())
def _residual_gate_layernorm_scale_shift_op(
    residual: Tensor,
    y: Tensor,
    gate: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    return _residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps, weight, bias, launch=True)


@_residual_gate_layernorm_scale_shift_op.register_fake
def _(residual, y, gate, shift, scale, eps, weight=None, bias=None):
    return _residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps, weight, bias, launch=False)


def residual_gate_layernorm_scale_shift(
    residual: Tensor,
    y: Tensor,
    gate: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> ResidualNormOut:
    """`r = residual + gate * y` and `layer_norm(r) * (1 + scale) + shift`, each input read once."""
    return ResidualNormOut(*_residual_gate_layernorm_scale_shift_op(residual, y, gate, shift, scale, eps, weight, bias))


register_reference_autograd(layernorm_scale_shift, reference_layernorm_scale_shift)
register_reference_autograd(_residual_gate_layernorm_scale_shift_op, reference_residual_gate_layernorm_scale_shift)
