"""The report as a user reads it: ``print(report)`` is the CLI's report in plain text, ``repr`` is
one short line, and what could not be captured or was assumed is said in terms of the user's
own code (argument names, class and line), never graph node names or tracer jargon."""
from __future__ import annotations

import re

import torch
from torch import nn

import fusion_pass
from fusion_pass.report import render_plain

D = 8


class AdaLN(nn.Module):
    """One adaLN modulation (the layernorm_modulate family) and one plain `norm(x) * scale + shift`
    (its near-miss: no `1 +`)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D, elementwise_affine=False)
        self.other = nn.LayerNorm(D, elementwise_affine=False)

    def forward(self, x, shift, scale):
        return self.norm(x) * (1 + scale) + shift, self.other(x) * scale + shift


class Unpacks(nn.Module):
    def forward(self, x):
        return torch.maximum(*x.unbind(-1))  # star-unpacking a traced value of unknown length: FX cannot follow it


class UnpacksIntoNames(nn.Module):
    """Unpacks traced tensors into names twice in one forward, with different counts: FX follows
    ``a, b = t`` (one ``t[i]`` per name); ``for`` over a traced tensor it cannot."""

    def __init__(self, iterate: bool = False):
        super().__init__()
        self.iterate = iterate

    def forward(self, x):
        a, b = x
        c, d, e = x.transpose(0, 1)
        if self.iterate:
            return sum(row for row in x)
        return a * b, c - d * e


class BranchesOnValue(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class BranchesOnDtype(AdaLN):
    """A dtype branch on ``x`` after ``depth`` multiplications, before a fused modulation (the
    report lists the assumptions of graphs that fused something)."""

    def __init__(self, depth):
        super().__init__()
        self.depth = depth

    def forward(self, x, shift, scale):
        y = x
        for _ in range(self.depth):
            y = y * 2
        if torch.is_floating_point(y):
            return self.norm(x) * (1 + scale) + shift
        return x


def optimized_report(module: nn.Module):
    return fusion_pass.report(fusion_pass.optimize(module))


def test_print_shows_the_cli_report_as_plain_text(monkeypatch):
    monkeypatch.setenv("COLUMNS", "90")  # str() fits the terminal; here, 90 columns
    report = optimized_report(AdaLN())
    text = str(report)
    assert text == render_plain(report, 90)  # what the CLI prints, without colour
    assert "\x1b[" not in text and max(map(len, text.splitlines())) <= 90
    assert "fusion_pass (optimize): 1 fused calls" in text
    assert re.search(r"^\s+layernorm_modulate:\s+norm$", text, re.MULTILINE)  # where it fused
    assert re.search(r"^\s+layernorm_modulate:\s+other: scale has no \+1", text, re.MULTILINE)  # near-miss, why


def test_repr_is_one_short_line():
    report = optimized_report(AdaLN())
    assert re.fullmatch(r"<Report optimize: 1 fused calls, 1 near-misses, \d+\.\d s>", repr(report))


def test_an_unpacking_forward_is_explained_with_its_class_and_line():
    report = optimized_report(Unpacks())
    [(where, reason)] = report.uncaptured
    assert where == ""
    assert "unpacks a tensor into Python values" in reason
    assert re.search(r"\(Unpacks\.forward, test_report\.py:\d+\)", reason)
    assert "Proxy" not in str(report) and "TraceError" not in str(report)
    assert report.to_dict()["uncaptured"][0]["error"].startswith("TraceError: Proxy object cannot be iterated")


def test_unpacking_into_names_is_traced_at_each_site_and_iterating_is_refused():
    x = torch.randn(2, 3, D)
    module = UnpacksIntoNames()
    expected = module(x)
    report = optimized_report(module)
    assert not report.uncaptured
    for got, want in zip(module(x), expected, strict=True):
        assert torch.equal(got, want)
    [(_, reason)] = optimized_report(UnpacksIntoNames(iterate=True)).uncaptured
    assert "unpacks a tensor into Python values" in reason


def test_a_branch_on_a_tensor_value_is_explained_as_data_dependent_control_flow():
    [(_, reason)] = optimized_report(BranchesOnValue()).uncaptured
    assert "control flow on a tensor's value" in reason and "BranchesOnValue.forward" in reason


def test_a_guard_names_the_forward_argument_not_a_graph_node():
    assert optimized_report(BranchesOnDtype(1)).assumptions == [("", "torch.is_floating_point(x * 2) is True")]
    assert optimized_report(BranchesOnDtype(2)).assumptions == [("", "torch.is_floating_point((x * 2) * 2) is True")]
    deep = optimized_report(BranchesOnDtype(3)).assumptions
    assert deep == [("", "torch.is_floating_point(a value computed from x) is True")]


class WideAdaLN(nn.Module):
    """One adaLN modulation of rows `width` wide: past MAX_BLOCK, a width no LayerNorm kernel takes."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)

    def forward(self, x, shift, scale):
        return self.norm(x) * (1 + scale) + shift


