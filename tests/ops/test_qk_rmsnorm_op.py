"""q/k RMSNorm: strided head views, mixed shapes and dtypes, any rank, the in-place form."""

import pytest
import torch

import fusion_pass.ops as ops
from ops_testing import FLOAT_DTYPES, OP_CASES, assert_accurate, assert_op_accurate, qkv_views, randn

CASE = OP_CASES["qk_rmsnorm"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("q_shape", [(2, 2, 4, 64), (1, 2, 1, 100), (1, 2, 3, 1000)], ids=str)
def test_strided_head_views_match_float64(interpreted, q_shape, dtype):
    assert_op_accurate(CASE, CASE.make_args(q_shape, dtype), dtype, interpreted=True)
    assert interpreted.count == 1


def test_q_and_k_of_different_length_width_and_dtype_share_one_launch(interpreted):
    q, _ = qkv_views((1, 2, 3, 64), torch.float16)
    _, k = qkv_views((1, 2, 5, 100), torch.bfloat16)
    args = (q, k, randn(64, dtype=torch.float16, mean=1.0), randn(100, dtype=torch.bfloat16, mean=1.0), 1e-6)
    q_out, k_out = ops.qk_rmsnorm(*args)
    q_ref, k_ref = ops.reference_qk_rmsnorm(*args)
    q_true, k_true = CASE.truth(*args)
    assert_accurate(q_out, q_ref, q_true, torch.float16, interpreted=True)
    assert_accurate(k_out, k_ref, k_true, torch.bfloat16, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("q_shape", [(100,), (6, 100), (2, 1, 3, 2, 100)], ids=str)
def test_any_rank_is_normed_over_the_last_dim(interpreted, q_shape):
    q, k = randn(*q_shape, dtype=torch.float32), randn(*q_shape, dtype=torch.float32)
    args = (q, k, randn(q_shape[-1], dtype=torch.float32), randn(q_shape[-1], dtype=torch.float32), 1e-6)
    assert_op_accurate(CASE, args, torch.float32, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_eps_none_is_the_dtype_epsilon(interpreted, dtype):
    q, k, q_weight, k_weight, _ = CASE.make_args((1, 2, 3, 64), dtype)
    q = q / 1000  # small enough that eps matters
    explicit = ops.qk_rmsnorm(q, k, q_weight, k_weight, torch.finfo(dtype).eps)
    default = ops.qk_rmsnorm(q, k, q_weight, k_weight)
    for actual, expected in zip(default, explicit):
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)
    torch.testing.assert_close(
        ops.reference_qk_rmsnorm(q, k, q_weight, k_weight, None)[0],
        ops.reference_qk_rmsnorm(q, k, q_weight, k_weight, torch.finfo(dtype).eps)[0],
        rtol=0.0,
        atol=0.0,
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_in_place_form_writes_q_and_k_with_one_launch(interpreted, dtype):
    q, k, q_weight, k_weight, eps = CASE.make_args((1, 2, 4, 64), dtype)
    expected_q, expected_k = ops.qk_rmsnorm(q, k, q_weight, k_weight, eps)
    q_storage = q.untyped_storage().data_ptr()
    assert ops.qk_rmsnorm_(q, k, q_weight, k_weight, eps) is None
    assert q.untyped_storage().data_ptr() == q_storage
    torch.testing.assert_close(q, expected_q, rtol=0.0, atol=0.0)
    torch.testing.assert_close(k, expected_k, rtol=0.0, atol=0.0)
    assert interpreted.count == 2


def test_in_place_form_on_cpu_writes_the_reference(launches):
    q, k, q_weight, k_weight, eps = CASE.make_args(CASE.x_shape, torch.float16)
    expected_q, expected_k = ops.reference_qk_rmsnorm(q, k, q_weight, k_weight, eps)
    ops.qk_rmsnorm_(q, k, q_weight, k_weight, eps)
    torch.testing.assert_close(q, expected_q, rtol=0.0, atol=0.0)
    torch.testing.assert_close(k, expected_k, rtol=0.0, atol=0.0)
    assert launches.count == 0


def test_in_place_form_refuses_a_promoting_weight():
    q, k, q_weight, k_weight, eps = CASE.make_args((1, 2, 3, 64), torch.float16)
    with pytest.raises(ValueError, match="use qk_rmsnorm"):
        ops.qk_rmsnorm_(q, k, q_weight.float(), k_weight, eps)
