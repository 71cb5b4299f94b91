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
    fused = {family: n for family, n in fusion_pass.report(model).totals().items() if n}  # no other family fused
    assert fused == get_config("tiny").expected_sites()


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


# --- Flux (diffusers): blocks compiled regionally by Dynamo ---------------------------------------

FLUX_LORA_TARGETS = ["to_q", "to_k", "to_v", "proj_mlp"]
FLUX_INNER = "transformer_blocks.0.ff.net.2"  # an nn.Linear inside a double block
FLUX_NORM = "transformer_blocks.0.norm1.norm"  # AdaLayerNormZero's LayerNorm(eps=1e-6, no affine)


def diffusers_pair(name):
    """(original, optimized after one call, inputs) for the tiny ``name`` of reference_models/diffusers_tiny.py."""
    from reference_models.diffusers_tiny import MODELS

    tiny = MODELS[name]
    original = tiny.build()
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    flux_call(optimized, tiny.inputs())
    return original, optimized, tiny.inputs()


@pytest.fixture
def flux():
    return diffusers_pair("flux")


def flux_call(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


def assert_same_flux(pair):
    original, optimized, kwargs = pair
    assert rel_err(flux_call(optimized, kwargs), flux_call(original, kwargs)) <= 1e-5


def flux_sites(model):
    return fusion_pass.report(model).totals()


def test_flux_lora_injected_after_optimize_is_applied_and_fused_again(flux):
    before = flux_sites(flux[1])
    both(flux, lambda m: inject_adapter_in_model(LoraConfig(target_modules=FLUX_LORA_TARGETS, init_lora_weights=False), m))
    assert_same_flux(flux)
    both(flux, lambda m: [layer.scale_layer(0.25) for layer in lora_layers(m)])
    assert_same_flux(flux)
    # seen by the root's graph (peft records its config on the model: the whole model is captured again)
    # or, where the root runs unfused, by the block's
    assert ("peft_config of <root> added" in reasons(flux[1])
            or "submodule transformer_blocks.0.attn.to_q replaced (Linear -> Linear)" in reasons(flux[1]))
    assert flux_sites(flux[1]) == before  # Dynamo recompiled the LoRA blocks; the same sites fused


def test_flux_block_changed_after_optimize_is_reported_as_it_now_runs(flux):
    """The double block's norm_q replaced by an Identity: Dynamo recompiles the block, whose joint
    q/k site (norms, cat and RoPE of both streams in one op) can no longer fuse; the report counts
    the graph that runs now, not the one compiled before the change."""
    before = flux_sites(flux[1])
    both(flux, lambda m: setattr(m.transformer_blocks[0].attn, "norm_q", torch.nn.Identity()))
    assert_same_flux(flux)
    after = flux_sites(flux[1])
    assert before["qk_rmsnorm_cat_rope"] == 1 and after["qk_rmsnorm_cat_rope"] == 0  # num_layers=1 double block


def test_flux_lora_merged_and_set_adapter_are_applied(flux):
    both(flux, lambda m: (inject_adapter_in_model(LoraConfig(target_modules=FLUX_LORA_TARGETS, init_lora_weights=False),
                                                  m, adapter_name="a"),
                          inject_adapter_in_model(LoraConfig(target_modules=FLUX_LORA_TARGETS, init_lora_weights=False),
                                                  m, adapter_name="b")))
    assert_same_flux(flux)
    both(flux, lambda m: [layer.set_adapter("a") for layer in lora_layers(m)])
    assert_same_flux(flux)
    both(flux, lambda m: [layer.merge() for layer in lora_layers(m)])
    assert_same_flux(flux)


def test_flux_attention_processor_swapped_is_used(flux):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class Halved(FluxAttnProcessor):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5

    both(flux, lambda m: m.set_attn_processor(Halved()))
    assert_same_flux(flux)
    assert "processor" in reasons(flux[1])
    both(flux, lambda m: m.set_attn_processor(FluxAttnProcessor()))
    assert_same_flux(flux)


def test_flux_fused_qkv_projections_are_used(flux):
    both(flux, lambda m: m.fuse_qkv_projections())
    assert_same_flux(flux)
    both(flux, lambda m: m.unfuse_qkv_projections())
    assert_same_flux(flux)


def test_flux_hooks_run_while_registered(flux):
    handles = []
    both(flux, lambda m: handles.append(m.get_submodule(FLUX_INNER).register_forward_hook(doubled)))
    assert_same_flux(flux)
    assert f"forward hook added on {FLUX_INNER}" in reasons(flux[1])
    for handle in handles:
        handle.remove()
    both(flux, lambda m: handles.append(m.get_submodule(FLUX_INNER).register_forward_pre_hook(halved_input)))
    assert_same_flux(flux)
    for handle in handles:
        handle.remove()
    assert_same_flux(flux)
    assert not any("Dynamo could not" in r for _, r, _ in fusion_pass.report(flux[1]).fallbacks)


def test_flux_global_hook_runs(flux):
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, _args, output: output * 1.5 if isinstance(module, nn.Linear) else None)
    try:
        assert_same_flux(flux)
    finally:
        handle.remove()
    assert_same_flux(flux)


