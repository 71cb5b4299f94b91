"""Joint attention's q/k RMSNorm of two streams with their concatenation folded in, one launch:

    fusion_pass::qk_rmsnorm_cat(q0, k0, v0, q1, k1, v1, q_weight0, k_weight0, q_weight1, k_weight1,
                                eps, dim, cast_to_v) -> (q, k, v)

equals the unfused code of a double-stream block (Hunyuan3D-2 / Flux `DoubleStreamBlock`):

    n(x, w, v) = rmsnorm(x) * w, as `qk_rmsnorm` computes it, then `.to(v)` when cast_to_v
    q = cat((n(q0, q_weight0, v0), n(q1, q_weight1, v1)), dim)
    k = cat((n(k0, k_weight0, v0), n(k1, k_weight1, v1)), dim)
    v = cat((v0, v1), dim)

Stream i's q_i, k_i, v_i are `[..., L_i, D]` (Dq, Dk, Dv may differ), typically the `[B, H, L_i, D]`
views `rearrange(qkv, "B L (K H D) -> K B H L D")` makes of its qkv projection, read in place. The
outputs are `[..., L_0 + L_1, D]`, contiguous, of cat's promoted dtype. eps=None means
`torch.finfo(x.dtype).eps` per tensor.

Kernel: the leading dims coalesce (as in `launch.row_layout`) into outer x inner row groups;
per outer group, programs over stream 0's rows (inner group, token), then stream 1's. A program
normalises a tile of q rows and one of k rows (fp32, the official rounding order: normalise, cast
to the input dtype, multiply by the weight) and copies the v rows of one stream, each into its
place in the joint outputs, rounding once to the output dtype (the unfused code rounds to the
product's dtype, then to v's, then to cat's: never fewer times). It runs where `dim` is the L dim
(-2), the six inputs share their leading dims, each stream's q, k, v their L, q0/q1 (k0/k1, v0/v1)
their width, the weights are per-channel (`[D]`, broadcast over every other dim), and the
conditions of `launch.rows_fit_kernel` hold; anything else computes the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .direct import fused_op
from .launch import (
    KernelCall,
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
    row_layout,
    row_settings,
    rows_fit_kernel,
    tensor_key,
    tensor_meta,
)
from .qk_rmsnorm import default_eps, reference_rmsnorm, rmsnorm_tile
from .reference_autograd import register_reference_autograd
from .reference_runs import refuse
from .row_access import copy_tile

class QKVCatOut(NamedTuple):
    q: Tensor
    k: Tensor
    v: Tensor


@triton.jit
def _stream_tile(
    first_row,  # first row of this program's tile, rows (j, l) of [n_inner, length]
    outer,  # outer row group
    n_inner,  # J: inner row groups
    length,  # L_i: this stream's tokens
    offset,  # L of this stream's first token in the joint outputs (0 or L_0)
    total,  # L_0 + L_1
    Q, q_sa, q_sj, q_sl, q_sc, QW, qw_sc, Q_OUT, q_cols, q_eps,  # q: (outer, inner, L, col) strides
    K, k_sa, k_sj, k_sl, k_sc, KW, kw_sc, K_OUT, k_cols, k_eps,  # k: likewise
    V, v_sa, v_sj, v_sl, v_sc, V_OUT, v_cols,  # v: likewise
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One tile of q, k and v rows of a stream into the contiguous `[outer, J, total, D]` outputs."""
    n_rows = n_inner * length
    joint_row = outer * n_inner * total + offset  # output row of (outer, j=0, l=0)
    rmsnorm_tile(first_row, n_rows, Q + outer * q_sa, q_sj, q_sl, q_sc, QW, 0, 0, qw_sc,
                 Q_OUT + joint_row * q_cols, total * q_cols, q_cols, 1, length, q_cols, q_eps, BLOCK_ROWS, BLOCK_D)
    rmsnorm_tile(first_row, n_rows, K + outer * k_sa, k_sj, k_sl, k_sc, KW, 0, 0, kw_sc,
                 K_OUT + joint_row * k_cols, total * k_cols, k_cols, 1, length, k_cols, k_eps, BLOCK_ROWS, BLOCK_D)
    copy_tile(first_row, n_rows, V + outer * v_sa, v_sj, v_sl, v_sc,
              V_OUT + joint_row * v_cols, total * v_cols, v_cols, 1, length, v_cols, BLOCK_ROWS, BLOCK_D)


