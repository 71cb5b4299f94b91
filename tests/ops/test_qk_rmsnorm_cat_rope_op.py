"""Two streams' q/k RMSNorm, their cat and the joint RoPE: every RoPE form, the layouts the models
pass, diffusers' own code, promotion, fallbacks, errors."""

import pytest
import torch

import fusion_pass.ops as ops
from ops_testing import (
    FLOAT_DTYPES,
    OP_CASES,
    ROPE_FORMS,
    assert_accurate,
    assert_op_accurate,
    qkv_views,
    randn,
    rope_tables,
    sequence_major,
)

CASE = OP_CASES["qk_rmsnorm_cat_rope"]


def _weights(d, dtype, device="cpu"):
    return [randn(d, dtype=dtype, mean=1.0, scale=0.2, device=device) for _ in range(4)]


def _flux_args(batch, lengths, heads, d, dtype, form, device="cpu"):
    """Flux's double block: text (stream 0) and image (stream 1) `[B, L_i, H, D]` projection views,
    joined on dim 1, tables `cos[None, :, None, :]` of the joint sequence."""
    q0, k0, q1, k1 = (sequence_major(batch, n, heads, d, dtype, device) for n in (*[lengths[0]] * 2, *[lengths[1]] * 2))
    cos, sin = (t[None, :, None, :] for t in rope_tables(sum(lengths), d, form, device=device))
    return (q0, k0, q1, k1, *_weights(d, dtype, device), 1e-6, 1, cos, sin, form != "half")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("batch, lengths, d", [(1, (3, 5), 16), (2, (1, 4), 6), (1, (2, 2), 34)], ids=str)
