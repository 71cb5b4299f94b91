"""fusion_pass.bench on the CPU: the smoke run CI can afford writes every file, with finite numbers
and float32-exact outputs. The real measurements need the H200 (scripts/gpu_run.sh)."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from fusion_pass import bench

SMOKE_MODES = ("eager", "optimize", "backend-eager")
# tiny config, fewer tokens still: fused kernels run in the Triton interpreter here
SMOKE_ARGS = ("--allow-cpu", "--configs", "tiny", "--dtypes", "float32", "--modes", ",".join(SMOKE_MODES),
              "--latent-tokens", "8", "--cond-tokens", "4", "--warmup", "1", "--repeat", "2")


def _run(out, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.run(parser.parse_args([*SMOKE_ARGS, "--out", str(out), *extra]))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = _run(out)
    return status, out, json.loads((out / "bench.json").read_text())


def _group(results):
    (group,) = results["groups"]
    return group


def test_smoke_run_completes_with_status_zero(smoke):
    status, _, results = smoke
    assert status == 0
    assert results["status"] == "complete"


def test_json_has_every_requested_mode_with_finite_figures(smoke):
    _, _, results = smoke
    group = _group(results)
    assert (group["config"], group["dtype"]) == ("tiny", "float32")
    assert set(group["modes"]) == set(SMOKE_MODES)
    for mode, record in group["modes"].items():
        assert record["status"] == "ok", (mode, record.get("error"))
        figures = [record["step_ms"]["median"], record["step_ms"]["p10"], record["step_ms"]["p90"],
                   record["setup_s"], record["err_vs_eager"], record["err_vs_fp32"], record["profile"]["kernel_ms"]]
        assert all(isinstance(x, (int, float)) and math.isfinite(x) for x in figures), (mode, figures)
        assert record["step_ms"]["n"] == 2
        assert record["profile"]["kernels"] > 0


def test_float32_modes_match_eager_and_the_float32_reference(smoke):
    _, _, results = smoke
    for mode, record in _group(results)["modes"].items():
        assert record["err_vs_eager"] < 1e-5, mode
        assert record["err_vs_fp32"] < 1e-5, mode


def test_fused_modes_report_every_expected_site(smoke):
    _, _, results = smoke
    modes = _group(results)["modes"]
    for mode in ("optimize", "backend-eager"):
        fused = modes[mode]["fusion"]["fused_vs_expected"]
        for family, ratio in fused.items():
            done, expected = map(int, ratio.split("/"))
            assert done == expected, (mode, family, ratio)


def test_markdown_profiles_and_targets_are_written(smoke):
    _, out, results = smoke
    assert "| eager |" in (out / "bench.md").read_text()
    for mode in ("eager", "optimize"):
        assert f"tiny/float32 / {mode}" in (out / f"profile_{mode}.txt").read_text()
    assert {t["status"] for t in results["targets"]} <= {"PASS", "MISS", "n/a"}
    assert {p.name for p in out.iterdir()} <= set(bench.FILES)


def test_environment_and_argv_are_recorded(smoke):
    _, _, results = smoke
    assert results["env"]["torch"] == torch.__version__
    assert results["env"]["python"] and results["env"]["date"]
    assert isinstance(results["argv"], list)


def test_end_to_end_denoising_reports_time_and_error(tmp_path):
    status = _run(tmp_path, "--modes", "eager", "--e2e", "all", "--e2e-steps", "2")
    e2e = _group(json.loads((tmp_path / "bench.json").read_text()))["e2e"]
    assert status == 0 and e2e["status"] == "ok"
    eager = e2e["modes"]["eager"]
    assert math.isfinite(eager["total_s"]) and eager["err_vs_eager"] == 0.0
    assert eager["err_vs_fp32"] < 1e-5


def test_without_cuda_the_bench_stops_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--out", str(tmp_path)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [line for line in err if "bench needs a CUDA GPU" in line] and len(err) == 1
    assert not any(tmp_path.iterdir())


def test_an_unknown_mode_is_a_usage_error(tmp_path, capsys):
    assert _run(tmp_path, "--modes", "eager,turbo") == 2
    assert "unknown mode 'turbo'" in capsys.readouterr().err


def test_lever_mode_is_measured_against_its_base_and_mode_globs_limit_groups(tmp_path):
    """``optimize+levers`` runs optimize() with the opt-in families too (``linear_gelu`` fuses the
    tiny config's two double blocks' two MLPs); ``MODE@GLOB`` drops a mode from other groups."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = [arg for arg in SMOKE_ARGS]
    args[args.index("--modes") + 1] = "optimize,optimize+levers@tiny/float32,backend-eager@nothing/*"
    assert bench.run(parser.parse_args([*args, "--no-profile", "--out", str(tmp_path)])) == 0
    group = _group(json.loads((tmp_path / "bench.json").read_text()))
    assert set(group["modes"]) == {"optimize", "optimize+levers"}
    assert group["modes"]["optimize+levers"]["fusion"]["counts"]["linear_gelu"] == 4  # 2 MLPs x 2 double blocks
    assert group["modes"]["optimize+levers"]["err_vs_eager"] == 0.0  # the CPU runs the unfused expressions
    assert "Levers (opt-in families)" in (tmp_path / "bench.md").read_text()
