"""The kernels on a CUDA device at Hunyuan3D-2 shapes (B = 2, hidden 1024, 16 heads of 64; Flux-dev's 24 heads
of 128 for the RoPE op),
against float64. Real GPU casts round to nearest, so bf16 gets no interpreter allowance."""

import pytest
import torch

import fusion_pass.ops as ops
from ops_testing import BROADCAST_OPS, OP_CASES, assert_inductor_launches_the_kernel, assert_op_accurate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

HALF_DTYPES = (torch.float16, torch.bfloat16)
LENGTHS = (1, 1370, 3072)  # one token, condition tokens, latent tokens
KERNEL_NAMES = {
    "qk_rmsnorm": "_qk_rmsnorm_kernel",
    "qk_rmsnorm_rope": "_qk_rmsnorm_rope_kernel",
    "qk_rmsnorm_cat_rope": "_qk_rmsnorm_rope_kernel",  # the RoPE kernel over two streams' row sets
    "qk_layernorm": "_qk_layernorm_kernel",
}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", OP_CASES)
def test_kernel_on_gpu_matches_float64(launches, poisoned_outputs, name, length, dtype):
    case = OP_CASES[name]
    args = case.make_args(case.model_shape(length), dtype, "chunk", device="cuda")
    assert_op_accurate(case, args, dtype, interpreted=False)
    assert launches.count == 1


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name", ["layernorm_scale_shift", "rmsnorm_scale_shift", "residual_gate_layernorm_scale_shift"])
def test_layernorm_weight_and_bias_on_gpu(launches, poisoned_outputs, name, dtype):
    case = OP_CASES[name]
    args = case.make_args(case.model_shape(1370), dtype, "chunk", device="cuda", affine=True)
    assert_op_accurate(case, args, dtype, interpreted=False)
    assert launches.count == 1


@pytest.mark.parametrize("name", BROADCAST_OPS)
def test_fp32_operand_promotes_on_gpu(launches, name):
    case = OP_CASES[name]
    args = list(case.make_args(case.model_shape(1370), torch.float16, "chunk", device="cuda"))
    args[case.broadcast_operand] = args[case.broadcast_operand].float()
    assert_op_accurate(case, args, torch.float16, interpreted=False)
    assert launches.count == 1


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_in_place_qk_rmsnorm_on_gpu(launches, dtype):
    case = OP_CASES["qk_rmsnorm"]
    q, k, q_weight, k_weight, eps = case.make_args(case.model_shape(3072), dtype, device="cuda")
    expected_q, expected_k = ops.qk_rmsnorm(q, k, q_weight, k_weight, eps)
    ops.qk_rmsnorm_(q, k, q_weight, k_weight, eps)
    torch.testing.assert_close(q, expected_q, rtol=0.0, atol=0.0)
    torch.testing.assert_close(k, expected_k, rtol=0.0, atol=0.0)
    assert launches.count == 2


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", OP_CASES)
def test_inductor_launches_the_kernel_itself(name, dynamic):
    case = OP_CASES[name]
    args = case.make_args(case.model_shape(1370), torch.float16, "chunk", device="cuda")
    kernel = KERNEL_NAMES.get(name, "_residual_norm_modulate_kernel")
    assert_inductor_launches_the_kernel(case.op, args, kernel, dynamic=dynamic)