@triton.jit
def _qk_rmsnorm_cat_kernel(
    Q0, K0, V0,  # stream 0: [outer, J, L_0, D] inputs
    Q1, K1, V1,  # stream 1: [outer, J, L_1, D] inputs
    QW0, KW0, QW1, KW1,  # per-channel weights [D]
    Q_OUT, K_OUT, V_OUT,  # contiguous [outer, J, L_0 + L_1, D] outputs
    group_programs,  # programs per outer row group: program p takes group p // group_programs
    stream0_programs,  # of a group's programs, [0, stream0_programs) take stream 0's rows, the rest stream 1's
    length0, length1,  # L_0, L_1
    n_inner,  # J
    q_cols, k_cols, v_cols,  # Dq, Dk, Dv
    q0_eps, k0_eps, q1_eps, k1_eps,
    q0_sa, q0_sj, q0_sl,  # (outer, inner, L) strides of Q0; likewise for the other inputs
    k0_sa, k0_sj, k0_sl,
    v0_sa, v0_sj, v0_sl,
    q1_sa, q1_sj, q1_sl,
    k1_sa, k1_sj, k1_sl,
    v1_sa, v1_sj, v1_sl,
    q0_sc: tl.constexpr,  # column strides, constexpr: 1 but for odd views
    k0_sc: tl.constexpr,
    v0_sc: tl.constexpr,
    q1_sc: tl.constexpr,
    k1_sc: tl.constexpr,
    v1_sc: tl.constexpr,
    qw0_sc: tl.constexpr,
    kw0_sc: tl.constexpr,
    qw1_sc: tl.constexpr,
    kw1_sc: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next_power_of_2(max(Dq, Dk, Dv))
    ONE_BODY: tl.constexpr,  # the streams' q (k, v, weights) share dtype and column stride
):
    """BLOCK_ROWS rows of one stream per program: q and k normed, v copied, into the joint outputs.
    ONE_BODY: one tile body for both streams, each argument picked per program (`tl.where` on a
    program-uniform condition), which halves the code to compile (the first call's longest compile);
    else one body per stream."""
    program = tl.program_id(0).to(tl.int64)
    outer = program // group_programs
    program = program % group_programs
    total = length0 + length1
    if ONE_BODY:
        first = program < stream0_programs
        _stream_tile(tl.where(first, program, program - stream0_programs) * BLOCK_ROWS, outer, n_inner,
                     tl.where(first, length0, length1), tl.where(first, 0, length0), total,
                     tl.where(first, Q0, Q1), tl.where(first, q0_sa, q1_sa), tl.where(first, q0_sj, q1_sj),
                     tl.where(first, q0_sl, q1_sl), q0_sc, tl.where(first, QW0, QW1), qw0_sc, Q_OUT, q_cols,
                     tl.where(first, q0_eps, q1_eps),
                     tl.where(first, K0, K1), tl.where(first, k0_sa, k1_sa), tl.where(first, k0_sj, k1_sj),
                     tl.where(first, k0_sl, k1_sl), k0_sc, tl.where(first, KW0, KW1), kw0_sc, K_OUT, k_cols,
                     tl.where(first, k0_eps, k1_eps),
                     tl.where(first, V0, V1), tl.where(first, v0_sa, v1_sa), tl.where(first, v0_sj, v1_sj),
                     tl.where(first, v0_sl, v1_sl), v0_sc, V_OUT, v_cols, BLOCK_ROWS, BLOCK_D)
    elif program < stream0_programs:
        _stream_tile(program * BLOCK_ROWS, outer, n_inner, length0, 0, total,
                     Q0, q0_sa, q0_sj, q0_sl, q0_sc, QW0, qw0_sc, Q_OUT, q_cols, q0_eps,
                     K0, k0_sa, k0_sj, k0_sl, k0_sc, KW0, kw0_sc, K_OUT, k_cols, k0_eps,
                     V0, v0_sa, v0_sj, v0_sl, v0_sc, V_OUT, v_cols, BLOCK_ROWS, BLOCK_D)
    else:
        _stream_tile((program - stream0_programs) * BLOCK_ROWS, outer, n_inner, length1, length0, total,
                     Q1, q1_sa, q1_sj, q1_sl, q1_sc, QW1, qw1_sc, Q_OUT, q_cols, q1_eps,
                     K1, k1_sa, k1_sj, k1_sl, k1_sc, KW1, kw1_sc, K_OUT, k_cols, k1_eps,
                     V1, v1_sa, v1_sj, v1_sl, v1_sc, V_OUT, v_cols, BLOCK_ROWS, BLOCK_D)


