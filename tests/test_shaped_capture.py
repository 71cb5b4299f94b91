"""Capture at a call's shapes (``fusion_pass/shapes.py``): roots of diffusers transformers that compute
with shapes are captured for the first call's shapes and checked against them on every call.

Tiny diffusers models (fp32, CPU): a new resolution captures the root again (its blocks stay
installed), alternating resolutions switch between kept graphs, a parameter whose dtype changes
after ``optimize()`` is seen, a hooked block refuses the shaped capture, and a baked dict argument
mutated by its caller is seen.
"""
import copy

import pytest
import torch

import fusion_pass
from fusion_pass.guards import ArgumentsDiffer, CallSignature

pytest.importorskip("diffusers")

from reference_models.diffusers_tiny import MODELS, expected_sites  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def other_resolution(name: str, inputs: dict, gen: torch.Generator) -> dict:
    """The inputs of one call at another resolution (the latent grid doubled)."""
    inputs = dict(inputs)
    if name == "dit":  # (batch, channels, height, width): square (DiT unpatchifies a square), 8 -> 16
        inputs["hidden_states"] = torch.randn(1, 4, 16, 16, generator=gen)
    elif name == "wan":  # (batch, channels, frames, height, width)
        inputs["hidden_states"] = torch.randn(1, 4, 2, 16, 8, generator=gen)
    elif name == "flux":  # packed image tokens and their position ids, twice as many
        tokens = inputs["hidden_states"]
        inputs["hidden_states"] = torch.randn(1, 2 * tokens.shape[1], tokens.shape[2], generator=gen)
        inputs["img_ids"] = torch.cat([inputs["img_ids"], inputs["img_ids"] + 8])
    return inputs


@pytest.mark.parametrize("name", ["dit", "wan", "flux"])
def test_new_resolution_captures_the_root_again_and_alternating_ones_switch(name):
    tiny = MODELS[name]
    original = tiny.build()
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    first = tiny.inputs()
    second = other_resolution(name, first, torch.Generator().manual_seed(3))
    with torch.no_grad():
        optimized(**first)
        at_first = fusion_pass.report(optimized).totals()
        for inputs in (first, second, first, second):
            assert rel_err(optimized(**inputs)[0], original(**inputs)[0]) <= 1e-5
    report = fusion_pass.report(optimized)
    # the blocks recompiled by Dynamo at the second shape (with symbolic sizes) fuse what they fused at the
    # first: the report counts the graphs compiled last
    assert report.totals() == at_first
    reasons = {reason.split(" (")[0]: calls for path, reason, calls in report.fallbacks if path == ""}
    # the root: captured at the first call's shapes, again at the second's, then switched back and forth
    assert reasons == {"captured again at this call's shapes": 1, "switched to the graph captured at this call's shapes": 2}
    assert not [reason for path, reason, _ in report.fallbacks if path], report.fallbacks  # blocks: no fallback
    # the root's own site (norm_out's modulation) stays fused at the new shape: every site of the model's code
    assert report.totals()["layernorm_modulate"] == expected_sites(name, original.config).modulations
    assert "<root>" in report.graphs


@pytest.mark.parametrize("where", ["root", "block"])
def test_a_parameter_dtype_changed_after_optimize_is_seen(where):
    """Wan adds its ``scale_shift_table`` to the timestep embedding (root: ``norm_out``'s shift and scale;
    block: the six modulation vectors), so a float64 table makes those float64; the shaped root graph
    was captured with float32 ones and must not run stale."""
    tiny = MODELS["wan"]
    original = tiny.build()
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    inputs = tiny.inputs()
    with torch.no_grad():
        optimized(**inputs)
        for model in (original, optimized):
            owner = model if where == "root" else model.blocks[0]
            owner.scale_shift_table.data = owner.scale_shift_table.data.double()
        assert rel_err(optimized(**inputs)[0], original(**inputs)[0]) <= 1e-5
    changes = [reason for path, reason, _ in fusion_pass.report(optimized).fallbacks if path == ""]
    table = "scale_shift_table" if where == "root" else "blocks.0.scale_shift_table"
    assert any(f"{table}.dtype changed torch.float32 -> torch.float64" in reason for reason in changes), changes


