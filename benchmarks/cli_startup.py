"""Time the ``fusion-pass`` CLI's start-up in fresh processes: ``--help``, ``--version``,
``inspect --help`` and ``import fusion_pass``, with ``import torch`` as the yardstick.

Each command runs ``--runs`` times as ``python -m fusion_pass.cli ...`` with ``PYTHONPATH`` set
to a source tree; with ``--before DIR`` (another source tree, e.g. ``git archive`` of an older
commit unpacked) the two trees alternate run by run, so both see the same machine load.

Writes ``cli_startup.md`` (median and minimum wall time per command, machine, versions, load
average) to ``--out``. Run from the repository root:
``python3 benchmarks/cli_startup.py --before /tmp/main-tree --out docs/bench/cli-startup``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (
    ("fusion-pass --help", ["-m", "fusion_pass.cli", "--help"]),
    ("fusion-pass --version", ["-m", "fusion_pass.cli", "--version"]),
    ("fusion-pass inspect --help", ["-m", "fusion_pass.cli", "inspect", "--help"]),
    ("python -c 'import fusion_pass'", ["-c", "import fusion_pass"]),
    ("python -c 'import torch' (yardstick)", ["-c", "import torch"]),
)


def wall_time(tree: Path, argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed in {tree}: {done.stderr.strip()[-500:]}")
    return seconds


def versions() -> str:
    code = "import torch, triton; print(torch.__version__, triton.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    torch_version, triton_version, *_ = done.stdout.split() + ["?", "?"]
    return f"Python {platform.python_version()}, torch {torch_version}, triton {triton_version}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a source tree to compare with (the 'before' column)")
    parser.add_argument("--runs", type=int, default=7, help="runs per command and tree (default 7)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for cli_startup.md")
    args = parser.parse_args()
    trees = {"after": Path.cwd()} if args.before is None else {"before": args.before.resolve(), "after": Path.cwd()}

    load_start = os.getloadavg()
    times: dict[tuple[str, str], list[float]] = {}
    for label, argv in COMMANDS:
        for _ in range(args.runs):
            for name, tree in trees.items():
                times.setdefault((label, name), []).append(wall_time(tree, argv))
    load_end = os.getloadavg()

    header = "| command | " + " | ".join(f"{name}: median (min) s" for name in trees) + " |"
    lines = [
        "# fusion-pass CLI start-up, fresh processes",
        "",
        f"{datetime.date.today()}; {cpu_name()}, {os.cpu_count()} cores; {platform.system()}; {versions()}.",
        f"{args.runs} runs per command and tree, trees alternating; load average (1 min) {load_start[0]:.1f} at the "
        f"start, {load_end[0]:.1f} at the end (the machine is shared: compare columns, not absolute times).",
        "",
        header,
        "|---|" + "---|" * len(trees),
    ]
    for label, _ in COMMANDS:
        cells = [f"{statistics.median(times[label, name]):.2f} ({min(times[label, name]):.2f})" for name in trees]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli_startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
