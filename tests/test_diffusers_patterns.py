"""The pattern families on ten diffusers transformers, through the compile backend (Dynamo's
whole-model graphs): per-family counts derived from each model's code and config, the fused ops
in the graph, the unfused norms gone, outputs equal (fp32).

Site counts come from diffusers 0.42.1 (``diffusers/models/transformers/*``), derived from each
model's config in ``reference_models.diffusers_tiny.expected_sites``, which says where each comes from.
"""
from __future__ import annotations

import copy
import operator
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers", reason="the test extras install diffusers==0.42.1")

import fusion_pass  # noqa: E402
from fusion_pass.ops import interpret_on_cpu  # noqa: E402
from fusion_pass.ops.direct import direct_call  # noqa: E402
from fusion_pass.registry import FUSED_OPS  # noqa: E402
from reference_models.diffusers_tiny import MODELS, expected_sites  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


_FUSED_TARGETS = {target: key for key, op in FUSED_OPS.items() for target in (op.op, direct_call(op.op)) if target}
_NORMS = {F.layer_norm, F.rms_norm, torch.rsqrt}


class KeepGraphs:
    """The fusion backend (eager inner compiler), keeping each rewritten graph to inspect."""

    def __init__(self):
        self.backend = fusion_pass.backend(inner="eager")
        self.graphs = []

    def __call__(self, gm, example_inputs):
        compiled = self.backend(gm, example_inputs)
        self.graphs.append(gm.graph)
        return compiled


def _run(name):
    torch._dynamo.reset()
    model, inputs = MODELS[name].build(), MODELS[name].inputs()
    with torch.no_grad():
        reference = model(**inputs)[0]
        keep = KeepGraphs()
        out = torch.compile(model, backend=keep)(**inputs)[0]
    return model, reference, out, keep


@pytest.mark.parametrize("name", list(MODELS))
def test_backend_fuses_every_site_the_model_code_has(name):
    model, reference, out, keep = _run(name)
    sites = expected_sites(name, model.config)
    totals = keep.backend.report.totals()
    assert (totals["layernorm_modulate"], totals["residual_gate"], totals["qk_rmsnorm"], totals["qk_rmsnorm_rope"],
            totals["qk_rmsnorm_cat_rope"], totals["qk_layernorm"]) == (
        sites.modulations, sites.gates, sites.qk, sites.qk_rope, sites.qk_cat_rope, sites.qk_layernorm)
    # norms that no site uses stay in the graph: counted among norms_left
    calls = {key: 0 for key in FUSED_OPS}
    norms_left = 0
    for graph in keep.graphs:
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _FUSED_TARGETS:
                calls[_FUSED_TARGETS[node.target]] += 1
            norms_left += node.op == "call_function" and node.target in _NORMS
    counts = keep.backend.report.counts()
    assert calls["layernorm_scale_shift"] + calls["rmsnorm_scale_shift"] == counts["layernorm_modulate"]
    assert (calls["residual_gate"], calls["qk_rmsnorm"]) == (counts["residual_gate"], counts["qk_rmsnorm"])
    assert calls["residual_gate_layernorm_scale_shift"] == counts["residual_layernorm_modulate"]
    assert calls["qk_rmsnorm_rope"] == counts["qk_rmsnorm_rope"]
    assert calls["qk_rmsnorm_cat_rope"] == counts["qk_rmsnorm_cat_rope"]
    assert calls["qk_layernorm"] == counts["qk_layernorm"]
    assert norms_left == sites.norms_left
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def in_bf16(name: str, device) -> tuple:
    """``(model, inputs, exact, eager)``: the tiny model on ``device`` cast to bf16 after an fp32 run,
    its inputs in bf16, that fp32 run's output in fp64 and the bf16 model's own output."""
    model, inputs = MODELS[name].build().to(device), MODELS[name].inputs()
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        exact = model(**on_device)[0].double()
        model = model.to(torch.bfloat16)
        low = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
               for k, v in on_device.items()}
        eager = model(**low)[0]
    return model, low, exact, eager


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flux", "wan", "ltx", "sd3"])
def test_backend_fuses_the_same_sites_in_bf16_on_the_gpu(name, cuda):
    """On CUDA in bf16 (the dtype these models run in) the backend fuses what the fp32 CPU test
    fuses, its compiled kernels launch, and the output stays as close to an fp32 run as eager's."""
    torch._dynamo.reset()
    model, low, exact, eager = in_bf16(name, cuda)
    keep = KeepGraphs()
    with torch.no_grad():
        fused = torch.compile(model, backend=keep)(**low)[0]
    sites = expected_sites(name, model.config)
    totals = keep.backend.report.totals()
    assert (totals["layernorm_modulate"], totals["residual_gate"], totals["qk_rmsnorm"], totals["qk_rmsnorm_rope"],
            totals["qk_rmsnorm_cat_rope"]) == (sites.modulations, sites.gates, sites.qk, sites.qk_rope, sites.qk_cat_rope)
    eager_error = (eager.double() - exact).abs().max().item()
    fused_error = (fused.double() - exact).abs().max().item()
    assert fused_error <= 1.1 * eager_error + torch.finfo(torch.bfloat16).eps * exact.abs().max().item()


