"""The ``fusion-pass`` command line: ``inspect`` on built-in configs and factory files, its
JSON, its exit statuses and one-line errors, and the lazily imported ``bench`` subcommand.

Runs ``fusion_pass.cli.main`` in-process (capsys), and once as ``python -m fusion_pass.cli``.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from fusion_pass import cli
from reference_models import CONFIGS, DiTConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
HUNYUAN3D_2_SITES = {
    "layernorm_modulate": 97, "residual_gate": 96, "qk_rmsnorm": 64, "gelu_cat": 32, "qk_rmsnorm_cat": 16,
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(err: str, *pieces: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fusion-pass: error: ")
    assert "Traceback" not in err
    for piece in pieces:
        assert piece in lines[0]


def fused_totals(data: dict) -> dict[str, int]:
    """Per family of expected_sites(), fused sites with chained ones counted toward both halves
    and each qk_rmsnorm_cat call toward the two q/k pairs it folded."""
    counts = data["counts"]
    chained = counts.get("residual_layernorm_modulate", 0)
    return {
        "layernorm_modulate": counts["layernorm_modulate"] + chained,
        "residual_gate": counts["residual_gate"] + chained,
        "qk_rmsnorm": counts["qk_rmsnorm"] + 2 * counts["qk_rmsnorm_cat"],
        "gelu_cat": counts["gelu_cat"],
        "qk_rmsnorm_cat": counts["qk_rmsnorm_cat"],
    }


def write_factory(tmp_path: Path, body: str, name: str = "factory.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# A user model outside reference_models: one adaLN-modulated LayerNorm (shift, scale from a
# [B, D] condition, spelled with [:, None]) and the inputs --check needs.
ADALN_FACTORY = """
    import torch
    from torch import nn

    class AdaLN(nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mod = nn.Linear(dim, 2 * dim)

        def forward(self, x, c):
            shift, scale = self.mod(c).chunk(2, dim=-1)
            return self.norm(x) * (1 + scale[:, None]) + shift[:, None]

    def make_model():
        return AdaLN()

    def example_inputs():
        generator = torch.Generator().manual_seed(0)
        return torch.randn(2, 5, 16, generator=generator), torch.randn(2, 16, generator=generator)
"""


# --- built-in configs ---------------------------------------------------------------------

def test_inspect_tiny_prints_the_report_and_one_line_per_expected_family(capsys):
    status, out, err = run(capsys, "inspect", "tiny")
    assert status == cli.EXIT_OK, err
    assert "fusion_pass (optimize)" in out
    assert "on meta" in out  # built-in configs default to the meta device
    assert "expected sites for tiny" in out
    expected = CONFIGS["tiny"].expected_sites()
    expected_block = out.split("expected sites for tiny")[1]
    for family, count in expected.items():
        line = next(line for line in expected_block.splitlines() if line.strip().startswith(family + " "))
        assert f"{count} / {count}" in line and "ok" in line
    assert "Traceback" not in err


def test_inspect_hunyuan3d_2_on_meta_fuses_every_expected_site(capsys):
    status, out, err = run(capsys, "inspect", "hunyuan3d-2", "--json")
    assert status == cli.EXIT_OK, err
    data = json.loads(out)
    assert CONFIGS["hunyuan3d-2"].expected_sites() == HUNYUAN3D_2_SITES
    assert fused_totals(data) == HUNYUAN3D_2_SITES
    assert {family: row["fused"] for family, row in data["expected"].items()} == HUNYUAN3D_2_SITES
    assert all(row["ok"] for row in data["expected"].values())
    assert data["model"]["device"] == "meta" and data["model"]["parameters"] > 1_000_000_000


def test_inspect_official_tiny_fuses_every_expected_site(capsys):
    status, out, err = run(capsys, "inspect", "tiny", "--official", "--json")
    assert status == cli.EXIT_OK, err
    data = json.loads(out)
    assert "official" in data["model"]["label"]
    assert fused_totals(data) == CONFIGS["tiny"].expected_sites()


def test_json_output_is_one_json_document_and_nothing_else(capsys):
    status, out, err = run(capsys, "inspect", "tiny", "--json")
    assert status == cli.EXIT_OK, err
    data = json.loads(out)  # raises on anything but exactly one document
    assert {"source", "counts", "families", "graphs", "uncaptured", "expected", "model"} <= set(data)
    assert data["source"] == "optimize"


def test_check_runs_tiny_before_and_after_and_prints_the_relative_error(capsys):
    status, out, err = run(capsys, "inspect", "tiny", "--device", "cpu", "--check")
    assert status == cli.EXIT_OK, err
    assert "max relative error" in out and "on cpu" in out

    status, out, err = run(capsys, "inspect", "tiny", "--device", "cpu", "--check", "--json")
    assert status == cli.EXIT_OK, err
    check = json.loads(out)["check"]
    assert check["ok"] and 0 <= check["max_rel_error"] <= check["tolerance"]


def test_check_above_tolerance_exits_1_with_one_line(capsys):
    status, out, err = run(capsys, "inspect", "tiny", "--device", "cpu", "--check", "--tolerance", "-1")
    assert status == cli.EXIT_SHORTFALL
    assert_one_line_error(err, "--check", "tolerance")
    assert "fusion_pass (optimize)" in out  # the report is still shown


def test_check_on_the_meta_device_is_refused(capsys):
    status, out, err = run(capsys, "inspect", "tiny", "--check")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "meta", "--device cpu")
    assert out == ""


def test_patterns_limit_the_families_and_the_expected_comparison(capsys):
    status, out, err = run(capsys, "inspect", "tiny", "--json", "--patterns", "qk_rmsnorm")
    assert status == cli.EXIT_OK, err
    data = json.loads(out)
    assert data["counts"] == {"qk_rmsnorm": CONFIGS["tiny"].expected_sites()["qk_rmsnorm"]}
    assert set(data["expected"]) == {"qk_rmsnorm"}


def test_unknown_pattern_family_is_one_line_naming_the_valid_ones(capsys):
    status, out, err = run(capsys, "inspect", "tiny", "--patterns", "layernorm_modulate,nope")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "nope", "qk_rmsnorm")


def test_counts_below_expected_exit_1_with_one_line(capsys, monkeypatch):
    real = DiTConfig.expected_sites
    monkeypatch.setattr(DiTConfig, "expected_sites", lambda self: {k: v + 1 for k, v in real(self).items()})
    status, out, err = run(capsys, "inspect", "tiny")
    assert status == cli.EXIT_SHORTFALL
    assert_one_line_error(err, "fewer sites", "qk_rmsnorm 6/7")
    assert "BELOW EXPECTED" in out


def test_unknown_model_name_exits_2_listing_the_valid_names(capsys):
    status, out, err = run(capsys, "inspect", "hunyuan3d-3")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "hunyuan3d-3", *CONFIGS, "file.py:FUNCTION")
    assert out == ""


def test_unknown_model_name_from_a_subprocess_is_one_line_without_traceback():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "fusion_pass.cli", "inspect", "no-such-model"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_USAGE
    assert done.stdout == ""
    assert_one_line_error(done.stderr, "no-such-model", "tiny")


# --- factories ----------------------------------------------------------------------------

def test_factory_returning_a_module_is_inspected_on_the_cpu(capsys, tmp_path):
    path = write_factory(tmp_path, ADALN_FACTORY)
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--json")
    assert status == cli.EXIT_OK, err
    data = json.loads(out)
    assert data["counts"]["layernorm_modulate"] == 1
    assert data["model"]["device"] == "cpu"
    assert "expected" not in data  # only built-in configs have expected counts


def test_factory_with_example_inputs_supports_check_and_strict_on_its_families(capsys, tmp_path):
    path = write_factory(tmp_path, ADALN_FACTORY)
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--check", "--strict",
                           "--patterns", "layernorm_modulate")
    assert status == cli.EXIT_OK, err
    assert "max relative error" in out


def test_factory_building_one_of_our_models_imports_from_its_own_folder(capsys, tmp_path):
    write_factory(tmp_path, "CONFIG = 'tiny'\n", name="settings_for_factory.py")
    path = write_factory(tmp_path, """
        from settings_for_factory import CONFIG
        from reference_models import build_model

        def make_model():
            return build_model(CONFIG)
    """)
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--json")
    assert status == cli.EXIT_OK, err
    assert fused_totals(json.loads(out)) == CONFIGS["tiny"].expected_sites()


def test_factory_returning_a_non_module_exits_2(capsys, tmp_path):
    path = write_factory(tmp_path, "def make_model():\n    return 42\n")
    status, out, err = run(capsys, "inspect", f"{path}:make_model")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "returned int", "torch.nn.Module")


def test_factory_file_with_a_syntax_error_exits_2(capsys, tmp_path):
    path = write_factory(tmp_path, "def make_model(:\n    pass\n")
    status, out, err = run(capsys, "inspect", f"{path}:make_model")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "cannot import", "SyntaxError")


def test_factory_file_without_the_function_exits_2_naming_what_it_defines(capsys, tmp_path):
    path = write_factory(tmp_path, "def build():\n    pass\n")
    status, out, err = run(capsys, "inspect", f"{path}:make_model")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "no function 'make_model'", "build")


def test_factory_that_raises_exits_2_with_its_message(capsys, tmp_path):
    path = write_factory(tmp_path, "def make_model():\n    raise ValueError('needs a checkpoint')\n")
    status, out, err = run(capsys, "inspect", f"{path}:make_model")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "ValueError: needs a checkpoint")


def test_missing_factory_file_and_missing_function_name_exit_2(capsys, tmp_path):
    status, _, err = run(capsys, "inspect", f"{tmp_path / 'absent.py'}:make_model")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "does not exist")
    status, _, err = run(capsys, "inspect", str(write_factory(tmp_path, "")))
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, ":make_model")


def test_strict_with_a_model_that_has_nothing_to_fuse_exits_1(capsys, tmp_path):
    path = write_factory(tmp_path, """
        from torch import nn

        def make_model():
            return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    """)
    status, out, err = run(capsys, "inspect", f"{path}:make_model")
    assert status == cli.EXIT_OK, err  # without --strict an empty report is still a report
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--strict")
    assert status == cli.EXIT_SHORTFALL
    assert_one_line_error(err, "nothing fused")
    assert "fusion_pass (optimize): 0 fused calls" in out


# --- help and bench -----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"]])
def test_help_describes_the_model_forms_and_examples(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "fusion-pass inspect hunyuan3d-2" in out
    if argv[0] == "inspect":
        assert "path/to/file.py:make_model" in out and "meta" in out and "exit status" in out
    else:
        assert "inspect" in out and "bench" in out


def test_inspect_does_not_import_the_bench_module(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "fusion_pass.bench", raising=False)
    status, _, err = run(capsys, "inspect", "tiny", "--patterns", "qk_rmsnorm")
    assert status == cli.EXIT_OK, err
    assert "fusion_pass.bench" not in sys.modules


def test_bench_without_its_module_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fusion_pass.bench", None)  # import fails as if absent
    status, _, err = run(capsys, "bench")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "bench", "not available")


def test_bench_parses_its_options_with_the_bench_module_and_returns_its_status(capsys, monkeypatch):
    seen = {}

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--steps", type=int, default=1, help="timed steps")

    def run_bench(args: argparse.Namespace) -> int:
        seen["steps"] = args.steps
        return 3

    fake = types.ModuleType("fusion_pass.bench")
    fake.add_arguments, fake.run = add_arguments, run_bench
    monkeypatch.setitem(sys.modules, "fusion_pass.bench", fake)
    assert cli.main(["bench", "--steps", "7"]) == 3
    assert seen == {"steps": 7}
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "timed steps" in capsys.readouterr().out


# --- what a new user trips over (issue 15) --------------------------------------------------

# The same model, with example_inputs() as users write it: unseeded, new numbers every call.
UNSEEDED_FACTORY = ADALN_FACTORY.replace(
    "generator = torch.Generator().manual_seed(0)\n", "").replace(", generator=generator", "")


def test_check_with_an_unseeded_example_inputs_compares_outputs_of_the_same_inputs(capsys, tmp_path):
    path = write_factory(tmp_path, UNSEEDED_FACTORY)
    assert "manual_seed" not in path.read_text()
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--check", "--json")
    assert status == cli.EXIT_OK, err
    check = json.loads(out)["check"]
    assert check["ok"] and check["max_rel_error"] <= 1e-6  # CPU: the fused op runs its exact reference


def test_strict_passes_when_every_family_with_a_candidate_fused(capsys, tmp_path):
    # The model has one adaLN modulation and nothing of the other families (no gate, no q/k
    # norm, no GELU + cat): those have no candidate, which is not a failure.
    path = write_factory(tmp_path, ADALN_FACTORY)
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--strict")
    assert status == cli.EXIT_OK, err


def test_strict_fails_when_a_family_has_candidates_but_fused_none_naming_the_reason(capsys, tmp_path):
    # `norm(x) * scale + shift`: a modulation without the `1 +`, layernorm_modulate's near-miss.
    path = write_factory(tmp_path, ADALN_FACTORY.replace("(1 + scale[:, None])", "scale[:, None]"))
    status, out, err = run(capsys, "inspect", f"{path}:make_model")
    assert status == cli.EXIT_OK, err
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--strict")
    assert status == cli.EXIT_SHORTFALL
    assert_one_line_error(err, "layernorm_modulate fused none of its 1 candidates", "norm")


def test_strict_means_the_same_in_optimize_and_the_cli(capsys, tmp_path):
    import fusion_pass
    from fusion_pass.report import Report

    path = write_factory(tmp_path, ADALN_FACTORY.replace("(1 + scale[:, None])", "scale[:, None]"))
    status, _, err = run(capsys, "inspect", f"{path}:make_model", "--strict")
    spec = importlib.util.spec_from_file_location("strict_factory", path)
    factory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(factory)
    model = factory.make_model()
    with pytest.raises(fusion_pass.NothingFused) as raised:
        fusion_pass.optimize(model, strict=True)
    assert isinstance(fusion_pass.report(model), Report)
    assert str(raised.value) in err  # the CLI says exactly what optimize(strict=True) raises


def test_help_and_version_do_not_import_torch():
    code = textwrap.dedent("""
        import contextlib, io, sys
        from fusion_pass import cli
        for argv in (["--help"], ["--version"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    cli.main(argv)
                except SystemExit as exit_:
                    assert exit_.code == 0, exit_.code
            assert out.getvalue().strip(), argv
        print(sorted(name for name in ("torch", "triton", "reference_models", "patterns", "fusion_pass.api")
                     if name in sys.modules))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def module_names_in(text: str, roots: tuple[str, ...]) -> list[str]:
    """Dotted names in ``text`` that start like one of the model's top-level modules."""
    return [token for token in re.findall(r"[A-Za-z_][\w.]*\w", text) if token.split(".")[0] in roots]


def test_module_names_are_never_split_at_80_columns(capsys, monkeypatch):
    from reference_models import load_official

    monkeypatch.setenv("COLUMNS", "80")  # what rich reads for the width of a pipe or a terminal
    status, out, err = run(capsys, "inspect", "hunyuan3d-2", "--official")
    assert status == cli.EXIT_OK, err
    assert max(len(line) for line in out.splitlines()) <= 80
    modules = {name for name, _ in load_official("hunyuan3d-2", device="meta").named_modules()}
    roots = tuple({name.split(".")[0] for name in modules if name})
    shown = module_names_in(out, roots)
    assert len(shown) >= 20  # first sites of each family and the uncaptured modules
    assert [name for name in shown if name not in modules] == []


def test_check_shows_progress_on_a_terminal_and_nothing_in_a_pipe(capsys, monkeypatch, tmp_path):
    from rich.console import Console

    path = write_factory(tmp_path, ADALN_FACTORY)
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--check")
    assert status == cli.EXIT_OK and err == ""  # not a terminal: silent
    terminal = io.StringIO()
    monkeypatch.setattr(cli, "progress_console", lambda: Console(file=terminal, force_terminal=True, width=80))
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--check")
    assert status == cli.EXIT_OK, err
    shown = terminal.getvalue()
    for step in ("building", "running the model before", "optimize", "running the model after"):
        assert step in shown, shown
    terminal.truncate(0)
    status, out, err = run(capsys, "inspect", f"{path}:make_model", "--check", "--json")
    assert status == cli.EXIT_OK and terminal.getvalue() == ""  # --json: machines read stdout, no progress


def test_bench_writes_to_its_own_folder_quietly_and_names_only_the_files_it_wrote(tmp_path):
    # A run from some folder without --out, on the CPU, where matplotlib cannot be imported.
    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('matplotlib is hidden by the test')\n")
    work = tmp_path / "work"
    work.mkdir()
    path = os.pathsep.join(filter(None, [str(tmp_path / "stub"), str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "fusion_pass.cli", "bench", "--allow-cpu", "--configs", "tiny", "--dtypes", "float32",
         "--modes", "eager", "--latent-tokens", "8", "--cond-tokens", "4", "--warmup", "1", "--repeat", "1"],
        cwd=work, env=dict(os.environ, PYTHONPATH=path, COLUMNS="200"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = work / "fusion_pass_bench"  # the default --out: a folder of its own in the current one
    assert (out / "bench.json").is_file() and not (out / "bench.png").exists()
    wrote = next(line for line in done.stdout.splitlines() if "wrote" in line)
    assert "bench.json" in wrote and "bench.png" not in wrote
    assert "USDT" not in done.stdout + done.stderr  # the torch profiler's own log lines


# --- diffusers:NAME (reference_models/diffusers_tiny.py) ------------------------------------

@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_inspect_a_tiny_diffusers_model_with_check_fuses_its_sites(capsys, name):
    """``diffusers:NAME`` builds the tiny config on the CPU; --check's first call captures its blocks,
    so the report counts the sites of the model's code (``expected_sites``, from its config)."""
    pytest.importorskip("diffusers")
    from reference_models.diffusers_tiny import MODELS, expected_sites

    status, out, err = run(capsys, "inspect", f"diffusers:{name}", "--check", "--json")
    assert status == cli.EXIT_OK, err
    report = json.loads(out)
    sites = expected_sites(name, MODELS[name].build().config)
    totals = report["totals"]
    assert (totals["layernorm_modulate"], totals["residual_gate"], totals["qk_rmsnorm"]) == \
        (sites.modulations, sites.gates, sites.qk)
    assert report["check"]["ok"] and report["pending"] == []


def test_unknown_diffusers_model_and_the_meta_device_exit_2(capsys):
    pytest.importorskip("diffusers")
    from reference_models.diffusers_tiny import MODELS

    status, out, err = run(capsys, "inspect", "diffusers:nope")
    assert status == cli.EXIT_USAGE and out == ""
    assert_one_line_error(err, "nope", *MODELS)
    status, out, err = run(capsys, "inspect", "diffusers:flux", "--device", "meta")
    assert status == cli.EXIT_USAGE
    assert_one_line_error(err, "--device cpu")


# One adaLN modulation `width` wide (shift and scale are inputs: no weights to build) and its inputs.
WIDE_ADALN_FACTORY = """
    import torch
    from torch import nn

    WIDTH = {width}

    class AdaLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(WIDTH, elementwise_affine=False, eps=1e-6)

        def forward(self, x, shift, scale):
            return self.norm(x) * (1 + scale) + shift

    def make_model():
        return AdaLN()

    def example_inputs():
        generator = torch.Generator().manual_seed(0)
        return tuple(torch.randn(*shape, generator=generator) for shape in ((1, 2, WIDTH), (1, 1, WIDTH), (1, 1, WIDTH)))
"""


def test_check_reports_a_fused_op_that_declined_its_kernel(capsys, tmp_path, fresh_reference_runs):
    """A row wider than MAX_BLOCK: the site fuses, but its LayerNorm kernel declines it at run time
    (CPU tensors under the Triton interpreter take the kernels, as CUDA tensors do)."""
    from fusion_pass.ops import MAX_BLOCK, interpret_on_cpu

    path = write_factory(tmp_path, WIDE_ADALN_FACTORY.format(width=MAX_BLOCK + 8))
    with interpret_on_cpu():
        status, out, err = run(capsys, "inspect", f"{path}:make_model", "--check", "--json")
        assert status == cli.EXIT_OK, err
        (declined,) = json.loads(out)["reference_runs"]
        assert (declined["op"], declined["where"]) == ("layernorm_scale_shift", "<root>")
        assert "MAX_BLOCK" in declined["reason"]
        fresh_reference_runs.forget()  # the rendered report of a second run, recording anew
        status, out, err = run(capsys, "inspect", f"{path}:make_model", "--check")
    assert status == cli.EXIT_OK, err
    assert re.search(r"kernel declined on 1 fused ops.*\n\s+layernorm_scale_shift: <root>: rows of", out)


def test_check_reports_no_decline_where_the_kernel_ran(capsys, tmp_path, fresh_reference_runs):
    from fusion_pass.ops import interpret_on_cpu

    path = write_factory(tmp_path, WIDE_ADALN_FACTORY.format(width=16))
    with interpret_on_cpu():
        status, out, err = run(capsys, "inspect", f"{path}:make_model", "--check", "--json")
    assert status == cli.EXIT_OK, err
    assert json.loads(out)["reference_runs"] == []