def test_a_block_with_hooks_refuses_the_shaped_capture_and_its_hooks_run():
    """A shaped capture would run a called block's hooks on fake tensors while tracing: refused, said
    in the report; the root's original forward runs, the block is captured on its own."""
    tiny = MODELS["dit"]
    original = tiny.build()
    model = copy.deepcopy(original)
    calls = []
    model.transformer_blocks[0].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    optimized = fusion_pass.optimize(model)
    with torch.no_grad():
        for _ in range(2):
            assert rel_err(optimized(**tiny.inputs())[0], original(**tiny.inputs())[0]) <= 1e-5
    assert len(calls) == 2
    report = fusion_pass.report(optimized)
    assert "<root>" not in report.graphs
    assert any(path == "" for path, _ in report.uncaptured), report.uncaptured


def test_a_baked_dict_argument_mutated_by_its_caller_is_seen():
    """PixArt passes ``added_cond_kwargs={"resolution": None, "aspect_ratio": None}``: baked at capture
    (a copy), compared on every call, so the caller filling in the same dict object later differs."""
    def forward(self, x, added_cond_kwargs=None):
        return x

    added = {"resolution": None, "aspect_ratio": None}
    signature = CallSignature(forward, ((torch.ones(1),), {"added_cond_kwargs": added}))
    signature.required_values((torch.ones(1),), {"added_cond_kwargs": added})
    added["resolution"] = 1024
    with pytest.raises(ArgumentsDiffer, match="added_cond_kwargs"):
        signature.required_values((torch.ones(1),), {"added_cond_kwargs": added})


def test_shapes_dtypes_and_devices_of_traced_arguments_are_checked():
    def forward(self, x, y):
        return x

    signature = CallSignature(forward)
    signature.at_shapes((torch.ones(2, 3), torch.ones(4, dtype=torch.int64)))
    signature.required_values((torch.zeros(2, 3), torch.zeros(4, dtype=torch.int64)), {})
    for x, y, what in ((torch.ones(3, 3), torch.ones(4, dtype=torch.int64), r"x is \[3, 3\]"),
                       (torch.ones(2, 3), torch.ones(4), "y is .*float32"),
                       (torch.ones(2, 3, dtype=torch.float64), torch.ones(4, dtype=torch.int64), "x is .*float64")):
        with pytest.raises(ArgumentsDiffer, match=what):
            signature.required_values((x, y), {})


def test_a_call_under_autocast_after_one_without_is_captured_for_it():
    """The shaped root read intermediate dtypes, which autocast changes: the global state is part
    of its check (Dynamo's GlobalStateGuard), so the call under autocast is captured for it and the
    call after it, without autocast, switches back."""
    tiny = MODELS["dit"]
    original = tiny.build()
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    inputs = tiny.inputs()
    with torch.no_grad():
        for autocast in (False, True, False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out, ref = optimized(**inputs)[0], original(**inputs)[0]
            assert out.dtype == ref.dtype and rel_err(out, ref) <= 1e-5
    reasons = [reason for path, reason, _ in fusion_pass.report(optimized).fallbacks if path == ""]
    assert any("global state differs" in r and "autocast" in r for r in reasons), reasons


def test_a_forward_filling_a_cache_in_place_is_refused_and_its_cache_kept_clean():
    """A module that caches a tensor in a dict it holds would keep a tensor of the trace (a proxy,
    or a fake of a shaped capture) there: the trace is refused and the dict's contents restored."""
    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)
            self.cache = {}

        def forward(self, x, scale=None):
            self.cache[x.shape[-1]] = x * 2
            return self.norm(x) * (1 + x.sum(-1, keepdim=True))

    model = Cached()
    optimized = fusion_pass.optimize(copy.deepcopy(model))
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x))
    assert all(type(v) is torch.Tensor for v in optimized.cache.values())
    assert any(path == "" and "cache (in place)" in reason for path, reason in fusion_pass.report(optimized).uncaptured)


