"""LayerNorm (+ adaLN modulation), optionally preceded by a (gated) residual, in one row-wise kernel.

Ops (x, residual, y: `[..., D]`, normalised over the last dim D; shift, scale, gate broadcast to
x, typically `[B, 1, D]` chunk views of a `[B, 1, 6D]` modulation; weight, bias: `[D]` or None):

    fusion_pass::layernorm_scale_shift(x, shift, scale, eps, weight, bias) -> out
        out = layer_norm(x) * (1 + scale) + shift
    fusion_pass::residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps,
                                                     weight, bias) -> (r, normed)
        r = residual + gate * y;  normed = layer_norm(r) * (1 + scale) + shift
    fusion_pass::residual_add_layernorm(x, y, weight, bias, eps) -> (residual, normed)
        r = x + y;  normed = layer_norm(r)                 (pre-LN blocks: hy3dgen's ShapeVAE)
    fusion_pass::rmsnorm_scale_shift(x, shift, scale, eps, weight) -> out
        out = rms_norm(x) * (1 + scale) + shift            (LTX-Video; `rmsnorm_modulate.py`)

with `layer_norm(x) = (x - mean) / sqrt(var + eps) * weight + bias` (biased variance) and, under
the RMS switch, `rms_norm(x) = x / sqrt(mean(x^2) + eps) * weight`. Dtypes
and shapes are those of the unfused expression: fp16 x with an fp32 scale gives an fp32 out.
The kernel (fp16/bf16/fp32) computes in fp32 and rounds once per output; it normalises the
rounded r that it returns, as the unfused expression does; y of `residual_add_layernorm` must
have x's shape (a plain residual add, no broadcast), else the reference runs. Anything else (other dtypes, an
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

from .direct import fused_op
from .launch import (
    KernelCall,
    Launch,
    kernels_on_cpu,
    launch_kernel,
    launch_mode,
    on_device_of,
    plan_cache,
    promoted_dtype,
    row_layout,
    row_settings,
    rows_fit_kernel,
    tensor_key,
    tensor_meta,
)
from .reference_autograd import register_reference_autograd
from .reference_runs import refuse
from .row_access import layernorm_f32, load_row_f32, row_offsets, row_tile, store_row


class ResidualNormOut(NamedTuple):
    residual: Tensor  # r = residual + gate * y (residual_add_layernorm: x + y)
    normed: Tensor  # layer_norm(r) * (1 + scale) + shift (residual_add_layernorm: layer_norm(r))


@triton.jit
def _residual_norm_modulate_kernel(
    X,  # [rows, D] x, or the residual when HAS_RESIDUAL
    Y,  # [rows, D] y of r = x + gate * y (read when HAS_RESIDUAL)
    GATE,  # gate broadcast to [rows, D] (read when HAS_GATE)
    SHIFT,  # shift broadcast to [rows, D] (read when MODULATE)
    SCALE,  # scale broadcast to [rows, D] (read when MODULATE)
    W,  # LayerNorm weight [D] (read when HAS_WEIGHT)
    B,  # LayerNorm bias [D] (read when HAS_BIAS)
    R_OUT,  # [rows, D] r, written when HAS_RESIDUAL
    OUT,  # [rows, D] (modulated) LayerNorm, written when NORMALIZE
    eps,  # LayerNorm (RMSNorm) epsilon
    n_rows,  # rows in all
    n_inner,  # rows per outer index: row r is (r // n_inner, r % n_inner)
    n_cols,  # D
    x_s0, x_s1,  # (outer, inner) strides of X; likewise for Y, GATE, SHIFT, SCALE: 0 on a
    y_s0, y_s1,  # broadcast dim, None for an absent operand. W and B are [D]: no row strides.
    g_s0, g_s1,
    sh_s0, sh_s1,
    sc_s0, sc_s1,
    o_s0, o_s1,  # (outer, inner) strides of R_OUT and OUT, both empty_like(x): one layout
    x_sc: tl.constexpr,  # column strides, constexpr: 1 but for odd views (0: an operand [..., 1])
    y_sc: tl.constexpr,
    g_sc: tl.constexpr,
    sh_sc: tl.constexpr,
    sc_sc: tl.constexpr,
    w_sc: tl.constexpr,
    b_sc: tl.constexpr,
    o_sc: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # x := x + gate * y (x + y without HAS_GATE) first, and store it to R_OUT
    HAS_GATE: tl.constexpr,
    NORMALIZE: tl.constexpr,  # compute and store the LayerNorm
    RMS: tl.constexpr,  # ... an RMSNorm instead: no mean subtracted, no bias
    MODULATE: tl.constexpr,  # ... modulated: * (1 + scale) + shift
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next_power_of_2(D)
):
    """BLOCK_ROWS rows per program, each:

        x      = x + gate * y  (x + y without HAS_GATE)    (HAS_RESIDUAL; stored, rounded, to R_OUT)
        mean   = sum(x) / D;  var = sum((x - mean)^2) / D;  rstd = 1 / sqrt(var + eps)
        out    = (x - mean) * rstd * w + b                                   (NORMALIZE)
        out    = x / sqrt(sum(x^2) / D + eps) * w                            (NORMALIZE and RMS)
        out    = out * (1 + scale) + shift                                   (MODULATE)

    All arithmetic in fp32; each output is rounded once, on store.
    """
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    outer, inner, cols, mask = row_tile(first_row, n_rows, n_inner, n_cols, BLOCK_ROWS, BLOCK_D)
    x = load_row_f32(X, row_offsets(outer, inner, x_s0, x_s1, x_sc, cols), mask)
    if MODULATE:  # issued with x's load, so their latency hides behind it, not after the reductions
        shift = load_row_f32(SHIFT, row_offsets(outer, inner, sh_s0, sh_s1, sh_sc, cols), mask)
        scale = load_row_f32(SCALE, row_offsets(outer, inner, sc_s0, sc_s1, sc_sc, cols), mask)
    if HAS_RESIDUAL:
        y = load_row_f32(Y, row_offsets(outer, inner, y_s0, y_s1, y_sc, cols), mask)
        if HAS_GATE:
            y = y * load_row_f32(GATE, row_offsets(outer, inner, g_s0, g_s1, g_sc, cols), mask)
        x = x + y
        store_row(R_OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, cols), mask, x)
        # Normalise r as stored, like the unfused layer_norm(r) does.
        x = x.to(R_OUT.dtype.element_ty).to(tl.float32)
    if NORMALIZE:
        if RMS:
            normed = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=1)[:, None] / n_cols + eps))
        else:
            normed = layernorm_f32(x, mask, n_cols, eps)
        if HAS_WEIGHT:
            normed = normed * load_row_f32(W, row_offsets(outer, inner, 0, 0, w_sc, cols), mask)
        if HAS_BIAS:
            normed = normed + load_row_f32(B, row_offsets(outer, inner, 0, 0, b_sc, cols), mask)
        if MODULATE:
            normed = normed * (1.0 + scale) + shift
        store_row(OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, cols), mask, normed)


class _OutputDtypes(NamedTuple):
    r: torch.dtype | None  # r = x + gate * y (HAS_RESIDUAL), else None
    out: torch.dtype | None  # the (modulated) LayerNorm or RMSNorm (NORMALIZE), else None


def _normalizes(shift, normalize: bool | None = None) -> bool:
    """Whether the kernel computes the LayerNorm: `normalize`, by default where shift is given."""
    return shift is not None if normalize is None else normalize


def _op_name(cpu_kernels, x, y, gate, shift, scale, weight, bias, normalize=None, rms=False) -> str:
    """The op whose call has this `_output_dtypes` key (they share this module's kernel and planners)."""
    if rms:
        return "rmsnorm_scale_shift"
    if y is None:
        return "layernorm_scale_shift"
    if gate is None:
        return "residual_add_layernorm"
    return "residual_gate_layernorm_scale_shift" if shift is not None else "residual_gate"


@plan_cache(op=_op_name)
def _output_dtypes(cpu_kernels, x, y, gate, shift, scale, weight, bias, normalize=None, rms=False) -> _OutputDtypes | None:
    """Output dtypes of the kernel on operands with these `tensor_key`s (None where absent), or
    None where the reference must run: the kernel conditions (`rows_fit_kernel`) and
    F.layer_norm's, weight and bias `[D]` in the normalised dtype (x's, or r's); an ungated y
    of x's shape. `normalize` (None: whether shift is given) computes the LayerNorm, `rms` an
    RMSNorm instead (F.rms_norm's conditions are F.layer_norm's, without bias)."""
    x, y, gate, shift, scale, weight, bias = map(tensor_meta, (x, y, gate, shift, scale, weight, bias))
    normalize = _normalizes(shift, normalize)
    if y is not None and gate is None and y.shape != x.shape:
        return refuse("y's shape is not x's (a residual add that broadcasts)")
    r_dtype = promoted_dtype(x.dtype, *(t for t in (gate, y) if t is not None)) if y is not None else None
    norm_dtype = x.dtype if r_dtype is None else r_dtype
    operands = [t for t in (y, gate, shift, scale) if t is not None]
    params = [p for p in (weight, bias) if p is not None]
    if not rows_fit_kernel(cpu_kernels, x, *operands, *params):
        return None
    if not all(p.shape == x.shape[-1:] and p.dtype == norm_dtype for p in params):
        return refuse(f"norm weight/bias not [{x.shape[-1]}] in {str(norm_dtype).removeprefix('torch.')}, "
                      "as F.layer_norm requires")
    if not normalize:
        return _OutputDtypes(r_dtype, None)
    return _OutputDtypes(r_dtype, promoted_dtype(norm_dtype, scale, shift) if shift is not None else norm_dtype)


@plan_cache(op=lambda key, out_stride: _op_name(*key))
def _launch_plan(key: tuple, out_stride: tuple[int, ...]) -> KernelCall | None:
    """The launch on operands with `_output_dtypes` key `key` and outputs of `out_stride`, or
    None where the rows do not coalesce into two row dims (`row_layout`). Its call's own
    arguments: x, y, gate, shift, scale, weight, bias, r, out, eps."""
    _, *tensor_keys = key
    x, y, gate, shift, scale, weight, bias = map(tensor_meta, tensor_keys[:7])
    normalize, rms = (*tensor_keys[7:], None, False)[:2]  # a key may end before them (their defaults)
    normalize = _normalizes(shift, normalize)
    slots = (x, y, gate, shift, scale, weight, bias, x._replace(stride=out_stride))
    layout = row_layout(x.shape, *(t for t in slots if t is not None))
    if layout is None:
        return None
    present = iter(layout.strides)
    x_s, y_s, g_s, sh_s, sc_s, w_s, b_s, o_s = (next(present) if t is not None else (None,) * 3 for t in slots)
    row_strides = (*x_s[:2], *y_s[:2], *g_s[:2], *sh_s[:2], *sc_s[:2], *o_s[:2])
    n_cols = x.shape[-1]
    constexprs = dict(
        x_sc=x_s[2], y_sc=y_s[2], g_sc=g_s[2], sh_sc=sh_s[2], sc_sc=sc_s[2], w_sc=w_s[2], b_sc=b_s[2], o_sc=o_s[2],
        HAS_RESIDUAL=y is not None,
        HAS_GATE=gate is not None,
        NORMALIZE=normalize,
        RMS=rms,
        MODULATE=shift is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
    )
    settings = row_settings(n_cols, x.dtype.itemsize)
    constexprs |= dict(BLOCK_ROWS=settings.block_rows, BLOCK_D=settings.block_size)
    args = (layout.n_rows, layout.n_inner, n_cols, *row_strides)
    return KernelCall(settings.programs(layout.n_rows), args, constexprs, settings.num_warps)


def run_residual_norm_modulate(
    x: Tensor,
    *,
    y: Tensor | None = None,
    gate: Tensor | None = None,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 0.0,
    normalize: bool | None = None,
    rms: bool = False,
    launch: Launch = Launch.EAGER,
) -> ResidualNormOut | None:
    """The kernel's outputs over rows of `x` (`[..., D]`), or None, launching nothing, where
    the reference must run; operands broadcast into x's shape.

    Pass y (and gate) for the (gated) residual (`.residual`); shift and scale (weight, bias
    optional) for the modulated LayerNorm (`.normed`), or `normalize=True` without them for the
    plain LayerNorm (None: normalise where shift is given); `rms` normalises with RMSNorm instead
    (bias must be None); the other output is None. `launch`: see
    `launch.Launch` (`Launch.NONE`, the fake impls, allocates the outputs and launches nothing).
    """
    key = (
        kernels_on_cpu(x, launch),
        tensor_key(x), tensor_key(y), tensor_key(gate), tensor_key(shift), tensor_key(scale),
        tensor_key(weight), tensor_key(bias), normalize, rms,
    )
    dtypes = launch.planner(_output_dtypes)(*key)
    if dtypes is None:
        return None
    r = torch.empty_like(x, dtype=dtypes.r) if dtypes.r is not None else None
    out = torch.empty_like(x, dtype=dtypes.out) if dtypes.out is not None else None
    call = launch.planner(_launch_plan)(key, (out if r is None else r).stride())
    if call is None:
        return None
    if launch is not Launch.NONE:
        with on_device_of(x):
            launch_kernel(_residual_norm_modulate_kernel, call, (x, y, gate, shift, scale, weight, bias, r, out, eps),
                          traced=launch is Launch.TRACED)
    return ResidualNormOut(r, out)


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


def _layernorm_scale_shift(x, shift, scale, eps, weight, bias, launch: Launch) -> Tensor:
    """The op's body (`launch_mode(x)`) and fake impl (`Launch.NONE`): kernel or reference."""
    outputs = run_residual_norm_modulate(x, shift=shift, scale=scale, weight=weight, bias=bias, eps=eps, launch=launch)
    if outputs is not None:
        return outputs.normed
    return reference_layernorm_scale_shift(x, shift, scale, eps, weight, bias)


def _residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps, weight, bias, launch: Launch):
    """The op's body (`launch_mode(residual)`) and fake impl (`Launch.NONE`): kernel or reference."""
    operands = dict(y=y, gate=gate, shift=shift, scale=scale, weight=weight, bias=bias)
    outputs = run_residual_norm_modulate(residual, **operands, eps=eps, launch=launch)
    if outputs is not None:
        return outputs.residual, outputs.normed
    return reference_residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps, weight, bias)


@fused_op("layernorm_scale_shift")
def layernorm_scale_shift(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, weight: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """`F.layer_norm(x, (D,), weight, bias, eps) * (1 + scale) + shift` in one kernel."""
    return _layernorm_scale_shift(x, shift, scale, eps, weight, bias, launch=launch_mode(x))


@layernorm_scale_shift.register_fake
def _(x, shift, scale, eps, weight=None, bias=None):
    return _layernorm_scale_shift(x, shift, scale, eps, weight, bias, launch=Launch.NONE)


@fused_op("residual_gate_layernorm_scale_shift")
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
    return _residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps, weight, bias, launch_mode(residual))


@_residual_gate_layernorm_scale_shift_op.register_fake
def _(residual, y, gate, shift, scale, eps, weight=None, bias=None):
    return _residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale, eps, weight, bias, Launch.NONE)


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
