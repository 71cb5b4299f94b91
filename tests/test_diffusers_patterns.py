"""The pattern families on ten diffusers transformers, through the compile backend (Dynamo's
whole-model graphs): per-family counts derived from each model's code and config, the fused ops
in the graph, the unfused norms gone, outputs equal (fp32).

Site counts come from diffusers 0.42.1 (``diffusers/models/transformers/*``); each expectation
says where. ``modulations`` are ``norm(x) * (1 + scale) + shift`` of a LayerNorm, ``gates`` are
``x + gate * f(...)``, ``qk`` are q/k RMSNorm pairs feeding one attention; ``norms_left`` counts the
LayerNorm/RMSNorm calls the model makes that are none of these sites (they stay in the graph).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers", reason="the test extras install diffusers==0.42.1")

import fusion_pass  # noqa: E402
from fusion_pass.ops.direct import direct_call  # noqa: E402
from fusion_pass.registry import FUSED_OPS  # noqa: E402
from tests import diffusers_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Sites:
    modulations: int
    gates: int
    qk: int
    norms_left: int  # LayerNorm / RMSNorm calls that are not part of any site above
    unsupported: dict  # family -> sites in the code no fused op covers yet (counted in norms_left)


def expected(name: str, config) -> Sites:
    c = config
    if name == "flux":
        # FluxTransformerBlock: norm1 + norm1_context (AdaLayerNormZero) and the two norm2 modulations
        # `norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]`; 4 gates (attn, ff, context attn,
        # context ff); q/k pairs: norm_q/norm_k and norm_added_q/norm_added_k. FluxSingleTransformerBlock:
        # 1 modulation (AdaLayerNormZeroSingle), 1 gate, 1 q/k pair. norm_out: AdaLayerNormContinuous.
        return Sites(4 * c.num_layers + c.num_single_layers + 1, 4 * c.num_layers + c.num_single_layers,
                     2 * c.num_layers + c.num_single_layers, 0, {})
    if name == "sd3":
        # JointTransformerBlock: norm1 (SD35AdaLayerNormZeroX: one LayerNorm, two modulations, in dual-attention
        # layers; AdaLayerNormZero otherwise), norm1_context (AdaLayerNormZero, or AdaLayerNormContinuous in the
        # last, context_pre_only block), norm2, and norm2_context unless context_pre_only. Gates: gate_msa,
        # gate_msa2 (dual), gate_mlp, and c_gate_msa + c_gate_mlp unless context_pre_only. q/k pairs
        # (qk_norm="rms_norm", diffusers RMSNorm): attn's image and added pairs, attn2's one pair (dual).
        dual, pre_only, layers = len(c.dual_attention_layers), 1, c.num_layers
        return Sites(layers * 3 + dual + (layers - pre_only) + 1, layers * 2 + dual + 2 * (layers - pre_only),
                     2 * layers + dual, 0, {})
    if name == "wan":
        # WanTransformerBlock: norm1 and norm3 modulated (FP32LayerNorm, cast to fp32 and back), norm2 the
        # affine cross-attention norm (unmodulated); gates on attn1 and ffn; q/k pairs of attn1 and attn2
        # (qk_norm="rms_norm_across_heads": one RMSNorm over all heads). norm_out: FP32LayerNorm modulated.
        return Sites(2 * c.num_layers + 1, 2 * c.num_layers, 2 * c.num_layers, c.num_layers, {})
    if name == "hunyuan_video":
        # HunyuanVideoTransformerBlock: 4 modulations, 4 gates, 2 q/k pairs (image and added); single block:
        # 1 modulation, 1 gate, 1 q/k pair; the token refiner's blocks: 2 gates (HunyuanVideoAdaNorm) after
        # two unmodulated affine LayerNorms, attention without q/k norms. norm_out: AdaLayerNormContinuous.
        return Sites(4 * c.num_layers + c.num_single_layers + 1,
                     4 * c.num_layers + c.num_single_layers + 2 * c.num_refiner_layers,
                     2 * c.num_layers + c.num_single_layers, 2 * c.num_refiner_layers, {})
    if name == "cogvideox":
        # CogVideoXBlock: norm1 and norm2 (CogVideoXLayerNormZero: `norm(x) * (1 + scale)[:, None, :] + shift`
        # on the video and the text stream each), 4 gates; q/k LayerNorms (qk_layernorm: no fused op yet).
        # norm_final (affine LayerNorm, unmodulated); norm_out: AdaLayerNorm `(1 + scale)[:, None, :]`.
        return Sites(4 * c.num_layers + 1, 4 * c.num_layers, 0, 1 + 2 * c.num_layers,
                     {"qk_layernorm": c.num_layers})
    if name == "ltx":
        # LTXVideoTransformerBlock: norm1/norm2 are RMSNorms modulated `norm(x) * (1 + scale) + shift`
        # (rms modulation: no fused op yet), gates on attn1 and ff, q/k pairs of attn1 and attn2
        # (rms_norm_across_heads). norm_out: LayerNorm `* (1 + scale) + shift`.
        return Sites(1, 2 * c.num_layers, 2 * c.num_layers, 2 * c.num_layers, {"rms_modulate": 2 * c.num_layers})
    if name == "sana":
        # SanaTransformerBlock: norm1, norm2 modulated, 2 gates, no q/k norms (qk_norm=None);
        # caption_norm (RMSNorm on the text input); norm_out: SanaModulatedNorm.
        return Sites(2 * c.num_layers + 1, 2 * c.num_layers, 0, 1, {})
    if name in ("pixart", "dit"):
        # BasicTransformerBlock (ada_norm_single / ada_norm_zero): norm1 and norm2 modulated, 2 gates,
        # no q/k norms; the output norm modulated (`norm_out(x) * (1 + scale) + shift`).
        return Sites(2 * c.num_layers + 1, 2 * c.num_layers, 0, 0, {})
    if name == "qwen_image":
        # QwenImageTransformerBlock: img/txt norm1 and norm2 modulated (4), 4 gates, q/k pairs: image and
        # added (QwenDoubleStreamAttnProcessor2_0, diffusers RMSNorm); txt_norm (RMSNorm on the text input);
        # norm_out: AdaLayerNormContinuous.
        return Sites(4 * c.num_layers + 1, 4 * c.num_layers, 2 * c.num_layers, 1, {})
    raise KeyError(name)


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
    model, inputs = diffusers_models.build(name)
    with torch.no_grad():
        reference = model(**inputs)[0]
        keep = KeepGraphs()
        out = torch.compile(model, backend=keep)(**inputs)[0]
    return model, reference, out, keep


@pytest.mark.parametrize("name", list(diffusers_models.BUILDERS))
def test_backend_fuses_every_site_the_model_code_has(name):
    model, reference, out, keep = _run(name)
    sites = expected(name, model.config)
    totals = keep.backend.report.totals()
    assert (totals["layernorm_modulate"], totals["residual_gate"], totals["qk_rmsnorm"]) == (
        sites.modulations, sites.gates, sites.qk)
    calls = {key: 0 for key in FUSED_OPS}
    norms_left = 0
    for graph in keep.graphs:
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _FUSED_TARGETS:
                calls[_FUSED_TARGETS[node.target]] += 1
            norms_left += node.op == "call_function" and node.target in _NORMS
    counts = keep.backend.report.counts()
    assert {key: calls[FUSED_OPS[key].key] for key in ("layernorm_scale_shift", "residual_gate", "qk_rmsnorm")} == {
        "layernorm_scale_shift": counts["layernorm_modulate"], "residual_gate": counts["residual_gate"],
        "qk_rmsnorm": counts["qk_rmsnorm"]}
    assert calls["residual_gate_layernorm_scale_shift"] == counts["residual_layernorm_modulate"]
    assert norms_left == sites.norms_left
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
