"""What the per-call checks of an installed graph cost (README, "What is checked on every call").

The structure is asserted here (the guard covers every inlined module of Hunyuan3D-2, one list
comparison); what it costs against a step is a benchmark, not a timed test:
``benchmarks/call_checks_bench.py`` (H200 result in docs/bench/).
"""
import fusion_pass
from reference_models import load_official


def installed_root(model):
    return model.__dict__["forward"]


def test_the_hunyuan3d_2_guard_covers_every_inlined_module_and_holds():
    model = fusion_pass.optimize(load_official("hunyuan3d-2", device="meta"))
    guard = installed_root(model).guard
    # the whole model is one graph that inlines every module (the Modulations' star-unpacked
    # chunks are followed under a chunk-count assumption), so the guard watches all of them
    assert guard.modules == len(list(model.modules()))
    assert guard.holds()
    model.double_blocks[3].img_norm1.eps = 1e-5
    assert not guard.holds()
    assert guard.describe() == "LayerNorm.eps of double_blocks.3.img_norm1 changed 1e-06 -> 1e-05"
