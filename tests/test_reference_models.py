"""reference_models: our Hunyuan3D DiT is the official hy3dgen file in structure, numerics and graphs.

Runs on the CPU in CI; the official file comes from `hy3dgen==2.0.2`, which the setup script installs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

from reference_models import (
    CONFIGS,
    INSTALL_HINT,
    DiTConfig,
    build_model,
    example_inputs,
    get_config,
    load_official,
    official_module,
)
from reference_models import hunyuan3d_dit

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIGS["tiny"]
TINY_GUIDED = dataclasses.replace(TINY, guidance_embed=True)
FULL_WIDTH_SLICE = dataclasses.replace(
    CONFIGS["hunyuan3d-2"], depth=1, depth_single_blocks=1, latent_tokens=8, cond_tokens=6
)
BUILDERS = {"ours": build_model, "official": load_official}


def _state_signature(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in model.state_dict().items()]


def _module_signature(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model.named_modules()]


def _classes(module) -> dict[str, type]:
    """The classes a module defines (not those it imports)."""
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, type) and value.__module__ == module.__name__
    }


def _twins(config: DiTConfig, *, seed: int | None = None) -> tuple[nn.Module, nn.Module]:
    """(ours, official) built from `config`; from the same seed when given, else from fresh draws."""
    models = []
    for build in BUILDERS.values():
        if seed is not None:
            torch.manual_seed(seed)
        models.append(build(config))
    return models[0], models[1]


# Structure


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_and_module_tree_match_official(name):
    ours, official = build_model(name, device="meta"), load_official(name, device="meta")
    assert _state_signature(ours) == _state_signature(official)
    assert _module_signature(ours) == _module_signature(official)
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in official.named_buffers()]
    assert all(p.is_meta for p in ours.parameters())


def test_same_seed_gives_same_weights_as_official():
    ours, official = _twins(TINY, seed=0)
    for (name, ours_tensor), official_tensor in zip(ours.state_dict().items(), official.state_dict().values()):
        assert torch.equal(ours_tensor, official_tensor), name


@pytest.mark.parametrize("builder", BUILDERS)
def test_dtype_argument_casts_every_parameter(builder):
    model = BUILDERS[builder](TINY, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


@pytest.mark.parametrize("builder", BUILDERS)
def test_head_width_must_equal_sum_of_axes_dim(builder):
    with pytest.raises(ValueError):
        BUILDERS[builder](dataclasses.replace(TINY, axes_dim=(8,)), device="meta")


def test_ckpt_path_is_refused_with_the_reason():
    with pytest.raises(NotImplementedError, match="load_state_dict"):
        hunyuan3d_dit.Hunyuan3DDiT(**TINY.model_kwargs(), ckpt_path="dit.ckpt")


def test_every_official_class_has_a_twin_with_the_same_forward_signature():
    official = official_module()
    ours = _classes(hunyuan3d_dit)
    for name, official_cls in _classes(official).items():
        assert name in ours
        if issubclass(official_cls, nn.Module):
            # FX copies forward annotations into placeholders; ModulationOut differs only by its module.
            ours_signature = str(inspect.signature(ours[name].forward)).replace(hunyuan3d_dit.__name__, "<model>")
            official_signature = str(inspect.signature(official_cls.forward)).replace(official.__name__, "<model>")
            assert ours_signature == official_signature, name


# Numerics


@pytest.mark.parametrize("source", BUILDERS)
@pytest.mark.parametrize(
    "config", [TINY, TINY_GUIDED, FULL_WIDTH_SLICE], ids=["tiny", "tiny-guided", "full-width-slice"]
)
def test_loading_state_dict_into_the_twin_gives_identical_outputs(config, source):
    ours, official = _twins(config)
    src, dst = (ours, official) if source == "ours" else (official, ours)
    dst.load_state_dict(src.state_dict(), strict=True)
    inputs = example_inputs(config, seed=0)
    with torch.no_grad():
        expected = inputs.call(src)
        torch.testing.assert_close(inputs.call(dst), expected, atol=1e-6, rtol=0)
    assert expected.shape == inputs.x.shape


@pytest.mark.parametrize("builder", BUILDERS)
def test_guidance_distilled_model_refuses_to_run_without_guidance(builder):
    model = BUILDERS[builder](TINY_GUIDED)
    inputs = example_inputs(TINY_GUIDED, seed=0)
    with pytest.raises(ValueError, match="guidance"):
        model(*inputs.args)


@pytest.mark.parametrize("builder", BUILDERS)
def test_meta_model_runs_full_size_turbo_on_meta_inputs(builder):
    model = BUILDERS[builder]("hunyuan3d-2-turbo", device="meta")
    inputs = example_inputs("hunyuan3d-2-turbo", device="meta")
    out = inputs.call(model)
    assert out.is_meta and out.shape == (2, 3072, 64)


# Capture obstacles and captured graphs

_UNTRACEABLE_PARTS = {
    "model": lambda model: model,
    "double_block": lambda model: model.double_blocks[0],
    "single_block": lambda model: model.single_blocks[0],
    "modulation": lambda model: model.single_blocks[0].modulation,
}


@pytest.mark.parametrize("part", _UNTRACEABLE_PARTS)
def test_symbolic_trace_fails_exactly_like_official(part):
    messages = []
    for model in _twins(TINY):
        with pytest.raises(fx.proxy.TraceError) as failure:
            fx.symbolic_trace(_UNTRACEABLE_PARTS[part](model))
        messages.append(str(failure.value))
    assert messages[0] == messages[1]


def test_last_layer_traces_to_the_official_graph():
    ours, official = (fx.symbolic_trace(model.final_layer) for model in _twins(TINY))
    assert ours.code == official.code


class _ModulationLeafTracer(fx.Tracer):
    """The tracer NOTES.md describes: Modulation kept as a leaf, einops.rearrange wrapped."""

    def __init__(self, model_module):
        super().__init__(autowrap_functions=(model_module.rearrange,))
        self.modulation_cls = model_module.Modulation

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.modulation_cls) or super().is_leaf_module(module, qualified_name)


_LEAF_TRACEABLE_PARTS = {
    "double_block": lambda model: model.double_blocks[0],
    "single_block": lambda model: model.single_blocks[0],
    "self_attention": lambda model: model.double_blocks[0].txt_attn,
}


@pytest.mark.parametrize("part", _LEAF_TRACEABLE_PARTS)
def test_leaf_tracer_gives_the_official_graph(part):
    ours, official = _twins(TINY)
    graphs = [
        _ModulationLeafTracer(model_module).trace(_LEAF_TRACEABLE_PARTS[part](model))
        for model, model_module in ((ours, hunyuan3d_dit), (official, official_module()))
    ]
    assert graphs[0].python_code("self").src == graphs[1].python_code("self").src


@pytest.mark.parametrize("config", [TINY, TINY_GUIDED], ids=["tiny", "tiny-guided"])
def test_dynamo_captures_the_official_graph(config):
    captured = []

    def capture(graph_module, sample_inputs):
        captured.append(graph_module.code)
        return graph_module.forward

    inputs = example_inputs(config, seed=0)
    for model in _twins(config):
        torch._dynamo.reset()
        torch.compile(model, backend=capture, fullgraph=True)(*inputs.args, **inputs.kwargs)
    torch._dynamo.reset()
    assert len(captured) == 2
    assert captured[0] == captured[1]


# Official file loading


def test_load_official_without_hy3dgen_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_hy3dgen(name, *args, **kwargs):
        return None if name == "hy3dgen" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_hy3dgen)
    with pytest.raises(ModuleNotFoundError, match=re.escape(INSTALL_HINT)):
        load_official("tiny", device="meta")


def test_official_module_is_loaded_once():
    assert official_module() is official_module()


def test_loading_official_never_imports_the_hy3dgen_package():
    script = (
        "import sys; from reference_models import load_official; load_official('tiny', device='meta'); "
        "sys.exit(any(m == 'hy3dgen' or m.startswith('hy3dgen.') for m in sys.modules))"
    )
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    assert subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT).returncode == 0


# Configs and inputs


def test_unknown_config_name_lists_valid_names():
    with pytest.raises(KeyError, match="hunyuan3d-2mini.*tiny"):
        get_config("hunyuan3d-3")


@pytest.mark.parametrize(
    ("name", "sites"),
    [
        ("hunyuan3d-2", {"layernorm_modulate": 97, "residual_gate": 96, "qk_rmsnorm": 64, "gelu_cat": 32,
                         "qk_rmsnorm_cat": 16}),
        ("hunyuan3d-2mini", {"layernorm_modulate": 49, "residual_gate": 48, "qk_rmsnorm": 32, "gelu_cat": 16,
                             "qk_rmsnorm_cat": 8}),
    ],
)
def test_expected_sites_match_the_counts_measured_on_dynamo_graphs(name, sites):
    assert get_config(name).expected_sites() == sites


def test_example_inputs_follow_the_config():
    inputs = example_inputs("tiny", seed=0)
    assert inputs.x.shape == (2, TINY.latent_tokens, TINY.in_channels)
    assert inputs.t.shape == (2,)
    assert inputs.contexts["main"].shape == (2, TINY.cond_tokens, TINY.context_in_dim)
    assert inputs.kwargs == {}
    for tensor in (inputs.x, inputs.t, inputs.contexts["main"]):
        assert tensor.dtype == torch.float32 and torch.count_nonzero(tensor) == tensor.numel()
    assert ((0 <= inputs.t) & (inputs.t < 1)).all()


def test_example_inputs_overrides_and_guidance():
    inputs = example_inputs("hunyuan3d-2-turbo", batch=3, latents=5, cond_tokens=4, dtype=torch.bfloat16)
    assert inputs.x.shape == (3, 5, 64)
    assert inputs.contexts["main"].shape == (3, 4, 1536)
    assert set(inputs.kwargs) == {"guidance"}
    assert inputs.kwargs["guidance"].shape == (3,)
    assert {t.dtype for t in (inputs.x, inputs.t, inputs.contexts["main"], inputs.kwargs["guidance"])} == {
        torch.bfloat16
    }


def test_example_inputs_seed_fixes_values_across_dtypes():
    fp32 = example_inputs("tiny", seed=7)
    assert torch.equal(example_inputs("tiny", seed=7).x, fp32.x)
    assert torch.equal(example_inputs("tiny", seed=7, dtype=torch.bfloat16).x, fp32.x.to(torch.bfloat16))
    assert not torch.equal(example_inputs("tiny", seed=8).x, fp32.x)


def test_example_inputs_args_and_call_spell_the_model_call():
    inputs = example_inputs(TINY_GUIDED, seed=0)
    model = build_model(TINY_GUIDED)
    with torch.no_grad():
        spelled_out = model(inputs.x, inputs.t, inputs.contexts, guidance=inputs.kwargs["guidance"])
        assert torch.equal(inputs.call(model), spelled_out)
        assert torch.equal(model(*inputs.args, **inputs.kwargs), spelled_out)