@pytest.mark.parametrize("change", ["eps", "parameter", "float64", "train", "requires_grad"])
def test_flux_plain_changes_are_used(flux, change):
    changes = {
        "eps": lambda m: setattr(m.get_submodule(FLUX_NORM), "eps", 0.5),
        "parameter": lambda m: setattr(m.get_submodule(FLUX_INNER), "weight",
                                       nn.Parameter(torch.randn_like(m.get_submodule(FLUX_INNER).weight))),
        "float64": lambda m: m.to(torch.float64),
        "train": lambda m: m.train(),
        "requires_grad": lambda m: m.requires_grad_(False),
    }
    both(flux, changes[change])
    if change == "float64":
        flux = (flux[0], flux[1], {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                   for k, v in flux[2].items()})
    assert_same_flux(flux)
    if change == "eps":
        assert f"LayerNorm.eps of {FLUX_NORM} changed 1e-06 -> 0.5" in reasons(flux[1])


def test_the_report_and_its_rendering_show_checks_and_fallbacks(flux):
    import io

    from rich.console import Console

    handle = flux[1].get_submodule(FLUX_INNER).register_forward_hook(doubled)
    flux_call(flux[1], flux[2])
    handle.remove()
    report = fusion_pass.report(flux[1])
    data = report.to_dict()
    assert any("Dynamo guards" in g["checks"] for g in data["guards"])
    assert any("subtree unchanged" in g["checks"] for g in data["guards"])
    assert any(f["reason"].startswith("original forward while hooks exist (forward hook added on "
                                      f"{FLUX_INNER})") and f["calls"] == 1 for f in data["fallbacks"])
    out = io.StringIO()
    Console(file=out, width=200).print(report)
    assert "run-time fallbacks" in out.getvalue() and "checked on every call" in out.getvalue()


def test_a_deep_copy_of_an_optimized_flux_runs_its_own_blocks(flux):
    clone = copy.deepcopy(flux[1])
    assert clone.transformer_blocks[0].forward.module is clone.transformer_blocks[0]
    assert rel_err(flux_call(clone, flux[2]), flux_call(flux[0], flux[2])) <= 1e-5


# --- SD3 (diffusers): the root traced by our FX tracer, which reads each q/k RMSNorm's weight.dtype ---

SD3_NORM = "transformer_blocks.0.attn.norm_q"  # diffusers RMSNorm(head dim, eps=1e-6), fp32 weight
#: SD3's q/k norm pairs (qk_norm="rms_norm"): block 0 has SD3.5's dual attention, so attn (image and
#: context q/k: 2 pairs) and attn2 (image: 1 pair); block 1 (context_pre_only) attn: 2 pairs
SD3_QK_PAIRS = 5


@pytest.fixture
def sd3():
    original, optimized, inputs = diffusers_pair("sd3")
    assert fusion_pass.report(optimized).totals()["qk_rmsnorm"] == SD3_QK_PAIRS
    return original, optimized, inputs


def cast_floats(kwargs, dtype):
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}


