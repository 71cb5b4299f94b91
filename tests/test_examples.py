"""The scripts in ``examples/`` run on the CPU with the tiny config and say what they show."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    if str(EXAMPLES) not in sys.path:  # as when run as a script: `common` sits beside them
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra", [[], ["--official"]], ids=["ours", "official"])
def test_optimize_example_matches_the_original_and_round_trips_the_state_dict(capsys, extra):
    example = load_example("optimize_hunyuan3d")
    assert example.main(["--config", "tiny", "--device", "cpu", *extra]) == 0
    out = capsys.readouterr().out
    assert "fusion_pass (optimize)" in out
    assert "max relative error vs the unoptimized model" in out
    assert "state_dict round trip" in out and "same keys as the original: True" in out
    assert "TOO LARGE" not in out and "FAILED" not in out


def test_compile_example_fuses_with_the_eager_inner_compiler_on_the_cpu(capsys):
    example = load_example("compile_backend")
    assert example.main(["--config", "tiny", "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo rich's line wrapping
    assert "fusion_pass (backend)" in out
    assert 'fusion_pass.backend(inner="eager")' in out
    assert "layernorm_modulate 11/11, residual_gate 10/10, qk_rmsnorm 6/6" in out
    assert "max relative error vs eager" in out
    assert 'backend="fusion_pass" (inner "inductor") skipped' in out


def test_flow_matching_example_samples_the_same_latents_with_the_optimized_model(capsys):
    example = load_example("sample_flow_matching")
    assert example.main(["--config", "tiny", "--device", "cpu", "--steps", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "3 steps, CFG batch 2, float32 on cpu" in out
    assert "original" in out and "optimized" in out and "ms/step" in out
    assert "final latents: max relative error" in out and ": ok" in out
