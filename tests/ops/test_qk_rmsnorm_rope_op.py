"""q/k RMSNorm + RoPE: every RoPE form, the layouts the models pass, diffusers' own code, errors."""

import pytest
import torch

import fusion_pass.ops as ops
from fusion_pass.ops.qk_rmsnorm import reference_rmsnorm
from fusion_pass.ops.qk_rmsnorm_rope import reference_rope
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

CASE = OP_CASES["qk_rmsnorm_rope"]
HEAD_SHAPES = [(2, 2, 4, 64), (1, 2, 1, 6), (1, 3, 3, 34), (1, 2, 3, 2)]
"""[B, H, L, D]: a model-like head, one token of batch 1 with D/2 = 3 (odd, not a power of
two), D = 34 (a tile wider than the row) and D = 2 (one pair a row: the kernel splits a row
tile into its even and odd columns, here tiles of one column each)."""


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("q_shape", HEAD_SHAPES, ids=str)
@pytest.mark.parametrize("form", ROPE_FORMS)
def test_every_rope_form_on_strided_head_views_matches_float64(interpreted, form, q_shape, dtype):
    assert_op_accurate(CASE, CASE.make_args(q_shape, dtype, form=form), dtype, interpreted=True)
    assert interpreted.count == 1


def _sequence_major(batch, length, heads, d, dtype):
    """q, k `[B, L, H, D]` as Flux/QwenImage/HunyuanVideo unflatten their projections."""
    return (sequence_major(batch, length, heads, d, dtype) for _ in "qk")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("form", ROPE_FORMS)
