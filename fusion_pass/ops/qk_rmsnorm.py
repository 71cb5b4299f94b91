"""q/k RMSNorm of attention: both norms over the head dim D in one kernel launch.

    fusion_pass::qk_rmsnorm(q, k, q_weight, k_weight, eps) -> (q_out, k_out)
    fusion_pass::qk_rmsnorm_(q, k, q_weight, k_weight, eps) -> ()      (writes q, k in place)

per tensor, in the official RMSNorm's rounding order:

    n   = (x.float() * rsqrt(mean(x.float() ** 2, -1, keepdim=True) + eps)).to(x.dtype)
    out = n * w

q, k: `[..., D]` of any rank >= 1, typically `[B, H, L, D]` views
`qkv.reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4)[i]` of a qkv projection, read in place
(rows coalesce to `(B * L, H)`); outputs keep the input's dim order, as eager ops would.
Weights broadcast to their tensor (usually `[D]`). Out dtype = `torch.result_type(n, w)`;
`eps=None` means `torch.finfo(x.dtype).eps` (F.rms_norm's convention). q and k may differ in
shape, D and dtype. The in-place form requires out dtype == input dtype. fp16/bf16/fp32 with
D <= MAX_BLOCK on CUDA (or the CPU interpreter) take the kernel, the rest the reference, which
normalises in fp32, or in fp64 for fp64 inputs: never less precise than the spelling it replaces
(the official `x.float()` would round fp64 to fp32; spellings without an upcast keep fp64).
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
from .row_access import load_row_f32, row_offsets, row_tile, store_row


class QKNormOut(NamedTuple):
    q: Tensor
    k: Tensor


@triton.jit
def rmsnorm_tile(
    first_row,  # first row of this program's tile
    n_rows,  # rows of this tensor
    X, x_s0, x_s1, x_sc,  # [rows, D] input, (outer, inner, col) strides
    W, w_s0, w_s1, w_sc,  # weight broadcast to [rows, D], stride 0 where broadcast
    OUT, o_s0, o_s1, o_sc,  # [rows, D] output (X itself for the in-place op)
    n_inner,  # rows per outer index: row r is (r // n_inner, r % n_inner)
    n_cols,  # D
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    outer, inner, cols, mask = row_tile(first_row, n_rows, n_inner, n_cols, BLOCK_ROWS, BLOCK_D)
    x = load_row_f32(X, row_offsets(outer, inner, x_s0, x_s1, x_sc, cols), mask)
    w = load_row_f32(W, row_offsets(outer, inner, w_s0, w_s1, w_sc, cols), mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1)[:, None] / n_cols + eps)
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # the official `.to(x.dtype)`
    store_row(OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, cols), mask, normed * w)


@triton.jit
def _qk_rmsnorm_kernel(
    Q,  # [q_rows, Dq] queries
    QW,  # q weight broadcast to q's shape
    Q_OUT,  # [q_rows, Dq] normed queries
    K,  # [k_rows, Dk] keys
    KW,  # k weight broadcast to k's shape
    K_OUT,  # [k_rows, Dk] normed keys
    q_programs,  # programs [0, q_programs) norm q tiles, the rest k tiles
    q_eps, k_eps,
    q_rows, k_rows,
    q_inner, k_inner,  # rows per outer index of q and of k
    q_cols, k_cols,  # Dq, Dk
    q_s0, q_s1,  # (outer, inner) strides of Q; likewise for the others (0 where broadcast)
    qw_s0, qw_s1,
    qo_s0, qo_s1,
    k_s0, k_s1,
    kw_s0, kw_s1,
    ko_s0, ko_s1,
    q_sc: tl.constexpr,  # column strides, constexpr: 1 but for odd views
    qw_sc: tl.constexpr,
    qo_sc: tl.constexpr,
    k_sc: tl.constexpr,
    kw_sc: tl.constexpr,
    ko_sc: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next_power_of_2(max(Dq, Dk))
):
    """BLOCK_ROWS rows per program: `out = (x * rsqrt(sum(x^2) / D + eps)).to(x.dtype) * w`, fp32."""
    program = tl.program_id(0).to(tl.int64)
    if program < q_programs:
        rmsnorm_tile(program * BLOCK_ROWS, q_rows, Q, q_s0, q_s1, q_sc, QW, qw_s0, qw_s1, qw_sc,
                     Q_OUT, qo_s0, qo_s1, qo_sc, q_inner, q_cols, q_eps, BLOCK_ROWS, BLOCK_D)
    else:
        rmsnorm_tile((program - q_programs) * BLOCK_ROWS, k_rows, K, k_s0, k_s1, k_sc, KW, kw_s0, kw_s1, kw_sc,
                     K_OUT, ko_s0, ko_s1, ko_sc, k_inner, k_cols, k_eps, BLOCK_ROWS, BLOCK_D)


def default_eps(x: Tensor | TensorMeta, eps: float | None) -> float:
    return torch.finfo(x.dtype).eps if eps is None else eps


def reference_rmsnorm(x: Tensor, weight: Tensor | None, eps: float | None) -> Tensor:
    x_float = x.to(torch.promote_types(x.dtype, torch.float32))  # fp64 stays fp64
    rms_inv = torch.rsqrt(torch.mean(x_float**2, dim=-1, keepdim=True) + default_eps(x, eps))
    normed = (x_float * rms_inv).to(x.dtype)
    return normed if weight is None else normed * weight


def reference_qk_rmsnorm(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float | None) -> tuple[Tensor, Tensor]:
    return reference_rmsnorm(q, q_weight, eps), reference_rmsnorm(k, k_weight, eps)


def _out_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    return promoted_dtype(x.dtype, weight)


class _OutputDtypes(NamedTuple):
    q: torch.dtype
    k: torch.dtype


@plan_cache
def _output_dtypes(cpu_kernels, q, k, q_weight, k_weight) -> _OutputDtypes | None:
    """Output dtypes of the kernel on operands with these `tensor_key`s, or None where the
    reference must run (`rows_fit_kernel` for each norm, q and k on one device)."""
    q, k, q_weight, k_weight = map(tensor_meta, (q, k, q_weight, k_weight))
    if not (rows_fit_kernel(cpu_kernels, q, q_weight) and rows_fit_kernel(cpu_kernels, k, k_weight) and q.device == k.device):
        return None
    return _OutputDtypes(promoted_dtype(q.dtype, q_weight), promoted_dtype(k.dtype, k_weight))


@plan_cache
def _launch_plan(
    key: tuple, q_out_stride: tuple[int, ...], k_out_stride: tuple[int, ...], eps: float | None
) -> KernelCall | None:
    """The launch on operands with `_output_dtypes` key `key`, outputs of these strides and
    `eps`, or None where a weight does not broadcast into its tensor or rows do not coalesce.
    Its call's own arguments: q, q_weight, q_out, k, k_weight, k_out."""
    _, *tensor_keys = key
    q, k, q_weight, k_weight = map(tensor_meta, tensor_keys)
    q_layout = row_layout(q.shape, q, q_weight, q._replace(stride=q_out_stride))
    k_layout = row_layout(k.shape, k, k_weight, k._replace(stride=k_out_stride))
    if q_layout is None or k_layout is None:
        return None
    (q_s, qw_s, qo_s), (k_s, kw_s, ko_s) = q_layout.strides, k_layout.strides
    eps_q, eps_k = default_eps(q, eps), default_eps(k, eps)
    args = (
        eps_q, eps_k,
        q_layout.n_rows, k_layout.n_rows,
        q_layout.n_inner, k_layout.n_inner,
        q.shape[-1], k.shape[-1],
        *q_s[:2], *qw_s[:2], *qo_s[:2], *k_s[:2], *kw_s[:2], *ko_s[:2],
    )
    constexprs = dict(q_sc=q_s[2], qw_sc=qw_s[2], qo_sc=qo_s[2], k_sc=k_s[2], kw_sc=kw_s[2], ko_sc=ko_s[2])
    settings = row_settings(max(q.shape[-1], k.shape[-1]), max(q.dtype.itemsize, k.dtype.itemsize))
    q_programs = settings.programs(q_layout.n_rows)
    constexprs |= dict(BLOCK_ROWS=settings.block_rows, BLOCK_D=settings.block_size)
    return KernelCall(q_programs + settings.programs(k_layout.n_rows), (q_programs, *args), constexprs,
                      settings.num_warps)


