"""Inputs the pass and the optimized model must survive: each gets the exact result of the
original model, or the same error, never a different number.

Run time: fp64, odd hidden sizes, L = 1, batch 1..8, non-contiguous and transposed inputs,
zero-size tensors, NaN/Inf, inputs on another device than the weights.
Pass time: non-Modules, modules with nothing to fuse, models already optimized, untraceable
children, forwards that create tensor constants, store attributes or mutate in place, hooks.
"""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusion_pass
from fusion_pass.install import graph_of, is_installed
from reference_models import build_model, example_inputs, get_config, load_official

BUILDERS = {"ours": build_model, "official": load_official}
EXACT = dict(rtol=0, atol=0)
FP32 = dict(rtol=1e-5, atol=1e-5)
FP64 = dict(rtol=1e-12, atol=1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")


def original_and_optimized(source: str, config="tiny", seed=0):
    torch.manual_seed(seed)
    original = BUILDERS[source](config).eval()
    return original, fusion_pass.optimize(copy.deepcopy(original))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny_pair(request):
    """(original, optimized) tiny Hunyuan3D DiT, ours and the official file."""
    return original_and_optimized(request.param)


def outcome(model, *args, **kwargs):
    """The model's output, or the exception it raised."""
    try:
        return model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome under test
        return exc


def assert_same_outcome(original, optimized, *args, tolerance=FP32, **kwargs):
    """Same values (NaN and Inf in the same places), or the same error type and a similar message."""
    want, got = outcome(original, *args, **kwargs), outcome(optimized, *args, **kwargs)
    if isinstance(want, Exception):
        assert isinstance(got, Exception), f"the original raised {want!r}; the optimized model returned a value"
        assert type(got) is type(want), f"{got!r} instead of {want!r}"
        assert _gist(got) == _gist(want), f"{got!r} instead of {want!r}"
        return
    assert not isinstance(got, Exception), f"the optimized model raised {got!r}; the original did not"
    assert (got.dtype, got.shape, got.device) == (want.dtype, want.shape, want.device)
    if got.device.type != "meta":
        torch.testing.assert_close(got, want, equal_nan=True, **tolerance)


def _gist(exc: Exception) -> str:
    """The kind of an error message (device errors name the devices in either order)."""
    text = str(exc).lower()
    for kind in ("device", "shape", "size", "dtype", "expected"):
        if kind in text:
            return kind
    return text


# --- the tiny Hunyuan3D DiT at run time ------------------------------------------------------

def test_fp64_model_gives_the_fp64_result(tiny_pair):
    """The official RMSNorm's ``x.float()`` rounds fp64 activations to fp32; the fused op keeps
    them in fp64 (never less precise), so the two agree to fp32 precision, not bitwise."""
    original, optimized = (copy.deepcopy(m).double() for m in tiny_pair)
    inputs = example_inputs("tiny", seed=1, dtype=torch.float64)
    assert_same_outcome(original, optimized, *inputs.args, tolerance=FP32)
    assert optimized(*inputs.args).dtype == torch.float64


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batch_sizes_from_one_to_eight(tiny_pair, batch):
    assert_same_outcome(*tiny_pair, *example_inputs("tiny", batch=batch, seed=2).args)


def test_a_single_latent_and_a_single_condition_token(tiny_pair):
    assert_same_outcome(*tiny_pair, *example_inputs("tiny", latents=1, cond_tokens=1, seed=3).args)


@pytest.mark.parametrize("hidden,heads", [(1000, 8), (1536, 12)])
def test_wide_odd_hidden_sizes_with_few_tokens(hidden, heads):
    config = dataclasses.replace(
        get_config("tiny"), hidden_size=hidden, num_heads=heads, axes_dim=(hidden // heads,),
        depth=1, depth_single_blocks=1, latent_tokens=3, cond_tokens=2,
    )
    for source in BUILDERS:
        original, optimized = original_and_optimized(source, config)
        counts = fusion_pass.report(optimized).counts()
        chained = counts["residual_layernorm_modulate"]
        assert {
            "layernorm_modulate": counts["layernorm_modulate"] + chained,
            "residual_gate": counts["residual_gate"] + chained,
            "qk_rmsnorm": counts["qk_rmsnorm"] + 2 * counts["qk_rmsnorm_cat"],  # a cat folds two pairs
            "gelu_cat": counts["gelu_cat"],
            "qk_rmsnorm_cat": counts["qk_rmsnorm_cat"],
        } == config.expected_sites()
        assert_same_outcome(original, optimized, *example_inputs(config, seed=4).args)


def test_non_contiguous_and_transposed_inputs(tiny_pair):
    config = get_config("tiny")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, config.in_channels, 16, generator=g).transpose(1, 2)  # [B, L, C], strides permuted
    t = torch.rand(4, generator=g)[::2]
    cond = torch.randn(2, 8, 2 * config.context_in_dim, generator=g)[..., ::2]
    assert not (x.is_contiguous() or t.is_contiguous() or cond.is_contiguous())
    assert_same_outcome(*tiny_pair, x, t, {"main": cond})


@pytest.mark.parametrize("shape", ["no latents", "no condition tokens", "empty batch"])
def test_zero_size_inputs(tiny_pair, shape):
    kwargs = {"no latents": dict(latents=0), "no condition tokens": dict(cond_tokens=0), "empty batch": dict(batch=0)}
    assert_same_outcome(*tiny_pair, *example_inputs("tiny", seed=6, **kwargs[shape]).args)


@pytest.mark.parametrize("where", ["latent token", "condition token", "timestep"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_propagate_exactly_as_in_the_original(tiny_pair, where, value):
    inputs = example_inputs("tiny", seed=7)
    x, t, cond = inputs.x.clone(), inputs.t.clone(), inputs.contexts["main"].clone()
    if where == "latent token":
        x[0, 3, 1] = value  # batch element 1 stays finite
    elif where == "condition token":
        cond[1, 2, :] = value
    else:
        t[0] = value
    assert_same_outcome(*tiny_pair, x, t, {"main": cond})


def test_inputs_on_meta_with_weights_on_cpu_raise_like_the_original(tiny_pair):
    assert_same_outcome(*tiny_pair, *example_inputs("tiny", seed=8, device="meta").args)


def test_weights_on_meta_with_inputs_on_cpu_raise_like_the_original(tiny_pair):
    original, optimized = (copy.deepcopy(m).to("meta") for m in tiny_pair)
    assert_same_outcome(original, optimized, *example_inputs("tiny", seed=8).args)


def test_everything_on_meta_gives_the_original_shapes(tiny_pair):
    original, optimized = (copy.deepcopy(m).to("meta") for m in tiny_pair)
    assert_same_outcome(original, optimized, *example_inputs("tiny", seed=8, device="meta").args)


# --- the fused ops meet the odd input first: small modules -----------------------------------

D = 12


class Modulated(nn.Module):
    """``x + gate * lin(LN(x) * (1 + scale) + shift)``: one LayerNorm-modulate, one gate."""

    def __init__(self, hidden=D, affine=False):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=affine, eps=1e-6)
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, x, mod):
        shift, scale, gate = mod.chunk(3, dim=-1)
        return x + gate * self.lin((1 + scale) * self.norm(x) + shift)


class QKNormed(nn.Module):
    """q/k RMSNorm (``F.rms_norm`` or the upcast spelling) feeding SDPA."""

    def __init__(self, hidden=D, heads=2, spelling="functional"):
        super().__init__()
        self.heads, self.head_dim, self.spelling = heads, hidden // heads, spelling
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_scale = nn.Parameter(torch.randn(self.head_dim) * 0.2 + 1)
        self.k_scale = nn.Parameter(torch.randn(self.head_dim) * 0.2 + 1)

    def norm(self, x, weight):
        if self.spelling == "functional":
            return F.rms_norm(x, (x.shape[-1],), weight, 1e-6)
        if self.spelling == "no_cast":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf ** 2, dim=-1, keepdim=True) + 1e-6)).to(x.dtype) * weight

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(self.norm(q, self.q_scale), self.norm(k, self.k_scale), v)