def test_past_the_recapture_limit_the_root_runs_its_own_forward_and_its_blocks_stay_fused():
    """A root changed more than ``MAX_RECAPTURES`` times (a plain attribute rebound between calls, and
    apart, new resolutions) keeps its original forward from then on; its blocks stay captured and
    fused, outputs exact."""
    from fusion_pass.session import MAX_RECAPTURES

    tiny = MODELS["dit"]
    original = tiny.build()
    gates = expected_sites("dit", original.config).gates  # all inside the blocks
    for change in ("attribute", "resolution"):
        optimized = fusion_pass.optimize(copy.deepcopy(original))
        with torch.no_grad():
            for i in range(MAX_RECAPTURES + 2):
                inputs = tiny.inputs(seed=i)
                if change == "attribute":
                    optimized.fusion_pass_test_counter = i  # a plain attribute of the root: its guard sees it
                else:  # square latents (DiT unpatchifies a square), patch size 2
                    side = 4 + 2 * i
                    inputs["hidden_states"] = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(i))
                assert rel_err(optimized(**inputs)[0], original(**inputs)[0]) <= 1e-5
        report = fusion_pass.report(optimized)
        reasons = " | ".join(reason for path, reason, _ in report.fallbacks if path == "")
        assert f"{MAX_RECAPTURES} " in reasons and "original forward" in reasons, reasons
        assert report.totals()["residual_gate"] == gates, (change, report.totals())
        if change == "attribute":  # the root itself keeps its original forward
            assert "<root>" not in report.graphs
        else:  # new shapes run the original forward; the graph captured last still runs at its shapes
            assert "<root>" in report.graphs
            last = tiny.inputs(seed=MAX_RECAPTURES)
            side = 4 + 2 * MAX_RECAPTURES
            last["hidden_states"] = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(MAX_RECAPTURES))
            with torch.no_grad():
                assert rel_err(optimized(**last)[0], original(**last)[0]) <= 1e-5
            assert fusion_pass.report(optimized).fallbacks == report.fallbacks  # it ran its graph: nothing fell back


class _ShapeBranchingRoot(torch.nn.Module):
    """A root that computes with a shape (plain FX cannot trace it) and, for rows wider than 8 only,
    branches on a tensor's value (no capture can follow that): LayerNorm modulated by ``scale``."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(16, 16)])
        self.norm = torch.nn.LayerNorm(16, elementwise_affine=False)
        self.shift = torch.nn.Parameter(torch.randn(16))

    def forward(self, x, scale, unused=None):
        side = int(x.shape[1] ** 0.5)  # a Python int from a shape
        if side > 2 and x.sum() > 0:  # data-dependent, reached for more than 4 rows only
            x = x * 0.5
        x = self.blocks[0](x)
        return self.norm(x) * (1 + scale) + self.shift * side


def test_a_call_at_shapes_the_root_cannot_take_leaves_its_graph_installed():
    """The graph captured at 4 rows stays installed when a call at 9 rows cannot be captured (a
    branch on a value there): that call runs the original forward, the next 4-row call the graph."""
    model = _ShapeBranchingRoot()
    optimized = fusion_pass.optimize(copy.deepcopy(model))
    scale = torch.randn(16)
    small, large = torch.randn(1, 4, 16), torch.randn(1, 9, 16)
    with torch.no_grad():
        for x in (small, large, small):
            torch.testing.assert_close(optimized(x, scale), model(x, scale), rtol=1e-5, atol=1e-6)
    report = fusion_pass.report(optimized)
    assert "<root>" in report.graphs and report.totals()["layernorm_modulate"] == 1  # the one site of forward
    reasons = [reason for path, reason, calls in report.fallbacks if path == ""]
    assert len(reasons) == 1 and "no graph at its shapes" in reasons[0], reasons  # the 4-row call: no fallback