def _run_kernel(q, k, q_weight, k_weight, eps, *, in_place: bool, launch: Launch) -> tuple[Tensor, Tensor] | None:
    """The kernel's `(q_out, k_out)` (q and k themselves `in_place`), or None, launching
    nothing, where the reference must run. `launch`: see `launch.Launch` (`Launch.NONE`, the
    fake impls, allocates the outputs and launches nothing)."""
    key = (kernels_on_cpu(q, launch), tensor_key(q), tensor_key(k), tensor_key(q_weight), tensor_key(k_weight))
    dtypes = launch.planner(_output_dtypes)(*key)
    if dtypes is None:
        return None
    if in_place:
        q_out, k_out = q, k
    else:
        q_out, k_out = torch.empty_like(q, dtype=dtypes.q), torch.empty_like(k, dtype=dtypes.k)
    call = launch.planner(_launch_plan)(key, q_out.stride(), k_out.stride(), eps)
    if call is None:
        return None
    if launch is not Launch.NONE:
        with on_device_of(q):
            launch_kernel(_qk_rmsnorm_kernel, call, (q, q_weight, q_out, k, k_weight, k_out),
                          traced=launch is Launch.TRACED)
    return q_out, k_out


def _qk_rmsnorm(q, k, q_weight, k_weight, eps, launch: Launch) -> tuple[Tensor, Tensor]:
    """The op's body (`launch_mode(q)`) and fake impl (`Launch.NONE`): kernel or reference."""
    outputs = _run_kernel(q, k, q_weight, k_weight, eps, in_place=False, launch=launch)
    if outputs is not None:
        return outputs
    return reference_qk_rmsnorm(q, k, q_weight, k_weight, eps)