def optimized_pair(module):
    module.eval()
    optimized = fusion_pass.optimize(copy.deepcopy(module))
    assert fusion_pass.report(optimized).total >= 1
    return module, optimized


@pytest.mark.parametrize("hidden", [1, 3, 1000])
@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_small_module_with_awkward_sizes(hidden, tokens):
    torch.manual_seed(0)
    pair = optimized_pair(Modulated(hidden, affine=True))
    assert_same_outcome(*pair, torch.randn(2, tokens, hidden), torch.randn(2, 1, 3 * hidden))


def test_broadcast_operands_given_as_expanded_and_transposed_views():
    torch.manual_seed(0)
    pair = optimized_pair(Modulated())
    x = torch.randn(3, D, 5).transpose(1, 2)
    mod = torch.randn(3, 3 * D, 1).transpose(1, 2).expand(3, 5, 3 * D)  # zero token stride
    assert_same_outcome(*pair, x, mod)


@pytest.mark.parametrize("on_meta", ["x", "modulation", "weights"])
def test_fused_ops_given_tensors_on_two_devices_raise_like_the_original(on_meta):
    torch.manual_seed(0)
    original, optimized = optimized_pair(Modulated(affine=True))
    x, mod = torch.randn(2, 5, D), torch.randn(2, 1, 3 * D)
    if on_meta == "weights":
        original, optimized = original.to("meta"), optimized.to("meta")
    elif on_meta == "x":
        x = x.to("meta")
    else:
        mod = mod.to("meta")
    assert_same_outcome(original, optimized, x, mod)