def test_sd3_cast_to_bfloat16_after_optimize_is_captured_again_and_no_less_accurate(sd3):
    original, optimized, kwargs = sd3
    weight = optimized.get_submodule(SD3_NORM).weight
    with torch.no_grad():
        exact = copy.deepcopy(original).double()(**cast_floats(kwargs, torch.float64))[0]
    both(sd3, lambda m: m.to(torch.bfloat16))
    assert optimized.get_submodule(SD3_NORM).weight is weight  # .to() rebinds weight.data: the same Parameter
    low = cast_floats(kwargs, torch.bfloat16)
    eager, fused = flux_call(original, low), flux_call(optimized, low)
    assert fused.dtype == eager.dtype == torch.bfloat16
    assert f"{SD3_NORM}.weight.dtype changed torch.float32 -> torch.bfloat16" in reasons(optimized)
    report = fusion_pass.report(optimized)
    assert report.totals()["qk_rmsnorm"] == SD3_QK_PAIRS  # captured again for bf16 weights, fused again
    assert ("", f"{SD3_NORM}: weight.dtype is torch.bfloat16") in report.assumptions
    # the fused op rounds as the bf16 spelling does (and the product once): one bf16 ulp of slack
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
    assert (fused.double() - exact).abs().max() <= (eager.double() - exact).abs().max() + ulp


def test_sd3_norm_weight_replaced_by_a_new_parameter_is_used(sd3):
    both(sd3, lambda m: setattr(m.get_submodule(SD3_NORM), "weight",
                                nn.Parameter(torch.randn_like(m.get_submodule(SD3_NORM).weight))))
    assert_same_flux(sd3)
    assert f"parameter {SD3_NORM}.weight replaced" in reasons(sd3[1])
    assert fusion_pass.report(sd3[1]).totals()["qk_rmsnorm"] == SD3_QK_PAIRS


def test_sd3_norm_weight_set_to_none_is_used(sd3):
    # RMSNorm(elementwise_affine=False) holds weight None and casts back to the input dtype instead:
    # that norm has no weight for the fused op, so its pair is left unfused, the others stay fused
    both(sd3, lambda m: setattr(m.get_submodule(SD3_NORM), "weight", None))
    assert_same_flux(sd3)
    assert f"parameter {SD3_NORM}.weight replaced" in reasons(sd3[1])
    assert fusion_pass.report(sd3[1]).totals()["qk_rmsnorm"] == SD3_QK_PAIRS - 1


# --- metadata of parameters and buffers read as values while tracing --------------------------------

class ReadsMetadata(nn.Module):
    """Branches on its parameter's and buffer's metadata, as diffusers' norms do."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))
        self.register_buffer("table", torch.randn(4))

    def forward(self, x):
        if self.weight.dtype in (torch.float16, torch.bfloat16) or self.table.ndim != 1:
            x = x.to(self.weight.dtype)
        if self.weight.size(0) == self.weight.shape[-1] == self.table.size()[0] and self.weight.dim() == 1:
            x = x * self.weight
        return x + self.table.to(self.weight.device)


def test_parameter_and_buffer_metadata_read_while_tracing_are_recorded_and_checked():
    from fusion_pass.capture import capture
    from fusion_pass.snapshot import SubtreeGuard

    module = ReadsMetadata()
    (graph,) = capture(module).graphs
    read = {(held.name, held.attr): held.value for held in graph.metadata}
    assert read == {("weight", "dtype"): torch.float32, ("table", "ndim"): 1, ("weight", "shape"): torch.Size([4]),
                    ("table", "shape"): torch.Size([4]), ("weight", "ndim"): 1, ("weight", "device"): torch.device("cpu")}
    guard = SubtreeGuard(module, "", metadata=graph.metadata)
    assert guard.holds()
    module.half()  # the same Parameter, its data rebound to fp16 (buffers are replaced)
    assert not guard.holds() and "weight.dtype changed torch.float32 -> torch.float16" in guard.describe()
    module.float()
    guard = SubtreeGuard(module, "", metadata=graph.metadata)
    assert guard.holds()
    module.weight.data = torch.randn(5)  # the same Parameter, another shape
    assert not guard.holds() and "weight.shape changed torch.Size([4]) -> torch.Size([5])" in guard.describe()
    module.weight.data = torch.randn(4)
    guard = SubtreeGuard(module, "", metadata=graph.metadata)
    module.to("meta")  # another device, the same Parameter
    assert not guard.holds() and "weight.device changed cpu -> meta" in guard.describe()