@pytest.mark.parametrize("form", ROPE_FORMS)
def test_every_rope_form_on_flux_streams_matches_float64(interpreted, form, batch, lengths, d, dtype):
    """Streams of other lengths (one of one token), D/2 odd (3) and a tile wider than the row
    (34); B = 2 takes row groups (rows (B, L, H) under `[1, L, 1, D]` tables)."""
    assert_op_accurate(CASE, _flux_args(batch, lengths, 2, d, dtype, form), dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_major_qkv_views_joined_on_the_token_dim(interpreted, dtype):
    """`[B, H, L_i, D]` views of qkv projections joined on dim -2 under `[L, D]` tables (a Hunyuan3D-like
    joint attention with RoPE): another cat dim, strides and table shape than Flux's."""
    q0, k0 = qkv_views((2, 3, 4, 16), dtype)
    q1, k1 = qkv_views((2, 3, 6, 16), dtype)
    cos, sin = rope_tables(10, 16, "half")
    args = (q0, k0, q1, k1, *_weights(16, dtype), 1e-6, -2, cos, sin, False)
    assert_op_accurate(CASE, args, dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_weights_are_optional_and_promote_like_the_unfused_code(interpreted, dtype):
    """No weight on stream 0's q, an fp32 weight on stream 1's k: the joint k is fp32, as cat's
    promotion of the unfused normed values makes it."""
    q0, k0, q1, k1, qw0, kw0, qw1, kw1, *rest = _flux_args(1, (3, 4), 2, 8, dtype, "interleaved")
    args = (q0, k0, q1, k1, None, kw0, qw1, kw1.float(), *rest)
    fused, reference, truth = CASE.op(*args), CASE.reference(*args), CASE.truth(*args)
    assert (fused.q.dtype, fused.k.dtype) == (dtype, torch.float32)
    for actual, expected, exact in zip(fused, reference, truth):
        assert_accurate(actual, expected, exact, dtype, interpreted=True)
    assert interpreted.count == 1


def test_grouped_keys_and_streams_of_other_dtypes_share_one_launch(interpreted):
    """k with fewer heads than q (grouped-query attention); stream 0 in fp16, stream 1 in bf16: cat
    promotes the joint q and k to fp32."""
    q0, q1 = sequence_major(1, 3, 4, 8, torch.float16), sequence_major(1, 5, 4, 8, torch.bfloat16)
    k0, k1 = sequence_major(1, 3, 2, 8, torch.float16), sequence_major(1, 5, 2, 8, torch.bfloat16)
    weights = [randn(8, dtype=x.dtype, mean=1.0) for x in (q0, k0, q1, k1)]
    cos, sin = (t[None, :, None, :] for t in rope_tables(8, 8, "interleaved"))
    args = (q0, k0, q1, k1, *weights, 1e-6, 1, cos, sin, True)
    fused, reference, truth = CASE.op(*args), CASE.reference(*args), CASE.truth(*args)
    assert (fused.q.shape, fused.k.shape, fused.q.dtype) == ((1, 8, 4, 8), (1, 8, 2, 8), torch.float32)
    for actual, expected, exact in zip(fused, reference, truth):
        assert_accurate(actual, expected, exact, torch.bfloat16, interpreted=True)
    assert interpreted.count == 1


def test_reference_is_diffusers_flux_attention_code():
    """Bit for bit: `FluxAttnProcessor`'s `norm_added_q(text)`, `norm_q(image)` (diffusers `RMSNorm`,
    bf16 weights), `torch.cat([text, image], dim=1)`, `apply_rotary_emb(x, (cos, sin), sequence_dim=1)`."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    norms = [RMSNorm(16, eps=1e-6).to(torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(randn(16, dtype=torch.bfloat16, mean=1.0))
    q0, k0, q1, k1 = (sequence_major(2, n, 3, 16, torch.bfloat16) for n in (4, 4, 6, 6))
    cos, sin = rope_tables(10, 16, "interleaved")
    with torch.no_grad():
        expected = [apply_rotary_emb(torch.cat([norms[i](a), norms[i + 2](b)], dim=1), (cos, sin), sequence_dim=1)
                    for i, (a, b) in enumerate(((q0, q1), (k0, k1)))]
        actual = ops.reference_qk_rmsnorm_cat_rope(q0, k0, q1, k1, *(n.weight for n in norms), 1e-6, 1,
                                                   cos[None, :, None, :], sin[None, :, None, :], True)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


def test_tables_that_widen_q_run_the_reference(interpreted):
    """cos/sin with a batch dim larger than q's: the unfused code broadcasts q up; so does the op."""
    args = list(_flux_args(1, (2, 3), 2, 8, torch.float32, "interleaved"))
    args[10], args[11] = (t.expand(2, -1, -1, -1) for t in args[10:12])
    for fused, reference in zip(CASE.op(*args), CASE.reference(*args)):
        assert fused.shape == (2, 5, 2, 8)
        torch.testing.assert_close(fused, reference, rtol=0.0, atol=0.0)
    assert interpreted.count == 0


def test_cat_on_the_head_dim_runs_the_reference(interpreted):
    """dim = -1 joins the streams' columns: RoPE pairs would span them; the op computes the reference."""
    q0, k0, q1, k1 = (randn(1, 3, 2, 4, dtype=torch.float32) for _ in range(4))
    cos, sin = rope_tables(3, 8, "interleaved")
    args = (q0, k0, q1, k1, *_weights(4, torch.float32), 1e-6, -1, cos[None, :, None, :], sin[None, :, None, :], True)
    for fused, reference in zip(CASE.op(*args), CASE.reference(*args)):
        torch.testing.assert_close(fused, reference, rtol=0.0, atol=0.0)
    assert interpreted.count == 0


@pytest.mark.parametrize(
    "q_d, k_d, table_d, match",
    [(7, 7, 7, "must be even"), (8, 16, 8, "share their last dim"), (8, 8, 6, "cos must be 8 wide")],
)
def test_bad_shapes_raise_a_clear_error(q_d, k_d, table_d, match):
    q, k = randn(1, 3, 2, q_d, dtype=torch.float32), randn(1, 3, 2, k_d, dtype=torch.float32)
    cos = sin = torch.ones(1, 6, 1, table_d)
    args = (q, k, q, k, None, None, None, None, 1e-6, 1, cos, sin, True)
    with pytest.raises(ValueError, match=match):
        ops.qk_rmsnorm_cat_rope(*args)
    with pytest.raises(ValueError, match=match):
        ops.reference_qk_rmsnorm_cat_rope(*args)


def test_one_rounding_is_more_accurate_on_average_than_the_unfused_code(interpreted):
    """fp16 (the interpreter rounds fp16 casts to nearest): the unfused code rounds the norm, its
    product with the weight and the rotation; the kernel rounds once."""
    args = _flux_args(1, (8, 24), 4, 64, torch.float16, "interleaved")
    truth = CASE.truth(*args)
    fused_error = sum((out.double() - t).abs().mean() for out, t in zip(CASE.op(*args), truth))
    unfused_error = sum((out.double() - t).abs().mean() for out, t in zip(CASE.reference(*args), truth))
    assert fused_error < 0.8 * unfused_error, (fused_error, unfused_error)
    assert interpreted.count == 1


on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FLUX_TEXT, FLUX_IMAGE, FLUX_HEADS, FLUX_HEAD_DIM = 512, 4096, 24, 128  # Flux-dev: 3072 = 24 x 128


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ROPE_FORMS)
def test_flux_dev_double_block_on_gpu(launches, poisoned_outputs, form, dtype, batch):
    """Flux-dev's double-block q/k: 512 text + 4096 image tokens, 24 heads of 128, bf16/fp16 weights,
    fp32 tables; B = 2 takes row groups. Every output element written (NaN-poisoned outputs), one launch."""
    args = _flux_args(batch, (FLUX_TEXT, FLUX_IMAGE), FLUX_HEADS, FLUX_HEAD_DIM, dtype, form, device="cuda")
    assert_op_accurate(CASE, args, dtype, interpreted=False)
    assert launches.count == 1
