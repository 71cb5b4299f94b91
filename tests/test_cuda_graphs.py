"""``optimize(model, cuda_graphs=True)``: replay of optimized modules as CUDA graphs."""
import copy

import pytest
import torch

import fusion_pass
from torch._C._dynamo.guards import GlobalStateGuard

from fusion_pass.cuda_graphs import GraphReplay, _Captured, call_key, changed_by_call, replay_allowed, replay_paused, \
    state_allows_replay
from torch.utils._pytree import tree_flatten
from reference_models import build_model, example_inputs


def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def test_cpu_calls_run_the_fused_code_without_graphs():
    model = tiny()
    inputs = example_inputs("tiny", seed=1)
    expected = inputs.call(model)
    fusion_pass.optimize(model, cuda_graphs=True)
    with torch.no_grad():
        torch.testing.assert_close(inputs.call(model), expected)


def key(*args, **kwargs):
    return call_key(*tree_flatten((args, kwargs)))


def test_the_key_is_the_same_for_fresh_tensors_of_the_same_kind():
    assert key(torch.randn(2, 3), flag=True) == key(torch.randn(2, 3), flag=True)


def test_the_key_differs_when_an_optional_input_is_left_out_or_none():
    x, mask = torch.randn(2, 3), torch.ones(2)
    assert len({key(x), key(x, mask=mask), key(x, mask=None)}) == 3


def test_the_key_differs_for_a_changed_non_tensor_argument():
    x = torch.randn(2, 3)
    # 1 == 1.0 == True in Python, yet a forward may branch on the type (isinstance, `is True`)
    assert len({key(x, scale=1), key(x, scale=1.0), key(x, scale=True), key(x, scale=2)}) == 4
    assert key(x, kwargs=None) != key(x, kwargs={})  # `kwargs or {}` takes the same branch; a forward may not
    assert key(x, kwargs={"scale": 1.0}) != key(x, kwargs={"scale": 0.5})
    assert key(x, kwargs={"scale": 1.0}) != key(x, kwargs={"gate": 1.0})


def test_the_key_sees_layout_dtype_requires_grad_and_one_tensor_passed_twice():
    x = torch.randn(3, 3)
    assert key(x) != key(x.t())  # same shape, other strides
    assert key(x) != key(x.double())
    assert key(x) != key(x.clone().requires_grad_())
    assert key(x, x) != key(x, x.clone())  # Dynamo guards aliasing; a static copy per tensor keeps it


def test_the_key_refuses_subclasses_unhashable_values_and_nan():
    x = torch.randn(2, 3)
    assert key(torch.nn.Parameter(x)) is None
    assert key(x, {1, 2}) is None
    assert key(x, float("nan")) is None  # never equal to itself: it would capture on every call


def test_no_replay_on_cpu_with_autograd_on_or_under_a_torch_function_mode():
    with torch.no_grad():
        assert state_allows_replay()
        assert not replay_allowed(tree_flatten(((torch.randn(2),), {}))[0])
        with torch.overrides.TorchFunctionMode():
            assert not state_allows_replay()
    with torch.enable_grad():
        assert not state_allows_replay()


def test_a_call_changing_an_input_in_place_or_a_list_argument_cannot_be_replayed():
    def check(forward, *args):
        flat, spec = tree_flatten((args, {}))
        versions = [v._version for v in flat if isinstance(v, torch.Tensor)]
        forward(*args)
        return changed_by_call(flat, spec, versions, args, {})

    assert check(lambda x: x * 2, torch.randn(2)) is None
    assert "in place" in check(lambda x: x.add_(1), torch.randn(2))
    assert "list or dict" in check(lambda x, extra: extra.append(x), torch.randn(2), [])
    assert "list or dict" in check(lambda x, extra: extra.update(y=x), torch.randn(2), {})


def captured(static_inputs=(), borrowed=()):
    """A capture's record without a graph: what decides whether a call may replay it."""
    return _Captured(graph=None, static_inputs=list(static_inputs), borrowed=list(borrowed), static_outputs=None,
                     check=None, global_state=GlobalStateGuard(), inference=False, state=[], state_ptrs=[],
                     registrations=0)


