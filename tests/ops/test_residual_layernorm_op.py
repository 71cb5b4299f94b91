"""Residual add + LayerNorm (pre-LN blocks): awkward rows, affine or not, strides, promotion."""

import re

import pytest
import torch

import fusion_pass.ops as ops
from ops_testing import FLOAT_DTYPES, OP_CASES, assert_op_accurate, randn

CASE = OP_CASES["residual_add_layernorm"]
SHAPES = [(2, 8, 64), (2, 4, 1000), (3, 1, 100), (1, 16, 100), (12, 100), (2, 3, 4, 100)]
"""[..., D]: a power of two, a wide odd-sized row, L = 1, batch 1, 2-D and 4-D."""


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("x_shape", SHAPES, ids=str)
def test_kernel_matches_float64(interpreted, x_shape, dtype, affine):
    assert_op_accurate(CASE, CASE.make_args(x_shape, dtype, affine=affine), dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("keep", ["weight", "bias"])
def test_weight_or_bias_alone_is_applied(interpreted, keep):
    x, y, weight, bias, eps = CASE.make_args((2, 8, 100), torch.bfloat16, affine=True)
    args = (x, y, weight if keep == "weight" else None, bias if keep == "bias" else None, eps)
    assert_op_accurate(CASE, args, torch.bfloat16, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_strided_x_and_y_are_read_in_place(interpreted, dtype):
    """x a column slice of a wider tensor, y a transposed `[L, B, D]` output seen as `[B, L, D]`."""
    x = randn(2, 8, 128, dtype=dtype, scale=3.0)[..., :100]
    y = randn(8, 2, 100, dtype=dtype).transpose(0, 1)
    assert_op_accurate(CASE, (x, y, *CASE.make_args((2, 8, 100), dtype, affine=True)[2:]), dtype, interpreted=True)
    assert interpreted.count == 1


def test_fp32_sublayer_output_promotes_the_residual_like_unfused(interpreted):
    x, y, _, _, eps = CASE.make_args((2, 8, 100), torch.bfloat16)
    weight, bias = (randn(100, dtype=torch.float32) for _ in "wb")
    fused = ops.residual_add_layernorm(x, y.float(), weight, bias, eps)
    assert (fused.residual.dtype, fused.normed.dtype) == (torch.float32, torch.float32)
    assert_op_accurate(CASE, (x, y.float(), weight, bias, eps), torch.bfloat16, interpreted=True)
    assert interpreted.count == 2


def test_broadcast_y_runs_reference(interpreted):
    """A residual add never broadcasts in a pre-LN block: y of another shape is left to PyTorch."""
    x, _, weight, bias, eps = CASE.make_args((2, 8, 100), torch.float32, affine=True)
    y = randn(2, 1, 100, dtype=torch.float32)
    for fused, expected in zip(ops.residual_add_layernorm(x, y, weight, bias, eps),
                               ops.reference_residual_add_layernorm(x, y, weight, bias, eps)):
        torch.testing.assert_close(fused, expected, rtol=0.0, atol=0.0)
    assert interpreted.count == 0


def test_layernorm_weight_of_another_dtype_runs_reference_and_raises_like_unfused(interpreted):
    x, y, weight, bias, eps = CASE.make_args((2, 8, 100), torch.bfloat16, affine=True)
    with pytest.raises(RuntimeError) as unfused:
        ops.reference_residual_add_layernorm(x, y, weight.float(), bias, eps)
    with pytest.raises(RuntimeError, match=re.escape(str(unfused.value))):
        ops.residual_add_layernorm(x, y, weight.float(), bias, eps)
    assert interpreted.count == 0


def test_normed_is_taken_of_the_rounded_residual(interpreted):
    """The unfused LayerNorm reads the stored bf16 residual: the fused one normalises that, not
    the fp32 sum (a row whose sum rounds coarsely shows the difference)."""
    x = torch.full((1, 1, 64), 256.0, dtype=torch.bfloat16)
    y = (torch.arange(64, dtype=torch.float32) / 64).to(torch.bfloat16)[None, None]
    residual, normed = ops.residual_add_layernorm(x, y, None, None, 1e-6)
    torch.testing.assert_close(normed, ops.reference_residual_add_layernorm(residual, torch.zeros_like(y), None, None, 1e-6)[1],
                               rtol=0.0, atol=torch.finfo(torch.bfloat16).eps * 4)
    assert interpreted.count == 1


def test_torch_compile_fullgraph_traces_the_op():
    args = CASE.make_args((2, 3, 8), torch.float32, affine=True)
    torch._dynamo.reset()
    compiled = torch.compile(ops.residual_add_layernorm, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(*args), ops.residual_add_layernorm(*args)):
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)


on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_shape", [(1, 4096 + 512, 3072), (8, 257, 1024)], ids=str)
def test_kernel_on_gpu_matches_float64(launches, poisoned_outputs, x_shape, dtype):
    """Flux-dev's hidden size at its token count, and a pre-LN stack at 1024 wide (ShapeVAE-like)."""
    assert_op_accurate(CASE, CASE.make_args(x_shape, dtype, affine=True, device="cuda"), dtype, interpreted=False)
    assert launches.count == 1
