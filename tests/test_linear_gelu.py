"""The ``linear_gelu`` family (``patterns/linear_gelu.py``): the double-stream block's
``Linear -> GELU(tanh)`` becomes one ``fusion_pass::linear_gelu`` call; near-misses are left as
they were, with a reason."""
import pytest
import torch
from torch import nn

import fusion_pass
from fusion_pass.install import graph_of
from patterns import FAMILY_NAMES
from reference_models import example_inputs, get_config, load_official

FAMILY = "linear_gelu"
D = 16


class Mlp(nn.Module):
    """``nn.Sequential(Linear, GELU, Linear)`` as the double block's MLP, GELU as ``kind`` says."""

    def __init__(self, approximate="tanh", bias=True, reuse=False):
        super().__init__()
        self.reuse = reuse
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D, bias=bias), nn.GELU(approximate=approximate), nn.Linear(4 * D, D))

    def forward(self, x):
        if self.reuse:  # the pre-activation is also used elsewhere
            hidden = self.mlp[0](x)
            return self.mlp[2](self.mlp[1](hidden)) + hidden.sum(-1, keepdim=True)
        return self.mlp(x)


def optimized(model):
    return fusion_pass.optimize(model, patterns=[FAMILY])


def test_linear_tanh_gelu_is_fused_exactly_on_the_cpu():
    torch.manual_seed(0)
    model, x = Mlp(), torch.randn(2, 5, D)
    expected = model(x)
    optimized(model)
    assert fusion_pass.report(model).counts() == {FAMILY: 1}
    code = graph_of(model)
    assert "linear_gelu_direct(" in code and "gelu(" not in code.replace("linear_gelu_direct(", "")
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # the CPU runs the reference


@pytest.mark.parametrize("kwargs, reason", [
    ({"approximate": "none"}, "tanh form only"),
    ({"bias": False}, "no bias"),
    ({"reuse": True}, "also used by"),
])
def test_near_miss_is_reported_and_left_unfused(kwargs, reason):
    torch.manual_seed(0)
    model, x = Mlp(**kwargs), torch.randn(2, 5, D)
    expected = model(x)
    optimized(model)
    report = fusion_pass.report(model)
    assert report.counts() == {FAMILY: 0}
    assert [reason in m.reason for m in report.families[FAMILY].near_misses] == [True]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_official_double_blocks_mlps_are_fused():
    """Each double block has two MLPs (``img_mlp``, ``txt_mlp``) of ``Linear -> GELU(tanh)``; the
    single blocks' GELU is on a split view (``gelu_cat``'s), not a Linear's output."""
    model = load_official("tiny")
    inputs = example_inputs("tiny", seed=0)
    expected = inputs.call(model)
    fusion_pass.optimize(model, patterns=[*FAMILY_NAMES, FAMILY])
    report = fusion_pass.report(model)
    assert report.counts()[FAMILY] == 2 * get_config("tiny").depth
    assert report.totals()["gelu_cat"] == get_config("tiny").expected_sites()["gelu_cat"]
    torch.testing.assert_close(inputs.call(model), expected, rtol=0, atol=0)
