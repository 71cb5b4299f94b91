"""Each pattern family on small modules: the spellings it must fuse and the near-misses it
must refuse (left untouched, reported with a reason)."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import fusion_pass

D = 24


class Spelled(nn.Module):
    """A module whose forward is ``fn(self, *inputs)``, with the usual parameters."""

    def __init__(self, fn, affine=False, eps=1e-6, q_eps=1e-6, k_eps=1e-6):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(D, elementwise_affine=affine, eps=eps)
        self.q_scale = nn.Parameter(torch.randn(D // 2) * 0.1 + 1)
        self.k_scale = nn.Parameter(torch.randn(D // 2) * 0.1 + 1)
        self.w = nn.Parameter(torch.randn(D) * 0.1 + 1)
        self.q_eps, self.k_eps = q_eps, k_eps
        self.lin = nn.Linear(D, D)
        self.lin_qkv = nn.Linear(D, 3 * D)

    def forward(self, x, mod):
        return self.fn(self, x, mod)


def modulation(batch=2):
    return torch.randn(batch, 1, 6 * D)


def run(fn, affine=False, x_shape=(2, 5, D), **kw):
    torch.manual_seed(0)
    module = Spelled(fn, affine=affine, **kw)
    if affine:
        with torch.no_grad():
            module.norm.weight.normal_(1, 0.2)
            module.norm.bias.normal_(0, 0.2)
    x, mod = torch.randn(*x_shape), modulation(x_shape[0])
    expected = module(x, mod)
    fusion_pass.optimize(module)
    got = module(x, mod)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return fusion_pass.report(module)


def chunks(mod):
    return mod.chunk(6, dim=-1)


def counts(report):
    return {k: v for k, v in report.counts().items() if v}


def reasons(report, family):
    return [m.reason for m in report.families[family].near_misses]


# --- LayerNorm -> scale-shift -----------------------------------------------------------

LN_SPELLINGS = {
    "module_scale_left": lambda s, x, m: (1 + chunks(m)[1]) * s.norm(x) + chunks(m)[0],
    "scale_plus_one_right": lambda s, x, m: s.norm(x) * (chunks(m)[1] + 1) + chunks(m)[0],
    "float_one_and_shift_first": lambda s, x, m: chunks(m)[0] + (1.0 + chunks(m)[1]) * s.norm(x),
    "functional_layer_norm": lambda s, x, m: (1 + chunks(m)[1]) * F.layer_norm(x, (D,), eps=1e-6) + chunks(m)[0],
    "addcmul": lambda s, x, m: torch.addcmul(chunks(m)[0], s.norm(x), 1 + chunks(m)[1]),
    "method_add_mul": lambda s, x, m: s.norm(x).mul(chunks(m)[1].add(1)).add(chunks(m)[0]),
    "unsqueeze_2d_modulation": lambda s, x, m: (1 + m[:, 0, :D].unsqueeze(1)) * s.norm(x) + m[:, 0, D:2 * D][:, None, :],
    "per_channel_vector": lambda s, x, m: (1 + m[0, 0, :D]) * s.norm(x) + m[0, 0, D:2 * D],
}


@pytest.mark.parametrize("spelling", sorted(LN_SPELLINGS))
def test_layernorm_modulate_spelling_is_fused(spelling):
    report = run(LN_SPELLINGS[spelling])
    assert counts(report) == {"layernorm_modulate": 1}


def test_affine_layernorm_is_fused_with_its_weight_and_bias():
    report = run(LN_SPELLINGS["module_scale_left"], affine=True)
    assert counts(report) == {"layernorm_modulate": 1}
    assert "affine" in report.families["layernorm_modulate"].sites[0].detail


def test_layernorm_eps_is_read_from_the_graph():
    report = run(LN_SPELLINGS["module_scale_left"], eps=1e-3)
    assert report.families["layernorm_modulate"].sites[0].detail.startswith("eps=0.001")


LN_NEAR_MISSES = {
    "scale has no +1": lambda s, x, m: chunks(m)[1] * s.norm(x) + chunks(m)[0],
    "scale offset is 2": lambda s, x, m: (2 + chunks(m)[1]) * s.norm(x) + chunks(m)[0],
    "also used by": lambda s, x, m: (lambda n: (1 + chunks(m)[1]) * n + chunks(m)[0] + n)(s.norm(x)),
    "not just the last dim": lambda s, x, m: (1 + chunks(m)[1]) * F.layer_norm(x, x.shape[-2:]) + chunks(m)[0],
    "not followed by a single + shift": lambda s, x, m: (1 + chunks(m)[1]) * s.norm(x) * chunks(m)[0],
}


@pytest.mark.parametrize("reason", sorted(LN_NEAR_MISSES))
def test_layernorm_modulate_near_miss_is_reported_not_fused(reason):
    report = run(LN_NEAR_MISSES[reason])
    assert report.counts()["layernorm_modulate"] == 0
    assert any(reason in r for r in reasons(report, "layernorm_modulate")), reasons(report, "layernorm_modulate")


# --- residual + gate * y ------------------------------------------------------------------

RG_SPELLINGS = {
    "gate_left": lambda s, x, m: x + chunks(m)[2] * s.lin(x),
    "gate_right_residual_right": lambda s, x, m: s.lin(x) * chunks(m)[2] + x,
    "addcmul": lambda s, x, m: torch.addcmul(x, chunks(m)[2], s.lin(x)),
    "torch_add_mul": lambda s, x, m: torch.add(x, torch.mul(chunks(m)[2], s.lin(x))),
}


@pytest.mark.parametrize("spelling", sorted(RG_SPELLINGS))
def test_residual_gate_spelling_is_fused(spelling):
    report = run(RG_SPELLINGS[spelling])
    assert counts(report) == {"residual_gate": 1}


def test_gate_multiplying_the_residual_is_not_fused():
    report = run(lambda s, x, m: x * chunks(m)[2] + s.lin(x))
    assert report.counts()["residual_gate"] == 0
    assert reasons(report, "residual_gate") == ["the gate multiplies the residual, not the branch computed from it"]


def test_gate_product_used_elsewhere_is_not_fused():
    def fn(s, x, m):
        product = chunks(m)[2] * s.lin(x)
        return x + product, product

    torch.manual_seed(0)
    module = Spelled(fn)
    x, mod = torch.randn(2, 5, D), modulation()
    expected = module(x, mod)
    fusion_pass.optimize(module)
    for got, want in zip(module(x, mod), expected):
        torch.testing.assert_close(got, want)
    assert any("also used by" in r for r in reasons(fusion_pass.report(module), "residual_gate"))


def test_dependence_follows_the_graph_order_through_inserted_nodes():
    # depends_on prunes by FX's node order, which must hold for nodes a rewrite inserts mid-graph
    from torch import fx

    from fusion_pass.match import depends_on

    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.relu, (x,))
    c = graph.call_function(torch.add, (a, x))
    graph.output(c)
    with graph.inserting_after(x):
        b = graph.call_function(torch.neg, (x,))  # between x and a
    with graph.inserting_after(a):
        d = graph.call_function(torch.mul, (b, a))  # between a and c
    c.args = (d, x)
    assert depends_on(c, b) and depends_on(c, a) and depends_on(d, b) and depends_on(c, x)
    assert not depends_on(a, b) and not depends_on(b, a) and not depends_on(d, c)


def test_unrelated_a_plus_b_times_c_is_not_a_candidate():
    report = run(lambda s, x, m: chunks(m)[0] + chunks(m)[1] * chunks(m)[2])
    assert report.total == 0 and not reasons(report, "residual_gate")


# --- chained residual -> norm --------------------------------------------------------------

def test_residual_feeding_a_modulated_layernorm_is_chained():
    def fn(s, x, m):
        shift, scale, gate = chunks(m)[:3]
        x = x + gate * s.lin(x)
        return x + chunks(m)[5] * s.lin((1 + scale) * s.norm(x) + shift)

    report = run(fn)
    assert counts(report) == {"residual_layernorm_modulate": 1, "residual_gate": 1}


# --- q/k RMSNorm --------------------------------------------------------------------------

def rms_official(x, w, eps):
    dtype = x.dtype
    x = x.float()
    return (x * torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + eps)).to(dtype=dtype) * w


def rms_method_chain(x, w, eps):
    return (x.float() * (x.float().pow(2).mean(-1, keepdim=True) + eps).rsqrt()).to(x.dtype) * w


def rms_no_cast(x, w, eps):
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def rms_functional(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def attention_with(norm, q_eps=None, k_eps=None):
    def fn(s, x, m):
        B, L, _ = x.shape
        q, k, v = s.lin_qkv(x).reshape(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        q = norm(q, s.q_scale, s.q_eps if q_eps is None else q_eps)
        k = norm(k, s.k_scale, s.k_eps if k_eps is None else k_eps)
        out = F.scaled_dot_product_attention(q.to(v), k.to(v), v)
        return out.transpose(1, 2).reshape(B, L, D)

    return fn


@pytest.mark.parametrize("norm", [rms_official, rms_method_chain, rms_no_cast, rms_functional], ids=lambda f: f.__name__)
def test_qk_rmsnorm_spelling_is_fused(norm):
    report = run(attention_with(norm))
    assert counts(report) == {"qk_rmsnorm": 1}


def test_nn_rmsnorm_modules_are_fused():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, 3 * D)
            self.q_norm, self.k_norm = nn.RMSNorm(D // 2, eps=1e-6), nn.RMSNorm(D // 2, eps=1e-6)

        def forward(self, x):
            B, L, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)

    torch.manual_seed(0)
    module, x = Attn(), torch.randn(2, 5, D)
    expected = module(x)
    fusion_pass.optimize(module)
    torch.testing.assert_close(module(x), expected)
    assert fusion_pass.report(module).counts()["qk_rmsnorm"] == 1


def test_eps_mismatch_between_q_and_k_is_not_fused():
    report = run(attention_with(rms_official), q_eps=1e-6, k_eps=1e-5)
    assert report.counts()["qk_rmsnorm"] == 0
    assert any("eps differs" in r for r in reasons(report, "qk_rmsnorm"))


def test_rmsnorm_over_a_non_last_dim_is_not_fused():
    def norm(x, w, eps):
        return x * torch.rsqrt(torch.mean(x * x, dim=-2, keepdim=True) + eps) * w

    report = run(attention_with(norm))
    assert report.counts()["qk_rmsnorm"] == 0
    assert any("not the last dim" in r for r in reasons(report, "qk_rmsnorm"))


def test_rmsnorm_upcast_never_cast_back_is_not_fused():
    def norm(x, w, eps):
        x = x.float()
        return x * torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + eps) * w

    report = run(attention_with(norm))
    assert report.counts()["qk_rmsnorm"] == 0
    assert any("never cast back" in r for r in reasons(report, "qk_rmsnorm"))


def test_lone_rmsnorm_without_attention_is_reported():
    report = run(lambda s, x, m: rms_official(x, s.w, 1e-6) + s.lin(x))
    assert report.total == 0
    assert reasons(report, "qk_rmsnorm") == ["RMSNorm does not feed an attention's query or key"]


# --- GELU -> cat --------------------------------------------------------------------------

def split_mlp(s, x):
    """A strided `[B, L, D]` view, as the single-stream block's split of its linear1 output."""
    return s.lin_qkv(x)[..., 2 * D:]


