"""Changes made to a model after ``optimize()`` and a first call: the optimized model answers
exactly as the unoptimized one after the same change, and never runs a stale graph.

Each test builds two identical copies (``deepcopy`` before ``optimize``), optimizes one, calls
it once, applies the same change to both (same seed) and compares the next call (fp32, rel 1e-5).
Where the behaviour is a re-capture (LoRA injected: the model is optimized again), the report
must show the sites fused again: the counts the config predicts (``DiTConfig.expected_sites``).
"""
import copy

import pytest
import torch
from torch import nn

import fusion_pass
from reference_models import example_inputs, get_config, load_official

peft = pytest.importorskip("peft")
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer, LoraModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LORA_TARGETS = ["qkv", "linear1", "linear2"]  # the official file's attention and single-block linears
INNER = "double_blocks.0.img_mlp.0"  # an nn.Linear the whole-model graph inlines
NORM = "double_blocks.0.img_norm1"  # nn.LayerNorm(eps=1e-6, elementwise_affine=False)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def lora(model, name="default"):
    inject_adapter_in_model(LoraConfig(target_modules=LORA_TARGETS, init_lora_weights=False), model, adapter_name=name)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def doubled(_module, _args, output):
    return output * 2


def halved_input(_module, args):
    return (args[0] * 0.5,)


@pytest.fixture
def pair():
    """(original, optimized after one call, inputs): identical weights."""
    torch.manual_seed(0)
    original = load_official("tiny")
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    inputs = example_inputs("tiny", seed=1)
    inputs.call(optimized)
    return original, optimized, inputs


def both(pair, change):
    for model in pair[:2]:
        torch.manual_seed(5)
        change(model)


def assert_same(pair, inputs=None):
    original, optimized, default_inputs = pair
    inputs = inputs or default_inputs
    with torch.no_grad():
        assert rel_err(inputs.call(optimized), inputs.call(original)) <= 1e-5


def reasons(model):
    return " | ".join(reason for _, reason, _ in fusion_pass.report(model).fallbacks)


def assert_fused_as_configured(model):
    """Re-captured: every site the config predicts is fused again (LoRA layers are called as modules)."""
    assert fusion_pass.report(model).totals() == get_config("tiny").expected_sites()


def test_lora_injected_after_optimize_is_applied_and_the_model_is_optimized_again(pair):
    both(pair, lora)
    assert_same(pair)
    assert "submodule double_blocks.0.img_attn.qkv replaced (Linear -> Linear)" in reasons(pair[1])
    assert_fused_as_configured(pair[1])
    assert all(isinstance(pair[1].get_submodule(p), LoraLayer) for p in ("single_blocks.0.linear1",))


def test_lora_scale_changes_are_applied(pair):
    both(pair, lora)
    assert_same(pair)
    both(pair, lambda m: [layer.scale_layer(0.25) for layer in lora_layers(m)])
    assert_same(pair)
    both(pair, lambda m: [layer.set_scale("default", 3.0) for layer in lora_layers(m)])
    assert_same(pair)


def test_set_adapter_switches_the_lora_in_use(pair):
    both(pair, lambda m: (lora(m, "a"), lora(m, "b")))
    assert_same(pair)
    both(pair, lambda m: [layer.set_adapter("a") for layer in lora_layers(m)])
    assert_same(pair)


def test_lora_merged_in_place_is_applied(pair):
    both(pair, lora)
    assert_same(pair)
    both(pair, lambda m: [layer.merge() for layer in lora_layers(m)])
    assert_same(pair)


def test_merge_and_unload_gives_plain_linears_and_the_sites_fused_again(pair):
    wrappers = []
    both(pair, lambda m: wrappers.append(LoraModel(m, LoraConfig(target_modules=LORA_TARGETS, init_lora_weights=False),
                                                   "default")))
    assert_same(pair)
    for wrapper in wrappers:
        wrapper.merge_and_unload()
    assert not lora_layers(pair[1])
    assert_same(pair)
    assert_fused_as_configured(pair[1])


def test_a_forward_hook_on_an_inlined_module_runs_and_removing_it_restores_the_graph(pair):
    handles = []
    both(pair, lambda m: handles.append(m.get_submodule(INNER).register_forward_hook(doubled)))
    assert_same(pair)
    assert f"forward hook added on {INNER}" in reasons(pair[1])
    assert_fused_as_configured(pair[1])  # the hooked Linear is called as a module, the rest fused
    for handle in handles:
        handle.remove()
    assert_same(pair)
    assert f"forward hook removed from {INNER}" in reasons(pair[1])


def test_a_forward_pre_hook_on_an_inlined_module_runs(pair):
    both(pair, lambda m: m.get_submodule(INNER).register_forward_pre_hook(halved_input))
    assert_same(pair)
    assert f"forward pre hook added on {INNER}" in reasons(pair[1])


def test_a_global_module_forward_hook_runs_on_inlined_modules(pair):
    calls = []

    def count_linears(module, _args, output):
        if isinstance(module, nn.Linear):
            calls.append(module)
            return output * 1.5
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(count_linears)
    try:
        assert_same(pair)
        assert len(calls) > 0 and len(calls) % 2 == 0  # as many Linear calls in both models
        assert "global module forward hook registered" in reasons(pair[1])
    finally:
        handle.remove()


def test_a_changed_layernorm_eps_is_used(pair):
    both(pair, lambda m: setattr(m.get_submodule(NORM), "eps", 0.5))
    assert_same(pair)
    assert f"LayerNorm.eps of {NORM} changed 1e-06 -> 0.5" in reasons(pair[1])
    assert_fused_as_configured(pair[1])


def test_a_replaced_parameter_is_used(pair):
    both(pair, lambda m: setattr(m.final_layer.linear, "weight", nn.Parameter(torch.randn_like(m.final_layer.linear.weight))))
    assert_same(pair)


def test_to_float64_runs_in_float64(pair):
    both(pair, lambda m: m.to(torch.float64))
    assert_same(pair, example_inputs("tiny", seed=1, dtype=torch.float64))


def test_train_and_eval_switch_back_and_forth(pair):
    both(pair, lambda m: m.train())
    assert_same(pair)
    both(pair, lambda m: m.eval())
    assert_same(pair)
    assert "training" in reasons(pair[1])


def test_requires_grad_off_changes_nothing(pair):
    both(pair, lambda m: m.requires_grad_(False))
    assert_same(pair)
    assert fusion_pass.report(pair[1]).fallbacks == []  # flags on the same parameters: nothing to re-check