@pytest.mark.parametrize("spelling", ["functional", "no_cast", "upcast"])
def test_fp64_q_k_rms_norm_keeps_the_original_precision(spelling):
    """Spellings without an upcast compute in fp64 in the original, so the fused op must too
    (fp32 would lose nine digits); the ``.float()`` spelling rounds to fp32 in the original,
    where the fused op's fp64 result agrees to fp32 precision and is closer to the exact one."""
    torch.manual_seed(0)
    original, optimized = optimized_pair(QKNormed(spelling=spelling).double())
    tolerance = FP32 if spelling == "upcast" else FP64
    assert_same_outcome(original, optimized, torch.randn(2, 5, D, dtype=torch.float64), tolerance=tolerance)


@pytest.mark.parametrize("spelling", ["functional", "no_cast", "upcast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_q_k_rms_norm_is_no_less_accurate(spelling, dtype):
    torch.manual_seed(0)
    module = QKNormed(spelling=spelling)
    original, optimized = optimized_pair(copy.deepcopy(module).to(dtype))
    x = torch.randn(2, 5, D)
    exact = module.double()(x.double())
    err_original = (original(x.to(dtype)).double() - exact).abs().max()
    err_optimized = (optimized(x.to(dtype)).double() - exact).abs().max()
    assert err_optimized <= err_original + torch.finfo(dtype).eps * exact.abs().max()


# --- pass time -------------------------------------------------------------------------------

@pytest.mark.parametrize("thing", [
    lambda x: x, nn.Linear, None, torch.zeros(3), [nn.Linear(2, 2)], {"block": nn.Linear(2, 2)}, "model",
], ids=["function", "module class", "None", "tensor", "list of modules", "dict of modules", "string"])
def test_a_non_module_is_a_type_error(thing):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fusion_pass.optimize(thing)


class LayerNormOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        return self.lin(self.norm(x)) * 2 + x


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)),
    lambda: nn.LayerNorm(D),
    LayerNormOnly,
    lambda: nn.TransformerEncoderLayer(D, 2, 16, batch_first=True),
], ids=["sequential", "bare layernorm", "layernorm without modulation", "torch transformer layer"])
def test_a_module_with_nothing_to_fuse_comes_back_unchanged(make):
    torch.manual_seed(0)
    module = make().eval()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(2, 5, D)
    want = module(x)
    assert fusion_pass.optimize(module) is module
    report = fusion_pass.report(module)
    assert report.total == 0 and not any(fam.near_misses for fam in report.families.values())
    assert not any(is_installed(m) for m in module.modules())
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    torch.testing.assert_close(module(x), want, **EXACT)


def test_a_second_pass_over_an_optimized_module_is_a_no_op():
    torch.manual_seed(0)
    module = fusion_pass.optimize(Modulated())
    forward = module.forward
    x, mod = torch.randn(2, 5, D), torch.randn(2, 1, 3 * D)
    want = module(x, mod)
    fusion_pass.optimize(module)
    report = fusion_pass.report(module)
    assert report.total == 0 and report.already_optimized == [""]
    assert module.forward is forward
    torch.testing.assert_close(module(x, mod), want, **EXACT)


