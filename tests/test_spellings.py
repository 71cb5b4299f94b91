"""diffusers' spellings of the fused math, each as a small module, with its near-misses: the
canonical forms ``normalize`` gives them (issue 13), through the compile backend (Dynamo graphs,
which carry dtypes and shapes) and, where no dtype is needed, through ``optimize()``."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fusion_pass
from fusion_pass.normalize import normalize

pytestmark = pytest.mark.usefixtures("one_thread")

H, DH = 2, 8
D = H * DH


def diffusers_rms_norm(x, weight, eps=1e-6):
    """diffusers' ``RMSNorm.forward`` (models/normalization.py, torch path), verbatim in substance."""
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight is not None:
        if weight.dtype in [torch.float16, torch.bfloat16]:
            x = x.to(weight.dtype)
        return x * weight
    return x.to(input_dtype)


def fp32_layer_norm(x, weight=None, bias=None, eps=1e-6):
    """diffusers' ``FP32LayerNorm.forward``."""
    origin_dtype = x.dtype
    return F.layer_norm(
        x.float(), (x.shape[-1],), weight.float() if weight is not None else None,
        bias.float() if bias is not None else None, eps,
    ).to(origin_dtype)


def rope_real(x, cos, sin, unbind_dim):
    """diffusers' ``apply_rotary_emb(use_real=True)`` on ``[B, H, L, D]``: interleaved pairs
    (``use_real_unbind_dim=-1``, Flux) or halves (``-2``, HunyuanDiT/CogVideoX)."""
    cos, sin = cos[None, None], sin[None, None]
    if unbind_dim == -1:
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    else:
        x_real, x_imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
        x_rotated = torch.cat([-x_imag, x_real], dim=-1)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def rope_in_place(x, cos, sin):
    """Wan's rotary embedding: ``out[..., 0::2] = ...`` into ``torch.empty_like(x)``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class Block(nn.Module):
    """``fn(self, x, emb)`` with a LayerNorm, q/k/v projections, q/k norm weights and RoPE tables."""

    def __init__(self, fn, dtype=torch.float32, norm_dtype=None):
        super().__init__()
        self.fn = fn
        self.to_q, self.to_k, self.to_v = (nn.Linear(D, D) for _ in range(3))
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.q_weight = nn.Parameter(torch.randn(DH) * 0.1 + 1)
        self.k_weight = nn.Parameter(torch.randn(DH) * 0.1 + 1)
        self.qh_weight = nn.Parameter(torch.randn(D) * 0.1 + 1)  # over all heads
        self.kh_weight = nn.Parameter(torch.randn(D) * 0.1 + 1)
        angles = torch.randn(5, DH // 2).repeat_interleave(2, -1)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.to(dtype)
        if norm_dtype is not None:
            self.q_weight.data, self.k_weight.data = self.q_weight.data.to(norm_dtype), self.k_weight.data.to(norm_dtype)

    def forward(self, x, emb):
        return self.fn(self, x, emb)

    def heads(self, t):
        return t.unflatten(-1, (H, DH)).transpose(1, 2)  # [B, H, L, DH]


def backend_run(fn, dtype=torch.float32, norm_dtype=None, seed=0):
    """(report, optimized output, original output, inputs) through the compile backend."""
    torch.manual_seed(seed)
    torch._dynamo.reset()
    module = Block(fn, dtype, norm_dtype)
    x, emb = torch.randn(2, 5, D, dtype=dtype), torch.randn(2, 6 * D, dtype=dtype)
    backend = fusion_pass.backend(inner="eager")
    with torch.no_grad():
        expected = module(x, emb)
        got = torch.compile(module, backend=backend, fullgraph=True)(x, emb)
    return backend.report, got, expected, module, (x, emb)


def fused(report):
    return {k: v for k, v in report.totals().items() if v}


def reasons(report, family):
    return [m.reason for m in report.families[family].near_misses]


# --- diffusers RMSNorm on q/k -----------------------------------------------------------------

def qk_attention(norm_q, norm_k, across_heads=False, rope=None, keywords=False, cast_to_v=False):
    def fn(s, x, emb):
        q, k, v = s.to_q(x), s.to_k(x), s.to_v(x)
        if across_heads:
            q, k = norm_q(q, s.qh_weight), norm_k(k, s.kh_weight)
        q, k, v = s.heads(q), s.heads(k), s.heads(v)
        if not across_heads:
            q, k = norm_q(q, s.q_weight), norm_k(k, s.k_weight)
        if rope is not None:
            q, k = rope(q, s.cos, s.sin), rope(k, s.cos, s.sin)
        if cast_to_v:
            q, k = q.to(v), k.to(v)
        if keywords:  # as diffusers' dispatch_attention_fn calls it
            out = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).flatten(2)

    return fn


def _fp64_error(module, inputs, output):
    with torch.no_grad():
        exact = module.double()(*(t.double() for t in inputs))
    return (output.double() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_diffusers_rmsnorm_on_q_and_k_is_fused_and_no_less_accurate(dtype):
    report, got, expected, module, inputs = backend_run(qk_attention(diffusers_rms_norm, diffusers_rms_norm), dtype)
    assert fused(report) == {"qk_rmsnorm": 1}
    # the spelling rounds (x * rsqrt).to(weight dtype) once before the weight, as the fused op does;
    # the interpreter truncates half stores (1 ulp), so allow one ulp of the output's magnitude
    ulp = torch.finfo(dtype).eps * expected.abs().max().item()
    assert _fp64_error(module, inputs, got) <= _fp64_error(module, inputs, expected) + ulp


def test_diffusers_rmsnorm_with_fp32_weight_on_half_input_is_not_fused():
    # diffusers keeps the fp32 product (no cast to the input dtype) when the weight is fp32: the fused
    # op rounds the normalized value to the input dtype first, which would be less accurate
    attention = qk_attention(diffusers_rms_norm, diffusers_rms_norm, cast_to_v=True)
    report, *_ = backend_run(attention, torch.bfloat16, torch.float32)
    assert fused(report) == {}
    assert reasons(report, "qk_rmsnorm") == ["normalized value is computed in fp32 and never cast back to the input dtype"] * 2


def optimize_run(fn, dtype=torch.float32, norm_dtype=None, seed=0):
    """(report, optimized output, original output, module, inputs) through ``optimize()``: our FX
    capture, whose graphs carry no dtypes (the trace reads ``weight.dtype`` as a value, guarded)."""
    torch.manual_seed(seed)
    module = Block(fn, dtype, norm_dtype)
    x, emb = torch.randn(2, 5, D, dtype=dtype), torch.randn(2, 6 * D, dtype=dtype)
    with torch.no_grad():
        expected = module(x, emb)
        optimized = fusion_pass.optimize(copy.deepcopy(module))
        got = optimized(x, emb)
    return fusion_pass.report(optimized), got, expected, module, (x, emb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_diffusers_rmsnorm_on_q_and_k_is_fused_by_optimize_and_no_less_accurate(dtype):
    report, got, expected, module, inputs = optimize_run(qk_attention(diffusers_rms_norm, diffusers_rms_norm), dtype)
    assert fused(report) == {"qk_rmsnorm": 1}
    assert ("", f"q_weight.dtype is {dtype}") in report.assumptions  # the branch the trace took, checked per call
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ulp = torch.finfo(dtype).eps * expected.abs().max().item()
    assert got.dtype == expected.dtype
    assert _fp64_error(module, inputs, got) <= _fp64_error(module, inputs, expected) + ulp


def test_diffusers_rmsnorm_in_float64_is_fused_by_optimize_and_normalised_in_float64():
    # diffusers takes the variance of x.to(float32) even for fp64 x; the fused op's fp64 path does
    # not round it, so it is at least as close to the norm computed wholly in fp64
    def rms_norm_fp64(x, weight, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    report, got, expected, module, inputs = optimize_run(qk_attention(diffusers_rms_norm, diffusers_rms_norm),
                                                         torch.float64)
    assert fused(report) == {"qk_rmsnorm": 1}
    module.fn = qk_attention(rms_norm_fp64, rms_norm_fp64)
    with torch.no_grad():
        exact = module(*inputs)
    assert (got - exact).abs().max() <= (expected - exact).abs().max()


@pytest.mark.parametrize("dtype, norm_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_diffusers_rmsnorm_with_a_weight_of_another_dtype_is_fused_by_optimize_and_no_less_accurate(dtype, norm_dtype):
    # the graph knows the weight's dtype (read and guarded) but not the input's: the norm is fused
    # over x.to(promote_types(x.dtype, T)), T = fp32 (fp32 weight) or the half weight's dtype: an fp32
    # input is not rounded before a bf16 weight, a bf16 input is upcast as diffusers' product does
    attention = qk_attention(diffusers_rms_norm, diffusers_rms_norm, cast_to_v=True)
    report, got, expected, module, inputs = optimize_run(attention, dtype, norm_dtype)
    assert fused(report) == {"qk_rmsnorm": 1}
    ulp = torch.finfo(torch.bfloat16).eps * expected.abs().max().item()
    assert got.dtype == expected.dtype
    assert _fp64_error(module, inputs, got) <= _fp64_error(module, inputs, expected) + ulp


def test_rmsnorm_across_heads_before_the_head_split_is_fused():
    def across(t, w):  # torch.nn.RMSNorm over all heads (Wan, LTX: qk_norm="rms_norm_across_heads")
        return F.rms_norm(t, (D,), w, 1e-6)

    report, got, expected, *_ = backend_run(qk_attention(across, across, across_heads=True))
    assert fused(report) == {"qk_rmsnorm": 1}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_called_with_keywords_is_fused():
    report, got, expected, *_ = backend_run(qk_attention(diffusers_rms_norm, diffusers_rms_norm, keywords=True))
    assert fused(report) == {"qk_rmsnorm": 1}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def interleaved(x, cos, sin):
    return rope_real(x, cos, sin, -1)


def half_rotated(x, cos, sin):
    return rope_real(x, cos, sin, -2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [interleaved, half_rotated], ids=lambda f: f.__name__)
def test_q_k_norms_followed_by_rope_run_as_one_call_no_less_accurate(rope, dtype):
    report, got, expected, module, inputs = backend_run(
        qk_attention(diffusers_rms_norm, diffusers_rms_norm, rope=rope), dtype)
    assert fused(report) == {"qk_rmsnorm": 1, "qk_rmsnorm_rope": 1}
    assert report.counts()["qk_rmsnorm"] == 0  # folded into the RoPE call
    assert reasons(report, "residual_gate") == []  # x * cos + rotate(x) * sin is no gated residual
    ulp = torch.finfo(dtype).eps * expected.abs().max().item()
    assert _fp64_error(module, inputs, got) <= _fp64_error(module, inputs, expected) + ulp


def test_q_k_norms_followed_by_rope_written_in_place_are_paired():
    report, got, expected, *_ = backend_run(qk_attention(diffusers_rms_norm, diffusers_rms_norm, rope=rope_in_place))
    assert fused(report) == {"qk_rmsnorm": 1}  # Wan's form stays a separate rotation
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _rotating(rope_q, rope_k):
    def fn(s, x, emb):
        q, k, v = (s.heads(p(x)) for p in (s.to_q, s.to_k, s.to_v))
        q, k = diffusers_rms_norm(q, s.q_weight), diffusers_rms_norm(k, s.k_weight)
        q, k = rope_q(q, s.cos, s.sin), rope_k(k, s.cos, s.sin)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    return fn


@pytest.mark.parametrize("rope_q, rope_k, reason", [
    (interleaved, half_rotated, "q and k are rotated with different tables or layouts"),
    (interleaved, lambda x, cos, sin: interleaved(x, sin, cos), "q and k are rotated with different tables or layouts"),
    (interleaved, lambda x, cos, sin: x, "only q is rotated"),
], ids=["layouts_differ", "tables_differ", "only_q_rotated"])
def test_rope_that_differs_between_q_and_k_keeps_the_norm_call(rope_q, rope_k, reason):
    report, got, expected, *_ = backend_run(_rotating(rope_q, rope_k))
    assert fused(report) == {"qk_rmsnorm": 1}
    assert reasons(report, "qk_rmsnorm_rope") == [reason]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def rope_sequence_major(x, cos, sin):
    """``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` (Flux) on ``[B, L, H, D]``, interleaved."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def joint_attention(rope_q=interleaved, rope_k=interleaved, k_order=(0, 1), text_eps=1e-6, sequence_major=False,
                    k_table=None):
    """A double-stream joint attention: a text stream (the first 3 tokens of ``x``, doubled) and the
    image stream ``x``, each with its own q/k RMSNorm weights, q, k and v concatenated on the tokens
    (text first), q and k rotated by the joint sequence's tables (Flux's ``FluxAttnProcessor`` with
    ``sequence_major``; ``[B, H, L, D]`` heads otherwise). ``k_order`` orders the k cat's streams;
    ``k_table`` rotates k with ``(sin, cos)`` instead."""
    def fn(s, x, emb):
        streams = (2 * x[:, :3], x)
        heads = (lambda t: t.unflatten(-1, (H, DH))) if sequence_major else s.heads
        dim = 1 if sequence_major else 2
        q, k, v = ([heads(p(t)) for t in streams] for p in (s.to_q, s.to_k, s.to_v))
        weights = ((s.qh_weight[DH:], s.kh_weight[DH:], text_eps), (s.q_weight, s.k_weight, 1e-6))
        q, k = zip(*((diffusers_rms_norm(qi, wq, eps), diffusers_rms_norm(ki, wk, eps))
                     for qi, ki, (wq, wk, eps) in zip(q, k, weights)))
        q, k, v = torch.cat(q, dim), torch.cat([k[i] for i in k_order], dim), torch.cat(v, dim)
        cos, sin = torch.cat([s.cos[:3], s.cos]), torch.cat([s.sin[:3], s.sin])
        if sequence_major:
            q, k = rope_sequence_major(q, cos, sin), rope_sequence_major(k, cos, sin)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] for attention
        else:
            q, k = rope_q(q, cos, sin), rope_k(k, *((sin, cos) if k_table else (cos, sin)))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)[:, 3:]

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [interleaved, half_rotated, "sequence_major"],
                         ids=lambda r: r if isinstance(r, str) else r.__name__)
def test_joint_q_k_cats_then_rope_run_as_one_call_no_less_accurate(rope, dtype):
    spelling = joint_attention(sequence_major=True) if rope == "sequence_major" else joint_attention(rope, rope)
    report, got, expected, module, inputs = backend_run(spelling, dtype)
    assert fused(report) == {"qk_rmsnorm": 2, "qk_rmsnorm_cat_rope": 1}
    assert report.counts()["qk_rmsnorm"] == 0  # both folded into the joint call
    assert reasons(report, "qk_rmsnorm_cat") == reasons(report, "qk_rmsnorm_cat_rope") == []
    ulp = torch.finfo(dtype).eps * expected.abs().max().item()
    assert _fp64_error(module, inputs, got) <= _fp64_error(module, inputs, expected) + ulp


@pytest.mark.parametrize("spelling, reason", [
    (joint_attention(rope_k=lambda x, cos, sin: x), "only q is rotated"),
    (joint_attention(k_table=True), "q and k are rotated with different tables or layouts"),
    (joint_attention(rope_k=half_rotated), "q and k are rotated with different tables or layouts"),
    (joint_attention(k_order=(1, 0)), "the streams' normed k are not concatenated in the q cat's order"),
    (joint_attention(text_eps=1e-5), "eps differs between the streams' q/k norms (1e-05 vs 1e-06)"),
], ids=["only_q_rotated", "tables_differ", "layouts_differ", "k_cat_in_other_order", "eps_differs"])
def test_joint_rope_that_differs_between_q_and_k_keeps_the_norm_calls(spelling, reason):
    report, got, expected, *_ = backend_run(spelling)
    assert fused(report) == {"qk_rmsnorm": 2}
    assert reasons(report, "qk_rmsnorm_cat_rope") == [reason]
    assert reasons(report, "qk_rmsnorm_cat") == []  # one near-miss a site, in the family that owns it
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_norm_reaching_both_query_and_key_is_not_paired():
    def fn(s, x, emb):
        q = s.heads(diffusers_rms_norm(s.to_q(x), s.qh_weight))
        return F.scaled_dot_product_attention(q, q * 0.5, s.heads(s.to_v(x))).transpose(1, 2).flatten(2)

    report, *_ = backend_run(fn)
    assert fused(report) == {}
    assert reasons(report, "qk_rmsnorm") == ["RMSNorm does not feed an attention's query or key"]


# --- modulation: views moved through the +1, casts around the norm ------------------------------

def modulate(one_plus_scale, norm=None):
    def fn(s, x, emb):
        shift, scale = emb.chunk(6, dim=1)[:2]
        normed = s.norm(x) if norm is None else norm(s, x)
        return normed * one_plus_scale(scale) + shift[:, None, :]

    return fn


VIEW_AFTER_ONE_PLUS = {
    "index": lambda scale: (1 + scale)[:, None, :],  # AdaLayerNormContinuous, CogVideoXLayerNormZero
    "unsqueeze": lambda scale: (1 + scale).unsqueeze(1),
    "reshape": lambda scale: (scale + 1).reshape(2, 1, D),
    "two_views": lambda scale: (1 + scale)[:, None, :].reshape(2, 1, D),
}


@pytest.mark.parametrize("spelling", VIEW_AFTER_ONE_PLUS)
def test_view_after_the_one_plus_is_fused(spelling):
    report, got, expected, *_ = backend_run(modulate(VIEW_AFTER_ONE_PLUS[spelling]))
    assert fused(report) == {"layernorm_modulate": 1}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_view_after_the_one_plus_is_fused_by_optimize():
    torch.manual_seed(0)
    module = Block(modulate(VIEW_AFTER_ONE_PLUS["index"]))
    x, emb = torch.randn(2, 5, D), torch.randn(2, 6 * D)
    expected = module(x, emb)
    fusion_pass.optimize(module)
    torch.testing.assert_close(module(x, emb), expected, rtol=1e-5, atol=1e-5)
    assert fused(fusion_pass.report(module)) == {"layernorm_modulate": 1}


def test_view_that_changes_the_broadcast_is_not_fused():
    def per_row(scale):  # [B, 1, 1]: one scale per row, broadcast over the hidden dim
        return (1 + scale[:, :1])[:, :, None]

    report, got, expected, *_ = backend_run(modulate(per_row))
    assert fused(report) == {}
    assert reasons(report, "layernorm_modulate") == ["scale broadcasts over the hidden dim"]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_layernorm_modulated_and_cast_back_is_fused(dtype):
    def fn(s, x, emb):  # Wan: (norm1(x.float()) * (1 + scale) + shift).type_as(x), norm1 an FP32LayerNorm
        shift, scale = emb.float().chunk(6, dim=1)[:2]
        out = fp32_layer_norm(x.float()) * (1 + scale[:, None]) + shift[:, None]
        return out.type_as(x)

    report, got, expected, *_ = backend_run(fn, dtype)
    assert fused(report) == {"layernorm_modulate": 1}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


RMS_MODULATED = {
    "diffusers": lambda s, x: diffusers_rms_norm(x, None),  # LTX: RMSNorm(elementwise_affine=False)
    "rms_norm": lambda s, x: F.rms_norm(x, (D,), None, 1e-6),
    "rms_norm_weighted": lambda s, x: F.rms_norm(x, (D,), s.qh_weight, 1e-6),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spelling", RMS_MODULATED)
def test_rmsnorm_modulated_is_fused_and_no_less_accurate(spelling, dtype):
    """LTX's `norm1(x) * (1 + scale_msa) + shift_msa` (norm1 an unweighted diffusers RMSNorm)."""
    report, got, expected, module, inputs = backend_run(modulate(VIEW_AFTER_ONE_PLUS["index"], RMS_MODULATED[spelling]),
                                                        dtype)
    assert fused(report) == {"layernorm_modulate": 1}
    assert [site.detail for site in report.families["layernorm_modulate"].sites][0].startswith("rms_norm, eps=1e-06")
    assert got.dtype == expected.dtype
    ulp = torch.finfo(dtype).eps * expected.abs().max().item()  # the interpreter truncates half stores
    assert _fp64_error(module, inputs, got) <= _fp64_error(module, inputs, expected) + ulp


def test_rmsnorm_left_in_fp32_before_the_modulation_is_not_fused():
    def fn(s, x, emb):  # the fp32 norm is modulated in fp32: the fused op would round it to bf16 first
        shift, scale = emb.chunk(6, dim=1)[:2]
        xf = x.float()
        normed = x * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed * (1 + scale[:, None]) + shift[:, None]

    report, got, expected, *_ = backend_run(fn, torch.bfloat16)
    assert fused(report) == {}
    assert reasons(report, "layernorm_modulate") == ["RMSNorm is computed in fp32 and never cast back to the input dtype"]
    torch.testing.assert_close(got, expected, rtol=0.0, atol=0.0)


def test_norm_cast_to_its_own_dtype_is_fused():
    def fn(s, x, emb):  # `self.norm(x).to(dtype=dtype)` in an fp32 model
        shift, scale = emb.chunk(6, dim=1)[:2]
        return s.norm(x).to(dtype=x.dtype) * (1 + scale[:, None]) + shift[:, None]

    report, *_ = backend_run(fn)
    assert fused(report) == {"layernorm_modulate": 1}


def test_norm_rounded_to_a_lower_precision_before_the_modulation_is_not_fused():
    def fn(s, x, emb):  # a cast that is not undone: the fp16 rounding is part of the math
        shift, scale = emb.chunk(6, dim=1)[:2]
        return s.norm(x).to(torch.float16) * (1 + scale[:, None]) + shift[:, None]

    report, got, expected, *_ = backend_run(fn)
    assert fused(report) == {}
    assert reasons(report, "layernorm_modulate") == ["LayerNorm output is rounded to torch.float16 before the modulation"]
    torch.testing.assert_close(got, expected)


def test_one_layernorm_feeding_two_modulations_is_fused_twice():
    def fn(s, x, emb):  # SD35AdaLayerNormZeroX: norm_hidden_states and norm_hidden_states2 of one LayerNorm
        shift, scale, shift2, scale2 = emb.chunk(6, dim=1)[:4]
        normed = s.norm(x)
        return (normed * (1 + scale[:, None]) + shift[:, None]) - (normed * (1 + scale2[:, None]) + shift2[:, None])

    report, got, expected, *_ = backend_run(fn)
    assert report.counts()["layernorm_modulate"] == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layernorm_also_used_outside_its_modulations_is_not_fused():
    def fn(s, x, emb):
        shift, scale, shift2, scale2 = emb.chunk(6, dim=1)[:4]
        normed = s.norm(x)
        return normed * (1 + scale[:, None]) + shift[:, None] + normed.sum(-1, keepdim=True)

    report, *_ = backend_run(fn)
    assert fused(report) == {}
    assert reasons(report, "layernorm_modulate")[0].startswith("LayerNorm output is also used by")


# --- the gate: a residual read through a second cast ---------------------------------------------

def gated_with_rope_elsewhere(write_input=False):
    def fn(s, x, emb):  # Wan: (x.float() + ff(norm(x.float())) * gate).type_as(x), RoPE written in place
        gate = emb.float().chunk(6, dim=1)[2][:, None]
        q = s.heads(s.to_q(x))
        if write_input:
            x[..., 0] = 0  # an in-place write to an input: any read of x may change
        rotated = rope_in_place(q, s.cos, s.sin)
        branch = s.to_v(F.layer_norm(x.float(), (D,), eps=1e-6).type_as(x)).float()
        return (x.float() + branch * gate).type_as(x), rotated

    return fn


def test_residual_cast_twice_is_merged_and_gated_despite_rope_in_place():
    report, got, expected, *_ = backend_run(gated_with_rope_elsewhere(), torch.bfloat16)
    assert fused(report) == {"residual_gate": 1}
    torch.testing.assert_close(got, expected)


def _graph_with_write(write_to: str, read: str) -> fx.Graph:
    """``a = <read>.float(); <write_to>[..., 0] = 1; return a + <read>.float()`` built by hand
    (symbolic tracing cannot trace item assignment); ``write_to``/``read`` name ``x`` (an input),
    ``out`` (``torch.empty_like(q)``) or ``view`` (``out.unsqueeze(0)``)."""
    graph = fx.Graph()
    values = {"x": graph.placeholder("x"), "q": graph.placeholder("q")}
    values["out"] = graph.call_function(torch.empty_like, (values["q"],))
    values["view"] = graph.call_function(torch.unsqueeze, (values["out"], 0))
    first = graph.call_method("float", (values[read],))
    graph.call_function(operator.setitem, (values[write_to], (Ellipsis, 0), 1.0))
    second = graph.call_method("float", (values[read],))
    graph.output(graph.call_function(operator.add, (first, second)))
    return graph


@pytest.mark.parametrize("write_to, read, merged", [
    ("out", "x", True),  # RoPE writing a fresh tensor elsewhere: x's two reads are equal
    ("x", "x", False),  # a write to an input: the reads around it may differ
    ("view", "out", False),  # a write through a view of the tensor read
    ("out", "view", False),  # a read through a view of the tensor written
])
def test_duplicate_casts_are_merged_unless_a_write_may_reach_them(write_to, read, merged):
    graph = _graph_with_write(write_to, read)
    normalize(graph)
    casts = sum(node.op == "call_method" and node.target == "to" for node in graph.nodes)
    assert casts == (1 if merged else 2)


# --- pre-LN residual add feeding a LayerNorm ------------------------------------------------------

def pre_ln(branch_shape=None, structured=True):
    def fn(s, x, emb):
        branch = s.to_v(s.norm(x))
        if branch_shape is not None:
            branch = branch[:, :1]  # one row broadcast over the tokens
        r = (x if structured else emb[:, None, :D]) + branch
        return F.layer_norm(r, (D,), s.qh_weight, s.kh_weight, 1e-6) + r

    return fn


def test_pre_ln_residual_feeding_a_layernorm_is_fused():
    report, got, expected, *_ = backend_run(pre_ln())
    assert fused(report) == {"residual_layernorm": 1}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_residual_add_that_broadcasts_the_branch_is_not_fused():
    report, got, expected, *_ = backend_run(pre_ln(branch_shape="row"))
    assert fused(report) == {}
    assert reasons(report, "residual_layernorm") == ["the residual add broadcasts one operand"]
    torch.testing.assert_close(got, expected)


def test_sum_without_residual_structure_is_not_a_candidate():
    report, *_ = backend_run(pre_ln(structured=False))
    assert fused(report) == {}
    assert reasons(report, "residual_layernorm") == []


# --- q/k LayerNorm --------------------------------------------------------------------------------

def qk_layer_norms(q_eps=1e-6, k_eps=1e-6, normed="qk"):
    def fn(s, x, emb):  # CogVideoX: nn.LayerNorm(head_dim) on [B, H, L, D] views
        q, k, v = (s.heads(p(x)) for p in (s.to_q, s.to_k, s.to_v))
        q = F.layer_norm(q, (DH,), s.q_weight, s.k_weight, q_eps) if "q" in normed else q
        k = F.layer_norm(k, (DH,), None, None, k_eps) if "k" in normed else k
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    return fn


def test_q_k_layernorms_are_fused():
    report, got, expected, *_ = backend_run(qk_layer_norms())
    assert fused(report) == {"qk_layernorm": 1}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, reason", [
    ({"k_eps": 1e-5}, "eps differs between q and k norm (1e-06 vs 1e-05)"),
    ({"normed": "q"}, "LayerNorm has no partner norm on the other of query/key"),
])
def test_q_k_layernorm_near_miss_is_reported_not_fused(kwargs, reason):
    report, got, expected, *_ = backend_run(qk_layer_norms(**kwargs))
    assert fused(report) == {}
    assert reasons(report, "qk_layernorm") == [reason]
    torch.testing.assert_close(got, expected)
