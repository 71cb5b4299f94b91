"""Where the kernels do not apply, every op computes its PyTorch reference, bit for bit."""

import pytest
import torch

from fusion_pass.ops import MAX_BLOCK
from ops_testing import BROADCAST_OPS, OP_CASES, outputs


def assert_runs_reference(case, args) -> None:
    fused, expected = outputs(case.op(*args)), outputs(case.reference(*args))
    assert len(fused) == len(expected)
    for actual, reference in zip(fused, expected):
        torch.testing.assert_close(actual, reference, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("name", OP_CASES)
def test_cpu_outside_interpret_on_cpu_is_reference_bit_exact(launches, name):
    case = OP_CASES[name]
    args = case.make_args(case.x_shape, torch.float16, "chunk")
    assert_runs_reference(case, args)
    assert launches.count == 0


@pytest.mark.parametrize("name", OP_CASES)
def test_float64_runs_reference(interpreted, name):
    case = OP_CASES[name]
    assert_runs_reference(case, case.make_args(case.x_shape, torch.float64, "chunk"))
    assert interpreted.count == 0


@pytest.mark.parametrize("name", BROADCAST_OPS)
def test_operand_that_adds_dims_runs_reference(interpreted, name):
    case = OP_CASES[name]
    args = list(case.make_args(case.x_shape, torch.float32, "chunk"))
    x = args[0]
    args[case.broadcast_operand] = torch.randn(3, *[1] * (x.dim() - 1), x.shape[-1])
    assert outputs(case.op(*args))[0].shape == (3, *x.shape)
    assert_runs_reference(case, args)
    assert interpreted.count == 0


@pytest.mark.parametrize("name", OP_CASES)
def test_zero_size_runs_reference(interpreted, name):
    case = OP_CASES[name]
    shape = (*case.x_shape[:-2], 0, case.x_shape[-1])
    assert_runs_reference(case, case.make_args(shape, torch.float32, "chunk"))
    assert interpreted.count == 0


@pytest.mark.parametrize("name", OP_CASES)
def test_rows_wider_than_max_block_run_reference(interpreted, name):
    case = OP_CASES[name]
    shape = (*[1] * (len(case.x_shape) - 1), MAX_BLOCK + 2)  # even: RoPE needs column pairs
    assert_runs_reference(case, case.make_args(shape, torch.float32, "chunk"))
    assert interpreted.count == 0


# These take a third row dim as groups of programs (`launch.grouped_row_layout`); their own tests refuse four.
GROUPED_ROW_OPS = ("qk_rmsnorm_rope", "qk_rmsnorm_cat_rope", "qk_layernorm")


@pytest.mark.parametrize("name", [name for name in OP_CASES if name not in GROUPED_ROW_OPS])
def test_rows_that_do_not_coalesce_run_reference(interpreted, name):
    case = OP_CASES[name]
    args = list(case.make_args((2, 3, 4, 16), torch.float32, "full"))
    # Three leading dims with gaps between them: no two merge into one row dim.
    args[0] = torch.randn(400 * 16).as_strided((2, 3, 4, 16), (200 * 16, 50 * 16, 10 * 16, 1))
    assert_runs_reference(case, args)
    assert interpreted.count == 0


@pytest.mark.parametrize("name", OP_CASES)
def test_device_mismatch_raises_like_unfused(interpreted, name):
    case = OP_CASES[name]
    args = list(case.make_args(case.x_shape, torch.float32, "chunk"))
    operand = 1 if case.broadcast_operand is None else case.broadcast_operand  # k of qk_layernorm
    args[operand] = args[operand].to("meta")
    with pytest.raises(RuntimeError) as unfused:
        case.reference(*args)
    with pytest.raises(RuntimeError, match=str(unfused.value)):
        case.op(*args)