def test_a_copy_of_an_optimized_model_is_already_optimized(tiny_pair):
    clone = copy.deepcopy(tiny_pair[1])
    fusion_pass.optimize(clone)
    assert fusion_pass.report(clone).total == 0 and fusion_pass.report(clone).already_optimized
    assert_same_outcome(tiny_pair[0], clone, *example_inputs("tiny", seed=9).args)


class DataDependent(nn.Module):
    """A child whose forward branches on a value (untraceable), holding a fusable grandchild."""

    def __init__(self):
        super().__init__()
        self.inner = Modulated()

    def forward(self, x, mod):
        if x.sum() > 0:
            return self.inner(x, mod)
        return -self.inner(-x, mod)


class WithUntraceableChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.branchy, self.plain = DataDependent(), Modulated()

    def forward(self, x, mod):
        return self.plain(self.branchy(x, mod), mod)


def test_an_untraceable_child_runs_as_before_and_the_rest_still_fuses():
    torch.manual_seed(0)
    original, optimized = optimized_pair(WithUntraceableChild())
    report = fusion_pass.report(optimized)
    assert dict(report.uncaptured).keys() == {"branchy"}
    assert "control flow" in dict(report.uncaptured)["branchy"]
    # the root (with `branchy` as a leaf) and `branchy.inner` each fuse one norm and one gate
    assert report.counts()["layernorm_modulate"] + report.counts()["residual_layernorm_modulate"] == 2
    assert not is_installed(optimized.branchy) and is_installed(optimized.branchy.inner)
    for sign in (1, -1):
        x = sign * (torch.randn(2, 5, D).abs() + 0.1)
        assert_same_outcome(original, optimized, x, torch.randn(2, 1, 3 * D))


class MakesTensorConstant(nn.Module):
    """Builds a tensor from Python values every call (as the official timestep embedding does)
    and moves it to the input's device."""

    def __init__(self):
        super().__init__()
        self.block = Modulated()

    def forward(self, x, mod):
        return self.block(x, mod) * torch.tensor([0.5, 2.0]).to(x.device).sum()


def test_a_tensor_constant_is_held_by_the_graph_not_the_module():
    torch.manual_seed(0)
    module = MakesTensorConstant()
    attributes = set(vars(module))
    original, optimized = optimized_pair(module)
    report = fusion_pass.report(optimized)
    assert report.uncaptured == [] and report.graphs == ["<root>"]
    assert set(vars(optimized)) - {"_fusion_pass_report", "forward"} == attributes  # forward: the installed one
    assert set(optimized.state_dict()) == set(original.state_dict())
    assert "_on(" in graph_of(optimized) and ".to(" not in graph_of(optimized)  # cached per device
    assert_same_outcome(original, optimized, torch.randn(2, 5, D), torch.randn(2, 1, 3 * D))


class DrawsRandomConstant(MakesTensorConstant):
    def forward(self, x, mod):
        return self.block(x, mod) * torch.rand(2).sum()


def test_a_random_draw_is_not_frozen_into_a_constant():
    torch.manual_seed(0)
    module = DrawsRandomConstant()
    state = torch.get_rng_state()
    fusion_pass.optimize(module)
    assert torch.equal(torch.get_rng_state(), state)  # tracing drew nothing from the user's generator
    assert "random numbers" in dict(fusion_pass.report(module).uncaptured)[""]
    assert not is_installed(module) and is_installed(module.block)


class BranchesOnDtype(nn.Module):
    """``if torch.is_floating_point(x)``: captured under a guard, checked every call."""

    def __init__(self):
        super().__init__()
        self.block = Modulated()

    def forward(self, x, mod):
        if torch.is_floating_point(x):
            return self.block(x, mod)
        return x * 2


def test_a_dtype_branch_is_captured_under_a_guard_that_falls_back_exactly():
    torch.manual_seed(0)
    original, optimized = optimized_pair(BranchesOnDtype())
    assert fusion_pass.report(optimized).graphs == ["<root>"] and "assume" in graph_of(optimized)
    assert_same_outcome(original, optimized, torch.randn(2, 5, D), torch.randn(2, 1, 3 * D))
    ints = torch.randint(-5, 5, (2, 5, D))
    torch.testing.assert_close(optimized(ints, torch.randn(2, 1, 3 * D)), ints * 2, **EXACT)  # guard failed