GC_SPELLINGS = {
    "block_contiguous_tanh_dim_2":
        lambda s, x, m: torch.cat((x, F.gelu(split_mlp(s, x).contiguous(), approximate="tanh")), 2),
    "list_keyword_dim_erf": lambda s, x, m: torch.cat([x, F.gelu(split_mlp(s, x))], dim=-1),
    "gelu_of_both_operands": lambda s, x, m: torch.cat((F.gelu(x), F.gelu(s.lin(x))), -1),
}


@pytest.mark.parametrize("spelling", sorted(GC_SPELLINGS))
def test_gelu_cat_spelling_is_fused(spelling):
    report = run(GC_SPELLINGS[spelling])
    assert counts(report) == {"gelu_cat": 1}


def test_single_stream_block_gelu_cat_is_fused_and_its_copy_skipped():
    from fusion_pass.install import graph_of
    from reference_models import build_model

    torch.manual_seed(0)
    block = build_model("tiny").single_blocks[0]
    x, vec = torch.randn(2, 6, 64), torch.randn(2, 64)
    expected = block(x, vec, None)
    fusion_pass.optimize(block)
    torch.testing.assert_close(block(x, vec, None), expected)
    report = fusion_pass.report(block)
    assert report.counts()["gelu_cat"] == 1 and not reasons(report, "gelu_cat")
    assert report.families["gelu_cat"].sites[0].detail == "approximate=tanh"
    code = graph_of(block)
    assert "gelu_cat" in code  # the fused call (the op, or its direct-call wrapper)
    assert "_nn.gelu" not in code and "contiguous" not in code and "torch.cat" not in code