def test_a_capture_is_not_replayed_under_other_global_state():
    with torch.no_grad():
        entry = captured()
        assert entry.accepts([], (), {})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not entry.accepts([], (), {})
        torch.use_deterministic_algorithms(True)
        try:
            assert not entry.accepts([], (), {})
        finally:
            torch.use_deterministic_algorithms(False)
    with torch.inference_mode():
        assert not entry.accepts([], (), {})  # its static inputs would be inference tensors


def test_a_borrowed_input_is_replayed_only_for_that_very_tensor():
    produced = torch.randn(4)  # stands for another graph's static output, read in place
    with torch.no_grad():
        entry = captured([produced], [True])
        assert entry.accepts([produced], (produced,), {})
        assert not entry.accepts([produced.clone()], (produced.clone(),), {})  # never copied into


def test_deepcopy_of_a_replayed_module_starts_without_graphs():
    replay = GraphReplay(torch.nn.Linear(2, 2), lambda m, x: m(x), pool=None)
    replay.captured[("key",)] = object()
    clone = copy.deepcopy(replay)
    assert clone.captured == {} and clone.module is not replay.module


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_replay_matches_the_fused_model_and_recaptures_after_to(cuda, dtype):
    model = tiny().to(cuda, dtype)
    fusion_pass.optimize(model, cuda_graphs=True)
    block = model.forward.graphs  # the whole model is one graph
    with torch.no_grad():
        for seed in (1, 2, 3):
            inputs = example_inputs("tiny", seed=seed, dtype=dtype, device=cuda)
            replayed = inputs.call(model).clone()
            with replay_paused(model):
                plain = inputs.call(model)
            torch.testing.assert_close(replayed, plain, rtol=0, atol=0)
        assert len(block.captured) == 1
        longer = example_inputs("tiny", latents=40, seed=4, dtype=dtype, device=cuda)
        longer.call(model)
        assert len(block.captured) == 2
        model.float().to(dtype)  # same signature, parameters at new addresses: captured again
        inputs = example_inputs("tiny", seed=5, dtype=dtype, device=cuda)
        replayed = inputs.call(model).clone()
        with replay_paused(model):
            torch.testing.assert_close(replayed, inputs.call(model), rtol=0, atol=0)
        assert len(block.captured) == 2


@pytest.mark.gpu
def test_autocast_calls_do_not_replay_the_graph_captured_without_it(cuda):
    model = tiny().to(cuda)
    fusion_pass.optimize(model, cuda_graphs=True)
    graphs = model.forward.graphs  # the whole model is one graph
    inputs = example_inputs("tiny", seed=7, device=cuda)
    with torch.no_grad():
        plain = inputs.call(model).clone()
        with torch.autocast("cuda", dtype=torch.bfloat16):  # same inputs, same key: the global state decides
            autocast = inputs.call(model).clone()
            with replay_paused(model):
                expected = inputs.call(model)
    torch.testing.assert_close(autocast, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(autocast.float(), plain.float())
    (key,) = graphs.captured
    assert len(graphs.captured[key]) == 2 and graphs.replays == 2  # one capture per global state, each replayed


@pytest.mark.gpu
def test_autograd_calls_do_not_replay(cuda):
    model = tiny().to(cuda)
    fusion_pass.optimize(model, cuda_graphs=True)
    inputs = example_inputs("tiny", seed=6, device=cuda)
    inputs.call(model).sum().backward()
    assert model.forward.graphs.captured == {}
    assert model.double_blocks[0].img_attn.qkv.weight.grad is not None


# --- Dynamo-regional blocks (diffusers Flux: the root is not FX-captured, its blocks are Dynamo's) --

FLUX_NORM = "transformer_blocks.0.norm1.norm"  # AdaLayerNormZero's LayerNorm(eps=1e-6, no affine)


def flux_pair(device=None, cuda_graphs=False):
    """(tiny diffusers Flux, the same optimized) on ``device``, fp32."""
    from reference_models.diffusers_tiny import MODELS

    original = MODELS["flux"].build().to(device)
    return original, fusion_pass.optimize(copy.deepcopy(original), cuda_graphs=cuda_graphs)


def flux_inputs(seed=0, device=None, optional=False):
    from reference_models.diffusers_tiny import MODELS

    kwargs = {**MODELS["flux"].inputs(seed), **(MODELS["flux"].optional(seed) if optional else {})}
    return {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) if isinstance(v, torch.Tensor)
            else v for k, v in kwargs.items()}


