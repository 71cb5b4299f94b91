"""Joint attention's q/k RMSNorm of two streams, their concatenation and the RoPE of the joint
sequence, q and k in one kernel launch:

    fusion_pass::qk_rmsnorm_cat_rope(q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1,
                                     eps, dim, cos, sin, interleaved) -> (q, k)

equals the unfused code of Flux's double-stream blocks (diffusers' `FluxAttnProcessor`: the text
stream's `norm_added_q/k`, the image stream's `norm_q/k`, `torch.cat([text, image], dim=1)`, then
`apply_rotary_emb(x, (cos, sin), sequence_dim=1)` on the joint q and k):

    q = rope(cat((rmsnorm(q0) * q_weight0, rmsnorm(q1) * q_weight1), dim))
    k = rope(cat((rmsnorm(k0) * k_weight0, rmsnorm(k1) * k_weight1), dim))

with `rmsnorm`, `rope`, the table forms (`[..., D]` per column or `[..., D/2]` per pair) and
`interleaved` as in `qk_rmsnorm_rope`. Stream 0 comes first in the joint sequence, so its rows
read the tables' first L_0 positions along `dim` and stream 1's the rest.

q_i `[..., L_i, ..., D]` of any strides (Flux: `to_q(x).unflatten(-1, (H, D))`, `[B, L_i, H, D]`
views), q0 and q1 equal but at `dim` (any dim but the last); k_i likewise (k may have other
heads than q, not another D). cos/sin broadcast into the joint q and k (`[1, L_0 + L_1, 1, D]`
for Flux's `cos[None, :, None, :]`), read through strides. Outputs: contiguous
`[..., L_0 + L_1, ..., D]`, what the unfused cat and rotation give (so attention reads the layout
it read before and keeps its backend), of dtype `torch.result_type` of the two streams' normed
values (`rmsnorm(x) * w`; x's dtype without weight). eps=None means `torch.finfo(x.dtype).eps`.

Kernel: four row sets (q0, k0, q1, k1), each a `launch.GroupedRowLayout` of its input with the
part of its joint output and of the tables its rows take (the joint tensors' strides, offset to
the stream's first position along `dim`), tiled by `qk_rmsnorm_rope.grouped_rope_tile`: fp32 from
load to store, rounded once (the unfused code rounds the norm, its product with the weight, the
cat's promotion and the rotation). Each input is read once and each output written once.
fp16/bf16/fp32 with D <= MAX_BLOCK on CUDA (or the CPU interpreter), per-channel weights, tables
that do not widen q or k and rows that coalesce into three row dims take the kernel; the rest
runs the reference. An odd D, q and k of different D, or tables of a width other than D or D/2
raise ValueError.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .direct import fused_op
from .launch import (
    Launch,
    TensorMeta,
    broadcast_strides,
    contiguous_strides,
    kernels_on_cpu,
    launch_kernel,
    launch_mode,
    on_device_of,
    plan_cache,
    promoted_dtype,
    row_settings,
    rows_fit_kernel,
    tensor_key,
    tensor_meta,
)
from .qk_rmsnorm import QKNormOut, default_eps, reference_rmsnorm
from .qk_rmsnorm_rope import (
    RopeRows,
    channel_stride,
    check_rope_operands,
    grouped_rope_tile,
    pair_freqs,
    reference_rope,
    rope_rows,
    row_operand,
)
from .reference_autograd import register_reference_autograd

TENSORS = ("q0", "k0", "q1", "k1")
"""The kernel's four row sets, in the order of its programs and arguments."""


