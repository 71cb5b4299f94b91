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
D <= MAX_BLOCK on CUDA (or the CPU interpreter) take the kernel, the rest the reference (which,
like the official `x.float()`, normalises fp64 inputs in fp32).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import on_device_of, promoted_dtype, row_layout, row_settings, rows_fit_kernel, strided_args
from .reference_autograd import register_reference_autograd
from .row_access import load_row_f32, row_offsets, row_tile, store_row


class QKNormOut(NamedTuple):
    q: Tensor
    k: Tensor


@triton.jit
def _rmsnorm_tile(
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
    Q, q_s0, q_s1, q_sc,  # [q_rows, Dq] queries
    QW, qw_s0, qw_s1, qw_sc,  # q weight broadcast to q's shape
    Q_OUT, qo_s0, qo_s1, qo_sc,  # [q_rows, Dq] normed queries
    K, k_s0, k_s1, k_sc,  # [k_rows, Dk] keys
    KW, kw_s0, kw_s1, kw_sc,  # k weight broadcast to k's shape
    K_OUT, ko_s0, ko_s1, ko_sc,  # [k_rows, Dk] normed keys
    q_programs,  # programs [0, q_programs) norm q tiles, the rest k tiles
    q_rows, k_rows,
    q_inner, k_inner,  # rows per outer index of q and of k
    q_cols, k_cols,  # Dq, Dk
    q_eps, k_eps,
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next_power_of_2(max(Dq, Dk))
):
    """BLOCK_ROWS rows per program: `out = (x * rsqrt(sum(x^2) / D + eps)).to(x.dtype) * w`, fp32."""
    program = tl.program_id(0).to(tl.int64)
    if program < q_programs:
        _rmsnorm_tile(program * BLOCK_ROWS, q_rows, Q, q_s0, q_s1, q_sc, QW, qw_s0, qw_s1, qw_sc,
                      Q_OUT, qo_s0, qo_s1, qo_sc, q_inner, q_cols, q_eps, BLOCK_ROWS, BLOCK_D)
    else:
        _rmsnorm_tile((program - q_programs) * BLOCK_ROWS, k_rows, K, k_s0, k_s1, k_sc, KW, kw_s0, kw_s1, kw_sc,
                      K_OUT, ko_s0, ko_s1, ko_sc, k_inner, k_cols, k_eps, BLOCK_ROWS, BLOCK_D)


def _default_eps(x: Tensor, eps: float | None) -> float:
    return torch.finfo(x.dtype).eps if eps is None else eps


def reference_rmsnorm(x: Tensor, weight: Tensor, eps: float | None) -> Tensor:
    x_float = x.float()
    rms_inv = torch.rsqrt(torch.mean(x_float**2, dim=-1, keepdim=True) + _default_eps(x, eps))
    return (x_float * rms_inv).to(x.dtype) * weight


def reference_qk_rmsnorm(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float | None) -> tuple[Tensor, Tensor]:
    return reference_rmsnorm(q, q_weight, eps), reference_rmsnorm(k, k_weight, eps)


def _out_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    return promoted_dtype(x.dtype, weight)


def _launch(q, k, q_weight, k_weight, q_out, k_out, eps: float | None, launch: bool) -> bool:
    """Run the kernel writing q_out, k_out. False, launching nothing, where a weight does not
    broadcast into its tensor or rows do not coalesce (`row_layout`)."""
    q_layout, k_layout = row_layout(q.shape, q, q_weight, q_out), row_layout(k.shape, k, k_weight, k_out)
    if q_layout is None or k_layout is None:
        return False
    if not launch:
        return True
    settings = row_settings(max(q.shape[-1], k.shape[-1]), max(q.element_size(), k.element_size()))
    q_programs = triton.cdiv(q_layout.n_rows, settings.block_rows)
    with on_device_of(q):
        _qk_rmsnorm_kernel[(q_programs + triton.cdiv(k_layout.n_rows, settings.block_rows),)](
            *strided_args((q, q_weight, q_out), q_layout),
            *strided_args((k, k_weight, k_out), k_layout),
            q_programs,
            q_layout.n_rows,
            k_layout.n_rows,
            q_layout.n_inner,
            k_layout.n_inner,
            q.shape[-1],
            k.shape[-1],
            _default_eps(q, eps),
            _default_eps(k, eps),
            BLOCK_ROWS=settings.block_rows,
            BLOCK_D=settings.block_size,
            num_warps=settings.num_warps,
        )
    return True


def _kernel_fits(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor) -> bool:
    return rows_fit_kernel(q, q_weight) and rows_fit_kernel(k, k_weight) and q.device == k.device


def _qk_rmsnorm(q, k, q_weight, k_weight, eps, launch: bool) -> tuple[Tensor, Tensor]:
    """The op's body (`launch=True`) and fake impl (`launch=False`): kernel or reference."""
    if _kernel_fits(q, k, q_weight, k_weight):
        q_out = torch.empty_like(q, dtype=_out_dtype(q, q_weight))
        k_out = torch.empty_like(k, dtype=_out_dtype(k, k_weight))
        if _launch(q, k, q_weight, k_weight, q_out, k_out, eps, launch):
            return q_out, k_out
    return reference_qk_rmsnorm(q, k, q_weight, k_weight, eps)


@torch.library.custom_op("fusion_pass::qk_rmsnorm", mutates_args=())
def _qk_rmsnorm_op(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float | None) -> tuple[Tensor, Tensor]:
    return _qk_rmsnorm(q, k, q_weight, k_weight, eps, launch=True)


@_qk_rmsnorm_op.register_fake
def _(q, k, q_weight, k_weight, eps):
    return _qk_rmsnorm(q, k, q_weight, k_weight, eps, launch=False)


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
    if _kernel_fits(q, k, q_weight, k_weight) and _launch(q, k, q_weight, k_weight, q, k, eps, launch=True):
        return
    q_out, k_out = reference_qk_rmsnorm(q, k, q_weight, k_weight, eps)
    q.copy_(q_out)
    k.copy_(k_out)


@qk_rmsnorm_.register_fake
def _(q, k, q_weight, k_weight, eps):
    _check_in_place(q, k, q_weight, k_weight)
