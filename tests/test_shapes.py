"""Shapes: the optimized model serves every batch size and token count from one capture, the
compile backend from one dynamic-shape graph, and the fused model stays as accurate as the
original against a float64 run of the same weights."""
import contextlib
import copy
import os

import pytest
import torch

import fusion_pass
from fusion_pass.install import FusedForward
from fusion_pass.ops import interpret_on_cpu
from reference_models import build_model, example_inputs, get_config, load_official

BUILDERS = {"ours": build_model, "official": load_official}
# (batch, latent tokens): the tiny config's 16 latents up to a production-sized 1024. Batch 1
# comes last: Dynamo specializes sizes 0 and 1 (a batch of one gets its own graph).
SHAPES = [(2, 16), (4, 512), (2, 1024), (4, 16), (2, 512), (1, 16), (1, 1024)]
FIDELITY_SEEDS = range(4)
MAX_ERROR_RATIO = 1.1


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def source(request):
    return request.param


def tiny(source, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[source]("tiny").eval()


# --- optimize(): one capture for every shape -----------------------------------------------------

@pytest.fixture(scope="module")
def optimized_tiny(source):
    original = tiny(source)
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    forwards = {name: m.__dict__["forward"] for name, m in optimized.named_modules() if "forward" in m.__dict__}
    assert forwards and all(isinstance(f, FusedForward) for f in forwards.values())
    return original, optimized, forwards


@pytest.mark.parametrize("batch,latents", SHAPES)
def test_optimize_serves_every_batch_and_token_count_without_recapturing(optimized_tiny, batch, latents, monkeypatch):
    original, optimized, forwards = optimized_tiny
    traces = []
    monkeypatch.setattr(torch.fx.Tracer, "trace", lambda *args, **kwargs: traces.append(args))
    inputs = example_inputs("tiny", batch=batch, latents=latents, seed=batch * latents)
    with torch.no_grad():
        got, want = inputs.call(optimized), inputs.call(original)
    assert got.shape == (batch, latents, get_config("tiny").in_channels)
    assert rel_err(got, want) <= 1e-5
    assert traces == []
    assert {name: m.__dict__.get("forward") for name, m in optimized.named_modules() if name in forwards} == forwards


# --- torch.compile(dynamic=True): one graph for every shape ---------------------------------------

def compiled_run(model, backend, shapes):
    """Outputs of ``torch.compile(model, backend, dynamic=True)`` over ``shapes`` and the
    number of graphs Dynamo compiled after each call."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    outputs, graphs = [], []
    with torch.no_grad():
        for batch, latents in shapes:
            outputs.append(example_inputs("tiny", batch=batch, latents=latents, seed=latents + batch).call(compiled))
            graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return outputs, graphs


@pytest.fixture(scope="module")
def dynamic_compile(source):
    """The tiny model compiled once with the fusion backend, run over every shape."""
    model = tiny(source)
    backend = fusion_pass.backend(inner="eager")
    outputs, graphs = compiled_run(model, backend, SHAPES)
    return model, backend, outputs, graphs


def test_dynamic_compile_does_not_recompile_across_batch_sizes_and_token_counts(dynamic_compile):
    _, backend, _, graphs = dynamic_compile
    batch_two_or_more = [graphs[i] for i, (batch, _) in enumerate(SHAPES) if batch > 1]
    assert batch_two_or_more == [1] * len(batch_two_or_more)
    assert backend.graphs_compiled == graphs[-1] == 2  # the batch of one


def test_batch_of_one_recompiles_only_as_plain_dynamo_does(dynamic_compile, source):
    """Dynamo specializes sizes of 0 and 1; the fusion backend adds no recompile of its own."""
    _, _, _, graphs = dynamic_compile
    _, plain_graphs = compiled_run(tiny(source), "eager", SHAPES)
    assert graphs == plain_graphs


def test_dynamic_compile_outputs_match_the_original(dynamic_compile):
    model, _, outputs, _ = dynamic_compile
    with torch.no_grad():
        for (batch, latents), got in zip(SHAPES, outputs):
            want = example_inputs("tiny", batch=batch, latents=latents, seed=latents + batch).call(model)
            assert rel_err(got, want) <= 1e-5, (batch, latents)


def test_dynamic_compile_fuses_every_site_of_each_graph(dynamic_compile):
    _, backend, _, _ = dynamic_compile
    expected = get_config("tiny").expected_sites()
    graphs = backend.graphs_compiled
    fused = {family: n for family, n in backend.report.totals().items() if n}  # other families: no sites
    assert fused == {family: n * graphs for family, n in expected.items()}
    reasons = sorted({miss.reason for fam in backend.report.families.values() for miss in fam.near_misses})
    assert reasons == []


# --- fidelity against float64 ----------------------------------------------------------------------

OPS = {
    # on the CPU the fused ops compute their PyTorch reference, ...
    "reference": contextlib.nullcontext,
    # ... or, under the Triton interpreter, their kernels (fp32 statistics, one rounding on store)
    "triton kernels": interpret_on_cpu,
}


@pytest.mark.parametrize("ops", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_optimized_error_against_fp64_is_within_1_1x_of_the_original(source, dtype, ops):
    if ops == "triton kernels" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (set on CPU)")
    ratios = []
    for seed in FIDELITY_SEEDS:
        original = tiny(source, seed).to(dtype)
        optimized = fusion_pass.optimize(copy.deepcopy(original))
        exact = copy.deepcopy(original).double()  # the same (rounded) weights, computed in fp64
        inputs = example_inputs("tiny", seed=100 + seed, dtype=dtype)
        with torch.no_grad():
            reference = exact(inputs.x.double(), inputs.t.double(), {"main": inputs.contexts["main"].double()})
            err_original = rel_err(inputs.call(original), reference)
            with OPS[ops]():
                err_optimized = rel_err(inputs.call(optimized), reference)
        ratios.append(err_optimized / err_original)
    assert max(ratios) <= MAX_ERROR_RATIO, f"error ratios optimized/original per seed: {ratios}"
