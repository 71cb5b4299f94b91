"""The pass on the Hunyuan3D DiT: the official file (loaded by path, untouched) and our copy.

Site counts come from the config (``DiTConfig.expected_sites``); chained residual->norm
sites count toward both of their halves.
"""
import copy
import importlib
import io
import operator
import os

import pytest
import torch
import torch.nn.functional as F

import fusion_pass
from fusion_pass.install import graph_of, is_installed
from fusion_pass.registry import FUSED_OPS
from patterns import FAMILIES
from reference_models import CONFIGS, build_model, example_inputs, get_config, load_official

BUILDERS = {"ours": build_model, "official": load_official}
CHAIN = "residual_layernorm_modulate"


def fused_families(report) -> dict[str, int]:
    """Sites per family that fused any (the Hunyuan3D DiT has no sites of the other families:
    its q/k norms are RMSNorms, it has no RoPE and every residual is gated)."""
    return {family: n for family, n in report.totals().items() if n}


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def tiny(source="official", seed=0):
    torch.manual_seed(seed)
    return BUILDERS[source]("tiny")


@pytest.mark.parametrize("source", sorted(BUILDERS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_site_is_fused_on_every_config(source, config):
    model = BUILDERS[source](config, device="meta")
    fusion_pass.optimize(model)
    report = fusion_pass.report(model)
    assert fused_families(report) == get_config(config).expected_sites()
    assert all(not fam.near_misses for fam in report.families.values())


def test_hunyuan3d_2_counts_are_97_96_64_32_16():
    model = load_official("hunyuan3d-2", device="meta")
    fusion_pass.optimize(model)
    assert fusion_pass.report(model).totals() == {
        "layernorm_modulate": 97, "residual_gate": 96, "qk_rmsnorm": 64, "gelu_cat": 32, "qk_rmsnorm_cat": 16,
        "qk_layernorm": 0, "qk_rmsnorm_rope": 0, "qk_rmsnorm_cat_rope": 0, "residual_layernorm": 0,
    }


@pytest.mark.parametrize("source", sorted(BUILDERS))
def test_optimized_tiny_model_matches_original_in_fp32(source):
    model = tiny(source)
    inputs = example_inputs("tiny", seed=1)
    expected = inputs.call(model)
    fusion_pass.optimize(model)
    assert rel_err(inputs.call(model), expected) <= 1e-5


def test_unfused_ops_are_gone_and_fused_ops_present():
    model = tiny()
    fusion_pass.optimize(model)
    code = graph_of(model)
    families = {family.name: family.op_key for family in FAMILIES}
    for name in (*get_config("tiny").expected_sites(), CHAIN):  # the families with sites in this model
        op = FUSED_OPS[families[name]].key
        assert f"fusion_pass_ops_direct_{op}_direct(" in code, op  # fused ops, called through fusion_pass.ops.direct
    assert "rsqrt" not in code and "layer_norm" not in code and "norm1(" not in code
    assert "pre_norm(" not in code and "torch.mean" not in code


def test_the_whole_model_is_one_graph_under_a_dtype_guard_and_chunk_count_guards():
    model = tiny()
    fusion_pass.optimize(model)
    report, config = fusion_pass.report(model), get_config("tiny")
    assert report.graphs == ["<root>"] and is_installed(model)
    assert report.assumptions[0] == ("", "torch.is_floating_point(1000.0 * t) is True")  # t: the forward's argument
    # Modulation star-unpacks its chunk (ModulationOut(*out[:3])): followed under one assumption
    # per Modulation (two a double block, one a single block) that chunk made its 6 or 3 pieces
    pieces = [what for path, what in report.assumptions[1:] if what.split(":")[0].endswith(("_mod", ".modulation"))]
    assert len(pieces) == len(report.assumptions) - 1 == 2 * config.depth + config.depth_single_blocks
    assert not report.uncaptured
    assert not any(is_installed(m) for m in model.modules() if m is not model)
    code = graph_of(model)
    assert "assume(is_floating_point, True, 'torch.is_floating_point(1000.0 * t)')" in code  # timestep_embedding's branch
    assert "_on(" in code  # its CPU arange: a per-device cached constant, no copy per call


class StarUnpacked(torch.nn.Module):
    """``Pair(*x.chunk(2, -1))``: the pieces are iterated; a last dim of 1 makes one piece only."""

    def forward(self, x):
        return torch.complex(*x.chunk(2, dim=-1))


def test_a_chunk_with_fewer_pieces_than_assumed_runs_the_original_forward():
    from fusion_pass.capture import capture
    from fusion_pass.guards import describe_guard, guards_in
    from fusion_pass.install import install

    model = StarUnpacked()
    (captured,) = capture(model).graphs
    assert [describe_guard(g) for g in guards_in(captured.graph)] == ["chunk(2) makes 2 pieces is True"]
    install(captured)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), torch.complex(x[:, :2], x[:, 2:]), rtol=0, atol=0)
    short = torch.randn(3, 1)  # chunk(2) of a dim of 1 is one piece
    with pytest.raises(TypeError) as fused_error:
        model(short)
    with pytest.raises(TypeError) as original_error:
        StarUnpacked()(short)
    assert str(fused_error.value) == str(original_error.value)  # the original forward ran