@triton.jit
def _qk_rmsnorm_cat_rope_kernel(
    Q0, QW0, K0, KW0,  # stream 0: q, k inputs and their weights [D] (None without)
    Q1, QW1, K1, KW1,  # stream 1: likewise
    Q_OUT, K_OUT,  # the contiguous joint outputs
    COS, SIN,  # the joint sequence's tables
    q0_gp, k0_gp, q1_gp, k1_gp,  # programs per row group of each row set (`grouped_rope_tile`)
    q0_end, k0_end, q1_end,  # programs [0, q0_end) take q0's tiles, then k0's to k0_end, q1's to q1_end, k1's
    n_pairs,  # D / 2
    # per row set (q0, k0, q1, k1): eps, rows per group, rows per outer index, the (group, outer,
    # inner) strides of its input, of its output part, of its cos and sin parts (0 where broadcast),
    # and the element offsets of those parts from Q_OUT / K_OUT, COS and SIN
    q0_eps, q0_rows, q0_inner, q0_sg, q0_s0, q0_s1, q0o_sg, q0o_s0, q0o_s1, q0c_sg, q0c_s0, q0c_s1,
    q0s_sg, q0s_s0, q0s_s1, q0o_off, q0c_off, q0s_off,
    k0_eps, k0_rows, k0_inner, k0_sg, k0_s0, k0_s1, k0o_sg, k0o_s0, k0o_s1, k0c_sg, k0c_s0, k0c_s1,
    k0s_sg, k0s_s0, k0s_s1, k0o_off, k0c_off, k0s_off,
    q1_eps, q1_rows, q1_inner, q1_sg, q1_s0, q1_s1, q1o_sg, q1o_s0, q1o_s1, q1c_sg, q1c_s0, q1c_s1,
    q1s_sg, q1s_s0, q1s_s1, q1o_off, q1c_off, q1s_off,
    k1_eps, k1_rows, k1_inner, k1_sg, k1_s0, k1_s1, k1o_sg, k1o_s0, k1o_s1, k1c_sg, k1c_s0, k1c_s1,
    k1s_sg, k1s_s0, k1s_s1, k1o_off, k1c_off, k1s_off,
    q0_sc: tl.constexpr,  # column strides, constexpr: 1 but for odd views (outputs: 1)
    k0_sc: tl.constexpr,
    q1_sc: tl.constexpr,
    k1_sc: tl.constexpr,
    qw0_sc: tl.constexpr,
    kw0_sc: tl.constexpr,
    qw1_sc: tl.constexpr,
    kw1_sc: tl.constexpr,
    c_sc: tl.constexpr,
    s_sc: tl.constexpr,
    Q0_HAS_WEIGHT: tl.constexpr,
    K0_HAS_WEIGHT: tl.constexpr,
    Q1_HAS_WEIGHT: tl.constexpr,
    K1_HAS_WEIGHT: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    PAIR_FREQS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_P: tl.constexpr,  # next_power_of_2(D / 2)
):
    """BLOCK_ROWS rows of one row set per program: RMSNorm, weight, rotation, into the joint output."""
    program = tl.program_id(0).to(tl.int64)
    if program < q0_end:
        grouped_rope_tile(program, q0_gp, q0_rows, q0_inner, n_pairs,
                          Q0, q0_sg, q0_s0, q0_s1, q0_sc, QW0, qw0_sc,
                          COS + q0c_off, q0c_sg, q0c_s0, q0c_s1, c_sc, SIN + q0s_off, q0s_sg, q0s_s0, q0s_s1, s_sc,
                          Q_OUT + q0o_off, q0o_sg, q0o_s0, q0o_s1, 1, q0_eps,
                          Q0_HAS_WEIGHT, INTERLEAVED, PAIR_FREQS, BLOCK_ROWS, BLOCK_P)
    elif program < k0_end:
        grouped_rope_tile(program - q0_end, k0_gp, k0_rows, k0_inner, n_pairs,
                          K0, k0_sg, k0_s0, k0_s1, k0_sc, KW0, kw0_sc,
                          COS + k0c_off, k0c_sg, k0c_s0, k0c_s1, c_sc, SIN + k0s_off, k0s_sg, k0s_s0, k0s_s1, s_sc,
                          K_OUT + k0o_off, k0o_sg, k0o_s0, k0o_s1, 1, k0_eps,
                          K0_HAS_WEIGHT, INTERLEAVED, PAIR_FREQS, BLOCK_ROWS, BLOCK_P)
    elif program < q1_end:
        grouped_rope_tile(program - k0_end, q1_gp, q1_rows, q1_inner, n_pairs,
                          Q1, q1_sg, q1_s0, q1_s1, q1_sc, QW1, qw1_sc,
                          COS + q1c_off, q1c_sg, q1c_s0, q1c_s1, c_sc, SIN + q1s_off, q1s_sg, q1s_s0, q1s_s1, s_sc,
                          Q_OUT + q1o_off, q1o_sg, q1o_s0, q1o_s1, 1, q1_eps,
                          Q1_HAS_WEIGHT, INTERLEAVED, PAIR_FREQS, BLOCK_ROWS, BLOCK_P)
    else:
        grouped_rope_tile(program - q1_end, k1_gp, k1_rows, k1_inner, n_pairs,
                          K1, k1_sg, k1_s0, k1_s1, k1_sc, KW1, kw1_sc,
                          COS + k1c_off, k1c_sg, k1c_s0, k1c_s1, c_sc, SIN + k1s_off, k1s_sg, k1s_s0, k1s_s1, s_sc,
                          K_OUT + k1o_off, k1o_sg, k1o_s0, k1o_s1, 1, k1_eps,
                          K1_HAS_WEIGHT, INTERLEAVED, PAIR_FREQS, BLOCK_ROWS, BLOCK_P)