class Model(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.block = WideAdaLN(width)

    def forward(self, x, shift, scale):
        return self.block(x, shift, scale)


def run_interpreted(width: int):
    """A model with one fused modulation of `width`, optimized and called with its kernels on
    (CPU tensors under the Triton interpreter)."""
    from fusion_pass.ops import interpret_on_cpu

    model = fusion_pass.optimize(Model(width))
    with interpret_on_cpu():
        model(torch.randn(1, 2, width), torch.randn(1, 1, width), torch.randn(1, 1, width))
    return fusion_pass.report(model)


def test_a_site_whose_kernel_declined_is_reported_beside_its_fused_count(fresh_reference_runs):
    from fusion_pass.ops import MAX_BLOCK

    report = run_interpreted(MAX_BLOCK + 8)
    assert report.counts()["layernorm_modulate"] == 1  # the graph rewrite happened
    (run,) = report.reference_runs
    assert (run.op, run.where, run.signatures) == ("layernorm_scale_shift", "<root>", 1)
    assert "MAX_BLOCK" in run.reason
    text = render_plain(report, 200)
    assert re.search(r"kernel declined on 1 fused ops: the PyTorch reference ran .*\n\s+layernorm_scale_shift: <root>: rows of "
                     rf"{MAX_BLOCK + 8} elements exceed", text)
    assert report.to_dict()["reference_runs"][0]["op"] == "layernorm_scale_shift"
    assert "1 kernel declines" in repr(report)


def test_strict_fails_on_a_declined_kernel(fresh_reference_runs):
    """``optimize(strict=True)``/``--strict`` promise fused kernels: a decline (here a row past
    MAX_BLOCK) fails them, naming the op; the same model at a width the kernel takes passes."""
    from fusion_pass.ops import MAX_BLOCK

    failures = run_interpreted(MAX_BLOCK + 8).strict_failures()
    assert len(failures) == 1 and failures[0].startswith("layernorm_scale_shift declined its kernel at <root>")
    assert run_interpreted(D).strict_failures() == []


def test_no_decline_is_reported_where_the_kernel_ran(fresh_reference_runs):
    report = run_interpreted(D)
    assert report.reference_runs == [] and report.declined_elsewhere == [] and report.by_design == []
    assert "declined" not in str(report) and "by design" not in str(report)


def test_a_decline_first_recorded_by_another_model_is_listed_apart(fresh_reference_runs):
    from fusion_pass.ops import MAX_BLOCK

    run_interpreted(MAX_BLOCK + 8)  # another model of this process declined this signature first
    report = run_interpreted(MAX_BLOCK + 8)
    assert report.reference_runs == [] and [run.op for run in report.declined_elsewhere] == ["layernorm_scale_shift"]
    assert re.search(r"layernorm_scale_shift: first declined outside this model \(the same shapes here decline too\): "
                     "rows of", render_plain(report, 200))


def test_the_cpu_reference_without_the_interpreter_is_not_a_decline_but_is_said(fresh_reference_runs):
    from fusion_pass.ops import MAX_BLOCK

    model = fusion_pass.optimize(Model(MAX_BLOCK + 8))
    model(torch.randn(1, 2, MAX_BLOCK + 8), torch.randn(1, 1, MAX_BLOCK + 8), torch.randn(1, 1, MAX_BLOCK + 8))
    report = fusion_pass.report(model)
    assert report.reference_runs == [] and "declined on" not in str(report)
    cpu = "CPU tensors outside interpret_on_cpu(): no Triton kernels on the CPU"
    assert report.by_design == [("layernorm_scale_shift", cpu)]
    assert re.search(rf"the PyTorch references ran, by design .*\n\s+{re.escape(cpu)}: layernorm_scale_shift",
                     render_plain(report, 200))