GC_NEAR_MISSES = {
    "also used by": lambda s, x, m: (lambda g: torch.cat((x, g), -1)[..., :D] + g)(F.gelu(s.lin(x))),
    "cat has 3 operands": lambda s, x, m: torch.cat((x, F.gelu(s.lin(x)), x), -1),
    "GELU is on the first cat operand": lambda s, x, m: torch.cat((F.gelu(s.lin(x)), x), -1),
}


@pytest.mark.parametrize("reason", sorted(GC_NEAR_MISSES))
def test_gelu_cat_near_miss_is_reported_not_fused(reason):
    report = run(GC_NEAR_MISSES[reason])
    assert report.counts()["gelu_cat"] == 0
    assert any(reason in r for r in reasons(report, "gelu_cat")), reasons(report, "gelu_cat")


def test_cat_without_gelu_is_not_a_candidate():
    report = run(lambda s, x, m: torch.cat((x, torch.relu(s.lin(x))), -1))
    assert report.total == 0 and not reasons(report, "gelu_cat")


def test_cat_along_tokens_fuses_without_shapes_and_is_refused_with_them():
    def fn(s, x, m):
        return torch.cat((x, F.gelu(s.lin(x), approximate="tanh")), 1)

    report = run(fn)  # optimize(): no shapes; the op computes the reference for a non-last dim
    assert counts(report) == {"gelu_cat": 1}
    torch.manual_seed(0)
    module, x, mod = Spelled(fn), torch.randn(2, 5, D), modulation()
    torch._dynamo.reset()
    backend = fusion_pass.backend(inner="eager")
    torch.testing.assert_close(torch.compile(module, backend=backend, fullgraph=True)(x, mod), module(x, mod))
    assert backend.report.counts()["gelu_cat"] == 0
    assert reasons(backend.report, "gelu_cat") == ["cat along dim 1, not the last dim"]