class CountLaunches:
    """Stands in for a Triton kernel: counts its `kernel[grid]` launches, then launches."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def test_flux_double_blocks_run_norms_cat_and_rope_as_one_kernel(monkeypatch):
    """Flux's double blocks (FluxAttnProcessor: norm_added_q/k and norm_q/k, `cat([text, image], dim=1)`,
    `apply_rotary_emb` on the joint q and k): one qk_rmsnorm_cat_rope call per block (num_layers of
    them), through optimize() and the backend, its kernel running (interpreter), no joint-cat
    near-miss left, outputs equal the original's."""
    module = __import__("fusion_pass.ops.qk_rmsnorm_rope", fromlist=["_"])  # the RoPE kernel serves both ops
    launches = CountLaunches(module._qk_rmsnorm_rope_kernel)
    monkeypatch.setattr(module, "_qk_rmsnorm_rope_kernel", launches)
    tiny = MODELS["flux"]
    original = tiny.build()
    blocks, single_blocks = original.config.num_layers, original.config.num_single_layers
    torch._dynamo.reset()
    keep = KeepGraphs()
    with torch.no_grad(), interpret_on_cpu():
        reference = original(**tiny.inputs())[0]
        optimized = fusion_pass.optimize(copy.deepcopy(original))
        by_optimize = optimized(**tiny.inputs())[0]
        by_backend = torch.compile(copy.deepcopy(original), backend=keep)(**tiny.inputs())[0]
    # one launch a block (the single blocks' qk_rmsnorm_rope too), in each of the two runs: a joint
    # call that ran its reference instead would launch nothing
    assert launches.count == 2 * (blocks + single_blocks)
    for report in (fusion_pass.report(optimized), keep.backend.report):
        assert report.counts()["qk_rmsnorm_cat_rope"] == blocks
        assert report.families["qk_rmsnorm_cat"].near_misses == []
        assert report.families["qk_rmsnorm_cat_rope"].near_misses == []
    for out in (by_optimize, by_backend):
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.gpu
def test_optimize_fuses_sd3_q_k_pairs_in_bf16_on_the_gpu(cuda):
    """``optimize()`` on SD3 cast to bf16 (our FX capture reads the q/k norms' weight dtype, guarded):
    the q/k pairs its config has fuse, the kernels launch at bf16, and the output stays as close to
    an fp32 run as eager's."""
    import copy

    model, low, exact, eager = in_bf16("sd3", cuda)
    with torch.no_grad():
        optimized = fusion_pass.optimize(copy.deepcopy(model))
        fused = optimized(**low)[0]
    assert fusion_pass.report(optimized).totals()["qk_rmsnorm"] == expected_sites("sd3", model.config).qk
    eager_error = (eager.double() - exact).abs().max().item()
    fused_error = (fused.double() - exact).abs().max().item()
    assert fused_error <= 1.1 * eager_error + torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
