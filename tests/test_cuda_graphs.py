"""``optimize(model, cuda_graphs=True)``: replay of optimized modules as CUDA graphs."""
import copy

import pytest
import torch

import fusion_pass
from fusion_pass.cuda_graphs import GraphReplay, call_key, changed_by_call, replay_allowed, replay_paused, \
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
def test_autograd_calls_do_not_replay(cuda):
    model = tiny().to(cuda)
    fusion_pass.optimize(model, cuda_graphs=True)
    inputs = example_inputs("tiny", seed=6, device=cuda)
    inputs.call(model).sum().backward()
    assert model.forward.graphs.captured == {}
    assert model.double_blocks[0].img_attn.qkv.weight.grad is not None