class BranchesAfterInPlace(BranchesOnDtype):
    def forward(self, x, mod):
        x.mul_(1)
        return super().forward(x, mod)


def test_a_guard_after_an_in_place_op_is_refused():
    torch.manual_seed(0)
    module = fusion_pass.optimize(BranchesAfterInPlace())
    assert "may modify state" in dict(fusion_pass.report(module).uncaptured)[""]
    assert not is_installed(module) and is_installed(module.block)


class StoresAttribute(Modulated):
    """Keeps its last output for inspection (as attention-map visualisers do)."""

    def __init__(self):
        super().__init__()
        self.last = None

    def forward(self, x, mod):
        out = super().forward(x, mod)
        self.last = out.detach()
        return out


def test_a_forward_that_stores_an_attribute_keeps_storing_it():
    torch.manual_seed(0)
    original, optimized = StoresAttribute(), fusion_pass.optimize(StoresAttribute())
    assert not isinstance(optimized.last, torch.fx.Proxy), "tracing left a Proxy on the module"
    optimized.load_state_dict(original.state_dict())
    x, mod = torch.randn(2, 5, D), torch.randn(2, 1, 3 * D)
    assert_same_outcome(original, optimized, x, mod)
    assert isinstance(optimized.last, torch.Tensor)
    torch.testing.assert_close(optimized.last, original.last, **FP32)


class MutatesBetweenCasts(Modulated):
    """Reads ``h`` in half precision before and after scaling it in place."""

    def forward(self, x, mod):
        h = self.lin(x)
        before = h.half()
        h.mul_(2)
        after = h.half()
        return super().forward(x, mod) + before.float() + after.float()


def test_an_in_place_op_between_two_equal_casts_is_respected():
    torch.manual_seed(0)
    pair = optimized_pair(MutatesBetweenCasts())
    assert_same_outcome(*pair, torch.randn(2, 5, D), torch.randn(2, 1, 3 * D))


class ViewsLikeInput(Modulated):
    def forward(self, x, mod):
        return super().forward(x, mod).view(x.shape) + x.reshape(x.size())


def test_a_view_to_another_tensors_shape_still_runs():
    torch.manual_seed(0)
    pair = optimized_pair(ViewsLikeInput())
    assert_same_outcome(*pair, torch.randn(2, 5, D), torch.randn(2, 1, 3 * D))


def test_a_hooked_layernorm_keeps_its_hook_and_is_not_mistaken_for_a_gate():
    torch.manual_seed(0)
    module = Modulated()
    calls = []
    module.norm.register_forward_hook(lambda *args: calls.append(1))
    original, optimized = module, fusion_pass.optimize(copy.deepcopy(module))
    x, mod = torch.randn(2, 5, D), torch.randn(2, 1, 3 * D)
    assert_same_outcome(original, optimized, x, mod)
    assert len(calls) == 2  # once per model: the hook fired in the optimized forward too
    assert {family: n for family, n in fusion_pass.report(optimized).counts().items() if n} == {"residual_gate": 1}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_torchscript_module_is_reported_uncaptured_and_left_alone():
    torch.manual_seed(0)
    module = Modulated()
    scripted = torch.jit.script(copy.deepcopy(module))
    fusion_pass.optimize(scripted)
    report = fusion_pass.report(scripted)
    assert report.total == 0 and report.uncaptured
    assert not any(is_installed(m) for m in scripted.modules())
    assert_same_outcome(module, scripted, torch.randn(2, 5, D), torch.randn(2, 1, 3 * D))


def test_a_torch_compiled_module_keeps_its_outputs():
    torch.manual_seed(0)
    module = Modulated()
    compiled = torch.compile(copy.deepcopy(module), backend="eager", fullgraph=True)
    x, mod = torch.randn(2, 5, D), torch.randn(2, 1, 3 * D)
    compiled(x, mod)
    fusion_pass.optimize(compiled)
    assert_same_outcome(module, compiled, x, mod)
    torch._dynamo.reset()
