"""`fusion_pass::linear_gelu`: `gelu(linear(x, W, b), "tanh")` with the GELU in cuBLASLt's epilogue on
CUDA (float16/bfloat16), the unfused expression elsewhere. On the GPU: never less accurate than
eager against float64, at Hunyuan3D-2's double-block MLP shapes."""

import pytest
import torch
import torch.nn.functional as F

import fusion_pass.ops as ops
from fusion_pass.ops.linear_gelu import takes_epilogue


def operands(lead, k, n, dtype, device="cpu", scale=1.0):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(*lead, k, generator=generator) * scale
    weight = torch.randn(n, k, generator=generator) / k**0.5
    bias = torch.randn(n, generator=generator) * 0.1
    return [t.to(device, dtype) for t in (x, weight, bias)]


def error_vs_float64(out, x, weight, bias):
    exact = F.gelu(F.linear(x.double(), weight.double(), bias.double()), approximate="tanh")
    return float((out.double() - exact).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpu_computes_the_unfused_expression_exactly(dtype):
    x, weight, bias = operands((2, 5), 24, 40, dtype)
    assert not takes_epilogue(x, weight, bias, "tanh")
    torch.testing.assert_close(ops.linear_gelu(x, weight, bias, "tanh"),
                               F.gelu(F.linear(x, weight, bias), approximate="tanh"), rtol=0, atol=0)


def test_erf_gelu_and_a_missing_bias_compute_the_reference():
    x, weight, bias = operands((3,), 8, 16, torch.float32)
    torch.testing.assert_close(ops.linear_gelu(x, weight, bias, "none"), F.gelu(F.linear(x, weight, bias)),
                               rtol=0, atol=0)
    torch.testing.assert_close(ops.linear_gelu(x, weight, None, "tanh"),
                               F.gelu(F.linear(x, weight), approximate="tanh"), rtol=0, atol=0)


def test_backward_matches_the_reference():
    x, weight, bias = (t.requires_grad_() for t in operands((2, 3), 8, 16, torch.float64))
    grad = torch.randn(2, 3, 16, dtype=torch.float64)
    got = torch.autograd.grad(ops.linear_gelu(x, weight, bias, "tanh"), (x, weight, bias), grad)
    want = torch.autograd.grad(ops.reference_linear_gelu(x, weight, bias, "tanh"), (x, weight, bias), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(2, 3072), (2, 1370), (1, 1), (3, 7)], ids=str)
def test_epilogue_is_never_less_accurate_than_eager(cuda, dtype, lead):
    """Hunyuan3D-2's double-block MLP: [2, 3072 | 1370, 1024] @ [1024, 4096]; and odd row counts.
    The epilogue rounds once from fp32 where eager rounds the pre-activation first."""
    x, weight, bias = operands(lead, 1024, 4096, dtype, cuda, scale=2.0)
    assert takes_epilogue(x, weight, bias, "tanh")
    fused = ops.linear_gelu(x, weight, bias, "tanh")
    eager = F.gelu(F.linear(x, weight, bias), approximate="tanh")
    assert fused.shape == eager.shape and fused.dtype == dtype
    fused_err, eager_err = error_vs_float64(fused, x, weight, bias), error_vs_float64(eager, x, weight, bias)
    # one unit of the dtype at the output's scale is the noise floor of both
    unit = torch.finfo(dtype).eps * float(eager.abs().max())
    assert fused_err <= 1.1 * eager_err + unit, (fused_err, eager_err)


@pytest.mark.gpu
def test_float32_keeps_the_reference_on_cuda(cuda):
    x, weight, bias = operands((2, 9), 64, 128, torch.float32, cuda)
    assert not takes_epilogue(x, weight, bias, "tanh")
    torch.testing.assert_close(ops.linear_gelu(x, weight, bias, "tanh"),
                               F.gelu(F.linear(x, weight, bias), approximate="tanh"), rtol=0, atol=0)