def reference_qk_rmsnorm_cat(
    q0: Tensor, k0: Tensor, v0: Tensor, q1: Tensor, k1: Tensor, v1: Tensor,
    q_weight0: Tensor, k_weight0: Tensor, q_weight1: Tensor, k_weight1: Tensor,
    eps: float | None, dim: int, cast_to_v: bool,
) -> QKVCatOut:
    def normed(x: Tensor, weight: Tensor, v: Tensor) -> Tensor:
        out = reference_rmsnorm(x, weight, eps)
        return out.to(v) if cast_to_v else out

    return QKVCatOut(
        torch.cat((normed(q0, q_weight0, v0), normed(q1, q_weight1, v1)), dim),
        torch.cat((normed(k0, k_weight0, v0), normed(k1, k_weight1, v1)), dim),
        torch.cat((v0, v1), dim),
    )


class _LaunchPlan(NamedTuple):
    """What a launch takes from the call signature alone."""

    out_shapes: tuple[tuple[int, ...], ...]  # q, k, v
    out_dtypes: tuple[torch.dtype, ...]
    call: KernelCall  # its own arguments: q0, k0, v0, q1, k1, v1, the four weights, q, k, v outputs


def _leading(t: TensorMeta) -> TensorMeta:
    """The leading dims of `t` (`[..., L, D]` -> `[..., 1]`) as a `row_layout` operand: its rows are
    the outer and inner row groups, and its one unit column stands for the `(L, D)` planes."""
    return t._replace(shape=(*t.shape[:-2], 1), stride=(*t.stride[:-2], 1))


def _channel_stride(weight: TensorMeta, x: TensorMeta) -> int | None:
    """The column stride of a per-channel weight broadcast into x, or None for any other weight."""
    strides = broadcast_strides(weight, x.shape)
    return None if strides is None or any(strides[:-1]) else strides[-1]


@plan_cache
def _launch_plan(
    cpu_kernels: bool, q0, k0, v0, q1, k1, v1, q_weight0, k_weight0, q_weight1, k_weight1,
    eps: float | None, dim: int, cast_to_v: bool,
) -> _LaunchPlan | None:
    """The launch on operands with these `tensor_key`s, or None where the reference must run."""
    inputs = q0, k0, v0, q1, k1, v1 = tuple(map(tensor_meta, (q0, k0, v0, q1, k1, v1)))
    streams = (inputs[:3], inputs[3:])
    weights = tuple(map(tensor_meta, (q_weight0, k_weight0, q_weight1, k_weight1)))
    ndim = len(q0.shape)
    if not all(rows_fit_kernel(cpu_kernels, x, *inputs, *weights) for x in inputs):
        return None
    if not (
        ndim >= 2 and dim in (-2, ndim - 2)
        and all(len(x.shape) == ndim and x.shape[:-2] == q0.shape[:-2] for x in inputs)
        and all(x.shape[-2] == q.shape[-2] for q, k, v in streams for x in (k, v))
        and all(a.shape[-1] == b.shape[-1] for a, b in zip(*streams))
    ):
        return refuse(f"the cat on dim {dim} is not one on the tokens (dim -2) of streams that match elsewhere")
    weight_cols = [_channel_stride(w, x) for w, x in zip(weights, (q0, k0, q1, k1))]
    if None in weight_cols:
        return refuse("weights that are not per-channel")
    lead = (*q0.shape[:-2], 1)
    layout = row_layout(lead, TensorMeta(lead, contiguous_strides(lead), q0.dtype, q0.device), *map(_leading, inputs))
    if layout is None:
        return None

    def stage_dtype(x: TensorMeta, weight: TensorMeta, v: TensorMeta) -> torch.dtype:
        return v.dtype if cast_to_v else promoted_dtype(x.dtype, weight)

    out_dtypes = (
        torch.promote_types(stage_dtype(q0, weights[0], v0), stage_dtype(q1, weights[2], v1)),
        torch.promote_types(stage_dtype(k0, weights[1], v0), stage_dtype(k1, weights[3], v1)),
        torch.promote_types(v0.dtype, v1.dtype),
    )
    lengths = (q0.shape[-2], q1.shape[-2])
    out_shapes = tuple((*q0.shape[:-2], sum(lengths), x.shape[-1]) for x in (q0, k0, v0))
    strides = [(*row_strides[:2], x.stride[-2]) for x, row_strides in zip(inputs, layout.strides[1:])]
    args = (
        *lengths, layout.n_inner, q0.shape[-1], k0.shape[-1], v0.shape[-1],
        *(default_eps(x, eps) for x in (q0, k0, q1, k1)),
        *(s for x_strides in strides for s in x_strides),
    )
    names = ("q0", "k0", "v0", "q1", "k1", "v1")
    constexprs = {f"{name}_sc": x.stride[-1] for name, x in zip(names, inputs)}
    constexprs |= {f"{name}_sc": s for name, s in zip(("qw0", "kw0", "qw1", "kw1"), weight_cols)}
    n_cols = max(x.shape[-1] for x in inputs)
    settings = row_settings(n_cols, max(dtype.itemsize for dtype in (*out_dtypes, *(x.dtype for x in inputs))))
    stream0_programs, stream1_programs = (settings.programs(layout.n_inner * length) for length in lengths)
    group_programs = stream0_programs + stream1_programs
    pairs = tuple(zip((*inputs[:3], *weights[:2]), (*inputs[3:], *weights[2:])))  # stream 0's, stream 1's
    one_body = all(a.dtype == b.dtype for a, b in pairs) and all(
        constexprs[f"{name}0_sc"] == constexprs[f"{name}1_sc"] for name in ("q", "k", "v", "qw", "kw"))
    constexprs |= dict(BLOCK_ROWS=settings.block_rows, BLOCK_D=settings.block_size, ONE_BODY=one_body)
    call = KernelCall(layout.n_outer * group_programs, (group_programs, stream0_programs, *args), constexprs,
                      settings.num_warps)
    return _LaunchPlan(out_shapes, out_dtypes, call)