def reference_qk_rmsnorm_cat_rope(
    q0: Tensor, k0: Tensor, q1: Tensor, k1: Tensor,
    q_weight0: Tensor | None, k_weight0: Tensor | None, q_weight1: Tensor | None, k_weight1: Tensor | None,
    eps: float | None, dim: int, cos: Tensor, sin: Tensor, interleaved: bool,
) -> tuple[Tensor, Tensor]:
    q = torch.cat((reference_rmsnorm(q0, q_weight0, eps), reference_rmsnorm(q1, q_weight1, eps)), dim)
    k = torch.cat((reference_rmsnorm(k0, k_weight0, eps), reference_rmsnorm(k1, k_weight1, eps)), dim)
    check_rope_operands(q, k, cos, sin)
    return reference_rope(q, cos, sin, interleaved), reference_rope(k, cos, sin, interleaved)


class _LaunchPlan(NamedTuple):
    """What a launch takes from the call signature alone."""

    out_shapes: tuple[tuple[int, ...], tuple[int, ...]]  # q, k
    out_dtypes: tuple[torch.dtype, torch.dtype]
    rows: tuple[RopeRows, ...]  # q0, k0, q1, k1
    n_cols: int  # D, for `row_settings`
    elem_bytes: int  # the widest input element, for `row_settings`
    args: tuple  # the kernel's arguments from n_pairs on
    constexprs: Mapping[str, object]  # column strides and switches


def joins_rows(ndim: int, dim: int) -> bool:
    """Whether a cat on `dim` of `ndim`-dim tensors joins rows, not columns (any dim but the last)."""
    return ndim >= 2 and -ndim <= dim < ndim - 1 and dim != -1


def _stream_part(t: TensorMeta, joint_rows: tuple[int, ...], dim: int, start: int, length: int):
    """What a stream's rows `[start, start + length)` along `dim` read of `t`, which broadcasts into
    the joint rows `joint_rows` (`[..., 1]`): `(meta of those rows, element offset)`, or None."""
    strides = broadcast_strides(row_operand(t), joint_rows)
    if strides is None:
        return None
    shape = list(joint_rows)
    shape[dim], shape[-1] = length, t.shape[-1]
    return TensorMeta(tuple(shape), (*strides[:-1], t.stride[-1]), t.dtype, t.device), start * strides[dim]


def _joint_shape(x0: TensorMeta, x1: TensorMeta, dim: int) -> tuple[int, ...] | None:
    """The shape of `cat((x0, x1), dim)`, or None where x0 and x1 differ elsewhere."""
    if len(x0.shape) != len(x1.shape) or any(a != b for i, (a, b) in enumerate(zip(x0.shape, x1.shape)) if i != dim):
        return None
    return tuple(a + b if i == dim else a for i, (a, b) in enumerate(zip(x0.shape, x1.shape)))


@plan_cache
def _launch_plan(cpu_kernels, q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1, cos, sin,
                 eps: float | None, dim: int, interleaved: bool) -> _LaunchPlan | None:
    """The launch on operands with these `tensor_key`s, or None where the reference must run."""
    inputs = tuple(map(tensor_meta, (q0, k0, q1, k1)))
    weights = tuple(map(tensor_meta, (q_weight0, k_weight0, q_weight1, k_weight1)))
    cos, sin = tensor_meta(cos), tensor_meta(sin)
    ndim = len(inputs[0].shape)
    if not (
        all(rows_fit_kernel(cpu_kernels, x, *(t for t in (w, cos, sin) if t is not None)) for x, w in zip(inputs, weights))
        and len({x.device for x in inputs}) == 1
        and joins_rows(ndim, dim)
    ):
        return None
    dim %= ndim
    q0, k0, q1, k1 = inputs
    joint = (_joint_shape(q0, q1, dim), _joint_shape(k0, k1, dim))
    weight_cols = tuple(channel_stride(w, x) for w, x in zip(weights, inputs))
    if None in joint or None in weight_cols:
        return None
    rows = []
    for name, x in zip(TENSORS, inputs):
        joint_shape = joint[name[0] == "k"]
        start = 0 if name[1] == "0" else joint_shape[dim] - x.shape[dim]
        out = TensorMeta(joint_shape, contiguous_strides(joint_shape), x.dtype, x.device)
        joint_rows = (*joint_shape[:-1], 1)
        parts = [_stream_part(t, joint_rows, dim, start, x.shape[dim]) for t in (out, cos, sin)]
        if None in parts:
            return None
        (out_part, out_offset), (cos_part, cos_offset), (sin_part, sin_offset) = parts
        x_rows = rope_rows(x, out_part, cos_part, sin_part)
        if x_rows is None:
            return None
        rows.append((x_rows, (out_offset, cos_offset, sin_offset)))

    def stage_dtype(x: TensorMeta, weight: TensorMeta | None) -> torch.dtype:
        return x.dtype if weight is None else promoted_dtype(x.dtype, weight)

    stages = [stage_dtype(x, w) for x, w in zip(inputs, weights)]
    out_dtypes = (torch.promote_types(stages[0], stages[2]), torch.promote_types(stages[1], stages[3]))
    d = q0.shape[-1]
    args = (d // 2, *(a for x, w, (r, offsets) in zip(inputs, weights, rows)
                      for a in (default_eps(x, eps), r.n_rows, r.n_inner, *r.strides, *offsets)))
    constexprs = {f"{name}_sc": x.stride[-1] for name, x in zip(TENSORS, inputs)}
    constexprs |= {f"{name[0]}w{name[1]}_sc": col for name, col in zip(TENSORS, weight_cols)}
    constexprs |= {f"{name.upper()}_HAS_WEIGHT": w is not None for name, w in zip(TENSORS, weights)}
    constexprs |= dict(c_sc=cos.stride[-1], s_sc=sin.stride[-1], INTERLEAVED=bool(interleaved),
                       PAIR_FREQS=pair_freqs(cos, d))
    return _LaunchPlan(
        joint, out_dtypes, tuple(r for r, _ in rows), d, max(x.dtype.itemsize for x in inputs), args,
        MappingProxyType(constexprs),
    )


