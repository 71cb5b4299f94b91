"""``optimize()`` on ten diffusers transformers (tiny random configs, fp32, CPU).

Every transformer block is captured whole (by our tracer, or regionally by Dynamo when the
tracer cannot follow it), outputs equal the original's with optional inputs passed on one call
and left out on the next, and what ``optimize()`` fuses equals what the ``torch.compile``
backend fuses on the same model (the same matcher on Dynamo's whole-model graph).
"""
import copy
import inspect

import pytest
import torch

import fusion_pass

pytest.importorskip("diffusers")

from reference_models.diffusers_tiny import MODELS, expected_sites  # noqa: E402
pytestmark = pytest.mark.usefixtures("one_thread")

#: Models whose root forward holds a fusable site itself (the final ``norm_out(x) * (1 + scale)
#: + shift``); their roots compute with shapes (``int(x.shape[1] ** 0.5)``) and are captured at
#: the call's shapes (``shapes.py``).
ROOT_SITES = {"ltx", "pixart", "dit", "wan"}


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def block_paths(tiny, model):
    return {f"{lst}.{i}" for lst in tiny.blocks for i in range(len(model.get_submodule(lst)))}


def captured_whole(report, paths):
    """Those of ``paths`` inside one graph: their own (FX: the path; Dynamo: "path (Dynamo, ...)"),
    or an ancestor's FX graph that traced through them (a module the tracer failed in is made a
    leaf, tried on its own, and then listed as uncaptured when that fails too)."""
    graphs = {graph.split(" (Dynamo")[0].replace("<root>", "") for graph in report.graphs}
    failed = {where for where, _ in report.uncaptured}

    def inside(path):
        ancestors = ["", *(path[:i] for i, c in enumerate(path) if c == ".")]
        return path in graphs or (path not in failed and any(a in graphs for a in ancestors))

    return {path for path in paths if inside(path)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_block_is_captured_whole_and_outputs_match_with_and_without_optional_inputs(name):
    tiny = MODELS[name]
    original = tiny.build()
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    assert fusion_pass.report(optimized).pending  # nothing compiled before the first call
    calls = [tiny.inputs(), {**tiny.inputs(), **tiny.optional()}, tiny.inputs()]
    with torch.no_grad():
        for kwargs in calls:
            assert rel_err(optimized(**kwargs)[0], original(**kwargs)[0]) <= 1e-5
    report = fusion_pass.report(optimized)
    blocks = block_paths(tiny, original)
    assert len(blocks) == tiny.block_count(original) > 0
    assert captured_whole(report, blocks) == blocks
    assert not any("could not capture" in reason for _, reason, _ in report.fallbacks)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_optimize_fuses_what_the_backend_fuses(name):
    tiny = MODELS[name]
    original = tiny.build()
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    backend = fusion_pass.backend(inner="eager")
    compiled = torch.compile(copy.deepcopy(original), backend=backend)
    with torch.no_grad():
        optimized(**tiny.inputs())
        compiled(**tiny.inputs())
    assert fusion_pass.report(optimized).totals() == backend.report.totals()


@pytest.mark.gpu  # also selected by the H200 run (torch 2.11), where the shared frame was seen
def test_regional_compiles_do_not_share_one_dynamo_frame():
    """Each block class's compile has its own code object with a source file: torch 2.11 wraps a
    function without one (an exec'd entry point) in ``external_utils.inner``, whose single frame every
    compile in the process then shares, so past Dynamo's recompile limit (8) blocks stopped compiling
    (seen on the H200: Flux optimized three times in one process). Five optimized tiny Flux models
    make ten compiles of two classes: every block still runs a fused graph."""
    tiny = MODELS["flux"]
    original = tiny.build()
    entries = []
    for _ in range(5):
        optimized = fusion_pass.optimize(copy.deepcopy(original))
        with torch.no_grad():
            assert rel_err(optimized(**tiny.inputs())[0], original(**tiny.inputs())[0]) <= 1e-5
        report = fusion_pass.report(optimized)
        assert not report.fallbacks, report.fallbacks
        assert report.totals()["residual_gate"] == expected_sites("flux", original.config).gates
        entries.append(optimized.transformer_blocks[0].__dict__["forward"].compiled.entry)
    # what torch 2.11 decides on (torch 2.13 no longer wraps): a source file, and a code object per compile
    assert all(inspect.getsourcefile(entry) is not None for entry in entries)
    assert len({id(entry.__code__) for entry in entries}) == len(entries)