# --- joint attention: q/k RMSNorm of two streams + cat ----------------------------------------

def joint_streams(s, x, cast_to_v=True, eps=(1e-6, 1e-6)):
    """(q, k, v) `[B, 2, L, D/2]` of a txt stream (3 tokens) and an img stream (x), as a double
    block makes them: qkv -> rearrange -> official RMSNorm of q and k -> `.to(v)`."""
    streams = []
    for tokens, stream_eps in zip((s.lin(x)[:, :3], x), eps):
        q, k, v = rearrange(s.lin_qkv(tokens), "B L (K H D) -> K B H L D", K=3, H=2)
        q, k = rms_official(q, s.q_scale, stream_eps), rms_official(k, s.k_scale, stream_eps)
        streams.append((q.to(v), k.to(v), v) if cast_to_v else (q, k, v))
    return streams


def joint_attention(q, k, v, x):
    """The img part of the attention over the joint sequence, merged back to x's shape."""
    out = F.scaled_dot_product_attention(q, k, v)[:, :, 3:]
    return out.transpose(1, 2).reshape(x.shape)


def joint_block(cat=torch.cat, dims=(2, 2, 2), **streams):
    def fn(s, x, m):
        (tq, tk, tv), (iq, ik, iv) = joint_streams(s, x, **streams)
        q, k, v = (cat((a, b), dim=d) for (a, b), d in zip(((tq, iq), (tk, ik), (tv, iv)), dims))
        return joint_attention(q, k, v, x)

    return fn


JOINT_SPELLINGS = {
    "official_cast_to_v": joint_block(),
    "no_casts_negative_dim": joint_block(dims=(-2, -2, -2), cast_to_v=False),
    "torch_concat": joint_block(cat=torch.concat),
}


@pytest.mark.parametrize("spelling", sorted(JOINT_SPELLINGS))
def test_joint_attention_cat_is_folded_into_the_q_k_norms(spelling):
    report = run(JOINT_SPELLINGS[spelling])
    assert counts(report) == {"qk_rmsnorm_cat": 1}
    assert report.totals()["qk_rmsnorm"] == 2 and len(report.families["qk_rmsnorm"].folded) == 2
    assert not any(fam.near_misses for fam in report.families.values())


