"""RMSNorm + modulation (LTX-Video): weight, [B, D] operands through strides, the diffusers
spelling, fallbacks. Awkward rows and every operand layout run in test_op_numerics (ROW_OPS)."""

import pytest
import torch

import fusion_pass.ops as ops
from ops_testing import FLOAT_DTYPES, OP_CASES, assert_accurate, assert_op_accurate, randn

CASE = OP_CASES["rmsnorm_scale_shift"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_weight_is_applied(interpreted, dtype):
    assert_op_accurate(CASE, CASE.make_args((2, 8, 100), dtype, affine=True), dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_bd_operands_unsqueezed_from_one_modulation_are_read_through_strides(interpreted, dtype):
    """shift, scale `[B, D]` chunks of one `[B, 6D]` tensor, unsqueezed to `[B, 1, D]` (strides
    (6D, 0, 1)), as `scale[:, None, :]` spells them."""
    x = randn(2, 8, 100, dtype=dtype, scale=3.0, mean=1.0)
    shift, scale = randn(2, 600, dtype=dtype, scale=0.5).chunk(6, dim=-1)[:2]
    assert_op_accurate(CASE, (x, shift[:, None, :], scale.unsqueeze(1), 1e-6, None), dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_never_less_accurate_than_the_diffusers_spelling(interpreted, dtype):
    """diffusers' `RMSNorm(elementwise_affine=False)` rounds the fp32 norm to x's dtype, then the
    modulation rounds again; the fused op rounds once."""
    x, shift, scale, eps, _ = CASE.make_args((2, 8, 100), dtype)
    xf = x.float()
    spelled = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * (1 + scale) + shift
    assert_accurate(ops.rmsnorm_scale_shift(x, shift, scale, eps), spelled, CASE.truth(x, shift, scale, eps, None),
                    dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # F.rms_norm, unfused
def test_weight_of_another_dtype_runs_reference(interpreted):
    x, shift, scale, eps, weight = CASE.make_args((2, 8, 100), torch.bfloat16, affine=True)
    fused = ops.rmsnorm_scale_shift(x, shift, scale, eps, weight.float())
    torch.testing.assert_close(fused, ops.reference_rmsnorm_scale_shift(x, shift, scale, eps, weight.float()),
                               rtol=0.0, atol=0.0)
    assert interpreted.count == 0


def test_torch_compile_fullgraph_traces_the_op():
    args = CASE.make_args((2, 3, 8), torch.float32, affine=True)
    torch._dynamo.reset()
    compiled = torch.compile(ops.rmsnorm_scale_shift, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), ops.rmsnorm_scale_shift(*args), rtol=0.0, atol=0.0)


on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_shape", [(2, 4096, 2048), (1, 6144 + 7, 2048)], ids=str)
def test_kernel_on_gpu_matches_float64(launches, poisoned_outputs, x_shape, dtype):
    """LTX-Video 2B's hidden size (32 heads of 64) at a latent video's token count, and an odd one;
    shift/scale `[B, 1, D]` chunks of the block's `[B, 1, 6D]` modulation."""
    assert_op_accurate(CASE, CASE.make_args(x_shape, dtype, device="cuda"), dtype, interpreted=False)
    assert launches.count == 1
