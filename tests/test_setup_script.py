"""``scripts/setup.sh`` (what ``make demo`` and ``make test`` run first) installs once: a second
run with the same pyproject.toml and constraints.txt skips pip, a changed one installs again.

The venv here is a stand-in whose ``python`` logs its calls and fakes pip and imports, so
the test installs nothing and needs no network."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
if [ "$1 $2" = "-m pip" ]; then
  printf '#!/bin/sh\\n' > "$(dirname "$0")/fusion-pass"; chmod +x "$(dirname "$0")/fusion-pass"
fi
exit 0
"""


def setup_run(venv: Path) -> list[str]:
    """The pip calls one run of setup.sh made."""
    log = venv / "calls.log"
    log.unlink(missing_ok=True)
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "setup.sh")], env=dict(os.environ, VENV=str(venv)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line for line in (log.read_text().splitlines() if log.exists() else []) if line.startswith("-m pip")]


def test_setup_installs_once_and_again_only_when_the_project_files_change(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)

    first = setup_run(venv)
    assert any("-e .[test]" in call for call in first), first
    assert setup_run(venv) == []  # installed from the same files: pip is not run at all

    stamp = next(venv.glob(".fusion-pass-installed"))
    stamp.write_text("0 0\n")  # as if pyproject.toml had changed since
    assert any("-e .[test]" in call for call in setup_run(venv))
