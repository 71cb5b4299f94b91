"""Optional arguments: a forward with defaults is captured for the arguments its call passes,
and a call passing them differently is captured for its own pattern (a Proxy is never None, so
tracing ``if pe is not None`` with a placeholder would bake the wrong branch)."""
import copy

import pytest
import torch
from torch import nn

import fusion_pass
from fusion_pass.guards import ArgumentsDiffer, CallSignature

D = 12
EXACT = dict(rtol=1e-5, atol=1e-6)


class OptionalInputs(nn.Module):
    """A block with the issue's optional inputs: ``pe`` added before the norm, a controlnet
    residual added at the end, a Python flag; one LayerNorm-modulate and one gate either way."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.lin = nn.Linear(D, D)

    def forward(self, x, mod, pe=None, controlnet_residual=None, double=False):
        shift, scale, gate = mod.chunk(3, dim=-1)
        if pe is not None:
            x = x + pe
        x = x + gate * self.lin((1 + scale) * self.norm(x) + shift)
        if controlnet_residual is not None:
            x = x + controlnet_residual
        return x * 2 if double else x


@pytest.fixture
def pair():
    torch.manual_seed(0)
    original = OptionalInputs()
    return original, fusion_pass.optimize(copy.deepcopy(original))


def test_a_forward_with_optional_arguments_waits_for_its_first_call(pair):
    report = fusion_pass.report(pair[1])
    assert report.pending == [("", "captured on its first call (its forward has optional parameters)")]
    assert report.total == 0


@pytest.mark.parametrize("first", [{}, {"pe": "t"}, {"controlnet_residual": "t", "double": True}])
def test_optional_inputs_passed_on_one_call_and_left_out_on_the_next_give_the_original_outputs(pair, first):
    original, optimized = pair
    x, mod = torch.randn(2, 5, D), torch.randn(2, 1, 3 * D)
    tensors = {"pe": torch.randn(2, 5, D), "controlnet_residual": torch.randn(2, 5, D)}
    calls = [{k: tensors.get(k, v) if v == "t" else v for k, v in first.items()}, {},
             {"pe": tensors["pe"], "controlnet_residual": tensors["controlnet_residual"]}, {"pe": None}, {}]
    for kwargs in calls:
        torch.testing.assert_close(optimized(x, mod, **kwargs), original(x, mod, **kwargs), **EXACT)
    report = fusion_pass.report(optimized)
    assert report.totals()["layernorm_modulate"] == 1 and report.totals()["residual_gate"] == 1  # one of each
    assert any("argument pe passed (captured without it)" in reason for _, reason, _ in report.fallbacks)


def test_the_signature_check_admits_defaults_passed_explicitly_and_refuses_other_values():
    signature = CallSignature(OptionalInputs.forward)  # the pattern "required arguments only"
    x = torch.zeros(1)
    assert signature.required_values((x, x), {}) == (x, x)
    assert signature.required_values((x,), {"mod": x, "pe": None, "double": False}) == (x, x)
    for kwargs, reason in [({"pe": x}, "argument pe passed"), ({"double": True}, "argument double passed"),
                           ({"other": 1}, "unexpected argument other")]:
        with pytest.raises(ArgumentsDiffer, match=reason):
            signature.required_values((x, x), kwargs)
    with_pe = CallSignature(OptionalInputs.forward, ((x, x), {"pe": x, "double": True}))
    assert with_pe.required_values((x, x), {"pe": x, "double": True}) == (x, x, x)
    with pytest.raises(ArgumentsDiffer, match="argument pe left out"):
        with_pe.required_values((x, x), {"double": True})
    with pytest.raises(ArgumentsDiffer, match="argument double is False"):
        with_pe.required_values((x, x), {"pe": x, "double": False})


def test_alternating_optional_inputs_switch_between_kept_graphs_instead_of_capturing_again(pair):
    original, optimized = pair
    x, mod, pe = torch.randn(2, 5, D), torch.randn(2, 1, 3 * D), torch.randn(2, 5, D)
    for step in range(12):  # more changes of pattern than MAX_RECAPTURES
        kwargs = {"pe": pe} if step % 2 else {}
        torch.testing.assert_close(optimized(x, mod, **kwargs), original(x, mod, **kwargs), **EXACT)
    fallbacks = {reason: calls for _, reason, calls in fusion_pass.report(optimized).fallbacks}
    assert fallbacks == {"re-captured after: argument pe passed (captured without it)": 1,
                         "switched to the graph captured for this argument pattern": 10}
    assert fusion_pass.report(optimized).totals()["residual_gate"] == 1


class RequiredNone(nn.Module):
    """Hunyuan3D's blocks: ``forward(self, x, mod, pe)`` with ``pe`` required but passed None."""

    def __init__(self):
        super().__init__()
        self.block = OptionalInputs()

    def forward(self, x, mod, pe):
        return self.block(x, mod, pe=pe)


def test_a_required_argument_passed_none_is_captured_once_for_that_pattern():
    torch.manual_seed(0)
    original = RequiredNone()
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    x, mod = torch.randn(2, 5, D), torch.randn(2, 1, 3 * D)
    for _ in range(3):
        torch.testing.assert_close(optimized(x, mod, None), original(x, mod, None), **EXACT)
    report = fusion_pass.report(optimized)
    reasons = [(reason, calls) for _, reason, calls in report.fallbacks]
    # captured with a tensor placeholder for pe, then once for pe=None (baked), and never again
    assert reasons == [("re-captured after: argument pe is NoneType (captured with a tensor)", 1)]
    assert report.totals()["layernorm_modulate"] == 1 and report.totals()["residual_gate"] == 1
