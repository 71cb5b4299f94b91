"""The first call's dry run (`fusion_pass.precompile`): which graphs may take it, that inside
`launch.dry_run()` kernels are compiled and never launched, and (on the GPU) that a model's
outputs, inputs and random state are exactly as without it."""
import contextlib
import copy
import operator
import types

import pytest
import torch
from torch import fx, nn

import fusion_pass
import fusion_pass.ops as ops
from fusion_pass import precompile
from fusion_pass.ops import launch


class WritesItsInput(nn.Module):
    def forward(self, x):
        x.add_(1.0)
        return x * 2


class WritesAFreshTensor(nn.Module):
    def forward(self, x):
        y = x * 2
        y.add_(1.0)
        return y


def writes_its_buffer() -> tuple[fx.Graph, nn.Module]:
    """``self.count.add_(1); return x + 1`` (symbolic_trace would run the write on the real buffer)."""
    module = nn.Module()
    module.register_buffer("count", torch.zeros(1))
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.call_method("add_", (graph.get_attr("count"), 1.0))
    graph.output(graph.call_function(operator.add, (x, 1.0)))
    return graph, module


@pytest.mark.parametrize("module, safe", [(WritesItsInput(), False), (WritesAFreshTensor(), True)], ids=["input", "fresh"])
def test_a_dry_run_is_taken_only_where_no_input_can_be_written(module, safe):
    graph = fx.symbolic_trace(module).graph
    assert precompile.dry_run_is_safe(graph, module) is safe


def test_no_dry_run_for_a_graph_that_writes_a_buffer():
    assert not precompile.dry_run_is_safe(*writes_its_buffer())


def test_inside_a_dry_run_ops_allocate_and_launch_nothing(interpreted):
    x, shift, scale = torch.randn(2, 4, 16), torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    with ops.interpret_on_cpu(), launch.dry_run():
        out = ops.layernorm_scale_shift(x, shift, scale, 1e-6)
    assert out.shape == x.shape and interpreted.count == 0
    with ops.interpret_on_cpu():
        ops.layernorm_scale_shift(x, shift, scale, 1e-6)
    assert interpreted.count == 1  # outside it, the same call launches


def test_on_the_cpu_the_first_call_runs_no_dry_run(monkeypatch):
    """No CUDA tensors: precompile returns before running anything (the graph runs once)."""
    runs = []
    precompile.precompile(lambda: runs.append(1), (torch.randn(2),))
    assert runs == []


