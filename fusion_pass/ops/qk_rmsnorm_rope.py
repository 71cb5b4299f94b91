"""q/k RMSNorm followed by rotary position embedding (RoPE), both tensors in one kernel launch:

    fusion_pass::qk_rmsnorm_rope(q, k, q_weight, k_weight, eps, cos, sin, interleaved) -> (q_out, k_out)

per tensor x (q or k), over its last dim D (D even), the unfused diffusers code it replaces:

    n   = rmsnorm(x) * w           diffusers' `RMSNorm` / `torch.nn.RMSNorm` (w [D] or None)
    out = (n.float() * cos + rotate(n).float() * sin).to(n.dtype)

with `rotate` that of diffusers' `apply_rotary_emb(n, (cos, sin), use_real=True, ...)`
(`models/embeddings.py`), on pairs (n_a, n_b) -> (-n_b, n_a):

- `interleaved=True`  (`use_real_unbind_dim=-1`; Flux, HunyuanVideo's double blocks, LTX): pairs
  are columns (2j, 2j + 1);
- `interleaved=False` (`use_real_unbind_dim=-2`; CogView4, Cosmos, OmniGen): pairs are columns
  (j, j + D/2).

cos, sin: the full form `[..., D]` (diffusers' real form, one value per column) or the pair form
`[..., D/2]` (one value per pair, used for both of its columns): the complex form
`x * freqs_cis` (QwenImage's `apply_rotary_emb_qwen(use_real=False)`, Lumina) is the interleaved
pair form with `cos, sin = torch.view_as_real(freqs_cis).unbind(-1)`, and Wan's rotary is it
with `cos = freqs_cos[..., 0::2], sin = freqs_sin[..., 1::2]`. Their leading dims broadcast into
q's and into k's (`[L, D]` for `[B, H, L, D]`, `[L, 1, D]` or `[1, L, 1, D]` for `[B, L, H, D]`,
`[B, L, D]` for LTX's `[B, L, H * D]` rows), read through strides, never materialised.

q `[..., D]` and k `[..., D]` (same D; Hk and L may differ) of any strides, typically
`qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)` views or `[B, L, H, D]` unflattened projections.
Outputs: `torch.empty_like(x)` (x's dim order, as the eager ops give), of dtype
`torch.result_type(rmsnorm(x), w)` (x's dtype without weight). eps=None means
`torch.finfo(x.dtype).eps` (torch.nn.RMSNorm's convention).

Rounding: the kernel computes in fp32 and rounds once, on store (the unfused code rounds the
norm's output, its product with w, then the rotation): never less accurate. fp16/bf16/fp32 with
D <= MAX_BLOCK on CUDA (or the CPU interpreter), per-channel weights and at most three row dims
per tensor after coalescing (`launch.grouped_row_layout`: `[B, H, L, D]` qkv views under
`[L, D]` tables are rows `(B, L, H)`) take the kernel; the rest runs the reference (the
unfused code in fp32, or fp64 for fp64 inputs). An odd D, q and k of different D, or cos/sin of a width other than D or
D/2 raise ValueError.

A cat of two streams between norm and RoPE (Flux's double blocks concatenate text and image q/k,
then rotate the joint sequence) is `qk_rmsnorm_cat_rope`'s: the same kernel with its second stream
switched on (`TWO_STREAMS`), four row sets (q0, k0, q1, k1) writing into the joint q and k at their
stream's offset and reading the tables there. Each row set is a `RopeRows` (`rope_rows`), a launch
a `launch.KernelCall` (`rope_launch`, `launch_rope`), for either op.

Not covered (the matcher refuses them): a norm over all heads followed by per-head RoPE (Wan's
`rms_norm_across_heads` norms `[B, L, H * D]` rows, then rotates `[B, L, H, D]`); RoPE on part of
the tokens (HunyuanVideo's single blocks); partial rotary (RoPE on the first rot_dim < D columns).
"""

from __future__ import annotations

import itertools
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
    grouped_row_layout,
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
from .reference_autograd import register_reference_autograd
from .row_access import load_row_f32, row_offsets, row_tile, store_row


@triton.jit
def _pairs(tile, BLOCK_ROWS: tl.constexpr, BLOCK_P: tl.constexpr):
    """Columns (2j, 2j + 1) of a [BLOCK_ROWS, 2 * BLOCK_P] tile, as two [BLOCK_ROWS, BLOCK_P] tiles."""
    return tl.split(tl.reshape(tile, (BLOCK_ROWS, BLOCK_P, 2)))