def _qk_rmsnorm_cat_rope(tensors: tuple, eps, dim, cos, sin, interleaved, launch: Launch) -> tuple[Tensor, Tensor]:
    """The op's body (`launch_mode(q0)`) and fake impl (`Launch.NONE`, which allocates the outputs
    and launches nothing): kernel or reference.
    `tensors`: q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1."""
    q0, k0 = tensors[:2]
    if joins_rows(q0.dim(), dim):  # the joint q and k are as wide as q0 and k0 (else the reference checks them)
        check_rope_operands(q0, k0, cos, sin)
    key = (kernels_on_cpu(q0, launch), *map(tensor_key, (*tensors, cos, sin)), eps, dim, interleaved)
    plan = launch.planner(_launch_plan)(*key)
    if plan is None:
        return reference_qk_rmsnorm_cat_rope(*tensors, eps, dim, cos, sin, interleaved)
    q_out, k_out = (torch.empty(shape, dtype=dtype, device=q0.device)
                    for shape, dtype in zip(plan.out_shapes, plan.out_dtypes))
    if launch is not Launch.NONE:
        settings = row_settings(plan.n_cols, plan.elem_bytes)
        per_group, programs = zip(*(settings.grouped_programs(r.n_groups, r.n_rows) for r in plan.rows))
        ends = tuple(itertools.accumulate(programs))
        q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1 = tensors
        with on_device_of(q0):
            launch_kernel(
                _qk_rmsnorm_cat_rope_kernel,
                ends[-1],
                (q0, q_weight0, k0, k_weight0, q1, q_weight1, k1, k_weight1, q_out, k_out, cos, sin,
                 *per_group, *ends[:-1], *plan.args),
                {**plan.constexprs, "BLOCK_ROWS": settings.block_rows, "BLOCK_P": settings.block_size // 2},
                settings.num_warps,
                traced=launch is Launch.TRACED,
            )
    return q_out, k_out


@fused_op("qk_rmsnorm_cat_rope")
def _qk_rmsnorm_cat_rope_op(
    q0: Tensor, k0: Tensor, q1: Tensor, k1: Tensor,
    q_weight0: Tensor | None, k_weight0: Tensor | None, q_weight1: Tensor | None, k_weight1: Tensor | None,
    eps: float | None, dim: int, cos: Tensor, sin: Tensor, interleaved: bool,
) -> tuple[Tensor, Tensor]:
    tensors = (q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1)
    return _qk_rmsnorm_cat_rope(tensors, eps, dim, cos, sin, interleaved, launch_mode(q0))


@_qk_rmsnorm_cat_rope_op.register_fake
def _(q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1, eps, dim, cos, sin, interleaved):
    tensors = (q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1)
    return _qk_rmsnorm_cat_rope(tensors, eps, dim, cos, sin, interleaved, Launch.NONE)


register_reference_autograd(_qk_rmsnorm_cat_rope_op, reference_qk_rmsnorm_cat_rope)


def qk_rmsnorm_cat_rope(
    q0: Tensor, k0: Tensor, q1: Tensor, k1: Tensor,
    q_weight0: Tensor | None, k_weight0: Tensor | None, q_weight1: Tensor | None, k_weight1: Tensor | None,
    eps: float | None, dim: int, cos: Tensor, sin: Tensor, interleaved: bool = True,
) -> QKNormOut:
    """Both streams' q/k RMSNorms, the cats on `dim` and the RoPE of the joint q and k, in one launch."""
    return QKNormOut(*_qk_rmsnorm_cat_rope_op(
        q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1, eps, dim, cos, sin, interleaved
    ))
