"""A Linear of a token slice, with its bias in the GEMM's epilogue:

    fusion_pass::linear_rows(x, weight, bias) -> F.linear(x, weight, bias)

x: `[B, L, K]`, a slice along the tokens of a contiguous `[B, L', K]` tensor (Hunyuan3D's double
blocks split the joint attention output with `attn[:, :L_txt]` and `attn[:, L_txt:]`, then apply
each stream's `proj`). Such a slice is not one matrix (`B * L` rows do not share one row stride), so
`F.linear` takes its batched path: a bias-less batched GEMM and then `out.add_(bias)`, a broadcast
add over the whole `[B, L, N]` output (32 calls, 0.37 ms of the optimized Hunyuan3D-2 step on the
H200: the `elementwise_kernel<..., CUDAFunctor_add>` of its profile).

Each `x[b]` is one matrix, though: for `B <= MAX_BATCH` the op runs one `torch.addmm(bias, x[b],
weight.t(), out=out[b])` per batch row, each with cuBLASLt's bias epilogue, into one contiguous
output: no add kernel, B GEMM launches instead of one GEMM and one add. Anything else (a
contiguous or 2-D input, rows that are not unit-strided, larger batches, the CPU, no bias) is
`F.linear` itself. The values are the same GEMM's (bias added to the fp32 accumulator instead of
after rounding: at least as accurate); `tests/ops/test_linear_rows_op.py` compares against float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .direct import fused_op
from .reference_autograd import register_reference_autograd

MAX_BATCH = 4
"""Batch rows up to which one GEMM per row beats the batched GEMM and the bias add (B=2 is CFG)."""


def reference_linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def takes_per_row_gemms(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the op runs one bias-epilogue GEMM per batch row (see the module docstring)."""
    return (
        bias is not None
        and x.is_cuda
        and x.dim() == 3
        and 1 <= x.shape[0] <= MAX_BATCH
        and not x.is_contiguous()
        and x.stride(2) == 1 and x.stride(1) >= x.shape[2]
        and x.dtype == weight.dtype == bias.dtype
        and x.device == weight.device == bias.device
        and weight.dim() == 2 and bias.dim() == 1
        and x.shape[2] == weight.shape[1] and bias.shape[0] == weight.shape[0]
        and x.shape[1] > 0
    )


@fused_op("linear_rows", opaque=True)
def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)`; one bias-epilogue GEMM per batch row for a token slice."""
    if not takes_per_row_gemms(x, weight, bias):
        return reference_linear_rows(x, weight, bias)
    out = torch.empty((*x.shape[:2], weight.shape[0]), dtype=x.dtype, device=x.device)
    weight_t = weight.t()
    for row in range(x.shape[0]):
        torch.addmm(bias, x[row], weight_t, out=out[row])
    return out


@linear_rows.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


register_reference_autograd(linear_rows, reference_linear_rows)