@pytest.mark.parametrize("source", sorted(BUILDERS))
def test_each_double_block_norms_both_streams_q_k_and_concatenates_them_in_one_call(source):
    model = tiny(source)
    fusion_pass.optimize(model)
    code, config = graph_of(model), get_config("tiny")
    assert code.count("fusion_pass_ops_direct_qk_rmsnorm_cat_direct(") == config.depth
    assert code.count("fusion_pass_ops_direct_qk_rmsnorm_direct(") == config.depth_single_blocks
    counts = fusion_pass.report(model).counts()
    assert (counts["qk_rmsnorm_cat"], counts["qk_rmsnorm"]) == (config.depth, config.depth_single_blocks)


def test_state_dict_and_parameters_are_unchanged():
    model = tiny()
    before = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters()}
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    fusion_pass.optimize(model)
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == before
    assert all(p is params[name] for name, p in model.named_parameters())
    assert [(name, type(m).__name__) for name, m in model.named_modules()] == modules


def test_loading_new_weights_after_the_pass_changes_outputs_like_the_original():
    original, optimized = tiny(seed=0), tiny(seed=0)
    fusion_pass.optimize(optimized)
    new_weights = tiny(seed=7).state_dict()
    buffer = io.BytesIO()
    torch.save(new_weights, buffer)
    for model in (original, optimized):
        buffer.seek(0)
        model.load_state_dict(torch.load(buffer), strict=True)
    inputs = example_inputs("tiny", seed=2)
    assert rel_err(inputs.call(optimized), inputs.call(original)) <= 1e-5


def test_scale_parameters_get_a_weight_alias_without_a_state_dict_key():
    model = tiny()
    keys = set(model.state_dict())
    fusion_pass.optimize(model)
    norm = model.double_blocks[0].img_attn.norm.query_norm
    assert norm.weight is norm.scale
    assert isinstance(norm, type(tiny().double_blocks[0].img_attn.norm.query_norm))
    assert set(model.state_dict()) == keys


def test_deepcopy_half_and_to_keep_working():
    model = tiny()
    inputs = example_inputs("tiny", seed=3)
    fusion_pass.optimize(model)
    expected = inputs.call(model)
    clone = copy.deepcopy(model)
    assert clone.forward.module is clone
    assert rel_err(inputs.call(clone), expected) <= 1e-6
    clone.to(torch.float64)
    x64 = example_inputs("tiny", seed=3, dtype=torch.float64)
    assert inputs.call(model).dtype == torch.float32 and x64.call(clone).dtype == torch.float64
    assert rel_err(x64.call(clone), expected) <= 1e-5


def test_training_mode_change_falls_back_to_the_original_forward():
    model = tiny().eval()
    fusion_pass.optimize(model)
    inputs = example_inputs("tiny", seed=4)
    expected = inputs.call(model)
    model.train()
    assert rel_err(inputs.call(model), expected) <= 1e-6


