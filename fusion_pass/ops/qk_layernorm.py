"""q/k LayerNorm of attention: both norms over the head dim D in one kernel launch.

    fusion_pass::qk_layernorm(q, k, q_weight, q_bias, k_weight, k_bias, eps) -> (q_out, k_out)

per tensor, `F.layer_norm(x, (D,), weight, bias, eps)`:

    out = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias       (biased variance)

the `nn.LayerNorm(head_dim)` q/k norms of CogVideoX (`qk_norm="layer_norm"`, on
`[B, H, L, D]` views `.view(B, L, H, D).transpose(1, 2)`) and of hy3dgen's ShapeVAE (on
`[B, N, H, D]` views of its q and kv projections, k a `split` of kv), affine or not.

q `[..., D]`, k `[..., Dk]` (D, Dk, shapes and dtypes may differ) of any strides, read in
place; outputs contiguous, of x's dtype, as F.layer_norm gives them.
Weights and biases `[D]` (`[Dk]`) or None, in their tensor's dtype (F.layer_norm's rule).
The kernel (fp16/bf16/fp32, D <= MAX_BLOCK, rows coalescing into three row dims, CUDA or the CPU
interpreter) computes in fp32 and rounds once, as F.layer_norm does; anything else runs the
reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    grouped_row_layout,
    plan_cache,
    row_settings,
    rows_fit_kernel,
    tensor_key,
    tensor_meta,
)
from .qk_rmsnorm import QKNormOut
from .reference_autograd import register_reference_autograd
from .reference_runs import refuse
from .row_access import layernorm_f32, load_row_f32, row_offsets, row_tile, store_row


@triton.jit
def _layernorm_tile(
    first_row,  # first row of this program's tile
    n_rows,  # rows of this tensor
    n_inner,  # rows per outer index: row r is (r // n_inner, r % n_inner)
    n_cols,  # D
    X, x_s0, x_s1, x_sc,  # [rows, D] input, (outer, inner, col) strides
    W, w_sc,  # weight [D] (read when HAS_WEIGHT)
    B, b_sc,  # bias [D] (read when HAS_BIAS)
    OUT, o_s0, o_s1, o_sc,  # [rows, D] output
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    outer, inner, cols, mask = row_tile(first_row, n_rows, n_inner, n_cols, BLOCK_ROWS, BLOCK_D)
    normed = layernorm_f32(load_row_f32(X, row_offsets(outer, inner, x_s0, x_s1, x_sc, cols), mask), mask, n_cols, eps)
    if HAS_WEIGHT:
        normed = normed * load_row_f32(W, row_offsets(outer, inner, 0, 0, w_sc, cols), mask)
    if HAS_BIAS:
        normed = normed + load_row_f32(B, row_offsets(outer, inner, 0, 0, b_sc, cols), mask)
    store_row(OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, cols), mask, normed)


@triton.jit
def _qk_layernorm_kernel(
    Q,  # [q_rows, Dq] queries
    QW,  # q weight [Dq] (None without)
    QB,  # q bias [Dq] (None without)
    Q_OUT,  # [q_rows, Dq] output
    K,  # [k_rows, Dk] keys
    KW,  # k weight [Dk] (None without)
    KB,  # k bias [Dk] (None without)
    K_OUT,  # [k_rows, Dk] output
    q_group_programs,  # programs per row group of q: q program p takes group p // q_group_programs
    q_programs,  # programs [0, q_programs) norm q tiles, the rest k tiles
    k_group_programs,
    eps,
    q_rows, k_rows,  # rows per group
    q_inner, k_inner,  # rows per outer index of q and of k
    q_cols, k_cols,  # Dq, Dk
    q_sg, q_s0, q_s1,  # (group, outer, inner) strides of Q; likewise for the outputs and K
    qo_sg, qo_s0, qo_s1,
    k_sg, k_s0, k_s1,
    ko_sg, ko_s0, ko_s1,
    q_sc: tl.constexpr,  # column strides, constexpr: 1 but for odd views
    qw_sc: tl.constexpr,
    qb_sc: tl.constexpr,
    qo_sc: tl.constexpr,
    k_sc: tl.constexpr,
    kw_sc: tl.constexpr,
    kb_sc: tl.constexpr,
    ko_sc: tl.constexpr,
    Q_HAS_WEIGHT: tl.constexpr,
    Q_HAS_BIAS: tl.constexpr,
    K_HAS_WEIGHT: tl.constexpr,
    K_HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next_power_of_2(max(Dq, Dk))
):
    """BLOCK_ROWS rows per program: `out = (x - mean) / sqrt(var + eps) * w + b`, fp32, one cast on store."""
    program = tl.program_id(0).to(tl.int64)
    if program < q_programs:
        g = program // q_group_programs
        _layernorm_tile((program % q_group_programs) * BLOCK_ROWS, q_rows, q_inner, q_cols,
                        Q + g * q_sg, q_s0, q_s1, q_sc, QW, qw_sc, QB, qb_sc, Q_OUT + g * qo_sg, qo_s0, qo_s1, qo_sc,
                        eps, Q_HAS_WEIGHT, Q_HAS_BIAS, BLOCK_ROWS, BLOCK_D)
    else:
        program = program - q_programs
        g = program // k_group_programs
        _layernorm_tile((program % k_group_programs) * BLOCK_ROWS, k_rows, k_inner, k_cols,
                        K + g * k_sg, k_s0, k_s1, k_sc, KW, kw_sc, KB, kb_sc, K_OUT + g * ko_sg, ko_s0, ko_s1, ko_sc,
                        eps, K_HAS_WEIGHT, K_HAS_BIAS, BLOCK_ROWS, BLOCK_D)


def reference_qk_layernorm(
    q: Tensor, k: Tensor, q_weight: Tensor | None, q_bias: Tensor | None,
    k_weight: Tensor | None, k_bias: Tensor | None, eps: float,
) -> tuple[Tensor, Tensor]:
    return (F.layer_norm(q, (q.shape[-1],), q_weight, q_bias, eps),
            F.layer_norm(k, (k.shape[-1],), k_weight, k_bias, eps))


def _params_fit(x: TensorMeta, *params: TensorMeta | None) -> bool:
    """F.layer_norm's weight and bias: `[D]` in x's dtype (None: absent)."""
    return all(p is None or (p.shape == x.shape[-1:] and p.dtype == x.dtype) for p in params)


@plan_cache
def _fits_kernel(cpu_kernels, q, k, q_weight, q_bias, k_weight, k_bias) -> bool:
    """Whether the kernel takes operands with these `tensor_key`s (`rows_fit_kernel` for each
    norm, one device, F.layer_norm's parameters)."""
    q, k, q_weight, q_bias, k_weight, k_bias = map(tensor_meta, (q, k, q_weight, q_bias, k_weight, k_bias))
    q_params = [p for p in (q_weight, q_bias) if p is not None]
    k_params = [p for p in (k_weight, k_bias) if p is not None]
    if not (rows_fit_kernel(cpu_kernels, q, *q_params) and rows_fit_kernel(cpu_kernels, k, *k_params)):
        return False
    if q.device != k.device:
        refuse(f"q and k on several devices ({q.device}, {k.device})")
        return False
    if not (_params_fit(q, q_weight, q_bias) and _params_fit(k, k_weight, k_bias)):
        refuse("weights/biases not [D] in q's and k's dtypes, as F.layer_norm requires")
        return False
    return True


@plan_cache
def _launch_plan(
    key: tuple, q_out_stride: tuple[int, ...], k_out_stride: tuple[int, ...], eps: float
) -> KernelCall | None:
    """The launch on operands with `_fits_kernel` key `key`, outputs of these strides and `eps`,
    or None where rows do not coalesce into three row dims (`grouped_row_layout`: a `[B, H, L, D]`
    view of `[B, L, H, D]` into a contiguous output has rows (B, L, H) in one, (B, H, L) in the other).
    Its call's own arguments: q, q_weight, q_bias, q_out, k, k_weight, k_bias, k_out."""
    _, *tensor_keys = key
    q, k, q_weight, q_bias, k_weight, k_bias = map(tensor_meta, tensor_keys)
    q_layout = grouped_row_layout(q.shape, q, q._replace(stride=q_out_stride))
    k_layout = grouped_row_layout(k.shape, k, k._replace(stride=k_out_stride))
    if q_layout is None or k_layout is None:
        return None
    (q_s, qo_s), (k_s, ko_s) = q_layout.rows.strides, k_layout.rows.strides
    (q_sg, qo_sg), (k_sg, ko_sg) = q_layout.group_strides, k_layout.group_strides
    args = (
        eps,
        q_layout.rows.n_rows, k_layout.rows.n_rows,
        q_layout.rows.n_inner, k_layout.rows.n_inner,
        q.shape[-1], k.shape[-1],
        q_sg, *q_s[:2], qo_sg, *qo_s[:2], k_sg, *k_s[:2], ko_sg, *ko_s[:2],
    )

    def col(p: TensorMeta | None) -> int:
        return 0 if p is None else p.stride[-1]

    constexprs = dict(
        q_sc=q_s[2], qw_sc=col(q_weight), qb_sc=col(q_bias), qo_sc=qo_s[2],
        k_sc=k_s[2], kw_sc=col(k_weight), kb_sc=col(k_bias), ko_sc=ko_s[2],
        Q_HAS_WEIGHT=q_weight is not None, Q_HAS_BIAS=q_bias is not None,
        K_HAS_WEIGHT=k_weight is not None, K_HAS_BIAS=k_bias is not None,
    )
    settings = row_settings(max(q.shape[-1], k.shape[-1]), max(q.dtype.itemsize, k.dtype.itemsize))
    q_group_programs, q_programs = settings.grouped_programs(q_layout.n_groups, q_layout.rows.n_rows)
    k_group_programs, k_programs = settings.grouped_programs(k_layout.n_groups, k_layout.rows.n_rows)
    constexprs |= dict(BLOCK_ROWS=settings.block_rows, BLOCK_D=settings.block_size)
    return KernelCall(q_programs + k_programs, (q_group_programs, q_programs, k_group_programs, *args), constexprs,
                      settings.num_warps)


def _qk_layernorm(q, k, q_weight, q_bias, k_weight, k_bias, eps, launch: Launch) -> tuple[Tensor, Tensor]:
    """The op's body (`launch_mode(q)`) and fake impl (`Launch.NONE`, which allocates the
    outputs and launches nothing): kernel or reference."""
    tensors = (q, k, q_weight, q_bias, k_weight, k_bias)
    key = (kernels_on_cpu(q, launch), *map(tensor_key, tensors))
    if not launch.planner(_fits_kernel)(*key):
        return reference_qk_layernorm(*tensors, eps)
    # Contiguous, as F.layer_norm returns (it normalises `x.contiguous()`).
    q_out, k_out = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k))
    call = launch.planner(_launch_plan)(key, q_out.stride(), k_out.stride(), eps)
    if call is None:
        return reference_qk_layernorm(*tensors, eps)
    if launch is not Launch.NONE:
        with on_device_of(q):
            launch_kernel(_qk_layernorm_kernel, call, (q, q_weight, q_bias, q_out, k, k_weight, k_bias, k_out),
                          traced=launch is Launch.TRACED)
    return q_out, k_out


@fused_op("qk_layernorm")
def _qk_layernorm_op(
    q: Tensor, k: Tensor, q_weight: Tensor | None, q_bias: Tensor | None,
    k_weight: Tensor | None, k_bias: Tensor | None, eps: float,
) -> tuple[Tensor, Tensor]:
    return _qk_layernorm(q, k, q_weight, q_bias, k_weight, k_bias, eps, launch_mode(q))


@_qk_layernorm_op.register_fake
def _(q, k, q_weight, q_bias, k_weight, k_bias, eps):
    return _qk_layernorm(q, k, q_weight, q_bias, k_weight, k_bias, eps, Launch.NONE)


register_reference_autograd(_qk_layernorm_op, reference_qk_layernorm)


def qk_layernorm(
    q: Tensor, k: Tensor, q_weight: Tensor | None = None, q_bias: Tensor | None = None,
    k_weight: Tensor | None = None, k_bias: Tensor | None = None, eps: float = 1e-5,
) -> QKNormOut:
    """LayerNorm of q (q_weight, q_bias) and of k (k_weight, k_bias) over the last dim, in one launch."""
    return QKNormOut(*_qk_layernorm_op(q, k, q_weight, q_bias, k_weight, k_bias, eps))
