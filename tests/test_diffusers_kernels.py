"""The fused ops of the ten tiny diffusers transformers take their kernels (Triton interpreter),
none declining into its PyTorch reference: the layouts these models pass the ops (views, strides,
broadcast operands, RoPE tables) are the kernels'. Widths are `tests/ops/test_model_widths.py`'s."""
from __future__ import annotations

import os
from importlib import import_module

import pytest
import torch

pytest.importorskip("diffusers", reason="the test extras install diffusers==0.42.1")

import fusion_pass  # noqa: E402
from fusion_pass.ops import interpret_on_cpu  # noqa: E402
from reference_models.diffusers_tiny import MODELS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# The op modules that launch kernels (the others call into these).
LAUNCHING = ("layernorm_modulate", "qk_rmsnorm", "qk_rmsnorm_cat", "qk_rmsnorm_rope", "qk_layernorm", "gelu_cat")


@pytest.fixture
def kernel_launches(monkeypatch) -> list:
    """One entry per fused kernel launch during the test."""
    launched = []
    for name in LAUNCHING:
        module = import_module(f"fusion_pass.ops.{name}")

        def counting(*args, launch=module.launch_kernel, **kwargs):
            launched.append(args[0])
            return launch(*args, **kwargs)

        monkeypatch.setattr(module, "launch_kernel", counting)
    return launched


@pytest.mark.parametrize("name", list(MODELS))
def test_every_fused_call_of_an_optimized_model_launches_its_kernel(name, fresh_reference_runs, kernel_launches):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (a GPU is present)")
    tiny = MODELS[name]
    model = fusion_pass.optimize(tiny.build())
    with torch.no_grad(), interpret_on_cpu():
        model(**tiny.inputs())  # blocks compiled by Dynamo are captured on their first call
        kernel_launches.clear()
        model(**tiny.inputs())
    report = fusion_pass.report(model)
    assert [(run.op, run.where, run.reason) for run in report.reference_runs] == []
    assert len(kernel_launches) == sum(report.counts().values()) > 0  # one launch per fused call
