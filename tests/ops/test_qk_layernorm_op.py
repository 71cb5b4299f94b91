"""q/k LayerNorm: strided head views, affine or not, mixed shapes and dtypes, F.layer_norm's rules."""

import re

import pytest
import torch
import torch.nn.functional as F

import fusion_pass.ops as ops
from ops_testing import FLOAT_DTYPES, OP_CASES, assert_accurate, assert_op_accurate, layernorm_params, qkv_views, randn

CASE = OP_CASES["qk_layernorm"]
HEAD_SHAPES = [(2, 2, 4, 64), (1, 2, 1, 7), (1, 3, 3, 100)]
"""[B, H, L, D]: a model head, one token of batch 1 with an odd D, a D that is no power of two."""


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("q_shape", HEAD_SHAPES, ids=str)
def test_strided_head_views_match_float64(interpreted, q_shape, dtype, affine):
    assert_op_accurate(CASE, CASE.make_args(q_shape, dtype, affine=affine), dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("keep", ["q_weight", "q_bias", "k_weight", "k_bias"])
def test_each_parameter_is_optional(interpreted, keep):
    q, k, *params, eps = CASE.make_args((1, 2, 3, 16), torch.bfloat16)
    names = ["q_weight", "q_bias", "k_weight", "k_bias"]
    params = [p if name == keep else None for name, p in zip(names, params)]
    assert_op_accurate(CASE, (q, k, *params, eps), torch.bfloat16, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cogvideox_transposed_heads(interpreted, dtype):
    """CogVideoX: `to_q(x).view(B, L, H, D).transpose(1, 2)`, `nn.LayerNorm(D)` on each."""
    q, k = (randn(2, 5, 3 * 16, dtype=dtype, scale=2.0, mean=0.5).view(2, 5, 3, 16).transpose(1, 2) for _ in "qk")
    args = (q, k, *layernorm_params(16, dtype), *layernorm_params(16, dtype), 1e-6)
    assert_op_accurate(CASE, args, dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_shapevae_cross_attention_views(interpreted, dtype):
    """hy3dgen ShapeVAE's cross attention: q `[B, N, H, D]` view of its projection, k the first
    half of each head of `kv.view(B, M, H, 2 D)` (`torch.split`), of another length."""
    q = randn(2, 3, 2 * 8, dtype=dtype, scale=2.0).view(2, 3, 2, 8)
    k, _ = torch.split(randn(2, 5, 2 * 16, dtype=dtype, scale=2.0).view(2, 5, 2, 16), 8, dim=-1)
    args = (q, k, *layernorm_params(8, dtype), *layernorm_params(8, dtype), 1e-6)
    assert_op_accurate(CASE, args, dtype, interpreted=True)
    assert interpreted.count == 1


def test_q_and_k_of_different_width_and_dtype_share_one_launch(interpreted):
    q, _ = qkv_views((1, 2, 3, 64), torch.float16)
    _, k = qkv_views((1, 2, 5, 100), torch.bfloat16)
    args = (q, k, *layernorm_params(64, torch.float16), *layernorm_params(100, torch.bfloat16), 1e-6)
    fused, reference, truth = CASE.op(*args), CASE.reference(*args), CASE.truth(*args)
    assert_accurate(fused.q, reference[0], truth[0], torch.float16, interpreted=True)
    assert_accurate(fused.k, reference[1], truth[1], torch.bfloat16, interpreted=True)
    assert interpreted.count == 1


def test_reference_is_two_layer_norm_modules():
    norm_q, norm_k = torch.nn.LayerNorm(16, eps=1e-6), torch.nn.LayerNorm(16, eps=1e-6)
    q, k = qkv_views((2, 3, 4, 16), torch.float32)
    with torch.no_grad():
        for norm in (norm_q, norm_k):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
        expected = (norm_q(q), norm_k(k))
        actual = ops.reference_qk_layernorm(q, k, norm_q.weight, norm_q.bias, norm_k.weight, norm_k.bias, 1e-6)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


def test_parameter_of_another_dtype_runs_reference_and_raises_like_unfused(interpreted):
    q, k, q_weight, q_bias, k_weight, k_bias, eps = CASE.make_args((1, 2, 3, 16), torch.bfloat16)
    with pytest.raises(RuntimeError) as unfused:
        F.layer_norm(q, (16,), q_weight.float(), q_bias, eps)
    with pytest.raises(RuntimeError, match=re.escape(str(unfused.value))):
        ops.qk_layernorm(q, k, q_weight.float(), q_bias, k_weight, k_bias, eps)
    assert interpreted.count == 0


def test_torch_compile_fullgraph_traces_the_op():
    args = CASE.make_args((1, 2, 3, 8), torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(ops.qk_layernorm, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(*args), ops.qk_layernorm(*args)):
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)


on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cogvideox_heads_on_gpu(launches, poisoned_outputs, dtype):
    """CogVideoX-5b: 48 heads of 64, 226 text + 17550 video tokens ([B, L, H, D].transpose(1, 2))."""
    q, k = (torch.randn(1, 226 + 17550, 48 * 64, device="cuda", dtype=dtype).view(1, -1, 48, 64).transpose(1, 2)
            for _ in "qk")
    args = (q, k, *layernorm_params(64, dtype, "cuda"), *layernorm_params(64, dtype, "cuda"), 1e-6)
    assert_op_accurate(CASE, args, dtype, interpreted=False)
    assert launches.count == 1


def test_four_row_dims_that_do_not_merge_run_reference(interpreted):
    # Gaps between all four leading dims: none merges with its neighbour.
    q = torch.randn(2000 * 16).as_strided((2, 3, 4, 5, 16), (1000 * 16, 300 * 16, 60 * 16, 10 * 16, 1))
    args = (q, q, None, None, None, None, 1e-6)
    for fused, reference in zip(CASE.op(*args), CASE.reference(*args)):
        torch.testing.assert_close(fused, reference, rtol=0.0, atol=0.0)
    assert interpreted.count == 0
