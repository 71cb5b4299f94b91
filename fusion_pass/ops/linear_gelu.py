"""A Linear followed by its tanh GELU, in the GEMM's epilogue:

    fusion_pass::linear_gelu(x, weight, bias, approximate) -> F.gelu(F.linear(x, weight, bias), approximate=approximate)

x: `[..., K]`, weight `[N, K]`, bias `[N]`; output `[..., N]` of x's dtype. Hunyuan3D-2's double
blocks compute `GELU(tanh)(Linear(h))` on `[2, 3072, 1024]` and `[2, 1370, 1024]` with N = 4096.

On CUDA in float16/bfloat16 with `approximate="tanh"` the op is
`torch._addmm_activation(bias, x2d, weight.t(), use_gelu=True)`: cuBLASLt's bias + GELU epilogue
(the tanh form, applied to the fp32 accumulator and rounded once), or, where cuBLASLt does not
apply, PyTorch's addmm followed by its tanh GELU. That skips the GELU kernel and a write and a read
of the `[..., N]` pre-activation. Measured on the H200 (fp16, [6144 x 1024] @ [1024 x 4096]):
Linear + GELU 109.9 us, epilogue 91.5 us (Linear alone 85.3 us); error vs float64 2.1e-4 against
eager's 3.2e-4 (eager rounds the pre-activation to fp16 before the GELU; the epilogue does not).
It is not bit-identical to eager, but never less accurate: `tests/ops/test_linear_gelu.py` checks
that against float64 on the GPU.

Everywhere else (the CPU, whose `_addmm_activation` computes the erf GELU; float32, kept exact;
the erf approximation; other shapes) the op is the reference: `F.gelu(F.linear(...))`.
No Triton kernel: an opaque `torch.library.custom_op`, so torch.compile keeps the epilogue call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .direct import fused_op
from .reference_autograd import register_reference_autograd

EPILOGUE_DTYPES = (torch.float16, torch.bfloat16)
"""Dtypes that take the epilogue: it rounds once from fp32, so it is at least as accurate as eager.
float32 keeps the reference (eager-exact)."""


def reference_linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str = "tanh") -> Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def takes_epilogue(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str) -> bool:
    """Whether the cuBLASLt epilogue computes this call (see the module docstring)."""
    return (
        approximate == "tanh"
        and bias is not None
        and x.is_cuda
        and x.dtype in EPILOGUE_DTYPES
        and weight.dtype == x.dtype == bias.dtype
        and weight.device == x.device == bias.device
        and weight.dim() == 2 and bias.dim() == 1 and x.dim() >= 1
        and x.shape[-1] == weight.shape[1] and bias.shape[0] == weight.shape[0]
        and x.numel() > 0
    )


@fused_op("linear_gelu", opaque=True)
def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str = "tanh") -> Tensor:
    """`F.gelu(F.linear(x, weight, bias), approximate=approximate)`, the GELU in the GEMM's epilogue
    where `takes_epilogue`."""
    if not takes_epilogue(x, weight, bias, approximate):
        return reference_linear_gelu(x, weight, bias, approximate)
    rows = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@linear_gelu.register_fake
def _(x, weight, bias, approximate="tanh"):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


register_reference_autograd(linear_gelu, reference_linear_gelu)