@fused_op("qk_rmsnorm")
def _qk_rmsnorm_op(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float | None) -> tuple[Tensor, Tensor]:
    return _qk_rmsnorm(q, k, q_weight, k_weight, eps, launch_mode(q))


@_qk_rmsnorm_op.register_fake
def _(q, k, q_weight, k_weight, eps):
    return _qk_rmsnorm(q, k, q_weight, k_weight, eps, Launch.NONE)


register_reference_autograd(_qk_rmsnorm_op, reference_qk_rmsnorm)


def qk_rmsnorm(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float | None = None) -> QKNormOut:
    """RMSNorm of q with q_weight and of k with k_weight, in one launch."""
    return QKNormOut(*_qk_rmsnorm_op(q, k, q_weight, k_weight, eps))


def _check_in_place(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor) -> None:
    for x, w in ((q, q_weight), (k, k_weight)):
        if _out_dtype(x, w) != x.dtype:
            raise ValueError(
                f"qk_rmsnorm_ writes in place, but a {x.dtype} input with a {w.dtype} weight "
                f"gives {_out_dtype(x, w)}: use qk_rmsnorm"
            )


@torch.library.custom_op("fusion_pass::qk_rmsnorm_", mutates_args=("q", "k"))
def qk_rmsnorm_(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float | None) -> None:
    """`qk_rmsnorm` written into q and k. No autograd: PyTorch's custom ops take autograd
    formulas only for functional ops; use `qk_rmsnorm` where gradients are needed."""
    _check_in_place(q, k, q_weight, k_weight)
    if _run_kernel(q, k, q_weight, k_weight, eps, in_place=True, launch=Launch.EAGER) is not None:
        return
    q_out, k_out = reference_qk_rmsnorm(q, k, q_weight, k_weight, eps)
    q.copy_(q_out)
    k.copy_(k_out)


@qk_rmsnorm_.register_fake
def _(q, k, q_weight, k_weight, eps):
    _check_in_place(q, k, q_weight, k_weight)
