#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install fusion-pass in editable
# mode with its test extras. Never replaces a torch that the environment already has.
# Once installed, a stamp in the venv (a hash of pyproject.toml and constraints.txt) makes the
# next run skip pip altogether (~10 s); editing either file, or deleting the stamp, reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.fusion-pass-installed"
WANT=$(cat pyproject.toml constraints.txt | cksum)
if [ -x "$VENV/bin/fusion-pass" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0  # installed from these very files: nothing to do
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip_install -e ".[test]"
else
  pip_install -c constraints.txt torch triton
  pip_install -c constraints.txt -e ".[test]"
fi
# The official Hunyuan3D DiT file, for the tests that compare against it. Its declared
# requirements (gradio, pymeshlab, ...) are not needed: the module itself needs torch + einops.
"$VENV/bin/python" -c "import hy3dgen" 2>/dev/null || pip_install --no-deps hy3dgen==2.0.2
echo "$WANT" > "$STAMP"