def _qk_rmsnorm_cat(tensors: tuple[Tensor, ...], eps, dim, cast_to_v, launch: Launch) -> tuple[Tensor, Tensor, Tensor]:
    """The op's body (`launch_mode(q0)`) and fake impl (`Launch.NONE`, which allocates without
    launching): kernel or reference.
    `tensors`: q0, k0, v0, q1, k1, v1, q_weight0, k_weight0, q_weight1, k_weight1."""
    q0 = tensors[0]
    key = (kernels_on_cpu(q0, launch), *map(tensor_key, tensors), eps, dim, cast_to_v)
    plan = launch.planner(_launch_plan)(*key)
    if plan is None:
        return tuple(reference_qk_rmsnorm_cat(*tensors, eps, dim, cast_to_v))
    outs = tuple(
        torch.empty(shape, dtype=dtype, device=q0.device) for shape, dtype in zip(plan.out_shapes, plan.out_dtypes)
    )
    if launch is not Launch.NONE:
        with on_device_of(q0):
            launch_kernel(_qk_rmsnorm_cat_kernel, plan.call, (*tensors, *outs), traced=launch is Launch.TRACED)
    return outs


@fused_op("qk_rmsnorm_cat")
def _qk_rmsnorm_cat_op(
    q0: Tensor, k0: Tensor, v0: Tensor, q1: Tensor, k1: Tensor, v1: Tensor,
    q_weight0: Tensor, k_weight0: Tensor, q_weight1: Tensor, k_weight1: Tensor,
    eps: float | None, dim: int, cast_to_v: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    tensors = (q0, k0, v0, q1, k1, v1, q_weight0, k_weight0, q_weight1, k_weight1)
    return _qk_rmsnorm_cat(tensors, eps, dim, cast_to_v, launch_mode(q0))


@_qk_rmsnorm_cat_op.register_fake
def _(q0, k0, v0, q1, k1, v1, q_weight0, k_weight0, q_weight1, k_weight1, eps, dim, cast_to_v):
    tensors = (q0, k0, v0, q1, k1, v1, q_weight0, k_weight0, q_weight1, k_weight1)
    return _qk_rmsnorm_cat(tensors, eps, dim, cast_to_v, Launch.NONE)


register_reference_autograd(_qk_rmsnorm_cat_op, reference_qk_rmsnorm_cat)


def qk_rmsnorm_cat(
    q0: Tensor, k0: Tensor, v0: Tensor, q1: Tensor, k1: Tensor, v1: Tensor,
    q_weight0: Tensor, k_weight0: Tensor, q_weight1: Tensor, k_weight1: Tensor,
    eps: float | None = None, dim: int = -2, cast_to_v: bool = False,
) -> QKVCatOut:
    """Both streams' q/k RMSNorms and the cats of q, k and v on `dim`, in one launch."""
    return QKVCatOut(*_qk_rmsnorm_cat_op(
        q0, k0, v0, q1, k1, v1, q_weight0, k_weight0, q_weight1, k_weight1, eps, dim, cast_to_v
    ))