def block_call(model, path, kwargs):
    """The (args, kwargs) ``model(**kwargs)`` passes to its block at ``path``."""
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(
        lambda _m, args, kw: seen.append((args, kw)), with_kwargs=True)  # the block's own hook: not in its guard
    with torch.no_grad():
        model(**kwargs)
    handle.remove()
    return seen[0]


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def fallbacks(model):
    return [reason for _, reason, _ in fusion_pass.report(model).fallbacks]


def replays_of(model, path):
    return model.get_submodule(path).__dict__["forward"].graphs


def test_a_flux_blocks_captured_graph_keeps_the_dynamo_guards_of_its_own_call():
    _, model = flux_pair()
    args, kwargs = block_call(model, "transformer_blocks.0", flux_inputs())
    forward = model.transformer_blocks[0].__dict__["forward"]
    with torch.no_grad():
        check = forward._replay_guard(args, kwargs, args, kwargs)  # what GraphReplay asks after a capture
        assert check(args, kwargs)
        assert not check(args, {**kwargs, "joint_attention_kwargs": {}})  # the processor's kwargs branch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not check(args, kwargs)  # GLOBAL_STATE: the graph was traced without autocast
        torch.use_deterministic_algorithms(True)
        try:
            assert not check(args, kwargs)  # DETERMINISTIC_ALGORITHMS
        finally:
            torch.use_deterministic_algorithms(False)
    with torch.enable_grad():
        assert not check(args, kwargs)  # GRAD_MODE (GraphReplay never replays with autograd on anyway)
    model.get_submodule(FLUX_NORM).eps = 0.5
    with torch.no_grad():
        assert not check(args, kwargs)  # CONSTANT_MATCH on the eps the graph baked
        assert "own state" in forward._replay_guard(args, kwargs, args, kwargs)  # changed since the guard was armed


def test_a_changed_flux_block_drops_its_captures_and_runs_through_dynamo_again():
    original, model = flux_pair()
    with torch.no_grad():
        model(**flux_inputs())  # the root captures on its first call, giving its blocks to Dynamo
    forward = model.transformer_blocks[0].__dict__["forward"]
    forward.graphs = GraphReplay(forward.module, forward.compiled.compiled, None, forward._replay_guard,
                                 forward.graph_note)  # on the CPU every call runs as is, through Dynamo
    forward.graphs.captured[("captured before the change",)] = []
    for m in (original, model):
        m.get_submodule(FLUX_NORM).eps = 0.5
    kwargs = flux_inputs(seed=1)
    with torch.no_grad():
        assert rel_err(model(**kwargs)[0], original(**kwargs)[0]) <= 1e-5
    assert forward.graphs.captured == {}
    assert any(r.startswith("left to Dynamo's guards after") and "eps" in r for r in fallbacks(model))


@pytest.mark.gpu
def test_flux_blocks_replay_as_cuda_graphs_equal_to_plain_optimize(cuda):
    _, model = flux_pair(cuda, cuda_graphs=True)
    calls = 3
    with torch.no_grad():
        for seed in range(calls):
            kwargs = flux_inputs(seed, cuda)
            replayed = model(**kwargs)[0].clone()
            with replay_paused(model):
                plain = model(**kwargs)[0]
            torch.testing.assert_close(replayed, plain, rtol=1e-5, atol=1e-6)
    for path in ("transformer_blocks.0", "single_transformer_blocks.0"):  # num_layers=1, num_single_layers=1
        graphs = replays_of(model, path)
        assert len(graphs.captured) == 1 and graphs.replays == calls  # one key; every graph-mode call replayed
    (single,) = next(iter(replays_of(model, "single_transformer_blocks.0").captured.values()))
    # Flux's forward feeds the double block's two outputs (encoder_hidden_states, hidden_states) to the
    # single block: both read in place from the double block's graph; temb and the RoPE tables are copied
    assert sum(single.borrowed) == 2
    checks = " ".join(c for p, c in fusion_pass.report(model).guards if p == "transformer_blocks.0")
    assert "CUDA graph replay" in checks and "Dynamo's guards of the graph captured" in checks


