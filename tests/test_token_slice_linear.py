"""The ``token_slice_linear`` family (``patterns/token_slice_linear.py``): a Linear of ``x[:, a:b]``
becomes ``fusion_pass::linear_rows``; other Linears are left alone."""
import pytest
import torch
from torch import nn

import fusion_pass
from fusion_pass.install import graph_of
from patterns import FAMILY_NAMES
from reference_models import example_inputs, get_config, load_official

FAMILY = "token_slice_linear"
D = 16


class JointProj(nn.Module):
    """The double block's split of a joint attention output into two streams, each projected."""

    def __init__(self, bias=True, step=None):
        super().__init__()
        self.step = step
        self.txt, self.img, self.other = nn.Linear(D, D, bias=bias), nn.Linear(D, D, bias=bias), nn.Linear(D, D)

    def forward(self, attn, txt):
        txt_attn, img_attn = attn[:, : txt.shape[1]:self.step], attn[:, txt.shape[1]:]
        return self.txt(txt_attn).sum(1) + self.img(img_attn).sum(1) + self.other(attn).sum(1)


def run(model):
    torch.manual_seed(0)
    attn, txt = torch.randn(2, 7, D), torch.randn(2, 3, D)
    expected = model(attn, txt)
    fusion_pass.optimize(model, patterns=[FAMILY])
    torch.testing.assert_close(model(attn, txt), expected, rtol=0, atol=0)
    report = fusion_pass.report(model)
    assert (graph_of(model) or "").count("linear_rows_direct(") == report.counts()[FAMILY]
    return report


def test_both_token_slices_are_fused_and_the_whole_tensor_linear_is_not():
    report = run(JointProj())
    assert report.counts() == {FAMILY: 2}


@pytest.mark.parametrize("kwargs, reason", [({"bias": False}, "no bias"), ({"step": 2}, "step")])
def test_near_miss_is_reported_and_left_unfused(kwargs, reason):
    report = run(JointProj(**kwargs))
    misses = [m.reason for m in report.families[FAMILY].near_misses]
    assert misses and all(reason in m for m in misses)


def test_official_double_blocks_proj_linears_are_fused():
    """Each double block projects its text and image slices of the joint attention: 2 a block."""
    model, config = load_official("tiny"), get_config("tiny")
    inputs = example_inputs("tiny", seed=0)
    expected = inputs.call(model)
    fusion_pass.optimize(model, patterns=[*FAMILY_NAMES, FAMILY])
    assert fusion_pass.report(model).counts()[FAMILY] == 2 * config.depth
    torch.testing.assert_close(inputs.call(model), expected, rtol=0, atol=0)
