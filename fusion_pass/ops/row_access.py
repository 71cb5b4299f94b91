"""Triton helpers of the row-wise kernels: a tile of rows, its addresses in strided operands.

Rows follow `launch.RowLayout`: row `r` is `(outer, inner) = (r // n_inner, r % n_inner)`, and
a tensor with strides `(s_outer, s_inner, s_col)` holds its column `c` at
`outer * s_outer + inner * s_inner + c * s_col`. A program handles BLOCK_ROWS rows at once.
"""

import triton
import triton.language as tl


@triton.jit
def row_tile(first_row, n_rows, n_inner, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `first_row + [0, BLOCK_ROWS)` as `(outer [R, 1], inner [R, 1], cols [1, D], mask [R, D])`,
    the mask excluding rows past `n_rows` and columns past `n_cols`."""
    rows = first_row + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return (rows // n_inner)[:, None], (rows % n_inner)[:, None], cols[None, :], mask


@triton.jit
def row_offsets(outer, inner, s_outer, s_inner, s_col, cols):
    """Element offsets of a `row_tile` in a tensor of strides `(s_outer, s_inner, s_col)`."""
    return outer * s_outer + inner * s_inner + cols * s_col


@triton.jit
def load_row_f32(PTR, offsets, mask):
    """The tile at `PTR + offsets`, upcast to fp32 at once (masked lanes read 0)."""
    return tl.load(PTR + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_row(PTR, offsets, mask, value):
    """Store fp32 `value` with one cast to `PTR`'s element type."""
    tl.store(PTR + offsets, value.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def layernorm_f32(x, mask, n_cols, eps):
    """`(x - mean) / sqrt(var + eps)` of each row of the fp32 tile x (biased variance over its
    n_cols columns; lanes outside `mask` must hold 0 and come out 0)."""
    mean = tl.sum(x, axis=1)[:, None] / n_cols
    diff = tl.where(mask, x - mean, 0.0)
    var = tl.sum(diff * diff, axis=1)[:, None] / n_cols
    return diff * (1.0 / tl.sqrt(var + eps))


@triton.jit
def copy_tile(first_row, n_rows, X, x_s0, x_s1, x_sc, OUT, o_s0, o_s1, o_sc, n_inner, n_cols,
              BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `first_row + [0, BLOCK_ROWS)` of X (strides `(x_s0, x_s1, x_sc)`) stored to OUT
    (strides `(o_s0, o_s1, o_sc)`) with one cast to OUT's element type."""
    outer, inner, cols, mask = row_tile(first_row, n_rows, n_inner, n_cols, BLOCK_ROWS, BLOCK_D)
    x = load_row_f32(X, row_offsets(outer, inner, x_s0, x_s1, x_sc, cols), mask)
    store_row(OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, cols), mask, x)
