"""Every kernel specialisation that the reference models launch compiles for the H200 (sm_90), checked on
the CPU: Triton compiles for a target without its GPU (with the ptxas its wheel bundles), while the
interpreter that runs our kernels in the other CPU tests accepts code the compiler rejects (a value of
another type in each branch of an `if`, say). Launches are recorded, not made
(`fusion_pass.bench.kernel_specs`), on models of the real widths with uninitialised weights and few tokens:
a kernel's block sizes, warps and switches follow from widths, dtypes and layouts, not token counts."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import fusion_pass
from fusion_pass.bench.kernel_specs import compile_in_subprocess, record_launches
from ops_testing import KERNELS

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches under the Triton interpreter (a GPU is present: the gpu tests launch them)")


def _hunyuan3d2(dtype):
    from reference_models import example_inputs, load_official

    model = load_official("hunyuan3d-2", device="meta", dtype=dtype).to_empty(device="cpu").eval()
    inputs = example_inputs("hunyuan3d-2", latents=16, cond_tokens=10, dtype=dtype, seed=0)
    return model, lambda m: inputs.call(m)


def _flux_dev_widths(dtype):
    """Flux-dev's widths (3072 hidden, 24 heads of 128, a 12288-wide MLP) with one block of each kind."""
    import diffusers

    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    model = model.to(dtype).to_empty(device="cpu").eval()
    image, text = 16, 8
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, image, 64, generator=gen).to(dtype),
                  encoder_hidden_states=torch.randn(1, text, 4096, generator=gen).to(dtype),
                  pooled_projections=torch.randn(1, 768, generator=gen).to(dtype), timestep=torch.tensor([0.5], dtype=dtype),
                  guidance=torch.tensor([3.5], dtype=dtype), img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(text, 3),
                  return_dict=False)
    return model, lambda m: m(**inputs)


def _tiny_diffusers(dtype):
    from reference_models.diffusers_tiny import MODELS, cast_inputs

    models = {name: tiny.build().to(dtype) for name, tiny in MODELS.items()}
    inputs = {name: cast_inputs(tiny.inputs(), dtype) for name, tiny in MODELS.items()}
    return models, lambda ms: [ms[name](**inputs[name]) for name in ms]


def _record(build, dtype) -> list[dict]:
    model, call = build(dtype)
    with torch.no_grad():
        for m in (model.values() if isinstance(model, dict) else (model,)):
            fusion_pass.optimize(m)
        return record_launches(lambda: call(model))


@pytest.fixture(scope="module")
def launches() -> list[dict]:
    pytest.importorskip("diffusers")
    recorded = []
    for build, dtype in ((_hunyuan3d2, torch.float16), (_hunyuan3d2, torch.bfloat16), (_flux_dev_widths, torch.bfloat16),
                         (_tiny_diffusers, torch.float16)):
        recorded += _record(build, dtype)
    return recorded


def test_every_recorded_specialisation_compiles_for_sm90(launches, tmp_path):
    # and qk_rmsnorm_cat's one-body-per-stream form (ONE_BODY False: streams of different dtypes or column
    # strides), which the models' streams, alike, never take
    two_bodies = [{**launch, "constexprs": {**launch["constexprs"], "ONE_BODY": False}}
                  for launch in launches if launch["constexprs"].get("ONE_BODY")]
    assert two_bodies
    compiled = [*launches, *two_bodies]
    results = compile_in_subprocess(compiled, workers=2, cache_dir=str(tmp_path))["results"]
    failed = [(launch["name"], launch["constexprs"], result["error"])
              for launch, result in zip(compiled, results) if "error" in result]
    assert not failed
    assert all(result["ptx_lines"] > 0 for result in results)


def test_the_models_launch_every_fused_kernel(launches):
    # every kernel of fusion_pass.ops is compiled above: the models' code holds a site of each (Hunyuan3D-2's
    # adaLN, gates, q/k RMSNorm, joint cat and GELU + cat; Flux's q/k RMSNorm + RoPE; CogVideoX's q/k LayerNorm)
    assert {launch["name"] for launch in launches} == {name for _, name in KERNELS}