def test_running_the_pass_twice_changes_nothing_the_second_time():
    model = tiny()
    fusion_pass.optimize(model)
    forwards = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    fusion_pass.optimize(model)
    report = fusion_pass.report(model)
    assert report.total == 0 and report.already_optimized
    assert forwards == {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_model_with_nothing_to_fuse_comes_back_unchanged_with_an_empty_report():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    assert fusion_pass.optimize(model) is model
    report = fusion_pass.report(model)
    assert report.total == 0 and not any(f.near_misses for f in report.families.values())
    assert not any(is_installed(m) for m in model.modules())


def test_restore_brings_back_the_original_forward_and_classes():
    model = tiny()
    cls = type(model.double_blocks[0].img_attn.norm.query_norm)
    fusion_pass.optimize(model)
    fusion_pass.restore(model)
    assert not any(is_installed(m) for m in model.modules())
    assert type(model.double_blocks[0].img_attn.norm.query_norm) is cls


def test_non_module_input_gets_a_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fusion_pass.optimize(lambda x: x)


def test_strict_raises_when_a_selected_family_fused_nothing():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    with pytest.raises(fusion_pass.NothingFused, match="layernorm_modulate"):
        fusion_pass.optimize(model, patterns=["layernorm_modulate"], strict=True)


def test_pattern_selection_fuses_only_the_named_families():
    model = tiny()
    fusion_pass.optimize(model, patterns=["qk_rmsnorm"])
    assert set(fusion_pass.report(model).families) == {"qk_rmsnorm"}
    assert fusion_pass.report(model).counts()["qk_rmsnorm"] == get_config("tiny").expected_sites()["qk_rmsnorm"]


def test_unknown_pattern_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pattern"):
        fusion_pass.optimize(tiny(), patterns=["layernorm_modulat"])


@pytest.mark.parametrize("batch,latents", [(1, 16), (2, 32), (4, 5)])
def test_no_recapture_when_batch_or_tokens_change(batch, latents):
    model = tiny()
    reference = copy.deepcopy(model)
    fusion_pass.optimize(model)
    forward = model.forward
    inputs = example_inputs("tiny", batch=batch, latents=latents, seed=5)
    assert rel_err(inputs.call(model), inputs.call(reference)) <= 1e-5
    assert model.forward is forward


def test_compile_backend_fuses_every_site_and_chains_across_blocks():
    model = tiny()
    inputs = example_inputs("tiny", seed=6)
    expected = inputs.call(model)
    backend = fusion_pass.backend(inner="eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert rel_err(inputs.call(compiled), expected) <= 1e-5
    counts = backend.report.counts()
    assert fused_families(backend.report) == get_config("tiny").expected_sites()
    # Within blocks: 2 chains per double block; across blocks: each double block's last
    # gates feed the next double block's first norms; single blocks chain to the next.
    config = get_config("tiny")
    within = 2 * config.depth
    across = 2 * (config.depth - 1) + (config.depth_single_blocks - 1)
    assert counts[CHAIN] == within + across


def test_compile_backend_is_registered_by_name():
    model = tiny()
    inputs = example_inputs("tiny", seed=8)
    expected = inputs.call(model)
    compiled = torch.compile(model, backend="fusion_pass", fullgraph=True)
    assert rel_err(inputs.call(compiled), expected) <= 1e-5


def test_optimized_model_compiles_with_dynamo():
    model = tiny()
    inputs = example_inputs("tiny", seed=9)
    expected = inputs.call(model)
    fusion_pass.optimize(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert rel_err(inputs.call(compiled), expected) <= 1e-5


def test_no_monkey_patch_is_left_behind():
    import einops

    rearrange, module_call, getattr_ = einops.rearrange, torch.nn.Module.__call__, torch.nn.Module.__getattr__
    model = tiny()
    def public_globals():  # Dynamo adds/removes private `___*` entries of its own
        return {k: v for k, v in type(model.double_blocks[0]).forward.__globals__.items() if not k.startswith("_")}

    official_globals = public_globals()
    fusion_pass.optimize(model)
    assert einops.rearrange is rearrange
    assert torch.nn.Module.__call__ is module_call and torch.nn.Module.__getattr__ is getattr_
    assert public_globals() == official_globals
    assert F.layer_norm is torch.nn.functional.layer_norm and operator.add(1, 2) == 3


def test_optimized_tiny_model_matches_with_triton_kernels_under_the_interpreter(monkeypatch):
    from fusion_pass.ops import interpret_on_cpu

    kernel_modules = [importlib.import_module(f"fusion_pass.ops.{name}")
                      for name in ("layernorm_modulate", "qk_rmsnorm", "qk_rmsnorm_cat", "gelu_cat")]

    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    model = tiny()
    inputs = example_inputs("tiny", seed=10)
    expected = inputs.call(model)
    fusion_pass.optimize(model)
    launches = []
    for module in kernel_modules:  # every kernel launch goes through launch_kernel
        real = module.launch_kernel
        monkeypatch.setattr(module, "launch_kernel", lambda kernel, *a, real=real, **kw: launches.append(kernel) or real(kernel, *a, **kw))
    with interpret_on_cpu():
        got = inputs.call(model)
    assert rel_err(got, expected) <= 1e-5
    report = fusion_pass.report(model)  # one launch per fused call, of every family
    assert len(launches) == report.total > 0
    assert {kernel.__name__ for kernel in launches} == {
        "_residual_norm_modulate_kernel", "_qk_rmsnorm_kernel", "_qk_rmsnorm_cat_kernel", "_gelu_cat_kernel"}


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])
@pytest.mark.parametrize("inductor_launches", [True, False])
def test_inductor_backend_traces_into_the_fused_ops_or_calls_them(device, inductor_launches):
    """`inductor_launches`: AOTAutograd traces the fused ops' bodies, so Inductor's code holds no
    call of a fused op through the dispatcher (on CUDA it launches our Triton kernels itself; on
    the CPU it compiles the references), or the ops stay calls. Both compute the original's output."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = tiny().to(device, dtype)
    inputs = example_inputs("tiny", seed=12, dtype=dtype, device=device)
    with torch.no_grad():
        expected = inputs.call(model)
        backend = fusion_pass.backend(inner="inductor", inductor_launches=inductor_launches)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        got, codes = run_and_get_code(inputs.call, compiled)
    code = "\n".join(codes)
    assert fused_families(backend.report) == get_config("tiny").expected_sites()
    assert ("torch.ops.fusion_pass" in code) is not inductor_launches
    if device == "cuda":
        assert ("_residual_norm_modulate_kernel" in code) is inductor_launches
    assert rel_err(got, expected) <= (2e-3 if dtype == torch.float16 else 1e-5)


def test_inductor_launches_needs_the_inductor_inner_compiler():
    with pytest.raises(ValueError, match="inductor_launches=True needs inner='inductor'"):
        fusion_pass.backend(inner="eager", inductor_launches=True)