def tensors(inputs) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten((inputs.args, inputs.kwargs))
    return [t for t in leaves if isinstance(t, torch.Tensor)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_with_and_without_the_dry_run_is_bit_identical_and_leaves_inputs_and_rng(monkeypatch):
    from reference_models import example_inputs, load_official

    torch.manual_seed(0)
    model = load_official("tiny").eval().cuda().half()
    inputs = example_inputs("tiny", seed=0, device="cuda", dtype=torch.float16)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(precompile, "ENABLED", enabled)
        optimized = fusion_pass.optimize(copy.deepcopy(model))
        before = [t.clone() for t in tensors(inputs)]
        rng = torch.cuda.get_rng_state()
        with torch.no_grad():
            results.append(inputs.call(optimized))
        assert torch.equal(rng, torch.cuda.get_rng_state())
        assert all(torch.equal(b, a) for b, a in zip(before, tensors(inputs), strict=True))
    assert torch.equal(results[0], results[1])


class IndexesByValues(nn.Module):
    def forward(self, x, table):
        return table[x.argmax(-1)] + torch.gather(x, 1, x.long())


def sizes_from_values() -> fx.Graph:
    """``torch.zeros(x.sum().item())`` (symbolic_trace cannot trace ``item``)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    total = graph.call_method("item", (graph.call_method("sum", (x,)),))
    graph.output(graph.call_function(torch.zeros, (total,)))
    return graph


@pytest.mark.parametrize("make_graph", [lambda: fx.symbolic_trace(IndexesByValues()).graph, sizes_from_values],
                         ids=["indices", "sizes"])
def test_no_dry_run_for_a_graph_that_reads_values_as_indices_or_sizes(make_graph):
    assert not precompile.dry_run_is_safe(make_graph(), nn.Module())


def test_precompiling_passes_calls_through_and_dry_runs_only_the_first(monkeypatch):
    dry_runs, calls = [], []
    monkeypatch.setattr(precompile, "precompile", lambda run, values: dry_runs.append(values))
    forward = precompile.precompiling(lambda *args: calls.append(args) or len(calls))
    assert [forward(1, 2), forward(3)] == [1, 2]
    assert calls == [(1, 2), (3,)] and dry_runs == [(1, 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_dynamo_graph_run_eagerly_dry_runs_once_and_is_bit_identical(monkeypatch):
    """The backend with the eager inner compiler (the regional blocks' path): its graph's first
    call dry-runs (compiles in parallel); outputs, inputs and the random state are as without."""
    from fusion_pass.dynamo_backend import make_backend
    from reference_models import example_inputs, load_official

    torch.manual_seed(0)
    model = load_official("tiny").eval().cuda().half()
    inputs = example_inputs("tiny", seed=0, device="cuda", dtype=torch.float16)
    real, dry_runs, results = precompile.precompile, [], []
    monkeypatch.setattr(precompile, "precompile", lambda run, values: dry_runs.append(1) or real(run, values))
    for enabled in (True, False):
        monkeypatch.setattr(precompile, "ENABLED", enabled)
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend=make_backend("eager"))
        before = [t.clone() for t in tensors(inputs)]
        rng = torch.cuda.get_rng_state()
        dry_runs.clear()
        with torch.no_grad():
            results.append(inputs.call(compiled))
            first = len(dry_runs)
            inputs.call(compiled)
        assert first >= 1 and len(dry_runs) == first  # each graph's first call only
        assert torch.equal(rng, torch.cuda.get_rng_state())
        assert all(torch.equal(b, a) for b, a in zip(before, tensors(inputs), strict=True))
    assert torch.equal(results[0], results[1])


def dynamo_graph(fn, *args) -> fx.GraphModule:
    """The graph Dynamo hands a backend for ``fn(*args)``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def grad_region(x):
    with torch.enable_grad():
        y = x * 2
    return y + 1


def autocast_region(x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = x @ x
    return y.float() + 1


def tensor_assert(x):
    y = x * 2
    torch._assert_async((y > -1e9).all())
    return y + 1


@pytest.mark.parametrize("fn", [grad_region, autocast_region, tensor_assert], ids=["grad", "autocast", "assert"])
def test_no_dry_run_for_a_dynamo_graph_that_changes_global_state_or_asserts_on_values(fn):
    """A dry run stopped between `_enter_autocast` and `_exit_autocast` (or a grad-mode switch and
    its undoing) would leave that state for the real call; a device-side assert on unwritten values
    would break the CUDA context."""
    with torch.no_grad():
        gm = dynamo_graph(fn, torch.randn(4, 4))
    assert not precompile.dry_run_is_safe(gm.graph, gm)
    plain = dynamo_graph(lambda x: x * 2 + 1, torch.randn(4, 4))
    assert precompile.dry_run_is_safe(plain.graph, plain)  # (the same check passes a plain graph)


def test_a_dry_run_whose_compile_mode_fails_to_exit_leaves_no_mode_active(monkeypatch):
    """A Triton whose `AsyncCompileMode.__exit__` raises before resetting the active mode would
    otherwise send every later compile of the thread to the dry run's closed pool."""
    from triton.runtime import _async_compile

    class ExitRaises(_async_compile.AsyncCompileMode):
        def __exit__(self, *exc):
            raise RuntimeError("a compile failed")

    cuda_tensor = type("CudaTensor", (torch.Tensor,), {"is_cuda": property(lambda self: True)})
    triton_async = types.SimpleNamespace(AsyncCompileMode=ExitRaises, active_mode=_async_compile.active_mode)
    monkeypatch.setattr(precompile, "_async_compile", lambda: triton_async)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: contextlib.nullcontext())
    with torch.no_grad():
        precompile.precompile(lambda: None, (torch.randn(2).as_subclass(cuda_tensor),))
    assert _async_compile.active_mode.get() is None
