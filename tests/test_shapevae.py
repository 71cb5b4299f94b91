"""hy3dgen's ShapeVAE transformer (pre-LN attention blocks with LayerNorm q/k norms), loaded by file
path from the installed ``hy3dgen==2.0.2`` wheel: its residual adds feeding the next LayerNorm
(``residual_layernorm``) and its q/k LayerNorms (``qk_layernorm``) fuse, through ``optimize()`` and
the compile backend, outputs exact.

Loaded as ``reference_models.shapevae`` loads it (a private package with a logger-only ``utils``:
the wheel's package ``__init__``s import pymeshlab, trimesh, cv2, diffusers and transformers).
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import fusion_pass
from reference_models.shapevae import autoencoder_module

pytestmark = pytest.mark.usefixtures("one_thread")


def attention_blocks():
    if importlib.util.find_spec("hy3dgen") is None:
        pytest.skip("needs hy3dgen (pip install --no-deps hy3dgen==2.0.2)")
    return autoencoder_module("attention_blocks")


LAYERS = 3


def transformer():
    torch.manual_seed(0)
    model = attention_blocks().Transformer(n_ctx=8, width=32, layers=LAYERS, heads=2, qk_norm=True).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 1:
                param.normal_(1, 0.2)  # LayerNorm weights off their default of ones
    return model, torch.randn(2, 8, 32)


# ResidualAttentionBlock.forward: `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`: every residual add
# feeds a LayerNorm (ln_2, or the next block's ln_1) but the last block's second; QKVMultiheadAttention
# (qk_norm=True): one q/k LayerNorm pair per block.
SITES = {"residual_layernorm": 2 * LAYERS - 1, "qk_layernorm": LAYERS}


def test_shapevae_residuals_feeding_layernorms_fuse_through_the_backend():
    model, x = transformer()
    backend = fusion_pass.backend(inner="eager")
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend=backend)(x)
    assert {k: v for k, v in backend.report.totals().items() if v} == SITES
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shapevae_residuals_feeding_layernorms_fuse_through_optimize():
    model, x = transformer()
    with torch.no_grad():
        expected = model(x)
        optimized = fusion_pass.optimize(copy.deepcopy(model))
        got = optimized(x)
    assert {k: v for k, v in fusion_pass.report(optimized).totals().items() if v} == SITES
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
