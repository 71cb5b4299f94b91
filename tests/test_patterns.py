"""Each pattern family on small modules: the spellings it must fuse and the near-misses it
must refuse (left untouched, reported with a reason)."""
import pytest
import torch
import torch.nn.functional as F
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