@triton.jit
def _rmsnorm_rope_tile(
    first_row,  # first row of this program's tile
    n_rows,  # rows of this tensor
    n_inner,  # rows per outer index: row r is (r // n_inner, r % n_inner)
    n_pairs,  # D / 2
    X, x_s0, x_s1, x_sc,  # [rows, D] input, (outer, inner, col) strides
    W, w_sc,  # per-channel weight [D] (read when HAS_WEIGHT)
    COS, c_s0, c_s1, c_sc,  # cos broadcast to [rows, D] ([rows, D/2] when PAIR_FREQS), 0 where broadcast
    SIN, s_s0, s_s1, s_sc,  # sin, likewise
    OUT, o_s0, o_s1, o_sc,  # [rows, D] output
    eps,
    HAS_WEIGHT: tl.constexpr,
    INTERLEAVED: tl.constexpr,  # pairs (2j, 2j + 1); else (j, j + D/2)
    PAIR_FREQS: tl.constexpr,  # cos/sin hold one value per pair j; else one per column
    BLOCK_ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr,  # next_power_of_2(D / 2)
):
    """BLOCK_ROWS rows, each as its D/2 pairs (a, b) of columns (col_a, col_b):

        rstd = 1 / sqrt(sum(x^2) / D + eps);  n = x * rstd * w
        out[col_a] = n_a * cos[col_a] - n_b * sin[col_a]
        out[col_b] = n_b * cos[col_b] + n_a * sin[col_b]

    (cos/sin at pair j for both columns when PAIR_FREQS). fp32 throughout, one cast on store.

    Interleaved pairs are loaded and stored as whole rows (contiguous, vectorised accesses) and
    split into their even and odd columns in registers (`_pairs`); the halves (j, j + D/2) are
    two contiguous loads already."""
    if INTERLEAVED:
        outer, inner, cols, mask = row_tile(first_row, n_rows, n_inner, 2 * n_pairs, BLOCK_ROWS, 2 * BLOCK_P)
        x_a, x_b = _pairs(load_row_f32(X, row_offsets(outer, inner, x_s0, x_s1, x_sc, cols), mask),
                          BLOCK_ROWS, BLOCK_P)
        if PAIR_FREQS:
            _, _, pairs, pair_mask = row_tile(first_row, n_rows, n_inner, n_pairs, BLOCK_ROWS, BLOCK_P)
            cos_a = load_row_f32(COS, row_offsets(outer, inner, c_s0, c_s1, c_sc, pairs), pair_mask)
            sin_a = load_row_f32(SIN, row_offsets(outer, inner, s_s0, s_s1, s_sc, pairs), pair_mask)
            cos_b = cos_a
            sin_b = sin_a
        else:
            cos_a, cos_b = _pairs(load_row_f32(COS, row_offsets(outer, inner, c_s0, c_s1, c_sc, cols), mask),
                                  BLOCK_ROWS, BLOCK_P)
            sin_a, sin_b = _pairs(load_row_f32(SIN, row_offsets(outer, inner, s_s0, s_s1, s_sc, cols), mask),
                                  BLOCK_ROWS, BLOCK_P)
        if HAS_WEIGHT:
            w_a, w_b = _pairs(load_row_f32(W, row_offsets(outer, inner, 0, 0, w_sc, cols), mask),
                              BLOCK_ROWS, BLOCK_P)
    else:
        outer, inner, col_a, mask = row_tile(first_row, n_rows, n_inner, n_pairs, BLOCK_ROWS, BLOCK_P)
        col_b = col_a + n_pairs
        x_a = load_row_f32(X, row_offsets(outer, inner, x_s0, x_s1, x_sc, col_a), mask)
        x_b = load_row_f32(X, row_offsets(outer, inner, x_s0, x_s1, x_sc, col_b), mask)
        if PAIR_FREQS:
            cos_a = load_row_f32(COS, row_offsets(outer, inner, c_s0, c_s1, c_sc, col_a), mask)
            sin_a = load_row_f32(SIN, row_offsets(outer, inner, s_s0, s_s1, s_sc, col_a), mask)
            cos_b = cos_a
            sin_b = sin_a
        else:
            cos_a = load_row_f32(COS, row_offsets(outer, inner, c_s0, c_s1, c_sc, col_a), mask)
            cos_b = load_row_f32(COS, row_offsets(outer, inner, c_s0, c_s1, c_sc, col_b), mask)
            sin_a = load_row_f32(SIN, row_offsets(outer, inner, s_s0, s_s1, s_sc, col_a), mask)
            sin_b = load_row_f32(SIN, row_offsets(outer, inner, s_s0, s_s1, s_sc, col_b), mask)
        if HAS_WEIGHT:
            w_a = load_row_f32(W, row_offsets(outer, inner, 0, 0, w_sc, col_a), mask)
            w_b = load_row_f32(W, row_offsets(outer, inner, 0, 0, w_sc, col_b), mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x_a * x_a + x_b * x_b, axis=1)[:, None] / (2 * n_pairs) + eps)
    n_a = x_a * rstd
    n_b = x_b * rstd
    if HAS_WEIGHT:
        n_a = n_a * w_a
        n_b = n_b * w_b
    out_a = n_a * cos_a - n_b * sin_a
    out_b = n_b * cos_b + n_a * sin_b
    if INTERLEAVED:
        out = tl.reshape(tl.join(out_a, out_b), (BLOCK_ROWS, 2 * BLOCK_P))
        store_row(OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, cols), mask, out)
    else:
        store_row(OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, col_a), mask, out_a)
        store_row(OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, col_b), mask, out_b)


