"""Kernel declines are recorded once per call signature, with the op, the reason in the user's
terms and the operand shapes (`fusion_pass.ops.reference_runs`); the kernel path, the documented
CPU path (no interpreter) and fake tensors record nothing."""
from importlib import import_module

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fusion_pass.ops import MAX_BLOCK
from ops_testing import OP_CASES, outputs

layernorm_modulate = import_module("fusion_pass.ops.layernorm_modulate")


def declines(records) -> list[tuple[str, str]]:
    return [(run.op, run.reason) for run in records.reference_runs()]


def test_row_wider_than_a_block_is_recorded_once_with_op_reason_and_shapes(interpreted, fresh_reference_runs):
    case = OP_CASES["layernorm_scale_shift"]
    args = case.make_args((1, 2, MAX_BLOCK + 8), torch.float32)
    for _ in range(3):  # one signature: planned, and recorded, once
        torch.testing.assert_close(case.op(*args), case.reference(*args), rtol=0, atol=0)
    assert interpreted.count == 0
    (run,) = fresh_reference_runs.reference_runs()
    assert (run.op, run.signatures) == ("layernorm_scale_shift", 1)
    assert run.reason == f"rows of {MAX_BLOCK + 8} elements exceed one program's block (MAX_BLOCK={MAX_BLOCK})"
    width = MAX_BLOCK + 8  # shift and scale: chunks of one [1, 1, 6 * width] modulation, strides shown
    assert run.example == (f"[1, 2, {width}] float32, [1, 1, {width}] float32 strides ({6 * width}, {6 * width}, 1), "
                           f"[1, 1, {width}] float32 strides ({6 * width}, {6 * width}, 1)")


def test_a_second_signature_with_the_same_reason_is_counted_in_the_same_record(interpreted, fresh_reference_runs):
    case = OP_CASES["layernorm_scale_shift"]
    for tokens in (2, 3):
        case.op(*case.make_args((1, tokens, MAX_BLOCK + 8), torch.float32))
    (run,) = fresh_reference_runs.reference_runs()
    assert run.signatures == 2


@pytest.mark.parametrize("name, op", [
    ("layernorm_scale_shift", "layernorm_scale_shift"),
    ("rmsnorm_scale_shift", "rmsnorm_scale_shift"),  # these five share one planner: each is named
    ("residual_gate", "residual_gate"),
    ("residual_gate_layernorm_scale_shift", "residual_gate_layernorm_scale_shift"),
    ("residual_add_layernorm", "residual_add_layernorm"),
    ("qk_rmsnorm", "qk_rmsnorm"),
    ("qk_layernorm", "qk_layernorm"),
    ("qk_rmsnorm_rope", "qk_rmsnorm_rope"),
    ("qk_rmsnorm_cat_rope", "qk_rmsnorm_cat_rope"),
])
def test_float64_is_recorded_under_the_op_that_declined(interpreted, fresh_reference_runs, name, op):
    case = OP_CASES[name]
    args = case.make_args(case.x_shape, torch.float64)
    for fused, reference in zip(outputs(case.op(*args)), outputs(case.reference(*args))):
        torch.testing.assert_close(fused, reference, rtol=0, atol=0)
    assert declines(fresh_reference_runs) == [(op, "dtype float64 (the kernels load float16, bfloat16, float32)")]


def test_an_operand_that_adds_dims_is_recorded_with_its_shape(interpreted, fresh_reference_runs):
    case = OP_CASES["layernorm_scale_shift"]
    x, shift, scale, *rest = case.make_args((2, 3, 16), torch.float32)
    case.op(x, shift[None], scale, *rest)  # shift [1, 2, 1, 16] broadcasts x to 4 dims
    assert declines(fresh_reference_runs) == [
        ("layernorm_scale_shift", "an operand adds dims to the input's, or does not broadcast into it")]
    assert "[1, 2, 1, 16] float32" in fresh_reference_runs.reference_runs()[0].example


def test_a_gelu_cat_on_a_leading_dim_is_recorded(interpreted, fresh_reference_runs):
    import fusion_pass.ops as ops

    ops.gelu_cat(torch.randn(2, 3, 8), torch.randn(2, 5, 8), 1)
    assert declines(fresh_reference_runs) == [("gelu_cat", "a and b differ in their leading dims")]


def test_the_kernel_path_records_nothing(interpreted, fresh_reference_runs):
    for name, case in OP_CASES.items():
        case.op(*case.make_args(case.x_shape, torch.float32))
    assert interpreted.count == len(OP_CASES)
    assert declines(fresh_reference_runs) == []


def test_cpu_without_the_interpreter_is_the_documented_path_not_a_decline(launches, fresh_reference_runs):
    """Outside `interpret_on_cpu()` CPU tensors run the reference by design: nothing is declined."""
    case = OP_CASES["layernorm_scale_shift"]
    for shape, dtype in (((1, 2, 16), torch.float32), ((1, 2, MAX_BLOCK + 8), torch.float64)):
        case.op(*case.make_args(shape, dtype))
    assert launches.count == 0
    assert declines(fresh_reference_runs) == []
    assert {(run.op, run.reason) for run in fresh_reference_runs.by_design()} == {
        ("layernorm_scale_shift", "CPU tensors outside interpret_on_cpu(): no Triton kernels on the CPU")}


def test_meta_tensors_are_not_a_decline(fresh_reference_runs):
    """The direct call of `optimize()`'s graphs runs the op's body on meta tensors (the dispatcher
    would pick the fake impl): nothing to compute there, nothing declined."""
    from fusion_pass.ops.direct import direct_call

    case = OP_CASES["qk_rmsnorm"]
    direct_call(torch.ops.fusion_pass.qk_rmsnorm.default)(*case.make_args(case.x_shape, torch.float32, "unused", "meta"))
    assert declines(fresh_reference_runs) == []
    assert [run.reason for run in fresh_reference_runs.by_design()] == ["meta tensors: no kernels there"]


def test_fake_tensors_record_nothing(interpreted, fresh_reference_runs):
    case = OP_CASES["layernorm_scale_shift"]
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                for a in case.make_args((1, 2, MAX_BLOCK + 8), torch.float64)]
        torch.ops.fusion_pass.layernorm_scale_shift(*args)
    assert declines(fresh_reference_runs) == [] and fresh_reference_runs.by_design() == []


def test_a_declined_signature_is_planned_once(interpreted, fresh_reference_runs):
    """The steady state of a declined signature is a cache hit, as the kernel path's is."""
    case = OP_CASES["layernorm_scale_shift"]
    args = case.make_args((1, 2, MAX_BLOCK + 8), torch.float32)
    case.op(*args)
    misses = layernorm_modulate._output_dtypes.cache_info().misses
    case.op(*args)
    assert layernorm_modulate._output_dtypes.cache_info().misses == misses


@pytest.mark.gpu
@pytest.mark.parametrize("width, dtype, reason", [
    (1024, torch.float64, "dtype float64 (the kernels load float16, bfloat16, float32)"),
    (MAX_BLOCK + 8, torch.bfloat16, f"rows of {MAX_BLOCK + 8} elements exceed one program's block (MAX_BLOCK={MAX_BLOCK})"),
])
def test_a_cuda_decline_is_recorded(cuda, launches, fresh_reference_runs, width, dtype, reason):
    case = OP_CASES["layernorm_scale_shift"]
    args = case.make_args((1, 2, width), dtype, "chunk", cuda)
    torch.testing.assert_close(case.op(*args), case.reference(*args), rtol=0, atol=0)
    assert launches.count == 0
    assert declines(fresh_reference_runs) == [("layernorm_scale_shift", reason)]
