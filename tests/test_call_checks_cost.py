"""What the per-call checks of an installed graph cost (README, "What is checked on every call").

On the CPU the structure is asserted (the guard covers every inlined module of Hunyuan3D-2, one
list comparison); the time budget (under 1 % of a Hunyuan3D-2 step) is asserted on the H200,
where the step is real. The CPU cost, measured on the 2-core CI machine: 225-250 us a call.
"""
import time

import pytest
import torch

import fusion_pass
from reference_models import example_inputs, get_config, load_official


def installed_root(model):
    return model.__dict__["forward"]


def checks_seconds(forward, args, kwargs, repeats=200) -> float:
    """Seconds per call of everything the installed forward checks before running its graph."""
    start = time.perf_counter()
    for _ in range(repeats):
        forward.guard.holds()
        forward.signature.required_values(args, kwargs)
    return (time.perf_counter() - start) / repeats


def test_the_hunyuan3d_2_guard_covers_every_inlined_module_and_holds():
    model = fusion_pass.optimize(load_official("hunyuan3d-2", device="meta"))
    guard = installed_root(model).guard
    # the whole model is one graph inlining every module but the Modulations (2 per double block,
    # 1 per single block), which the graph calls as modules (their star-unpack does not trace),
    # each with its Linear
    config = get_config("hunyuan3d-2")
    modulations = 2 * config.depth + config.depth_single_blocks
    assert guard.modules == len(list(model.modules())) - 2 * modulations
    assert guard.holds()
    model.double_blocks[3].img_norm1.eps = 1e-5
    assert not guard.holds()
    assert guard.describe() == "LayerNorm.eps of double_blocks.3.img_norm1 changed 1e-06 -> 1e-05"


@pytest.mark.gpu
def test_the_checks_cost_under_one_percent_of_a_hunyuan3d_2_step(cuda):
    torch.manual_seed(0)
    model = fusion_pass.optimize(load_official("hunyuan3d-2", device=cuda, dtype=torch.float16).eval())
    inputs = example_inputs("hunyuan3d-2", device=cuda, dtype=torch.float16, seed=0)
    with torch.no_grad():
        for _ in range(3):
            inputs.call(model)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            inputs.call(model)
        torch.cuda.synchronize()
    step = (time.perf_counter() - start) / 10
    checks = checks_seconds(installed_root(model), inputs.args, inputs.kwargs)
    assert fusion_pass.report(model).fallbacks == []
    assert checks < 0.01 * step, f"checks {checks * 1e6:.0f} us, step {step * 1e3:.1f} ms"
