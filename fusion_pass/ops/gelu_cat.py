"""GELU of one operand concatenated after another, in one kernel:

    fusion_pass::gelu_cat(a, b, dim, approximate="none") -> torch.cat((a, F.gelu(b, approximate=approximate)), dim)

a: `[..., Da]`, b: `[..., Db]` with the same leading dims, typically the attention output
`[B, L, 1024]` and the MLP half `[B, L, 4096]` of a single-stream block's linear1 output, a
non-contiguous split view read through its strides. `gelu(x) = x * Phi(x)`; "tanh" is
`0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`. The output is contiguous, of
dtype `promote_types(a.dtype, b.dtype)` (cat's promotion), shape `[..., Da + Db]`.

The kernel copies a into `out[..., :Da]` and writes gelu(b) into `out[..., Da:]`: programs
`[0, a_programs)` take a's rows, the rest b's, each operand tiled by the shared row heuristic of
its own width, rows wider than `COLUMN_CHUNK` cut into chunks of columns (a program a chunk:
nothing is reduced over a row). GELU is computed in fp32 and rounded once to b's dtype, as
PyTorch's GELU does in its opmath type. It runs when dim is the last dim, both inputs are
fp16/bf16/fp32 on one CUDA device (or the CPU interpreter), non-empty, with rows that coalesce;
anything else computes the reference.
"""

from __future__ import annotations

import math
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
    TensorMeta,
    chunked_row_settings,
    contiguous_strides,
    kernels_on_cpu,
    launch_kernel,
    launch_mode,
    on_device_of,
    plan_cache,
    row_layout,
    rows_fit_kernel,
    tensor_key,
    tensor_meta,
)
from .reference_autograd import register_reference_autograd
from .reference_runs import refuse
from .row_access import copy_tile, load_row_f32, row_offsets, row_tile, store_row

APPROXIMATIONS = ("none", "tanh")
"""F.gelu's `approximate` values (the kernel takes both; others raise in the reference)."""

_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_SQRT_HALF = tl.constexpr(math.sqrt(0.5))


