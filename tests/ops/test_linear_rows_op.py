"""`fusion_pass::linear_rows`: `F.linear` of a token slice `x[:, a:b]`, one bias-epilogue GEMM per batch
row on CUDA (no broadcast bias add), `F.linear` itself elsewhere."""

import pytest
import torch
import torch.nn.functional as F

import fusion_pass.ops as ops
from fusion_pass.ops.linear_rows import takes_per_row_gemms


def token_slices(batch, tokens, split, k, n, dtype, device="cpu"):
    """Both streams' slices of a joint `[batch, tokens, k]` tensor, and a Linear's weight and bias."""
    generator = torch.Generator().manual_seed(5)
    joint = torch.randn(batch, tokens, k, generator=generator).to(device, dtype)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(device, dtype)
    bias = torch.randn(n, generator=generator).to(device, dtype)
    return joint[:, :split], joint[:, split:], weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpu_is_f_linear_exactly(dtype):
    first, second, weight, bias = token_slices(2, 9, 4, 16, 8, dtype)
    for x in (first, second):
        assert not takes_per_row_gemms(x, weight, bias)
        torch.testing.assert_close(ops.linear_rows(x, weight, bias), F.linear(x, weight, bias), rtol=0, atol=0)


def test_backward_matches_f_linear():
    first, _, weight, bias = token_slices(2, 9, 4, 16, 8, torch.float64)
    weight.requires_grad_(), bias.requires_grad_()
    x = first.clone().requires_grad_()
    grad = torch.randn(2, 4, 8, dtype=torch.float64)
    got = torch.autograd.grad(ops.linear_rows(x, weight, bias), (x, weight, bias), grad)
    want = torch.autograd.grad(F.linear(x, weight, bias), (x, weight, bias), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_per_row_gemms_are_as_accurate_as_f_linear(cuda, dtype):
    """Hunyuan3D-2's double-block proj: [2, 1370 | 3072, 1024] slices of [2, 4442, 1024], N = 1024.
    fp16/bf16: eager rounds the GEMM result and then the bias sum, the epilogue once: never less
    accurate than eager (plus one unit). fp32: the same GEMM up to its summation order."""
    first, second, weight, bias = token_slices(2, 4442, 1370, 1024, 1024, dtype, cuda)
    for x in (first, second):
        assert takes_per_row_gemms(x, weight, bias)
        fused, eager = ops.linear_rows(x, weight, bias), F.linear(x, weight, bias)
        assert fused.shape == eager.shape and fused.is_contiguous()
        if dtype == torch.float32:
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
            continue
        exact = F.linear(x.double(), weight.double(), bias.double())
        fused_err, eager_err = (float((o.double() - exact).abs().max()) for o in (fused, eager))
        unit = torch.finfo(dtype).eps * float(exact.abs().max())
        assert fused_err <= 1.1 * eager_err + unit, (fused_err, eager_err)


@pytest.mark.gpu
def test_contiguous_and_large_batch_inputs_are_f_linear(cuda):
    _, _, weight, bias = token_slices(1, 2, 1, 64, 32, torch.float16, cuda)
    for x in (torch.randn(2, 5, 64, device=cuda, dtype=torch.float16),
              torch.randn(8, 9, 64, device=cuda, dtype=torch.float16)[:, 2:]):
        assert not takes_per_row_gemms(x, weight, bias)
        torch.testing.assert_close(ops.linear_rows(x, weight, bias), F.linear(x, weight, bias), rtol=0, atol=0)