@triton.jit
def grouped_rope_tile(
    program,  # this program's index among the tensor's programs
    group_programs,  # programs per row group: program p takes group p // group_programs
    n_rows, n_inner, n_pairs,  # rows per group, rows per outer index, D / 2
    X, x_sg, x_s0, x_s1, x_sc,  # input: (group, outer, inner, col) strides
    W, w_sc,  # per-channel weight [D] (read when HAS_WEIGHT)
    COS, c_sg, c_s0, c_s1, c_sc,  # cos over x's rows, 0 where broadcast
    SIN, s_sg, s_s0, s_s1, s_sc,  # sin, likewise
    OUT, o_sg, o_s0, o_s1, o_sc,  # output
    eps,
    HAS_WEIGHT: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    PAIR_FREQS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """`_rmsnorm_rope_tile` of one tensor laid out as a `launch.GroupedRowLayout`: the program's
    group offsets the pointers, its index within the group picks the tile."""
    g = program // group_programs
    _rmsnorm_rope_tile((program % group_programs) * BLOCK_ROWS, n_rows, n_inner, n_pairs,
                       X + g * x_sg, x_s0, x_s1, x_sc, W, w_sc,
                       COS + g * c_sg, c_s0, c_s1, c_sc, SIN + g * s_sg, s_s0, s_s1, s_sc,
                       OUT + g * o_sg, o_s0, o_s1, o_sc, eps,
                       HAS_WEIGHT, INTERLEAVED, PAIR_FREQS, BLOCK_ROWS, BLOCK_P)


@triton.jit
def _qk_rmsnorm_rope_kernel(
    Q0, QW0, K0, KW0,  # stream 0: q and k (`[..., D]`, any strides) and their weights [D] (None without)
    Q1, QW1, K1, KW1,  # stream 1 (`qk_rmsnorm_cat_rope`; stream 0's again for one stream, unread)
    Q_OUT, K_OUT,  # outputs: of q and k, or the joint q and k of two streams
    COS, SIN,  # tables, broadcast to each row set's rows through its strides below
    q0_gp, k0_gp, q1_gp, k1_gp,  # programs per row group of each row set (`grouped_rope_tile`)
    q0_end, k0_end, q1_end,  # programs [0, q0_end) take q0's tiles, then k0's up to k0_end, q1's up to q1_end, k1's
    n_pairs,  # D / 2
    # per row set (q0, k0, q1, k1): eps, rows per group, rows per outer index, the (group, outer, inner)
    # strides of its input, of its output part, of its cos and sin parts (0 where broadcast), and the
    # element offsets of those parts from Q_OUT / K_OUT, COS and SIN (0 for one stream; all of stream
    # 1's 0 and unread for one stream)
    q0_eps, q0_rows, q0_inner, q0_sg, q0_s0, q0_s1, q0o_sg, q0o_s0, q0o_s1, q0c_sg, q0c_s0, q0c_s1,
    q0s_sg, q0s_s0, q0s_s1, q0o_off, q0c_off, q0s_off,
    k0_eps, k0_rows, k0_inner, k0_sg, k0_s0, k0_s1, k0o_sg, k0o_s0, k0o_s1, k0c_sg, k0c_s0, k0c_s1,
    k0s_sg, k0s_s0, k0s_s1, k0o_off, k0c_off, k0s_off,
    q1_eps, q1_rows, q1_inner, q1_sg, q1_s0, q1_s1, q1o_sg, q1o_s0, q1o_s1, q1c_sg, q1c_s0, q1c_s1,
    q1s_sg, q1s_s0, q1s_s1, q1o_off, q1c_off, q1s_off,
    k1_eps, k1_rows, k1_inner, k1_sg, k1_s0, k1_s1, k1o_sg, k1o_s0, k1o_s1, k1c_sg, k1c_s0, k1c_s1,
    k1s_sg, k1s_s0, k1s_s1, k1o_off, k1c_off, k1s_off,
    q0_sc: tl.constexpr,  # column strides, constexpr: 1 but for odd views
    k0_sc: tl.constexpr,
    q1_sc: tl.constexpr,
    k1_sc: tl.constexpr,
    qw0_sc: tl.constexpr,
    kw0_sc: tl.constexpr,
    qw1_sc: tl.constexpr,
    kw1_sc: tl.constexpr,
    qo_sc: tl.constexpr,
    ko_sc: tl.constexpr,
    c_sc: tl.constexpr,
    s_sc: tl.constexpr,
    Q0_HAS_WEIGHT: tl.constexpr,
    K0_HAS_WEIGHT: tl.constexpr,
    Q1_HAS_WEIGHT: tl.constexpr,
    K1_HAS_WEIGHT: tl.constexpr,
    TWO_STREAMS: tl.constexpr,  # False: the row sets q0 and k0 only (k0_end is the grid)
    INTERLEAVED: tl.constexpr,
    PAIR_FREQS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_P: tl.constexpr,  # next_power_of_2(D / 2)
):
    """BLOCK_ROWS rows of one row set per program: RMSNorm, weight, rotation (`_rmsnorm_rope_tile`)."""
    program = tl.program_id(0).to(tl.int64)
    if program < q0_end:
        grouped_rope_tile(program, q0_gp, q0_rows, q0_inner, n_pairs, Q0, q0_sg, q0_s0, q0_s1, q0_sc, QW0, qw0_sc,
                          COS + q0c_off, q0c_sg, q0c_s0, q0c_s1, c_sc, SIN + q0s_off, q0s_sg, q0s_s0, q0s_s1, s_sc,
                          Q_OUT + q0o_off, q0o_sg, q0o_s0, q0o_s1, qo_sc, q0_eps,
                          Q0_HAS_WEIGHT, INTERLEAVED, PAIR_FREQS, BLOCK_ROWS, BLOCK_P)
    elif program < k0_end:
        grouped_rope_tile(program - q0_end, k0_gp, k0_rows, k0_inner, n_pairs, K0, k0_sg, k0_s0, k0_s1, k0_sc,
                          KW0, kw0_sc,
                          COS + k0c_off, k0c_sg, k0c_s0, k0c_s1, c_sc, SIN + k0s_off, k0s_sg, k0s_s0, k0s_s1, s_sc,
                          K_OUT + k0o_off, k0o_sg, k0o_s0, k0o_s1, ko_sc, k0_eps,
                          K0_HAS_WEIGHT, INTERLEAVED, PAIR_FREQS, BLOCK_ROWS, BLOCK_P)
    elif TWO_STREAMS:  # constexpr: one stream compiles no code for stream 1
        if program < q1_end:
            grouped_rope_tile(program - k0_end, q1_gp, q1_rows, q1_inner, n_pairs, Q1, q1_sg, q1_s0, q1_s1, q1_sc,
                              QW1, qw1_sc,
                              COS + q1c_off, q1c_sg, q1c_s0, q1c_s1, c_sc, SIN + q1s_off, q1s_sg, q1s_s0, q1s_s1, s_sc,
                              Q_OUT + q1o_off, q1o_sg, q1o_s0, q1o_s1, qo_sc, q1_eps,
                              Q1_HAS_WEIGHT, INTERLEAVED, PAIR_FREQS, BLOCK_ROWS, BLOCK_P)
        else:
            grouped_rope_tile(program - q1_end, k1_gp, k1_rows, k1_inner, n_pairs, K1, k1_sg, k1_s0, k1_s1, k1_sc,
                              KW1, kw1_sc,
                              COS + k1c_off, k1c_sg, k1c_s0, k1c_s1, c_sc, SIN + k1s_off, k1s_sg, k1s_s0, k1s_s1, s_sc,
                              K_OUT + k1o_off, k1o_sg, k1o_s0, k1o_s1, ko_sc, k1_eps,
                              K1_HAS_WEIGHT, INTERLEAVED, PAIR_FREQS, BLOCK_ROWS, BLOCK_P)


def check_rope_operands(x: Tensor | TensorMeta, other: Tensor | TensorMeta, cos, sin) -> None:
    """ValueError unless x and other share an even D and cos/sin are D or D/2 wide."""
    d = x.shape[-1] if len(x.shape) else 0
    if d % 2 or len(x.shape) == 0:
        raise ValueError(f"RoPE rotates pairs of columns: the last dim of q/k must be even, got {tuple(x.shape)}")
    if len(other.shape) == 0 or other.shape[-1] != d:
        raise ValueError(f"q and k must share their last dim for one RoPE, got {tuple(x.shape)} and {tuple(other.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if len(t.shape) == 0 or t.shape[-1] not in (d, d // 2):
            raise ValueError(f"{name} must be {d} wide (one value per column) or {d // 2} (one per pair), "
                             f"got {tuple(t.shape)} for q/k of last dim {d}")


def reference_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """diffusers' `apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1 if
    interleaved else -2)` with cos/sin already broadcastable to x; pair-form (`[..., D/2]`)
    cos/sin are first widened to one value per column. Computes in fp32 (fp64 stays fp64)."""
    if 2 * cos.shape[-1] == x.shape[-1]:
        cos, sin = (t.repeat_interleave(2, dim=-1) if interleaved else torch.cat((t, t), dim=-1) for t in (cos, sin))
    half = x.shape[-1] // 2  # not -1: a tensor without elements has no inferable dim
    if interleaved:
        real, imag = x.reshape(*x.shape[:-1], half, 2).unbind(-1)
        rotated = torch.stack((-imag, real), dim=-1).flatten(-2)
    else:
        real, imag = x.reshape(*x.shape[:-1], 2, half).unbind(-2)
        rotated = torch.cat((-imag, real), dim=-1)
    compute = torch.promote_types(x.dtype, torch.float32)
    return (x.to(compute) * cos + rotated.to(compute) * sin).to(x.dtype)


def reference_qk_rmsnorm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, eps: float | None,
    cos: Tensor, sin: Tensor, interleaved: bool,
) -> tuple[Tensor, Tensor]:
    check_rope_operands(q, k, cos, sin)
    return (
        reference_rope(reference_rmsnorm(q, q_weight, eps), cos, sin, interleaved),
        reference_rope(reference_rmsnorm(k, k_weight, eps), cos, sin, interleaved),
    )


class _OutputDtypes(NamedTuple):
    q: torch.dtype
    k: torch.dtype


class RopeRows(NamedTuple):
    """The rows of one row set (a tensor's norm and rotation) as `_qk_rmsnorm_rope_kernel` arguments."""

    n_groups: int
    n_rows: int  # rows per group
    n_inner: int  # rows per outer index
    strides: tuple[int, ...]  # (group, outer, inner) strides of x, out, cos, sin, in that order
    offsets: tuple[int, int, int] = (0, 0, 0)  # elements from Q_OUT / K_OUT, COS and SIN to its parts


@plan_cache
def _output_dtypes(cpu_kernels, q, k, q_weight, k_weight, cos, sin) -> _OutputDtypes | None:
    """Output dtypes of the kernel on operands with these `tensor_key`s, or None where the
    reference must run (`rows_fit_kernel`, one device). Raises `check_rope_operands`' ValueError
    (not memoised: on every call of a bad signature)."""
    q, k, q_weight, k_weight, cos, sin = map(tensor_meta, (q, k, q_weight, k_weight, cos, sin))
    check_rope_operands(q, k, cos, sin)
    q_operands = [t for t in (q_weight, cos, sin) if t is not None]
    k_operands = [t for t in (k_weight, cos, sin) if t is not None]
    if not (rows_fit_kernel(cpu_kernels, q, *q_operands) and rows_fit_kernel(cpu_kernels, k, *k_operands)
            and q.device == k.device):
        return None
    weights = (q_weight, k_weight)
    return _OutputDtypes(*(x.dtype if w is None else promoted_dtype(x.dtype, w) for x, w in zip((q, k), weights)))


def row_operand(t: TensorMeta) -> TensorMeta:
    """`t` with its last dim cut to one unit column: a `row_layout` operand of the rows alone,
    for cos/sin whose last dim (D/2 in the pair form) need not be x's."""
    return t._replace(shape=(*t.shape[:-1], 1), stride=(*t.stride[:-1], 1))


def channel_stride(weight: TensorMeta | None, x: TensorMeta) -> int | None:
    """The column stride of a per-channel weight broadcast into x (0 without a weight: unread),
    or None for a weight that varies along x's rows."""
    if weight is None:
        return 0
    strides = broadcast_strides(weight, x.shape)
    return None if strides is None or any(strides[:-1]) else strides[-1]


def rope_rows(x: TensorMeta, out: TensorMeta, cos: TensorMeta, sin: TensorMeta,
              offsets: tuple[int, int, int] = (0, 0, 0)) -> RopeRows | None:
    """x's rows with its output and tables (of x's rows, broadcasting into them), or None where
    a table adds dims or the rows do not coalesce into three row dims (`grouped_row_layout`)."""
    layout = grouped_row_layout((*x.shape[:-1], 1), *map(row_operand, (x, out, cos, sin)))
    if layout is None:
        return None
    strides = tuple(s for g, (s0, s1, _) in zip(layout.group_strides, layout.rows.strides) for s in (g, s0, s1))
    return RopeRows(layout.n_groups, layout.rows.n_rows, layout.rows.n_inner, strides, offsets)


def rope_launch(inputs: tuple[TensorMeta, ...], weights: tuple[TensorMeta | None, ...], rows: tuple[RopeRows, ...],
                out_col_strides: tuple[int, int], cos: TensorMeta, sin: TensorMeta, eps: float | None,
                interleaved: bool) -> KernelCall | None:
    """The launch over the row sets `rows` of `inputs` (q, k or q0, k0, q1, k1) with their `weights`,
    or None where a weight is not per-channel: one program grid over every row set. Its call's own
    arguments (`launch_rope`): each stream's q, q_weight, k, k_weight, the outputs, cos, sin.

    One stream passes its own tensors and zeros for stream 1's arguments, which compile to nothing
    (`TWO_STREAMS`): the same argument types as a real second stream, no None where a launch through
    Inductor (`wrap_triton`) expects a tensor or an int."""
    weight_cols = [channel_stride(w, x) for w, x in zip(weights, inputs)]
    if None in weight_cols:
        return None
    absent = 4 - len(rows)  # the row sets of a second stream, for one stream
    d = inputs[0].shape[-1]
    settings = row_settings(d, max(x.dtype.itemsize for x in inputs))
    per_group, programs = zip(*(settings.grouped_programs(r.n_groups, r.n_rows) for r in rows))
    ends = tuple(itertools.accumulate(programs))
    args = (
        *per_group, *(0,) * absent,
        *(*ends, 0)[:3],
        d // 2,
        *(a for x, r in zip(inputs, rows) for a in (default_eps(x, eps), r.n_rows, r.n_inner, *r.strides, *r.offsets)),
        *(0,) * (absent * len(_ROW_SET_ARGS)),
    )
    names = ("q0", "k0", "q1", "k1")
    constexprs = {f"{name}_sc": x.stride[-1] for name, x in zip(names, inputs)}
    constexprs |= {f"{name[0]}w{name[1]}_sc": col for name, col in zip(names, weight_cols)}
    constexprs |= {f"{name.upper()}_HAS_WEIGHT": w is not None for name, w in zip(names, weights)}
    for name in names[len(rows):]:  # absent: compiled out
        constexprs |= {f"{name}_sc": 0, f"{name[0]}w{name[1]}_sc": 0, f"{name.upper()}_HAS_WEIGHT": False}
    constexprs |= dict(
        qo_sc=out_col_strides[0], ko_sc=out_col_strides[1], c_sc=cos.stride[-1], s_sc=sin.stride[-1],
        TWO_STREAMS=not absent, INTERLEAVED=bool(interleaved), PAIR_FREQS=bool(2 * cos.shape[-1] == d),
        BLOCK_ROWS=settings.block_rows, BLOCK_P=settings.block_size // 2,
    )  # bools: concrete under SymInts
    return KernelCall(ends[-1], args, constexprs, settings.num_warps)


_ROW_SET_ARGS = ("eps", "rows", "inner", *(f"{t}_{s}" for t in ("x", "o", "c", "s") for s in ("sg", "s0", "s1")),
                 "o_off", "c_off", "s_off")
"""The scalar arguments of one row set, in the kernel's order."""


def launch_rope(call: KernelCall, streams: tuple, q_out: Tensor, k_out: Tensor, cos: Tensor, sin: Tensor,
                launch: Launch) -> None:
    """Launch `_qk_rmsnorm_rope_kernel` by `call` (`rope_launch`) on `streams`: q, q_weight, k,
    k_weight of stream 0, then of stream 1 (stream 0's again for one stream, unread)."""
    with on_device_of(streams[0]):
        launch_kernel(_qk_rmsnorm_rope_kernel, call, (*streams, q_out, k_out, cos, sin), traced=launch is Launch.TRACED)


@plan_cache
def _launch_plan(
    key: tuple, q_out_stride: tuple[int, ...], k_out_stride: tuple[int, ...], eps: float | None, interleaved: bool
) -> KernelCall | None:
    """The launch on operands with `_output_dtypes` key `key`, outputs of these strides, `eps`
    and `interleaved`, or None where a weight is not per-channel or `rope_rows` refuses q or k."""
    _, *tensor_keys = key
    q, k, q_weight, k_weight, cos, sin = map(tensor_meta, tensor_keys)
    rows = tuple(rope_rows(x, x._replace(stride=stride), cos, sin) for x, stride in ((q, q_out_stride), (k, k_out_stride)))
    if None in rows:
        return None
    return rope_launch((q, k), (q_weight, k_weight), rows, (q_out_stride[-1], k_out_stride[-1]), cos, sin, eps,
                       interleaved)


def _qk_rmsnorm_rope(q, k, q_weight, k_weight, eps, cos, sin, interleaved, launch: Launch) -> tuple[Tensor, Tensor]:
    """The op's body (`launch_mode(q)`) and fake impl (`Launch.NONE`, which allocates the
    outputs and launches nothing): kernel or reference."""
    key = (kernels_on_cpu(q, launch), *map(tensor_key, (q, k, q_weight, k_weight, cos, sin)))
    dtypes = launch.planner(_output_dtypes)(*key)
    if dtypes is None:
        return reference_qk_rmsnorm_rope(q, k, q_weight, k_weight, eps, cos, sin, interleaved)
    q_out, k_out = torch.empty_like(q, dtype=dtypes.q), torch.empty_like(k, dtype=dtypes.k)
    call = launch.planner(_launch_plan)(key, q_out.stride(), k_out.stride(), eps, interleaved)
    if call is None:
        return reference_qk_rmsnorm_rope(q, k, q_weight, k_weight, eps, cos, sin, interleaved)
    if launch is not Launch.NONE:
        launch_rope(call, (q, q_weight, k, k_weight) * 2, q_out, k_out, cos, sin, launch)
    return q_out, k_out


@fused_op("qk_rmsnorm_rope")
def _qk_rmsnorm_rope_op(
    q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, eps: float | None,
    cos: Tensor, sin: Tensor, interleaved: bool,
) -> tuple[Tensor, Tensor]:
    return _qk_rmsnorm_rope(q, k, q_weight, k_weight, eps, cos, sin, interleaved, launch_mode(q))


@_qk_rmsnorm_rope_op.register_fake
def _(q, k, q_weight, k_weight, eps, cos, sin, interleaved):
    return _qk_rmsnorm_rope(q, k, q_weight, k_weight, eps, cos, sin, interleaved, Launch.NONE)


register_reference_autograd(_qk_rmsnorm_rope_op, reference_qk_rmsnorm_rope)


def qk_rmsnorm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, eps: float | None,
    cos: Tensor, sin: Tensor, interleaved: bool = True,
) -> QKNormOut:
    """RMSNorm then RoPE of q and of k (see the module docstring), in one launch."""
    return QKNormOut(*_qk_rmsnorm_rope_op(q, k, q_weight, k_weight, eps, cos, sin, interleaved))
