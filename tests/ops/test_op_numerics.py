"""Fused kernels (Triton interpreter on CPU) against the unfused reference and float64."""

import pytest
import torch

from ops_testing import BROADCAST_OPS, FLOAT_DTYPES, OP_CASES, ROW_CASES, ROW_OPS, assert_op_accurate, outputs

LAYERNORM_OPS = ["layernorm_scale_shift", "residual_gate_layernorm_scale_shift"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("x_shape, layout", ROW_CASES, ids=[f"{s}-{lay}" for s, lay in ROW_CASES])
@pytest.mark.parametrize("name", ROW_OPS)
def test_row_op_kernel_matches_float64(interpreted, name, x_shape, layout, dtype):
    case = OP_CASES[name]
    assert_op_accurate(case, case.make_args(x_shape, dtype, layout), dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("keep", ["weight", "bias", "weight+bias"])
@pytest.mark.parametrize("name", LAYERNORM_OPS)
def test_layernorm_weight_and_bias_are_applied(interpreted, name, keep, dtype):
    case = OP_CASES[name]
    *args, weight, bias = case.make_args((2, 8, 100), dtype, affine=True)
    args += [weight if "weight" in keep else None, bias if "bias" in keep else None]
    assert_op_accurate(case, args, dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("name", BROADCAST_OPS)
def test_fp32_operand_promotes_fp16_op_like_unfused(interpreted, name):
    case = OP_CASES[name]
    args = list(case.make_args(case.x_shape, torch.float16, "chunk"))
    args[case.broadcast_operand] = args[case.broadcast_operand].float()
    assert torch.float32 in {out.dtype for out in outputs(case.op(*args))}
    assert_op_accurate(case, args, torch.float16, interpreted=True)


@pytest.mark.parametrize("name", BROADCAST_OPS)
def test_zero_dim_fp32_operand_keeps_fp16_output(interpreted, name):
    case = OP_CASES[name]
    args = list(case.make_args(case.x_shape, torch.float16, "chunk"))
    args[case.broadcast_operand] = torch.tensor(0.75)
    assert {out.dtype for out in outputs(case.op(*args))} == {torch.float16}
    assert_op_accurate(case, args, torch.float16, interpreted=True)


@pytest.mark.parametrize("name", ROW_OPS)
def test_non_contiguous_x_is_read_through_strides(interpreted, name):
    case = OP_CASES[name]
    args = list(case.make_args(case.x_shape, torch.float32, "chunk"))
    wide = torch.randn(*case.x_shape[:-1], case.x_shape[-1] + 28)
    args[0] = wide[..., : case.x_shape[-1]].copy_(args[0])
    assert_op_accurate(case, args, torch.float32, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("name", OP_CASES)
def test_nan_and_inf_propagate_like_unfused(interpreted, name):
    case = OP_CASES[name]
    args = case.make_args(case.x_shape, torch.float32, "chunk")
    x = args[0]
    x[(0,) * (x.dim() - 1)][3] = float("nan")
    x[(-1,) * (x.dim() - 1)][5] = float("inf")
    for fused, expected in zip(outputs(case.op(*args)), outputs(case.reference(*args))):
        assert torch.equal(fused.isnan(), expected.isnan())
        assert torch.equal(fused.isinf(), expected.isinf())
        torch.testing.assert_close(fused, expected, equal_nan=True)
    assert interpreted.count == 1
