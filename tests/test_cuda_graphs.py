"""``optimize(model, cuda_graphs=True)``: replay of optimized modules as CUDA graphs."""
import copy

import pytest
import torch

import fusion_pass
from fusion_pass.cuda_graphs import GraphReplay, _signature, replay_paused
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


def test_signature_refuses_cpu_tensors_and_unhashable_arguments():
    x = torch.randn(2, 3)
    assert _signature([x], None) is None
    assert _signature([[1, 2]], None) is None


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