def test_sequence_major_heads_with_unsqueezed_tables(interpreted, form, dtype):
    """Flux's `apply_rotary_emb(q, (cos, sin), sequence_dim=1)`: `[1, L, H, D]` with cos[None, :, None, :]."""
    q, k = _sequence_major(1, 5, 3, 16, dtype)
    cos, sin = rope_tables(5, 16, form)
    weights = [randn(16, dtype=dtype, mean=1.0) for _ in "qk"]
    args = (q, k, *weights, 1e-6, cos[None, :, None, :], sin[None, :, None, :], form != "half")
    assert_op_accurate(CASE, args, dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_transposed_heads_are_read_through_strides(interpreted, dtype):
    """`[B, L, H, D].transpose(1, 2)`: the `[B, H, L, D]` view attention takes, not contiguous."""
    q, k = (x.transpose(1, 2) for x in _sequence_major(2, 5, 3, 16, dtype))
    cos, sin = rope_tables(5, 16, "interleaved")
    args = (q, k, randn(16, dtype=dtype, mean=1.0), randn(16, dtype=dtype, mean=1.0), 1e-6, cos, sin, True)
    assert_op_accurate(CASE, args, dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_rows_over_all_heads_with_per_batch_tables(interpreted, dtype):
    """LTX: norm and RoPE over the whole `[B, L, H * D]` row, cos/sin `[B, L, H * D]`."""
    q, k = (randn(2, 5, 24, dtype=dtype, scale=2.0) for _ in "qk")
    cos, sin = (t.expand(2, 5, 24).clone() for t in rope_tables(5, 24, "interleaved"))
    args = (q, k, randn(24, dtype=dtype, mean=1.0), randn(24, dtype=dtype, mean=1.0), 1e-6, cos, sin, True)
    assert_op_accurate(CASE, args, dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("keep", ["none", "q", "k"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_weights_are_optional(interpreted, keep, dtype):
    q, k, q_weight, k_weight, eps, cos, sin, interleaved = CASE.make_args((1, 2, 3, 16), dtype)
    args = (q, k, q_weight if keep == "q" else None, k_weight if keep == "k" else None, eps, cos, sin, interleaved)
    assert_op_accurate(CASE, args, dtype, interpreted=True)
    assert interpreted.count == 1


def test_grouped_keys_of_another_length_and_dtype_share_one_launch(interpreted):
    """k with fewer heads (grouped-query attention) and in bf16 while q is fp16; cos/sin `[1, 1, L, D]`
    broadcast over both."""
    q, _ = qkv_views((1, 4, 3, 16), torch.float16)
    _, k = qkv_views((1, 2, 3, 16), torch.bfloat16)
    cos, sin = (t[None, None] for t in rope_tables(3, 16, "half"))
    args = (q, k, randn(16, dtype=torch.float16, mean=1.0), randn(16, dtype=torch.bfloat16, mean=1.0), 1e-6,
            cos, sin, False)
    fused, reference, truth = CASE.op(*args), CASE.reference(*args), CASE.truth(*args)
    assert_accurate(fused.q, reference[0], truth[0], torch.float16, interpreted=True)
    assert_accurate(fused.k, reference[1], truth[1], torch.bfloat16, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_batched_sequence_major_heads_take_row_groups(interpreted, dtype):
    """`[B, L, H, D]` with B > 1 under `[1, L, 1, D]` tables: three row dims (B, L, H) that do not
    merge, the outermost a group of programs."""
    q, k = _sequence_major(2, 3, 2, 8, dtype)
    cos, sin = (t[None, :, None, :] for t in rope_tables(3, 8, "interleaved"))
    assert_op_accurate(CASE, (q, k, None, None, 1e-6, cos, sin, True), dtype, interpreted=True)
    assert interpreted.count == 1


def test_four_row_dims_that_do_not_merge_run_reference(interpreted):
    # Gaps between all four leading dims: none merges with its neighbour.
    q = torch.randn(2000 * 16).as_strided((2, 3, 4, 5, 16), (1000 * 16, 300 * 16, 60 * 16, 10 * 16, 1))
    cos, sin = rope_tables(5, 16, "half")
    args = (q, q, None, None, 1e-6, cos, sin, False)
    for fused, reference in zip(CASE.op(*args), CASE.reference(*args)):
        torch.testing.assert_close(fused, reference, rtol=0.0, atol=0.0)
    assert interpreted.count == 0


def test_reference_is_diffusers_rmsnorm_then_apply_rotary_emb():
    """Bit for bit: diffusers' `RMSNorm` (bf16 weight) then `apply_rotary_emb`, both unbind dims."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    norm = RMSNorm(16, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(randn(16, dtype=torch.bfloat16, mean=1.0))
    q, k = qkv_views((2, 3, 5, 16), torch.bfloat16)
    for form, unbind_dim in (("interleaved", -1), ("half", -2)):
        cos, sin = rope_tables(5, 16, form)
        with torch.no_grad():
            expected = [apply_rotary_emb(norm(x), (cos, sin), use_real_unbind_dim=unbind_dim) for x in (q, k)]
        actual = ops.reference_qk_rmsnorm_rope(q, k, norm.weight, norm.weight, 1e-6, cos, sin, form == "interleaved")
        for got, want in zip(actual, expected):
            torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


def test_pair_form_is_the_complex_form_of_qwenimage():
    """QwenImage's `apply_rotary_emb_qwen(x, freqs_cis, use_real=False)` on `[B, L, H, D]`:
    the interleaved pair form with cos, sin = view_as_real(freqs_cis).unbind(-1), unsqueezed like
    its `freqs_cis.unsqueeze(1)`. Complex products may use fused multiply-adds: 1 ulp."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    x = next(_sequence_major(2, 5, 3, 16, torch.float32))
    cos, sin = rope_tables(5, 16, "complex")
    freqs_cis = torch.complex(cos, sin)
    expected = apply_rotary_emb_qwen(x, freqs_cis, use_real=False)
    actual = reference_rope(x, cos.unsqueeze(1), sin.unsqueeze(1), interleaved=True)
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=torch.finfo(torch.float32).eps * 4)


def test_pair_form_is_wans_rotary():
    """Wan's rotary (`transformer_wan.py`, `WanAttnProcessor`: `x1 * cos - x2 * sin` into the even
    columns, `x1 * sin + x2 * cos` into the odd, with cos = freqs_cos[..., 0::2] and
    sin = freqs_sin[..., 1::2]) is the interleaved pair form of those slices."""
    x = next(_sequence_major(1, 5, 3, 16, torch.float32))
    freqs_cos, freqs_sin = (t[None, :, None, :] for t in rope_tables(5, 16, "interleaved"))
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    expected = torch.empty_like(x)
    expected[..., 0::2] = x1 * cos - x2 * sin
    expected[..., 1::2] = x1 * sin + x2 * cos
    torch.testing.assert_close(reference_rope(x, cos, sin, interleaved=True), expected, rtol=0.0, atol=0.0)


def test_rmsnorm_without_weight_is_the_norm_alone():
    x = randn(2, 3, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(
        reference_rmsnorm(x, None, 1e-6), reference_rmsnorm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6),
        rtol=0.0, atol=0.0,
    )


@pytest.mark.parametrize(
    "q_d, k_d, table_d, match",
    [(7, 7, 7, "must be even"), (8, 16, 8, "share their last dim"), (8, 8, 6, "cos must be 8 wide")],
)
def test_bad_shapes_raise_a_clear_error(q_d, k_d, table_d, match):
    q, k = randn(1, 2, 3, q_d, dtype=torch.float32), randn(1, 2, 3, k_d, dtype=torch.float32)
    cos = sin = torch.ones(3, table_d)
    with pytest.raises(ValueError, match=match):
        ops.qk_rmsnorm_rope(q, k, None, None, 1e-6, cos, sin, True)
    with pytest.raises(ValueError, match=match):
        ops.reference_qk_rmsnorm_rope(q, k, None, None, 1e-6, cos, sin, True)


def test_torch_compile_fullgraph_traces_the_op():
    args = CASE.make_args((1, 2, 3, 8), torch.float32, form="complex")
    torch._dynamo.reset()
    compiled = torch.compile(ops.qk_rmsnorm_rope, fullgraph=True, backend="aot_eager")
    for actual, expected in zip(compiled(*args), ops.qk_rmsnorm_rope(*args)):
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)


on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FLUX_TOKENS, FLUX_HEADS, FLUX_HEAD_DIM = 4096 + 512, 24, 128  # Flux-dev: image + text tokens, 3072 = 24 x 128


def _flux_sequence_major(batch, dtype):
    """Flux's q, k: `to_q(x).unflatten(-1, (H, D))`, `[B, L, H, D]` views of `[B, L, H * D]`."""
    return (torch.randn(batch, FLUX_TOKENS, FLUX_HEADS * FLUX_HEAD_DIM, device="cuda", dtype=dtype)
            .unflatten(-1, (FLUX_HEADS, FLUX_HEAD_DIM)) for _ in "qk")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ROPE_FORMS)
def test_flux_shaped_heads_on_gpu(launches, poisoned_outputs, form, dtype, batch):
    """Flux-dev's single-block q/k (bf16 weights, fp32 tables `cos[None, :, None, :]`); B = 2
    takes row groups."""
    q, k = _flux_sequence_major(batch, dtype)
    cos, sin = (t[None, :, None, :] for t in rope_tables(FLUX_TOKENS, FLUX_HEAD_DIM, form, device="cuda"))
    weights = [randn(FLUX_HEAD_DIM, dtype=dtype, mean=1.0, scale=0.2, device="cuda") for _ in "qk"]
    assert_op_accurate(CASE, (q, k, *weights, 1e-6, cos, sin, form != "half"), dtype, interpreted=False)
    assert launches.count == 1


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_permuted_qkv_heads_with_plain_tables_on_gpu(launches, poisoned_outputs, dtype):
    """`[B, H, L, D]` views of one qkv projection (B = 2: row groups) under `[L, D]` tables."""
    args = CASE.make_args((2, FLUX_HEADS, FLUX_TOKENS, FLUX_HEAD_DIM), dtype, device="cuda", form="half")
    assert_op_accurate(CASE, args, dtype, interpreted=False)
    assert launches.count == 1


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ltx_rows_over_all_heads_on_gpu(launches, poisoned_outputs, dtype):
    """LTX-Video: norm and RoPE over `[B, L, 2048]` rows (32 heads of 64), tables `[B, L, 2048]`."""
    q, k = (torch.randn(1, 4096, 2048, device="cuda", dtype=dtype) for _ in "qk")
    cos, sin = (t[None] for t in rope_tables(4096, 2048, "interleaved", device="cuda"))
    weights = [randn(2048, dtype=dtype, mean=1.0, scale=0.2, device="cuda") for _ in "qk"]
    assert_op_accurate(CASE, (q, k, *weights, 1e-6, cos, sin, True), dtype, interpreted=False)
    assert launches.count == 1


def test_one_rounding_is_more_accurate_on_average_than_the_unfused_three(interpreted):
    """fp16 (the interpreter rounds fp16 casts to nearest; bf16 ones it truncates): the unfused
    code rounds the norm, its product with the weight and the rotation; the kernel rounds once."""
    args = CASE.make_args((2, 4, 16, 64), torch.float16)
    truth = CASE.truth(*args)
    fused_error = sum((out.double() - t).abs().mean() for out, t in zip(CASE.op(*args), truth))
    unfused_error = sum((out.double() - t).abs().mean() for out, t in zip(CASE.reference(*args), truth))
    assert fused_error < 0.8 * unfused_error, (fused_error, unfused_error)
    assert interpreted.count == 1