@triton.jit
def _gelu_tile(
    first_row,  # first row of this program's tile
    n_rows,  # rows of X
    n_inner,  # rows per outer index: row r is (r // n_inner, r % n_inner)
    n_cols,  # Db
    X, x_s0, x_s1, x_sc,  # [rows, Db] input, (outer, inner, col) strides
    OUT, o_s0, o_s1, o_sc,  # [rows, Db] output columns, (outer, inner, col) strides
    TANH: tl.constexpr,  # tanh approximation (else erf)
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    outer, inner, cols, mask = row_tile(first_row, n_rows, n_inner, n_cols, BLOCK_ROWS, BLOCK_D)
    x = load_row_f32(X, row_offsets(outer, inner, x_s0, x_s1, x_sc, cols), mask)
    if TANH:
        # 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u): no cancellation, exact limits at +-inf.
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        gelu = x / (1.0 + tl.exp(-2.0 * u))
    else:
        gelu = 0.5 * x * (1.0 + tl.erf(x * _SQRT_HALF))
    gelu = gelu.to(X.dtype.element_ty).to(tl.float32)  # gelu(b) has b's dtype before cat promotes it
    store_row(OUT, row_offsets(outer, inner, o_s0, o_s1, o_sc, cols), mask, gelu)


@triton.jit
def _gelu_cat_kernel(
    A,  # [rows, Da] first operand, copied
    B,  # [rows, Db] second operand, through GELU
    OUT,  # [rows, Da + Db] output
    a_programs,  # programs [0, a_programs) copy a's tiles, the rest write gelu(b)'s
    a_chunks, b_chunks,  # column chunks per row of a and of b (a program takes one chunk of a tile)
    n_rows,  # rows (the product of the leading dims)
    a_inner, b_inner,  # rows per outer index of a's and of b's row layout
    a_cols, b_cols,  # Da, Db
    a_s0, a_s1,  # (outer, inner) strides of A in a's row layout
    ao_s0, ao_s1,  # of OUT in a's row layout
    b_s0, b_s1,  # of B in b's row layout
    bo_s0, bo_s1,  # of OUT in b's row layout
    a_sc: tl.constexpr,  # column strides, constexpr: 1 but for odd views
    b_sc: tl.constexpr,
    o_sc: tl.constexpr,
    TANH: tl.constexpr,  # approximate == "tanh"
    A_BLOCK_ROWS: tl.constexpr,  # rows per program and next_power_of_2(width), per operand
    A_BLOCK_D: tl.constexpr,
    B_BLOCK_ROWS: tl.constexpr,
    B_BLOCK_D: tl.constexpr,
):
    """`out[r, :Da] = a[r]`, `out[r, Da:] = gelu(b[r])` (fp32, one rounding), one column chunk of
    a tile of rows a program."""
    program = tl.program_id(0).to(tl.int64)
    if program < a_programs:
        col = (program % a_chunks) * A_BLOCK_D
        copy_tile((program // a_chunks) * A_BLOCK_ROWS, n_rows, A + col * a_sc, a_s0, a_s1, a_sc,
                  OUT + col * o_sc, ao_s0, ao_s1, o_sc, a_inner, a_cols - col, A_BLOCK_ROWS, A_BLOCK_D)
    else:
        program -= a_programs
        col = (program % b_chunks) * B_BLOCK_D
        _gelu_tile((program // b_chunks) * B_BLOCK_ROWS, n_rows, b_inner, b_cols - col, B + col * b_sc, b_s0, b_s1,
                   b_sc, OUT + (a_cols + col) * o_sc, bo_s0, bo_s1, o_sc, TANH, B_BLOCK_ROWS, B_BLOCK_D)


def reference_gelu_cat(a: Tensor, b: Tensor, dim: int, approximate: str = "none") -> Tensor:
    return torch.cat((a, F.gelu(b, approximate=approximate)), dim)


class _LaunchPlan(NamedTuple):
    """What a launch takes from the call signature alone."""

    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    call: KernelCall  # its own arguments: a, b, out


@plan_cache
def _launch_plan(cpu_kernels: bool, a: tuple, b: tuple, dim: int, approximate: str) -> _LaunchPlan | None:
    """The launch on operands with these `tensor_key`s, or None where the reference must run:
    the row-kernel conditions for a and b, equal leading dims, dim the last, rows that coalesce."""
    a, b = tensor_meta(a), tensor_meta(b)
    if approximate not in APPROXIMATIONS:
        return refuse(f"approximate={approximate!r} (the kernel takes {', '.join(APPROXIMATIONS)})")
    if not rows_fit_kernel(cpu_kernels, a, b, chunked=True):
        return None
    if math.prod(b.shape) == 0:
        return refuse("b has no elements")
    if len(a.shape) != len(b.shape) or a.shape[:-1] != b.shape[:-1]:
        return refuse("a and b differ in their leading dims")
    if dim not in (-1, len(a.shape) - 1):
        return refuse(f"the cat is on dim {dim}, not the last")
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    out_shape = (*a.shape[:-1], a.shape[-1] + b.shape[-1])
    out_stride = contiguous_strides(out_shape)
    a_layout = row_layout(a.shape, a, TensorMeta(a.shape, out_stride, out_dtype, a.device))
    b_layout = row_layout(b.shape, b, TensorMeta(b.shape, out_stride, out_dtype, b.device))
    if a_layout is None or b_layout is None:
        return None
    (a_s, ao_s), (b_s, bo_s) = a_layout.strides, b_layout.strides
    args = (
        a_layout.n_rows, a_layout.n_inner, b_layout.n_inner, a.shape[-1], b.shape[-1],
        *a_s[:2], *ao_s[:2], *b_s[:2], *bo_s[:2],
    )
    constexprs = dict(a_sc=a_s[2], b_sc=b_s[2], o_sc=out_stride[-1], TANH=approximate == "tanh")
    elem_bytes = max(a.dtype.itemsize, b.dtype.itemsize)
    a_settings, a_chunks = chunked_row_settings(a.shape[-1], elem_bytes)
    b_settings, b_chunks = chunked_row_settings(b.shape[-1], elem_bytes)
    a_programs = a_settings.programs(a_layout.n_rows) * a_chunks
    constexprs |= dict(A_BLOCK_ROWS=a_settings.block_rows, A_BLOCK_D=a_settings.block_size,
                       B_BLOCK_ROWS=b_settings.block_rows, B_BLOCK_D=b_settings.block_size)
    call = KernelCall(a_programs + b_settings.programs(a_layout.n_rows) * b_chunks,
                      (a_programs, a_chunks, b_chunks, *args), constexprs,
                      max(a_settings.num_warps, b_settings.num_warps))
    return _LaunchPlan(out_shape, out_dtype, call)


def _gelu_cat(a: Tensor, b: Tensor, dim: int, approximate: str, launch: Launch) -> Tensor:
    """The op's body (`launch_mode(a)`) and fake impl (`Launch.NONE`, which allocates without
    launching): kernel or reference."""
    key = (kernels_on_cpu(a, launch), tensor_key(a), tensor_key(b), dim, approximate)
    plan = launch.planner(_launch_plan)(*key)
    if plan is None:
        return reference_gelu_cat(a, b, dim, approximate)
    out = torch.empty(plan.out_shape, dtype=plan.out_dtype, device=a.device)
    if launch is not Launch.NONE:
        with on_device_of(a):
            launch_kernel(_gelu_cat_kernel, plan.call, (a, b, out), traced=launch is Launch.TRACED)
    return out


@fused_op("gelu_cat")
def gelu_cat(a: Tensor, b: Tensor, dim: int, approximate: str = "none") -> Tensor:
    """`torch.cat((a, F.gelu(b, approximate=approximate)), dim)` in one kernel."""
    return _gelu_cat(a, b, dim, approximate, launch_mode(a))


@gelu_cat.register_fake
def _(a, b, dim, approximate="none"):
    return _gelu_cat(a, b, dim, approximate, Launch.NONE)


register_reference_autograd(gelu_cat, reference_gelu_cat)