@pytest.mark.parametrize("source", ["ours", "official"])
def test_double_stream_block_runs_one_fused_call_for_its_norms_and_cats(source):
    from fusion_pass.install import graph_of
    from reference_models import build_model, load_official

    torch.manual_seed(0)
    block = {"ours": build_model, "official": load_official}[source]("tiny").double_blocks[0]
    img, txt, vec = torch.randn(2, 6, 64), torch.randn(2, 4, 64), torch.randn(2, 64)
    expected = block(img, txt, vec, None)
    fusion_pass.optimize(block)
    for got, want in zip(block(img, txt, vec, None), expected):
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)
    report = fusion_pass.report(block)
    assert report.counts()["qk_rmsnorm_cat"] == 1 and report.counts()["qk_rmsnorm"] == 0
    assert report.totals()["qk_rmsnorm"] == 2 and not reasons(report, "qk_rmsnorm_cat")
    assert report.families["qk_rmsnorm_cat"].sites[0].detail == "dim=2, eps=1e-06, cast to v"
    code = graph_of(block)
    assert code.count("fusion_pass_ops_direct_qk_rmsnorm_cat_direct(") == 1
    assert "torch.cat" not in code and "qk_rmsnorm_direct" not in code


def q_used_besides_the_cat(s, x, m):
    (tq, tk, tv), (iq, ik, iv) = joint_streams(s, x)
    q, k, v = torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2)
    return joint_attention(q, k, v, x) + iq.mean()


def v_cat_over_heads(s, x, m):
    (tq, tk, tv), (iq, ik, iv) = joint_streams(s, x, cast_to_v=False)
    q, k = torch.cat((tq, iq), 2), torch.cat((tk, ik), 2)
    over_heads = torch.cat((tv, iv[:, :, :3]), 1)  # the only cat of the v views
    return joint_attention(q, k, torch.cat((1 * tv, iv), 2), x) + over_heads.mean()


def k_in_the_other_order(s, x, m):
    (tq, tk, tv), (iq, ik, iv) = joint_streams(s, x)
    return joint_attention(torch.cat((tq, iq), 2), torch.cat((ik, tk), 2), torch.cat((tv, iv), 2), x)


def v_computed_before_the_cat(s, x, m):
    (tq, tk, tv), (iq, ik, iv) = joint_streams(s, x, cast_to_v=False)
    return joint_attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((2 * tv, iv), 2), x)


def cast_to_the_tokens(s, x, m):
    (tq, tk, tv), (iq, ik, iv) = joint_streams(s, x, cast_to_v=False)
    q, k = torch.cat((tq.to(x), iq.to(x)), 2), torch.cat((tk.to(x), ik.to(x)), 2)
    return joint_attention(q, k, torch.cat((tv, iv), 2), x)


JOINT_NEAR_MISSES = {
    "the normed q of a stream is also used by": q_used_besides_the_cat,
    "different dims (2, 2, 1)": v_cat_over_heads,
    "normed k are not concatenated in the q cat's order": k_in_the_other_order,
    "no cat of the streams' v": v_computed_before_the_cat,
    "other than all by `.to(v)`": cast_to_the_tokens,
    "eps differs between the streams": joint_block(eps=(1e-6, 1e-5)),
}


@pytest.mark.parametrize("reason", sorted(JOINT_NEAR_MISSES))
def test_joint_attention_near_miss_keeps_the_q_k_norms_and_cats(reason):
    report = run(JOINT_NEAR_MISSES[reason])
    assert counts(report) == {"qk_rmsnorm": 2}
    assert [r for r in reasons(report, "qk_rmsnorm_cat") if reason in r], reasons(report, "qk_rmsnorm_cat")


def test_cat_dims_spelled_differently_fold_once_shapes_prove_them_equal():
    fn = joint_block(dims=(2, -2, 2))
    report = run(fn)  # optimize(): no shapes, so 2 and -2 may differ
    assert counts(report) == {"qk_rmsnorm": 2}
    assert reasons(report, "qk_rmsnorm_cat") == ["the q, k and v cats are on different dims (2, -2, 2)"]
    torch.manual_seed(0)
    module, x, mod = Spelled(fn), torch.randn(2, 5, D), modulation()
    torch._dynamo.reset()
    backend = fusion_pass.backend(inner="eager")
    torch.testing.assert_close(torch.compile(module, backend=backend, fullgraph=True)(x, mod), module(x, mod))
    assert counts(backend.report) == {"qk_rmsnorm_cat": 1}
