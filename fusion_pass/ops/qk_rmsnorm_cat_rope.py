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

Kernel: `qk_rmsnorm_rope`'s, over four row sets (q0, k0, q1, k1) instead of two, each a
`launch.GroupedRowLayout` of its input with the part of its joint output and of the tables its
rows take (the joint tensors' strides, offset to the stream's first position along `dim`): fp32
from load to store, rounded once (the unfused code rounds the norm, its product with the weight, the
cat's promotion and the rotation). Each input is read once and each output written once.
fp16/bf16/fp32 with D <= MAX_BLOCK on CUDA (or the CPU interpreter), per-channel weights, tables
that do not widen q or k and rows that coalesce into three row dims take the kernel; the rest
runs the reference. An odd D, q and k of different D, or tables of a width other than D or D/2
raise ValueError.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .direct import fused_op
from .launch import (
    KernelCall,
    Launch,
    TensorMeta,
    broadcast_strides,
    contiguous_strides,
    kernels_on_cpu,
    launch_mode,
    plan_cache,
    promoted_dtype,
    rows_fit_kernel,
    tensor_key,
    tensor_meta,
)
from .qk_rmsnorm import QKNormOut, reference_rmsnorm
from .qk_rmsnorm_rope import (
    check_rope_operands,
    launch_rope,
    reference_rope,
    rope_launch,
    rope_rows,
    row_operand,
)
from .reference_autograd import register_reference_autograd
from .reference_runs import refuse


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
    call: KernelCall  # `rope_launch`'s


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
    """The launch on operands with these `tensor_key`s, or None where the reference must run.
    Raises `check_rope_operands`' ValueError for a cat that joins rows (not memoised: on every
    call of a bad signature; other cats are the reference's to check)."""
    inputs = tuple(map(tensor_meta, (q0, k0, q1, k1)))
    weights = tuple(map(tensor_meta, (q_weight0, k_weight0, q_weight1, k_weight1)))
    cos, sin = tensor_meta(cos), tensor_meta(sin)
    ndim = len(inputs[0].shape)
    if joins_rows(ndim, dim):  # the joint q and k are as wide as q0 and k0
        check_rope_operands(inputs[0], inputs[1], cos, sin)
    if not all(rows_fit_kernel(cpu_kernels, x, *(t for t in (w, cos, sin) if t is not None))
               for x, w in zip(inputs, weights)):
        return None
    if len({x.device for x in inputs}) != 1:
        return refuse(f"q and k of the streams on several devices ({', '.join(sorted(str(x.device) for x in inputs))})")
    if not joins_rows(ndim, dim):
        return refuse(f"the cat on dim {dim} joins columns, not rows")
    dim %= ndim
    joint = (_joint_shape(inputs[0], inputs[2], dim), _joint_shape(inputs[1], inputs[3], dim))  # q, k
    if None in joint:
        return refuse(f"the streams differ beyond the cat's dim {dim}")
    rows = []
    for stream, x in zip((0, 0, 1, 1), inputs):
        joint_shape = joint[len(rows) % 2]
        start = 0 if stream == 0 else joint_shape[dim] - x.shape[dim]
        out = TensorMeta(joint_shape, contiguous_strides(joint_shape), x.dtype, x.device)
        parts = [_stream_part(t, (*joint_shape[:-1], 1), dim, start, x.shape[dim]) for t in (out, cos, sin)]
        if None in parts:
            return refuse("the RoPE tables do not broadcast into the joint q/k")
        x_rows = rope_rows(x, *(meta for meta, _ in parts), offsets=tuple(offset for _, offset in parts))
        if x_rows is None:
            return None
        rows.append(x_rows)
    call = rope_launch(inputs, weights, tuple(rows), (1, 1), cos, sin, eps, interleaved)
    if call is None:
        return None
    stages = [x.dtype if w is None else promoted_dtype(x.dtype, w) for x, w in zip(inputs, weights)]
    out_dtypes = (torch.promote_types(stages[0], stages[2]), torch.promote_types(stages[1], stages[3]))
    return _LaunchPlan(joint, out_dtypes, call)


def _qk_rmsnorm_cat_rope(tensors: tuple, eps, dim, cos, sin, interleaved, launch: Launch) -> tuple[Tensor, Tensor]:
    """The op's body (`launch_mode(q0)`) and fake impl (`Launch.NONE`, which allocates the outputs
    and launches nothing): kernel or reference.
    `tensors`: q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1."""
    q0, k0, q1, k1, q_weight0, k_weight0, q_weight1, k_weight1 = tensors
    key = (kernels_on_cpu(q0, launch), *map(tensor_key, (*tensors, cos, sin)), eps, dim, interleaved)
    plan = launch.planner(_launch_plan)(*key)
    if plan is None:
        return reference_qk_rmsnorm_cat_rope(*tensors, eps, dim, cos, sin, interleaved)
    q_out, k_out = (torch.empty(shape, dtype=dtype, device=q0.device)
                    for shape, dtype in zip(plan.out_shapes, plan.out_dtypes))
    if launch is not Launch.NONE:
        launch_rope(plan.call, (q0, q_weight0, k0, k_weight0, q1, q_weight1, k1, k_weight1), q_out, k_out, cos, sin,
                    launch)
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