@pytest.mark.gpu
def test_flux_optional_inputs_passed_on_one_call_and_not_the_next_replay_their_own_graphs(cuda):
    original, model = flux_pair(cuda, cuda_graphs=True)
    seen = {False: {}, True: {}}  # the root keeps one set of installed block forwards per argument pattern
    with torch.no_grad():
        for optional in (False, True, False, True):
            kwargs = flux_inputs(1, cuda, optional=optional)
            assert rel_err(model(**kwargs)[0], original(**kwargs)[0]) <= 1e-4
            graphs = replays_of(model, "transformer_blocks.0")
            seen[optional][id(graphs)] = graphs
    # the blocks get joint_attention_kwargs=None, then {} (reference_models/diffusers_tiny.py): each pattern's
    # block graph replays (the first call of a pattern runs as is where its key is new)
    for pattern in seen.values():
        assert sum(g.replays for g in pattern.values()) >= 1


def flux_changed_after_a_replay(device, seed, change):
    """Optimize a tiny Flux with CUDA graphs, call it (capture and replay), apply ``change(model)``
    to it and to the original, and check two calls more agree with the original's."""
    original, model = flux_pair(device, cuda_graphs=True)
    kwargs = flux_inputs(seed, device)
    with torch.no_grad():
        model(**kwargs)
        change(original)
        change(model)
        for _ in range(2):  # the call after the change, and the one after that (a replay where it is allowed)
            assert rel_err(model(**kwargs)[0], original(**kwargs)[0]) <= 1e-4
    return model


@pytest.mark.gpu
def test_flux_attribute_change_after_replays_recaptures_through_dynamo(cuda):
    model = flux_changed_after_a_replay(cuda, 2, lambda m: setattr(m.get_submodule(FLUX_NORM), "eps", 0.5))
    graphs = replays_of(model, "transformer_blocks.0")
    assert len(graphs.captured) == 1 and graphs.replays == 3  # the stale capture was dropped, a new one replays
    assert any(r.startswith("left to Dynamo's guards after") for r in fallbacks(model))


@pytest.mark.gpu
def test_flux_block_under_autocast_is_captured_again_not_replayed(cuda):
    _, model = flux_pair(cuda, cuda_graphs=True)
    args, kwargs = block_call(model, "transformer_blocks.0", flux_inputs(3, cuda))
    block, graphs = model.transformer_blocks[0], replays_of(model, "transformer_blocks.0")
    with torch.no_grad():
        plain = [t.clone() for t in block(*args, **kwargs)]
        with torch.autocast("cuda", dtype=torch.bfloat16):  # same inputs, so the same key: Dynamo's guards decide
            autocast = [t.clone() for t in block(*args, **kwargs)]
            with replay_paused(model):
                expected = block(*args, **kwargs)
        for out, ref, fp32 in zip(autocast, expected, plain):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            assert not torch.equal(out, fp32)
        (key,) = graphs.captured
        assert len(graphs.captured[key]) == 2  # one capture per global state
        before = graphs.replays
        for out, ref in zip(block(*args, **kwargs), plain):  # back without autocast: the first capture replays
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert graphs.replays == before + 1 and len(graphs.captured[key]) == 2


@pytest.mark.gpu
def test_flux_hook_on_an_inner_module_runs_the_original_forward(cuda):
    calls = []
    model = flux_changed_after_a_replay(cuda, 4, lambda m: m.get_submodule("transformer_blocks.0.ff").register_forward_hook(
        lambda *_: calls.append(1)))
    assert len(calls) == 2 * 2  # both models' hooks ran on both calls after the change
    assert replays_of(model, "transformer_blocks.0").replays == 1  # the call before the hook only
    assert any(r.startswith("original forward while hooks exist") for r in fallbacks(model))


@pytest.mark.gpu
def test_flux_parameters_moved_are_captured_again(cuda):
    _, model = flux_pair(cuda, cuda_graphs=True)
    kwargs = flux_inputs(5, cuda)
    with torch.no_grad():
        model(**kwargs)
        model.double().float()  # same key, parameters at new addresses
        replayed = model(**kwargs)[0].clone()
        with replay_paused(model):
            torch.testing.assert_close(replayed, model(**kwargs)[0], rtol=1e-5, atol=1e-6)
    graphs = replays_of(model, "transformer_blocks.0")
    assert len(graphs.captured) == 1 and graphs.replays == 2
