"""The README table of what fusion_pass fuses on ten diffusers transformers (tiny random configs, fp32, CPU).

    PYTHONPATH=. python scripts/diffusers_table.py            # print the markdown table
    PYTHONPATH=. python scripts/diffusers_table.py --readme   # and write it into README.md

Per model: the sites its code has (``reference_models.diffusers_tiny.expected_sites``, derived from the config
and diffusers' source), what ``optimize()`` fused, what the compile backend fused (Dynamo's
whole-model graph, eager inner compiler), and the near-misses each reported, grouped by reason.
Columns: modulations (LayerNorm or RMSNorm ``* (1 + scale) + shift``) / gates / q/k norm pairs.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from collections import Counter
from pathlib import Path

import diffusers
import torch

import fusion_pass
from reference_models.diffusers_tiny import MODELS, expected_sites

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- diffusers-table: begin -->", "<!-- diffusers-table: end -->"
FAMILIES = ("layernorm_modulate", "residual_gate", ("qk_rmsnorm", "qk_layernorm"))


def code_sites(name: str, model) -> tuple[int, int, int]:
    sites = expected_sites(name, model.config)
    return sites.modulations, sites.gates, sites.qk + sites.qk_layernorm


def fused(report) -> tuple[int, ...]:
    totals = report.totals()
    return tuple(sum(totals.get(f, 0) for f in ((family,) if isinstance(family, str) else family)) for family in FAMILIES)


def misses(report) -> Counter:
    return Counter(f"{miss.reason} ({fam.name})" for fam in report.families.values() for miss in fam.near_misses)


def measure(name: str) -> dict:
    model, inputs = MODELS[name].build(), MODELS[name].inputs()
    with torch.no_grad():
        reference = model(**inputs)[0]
        optimized = fusion_pass.optimize(copy.deepcopy(model))
        by_optimize = optimized(**inputs)[0]
        torch._dynamo.reset()
        backend = fusion_pass.backend(inner="eager")
        by_backend = torch.compile(model, backend=backend)(**inputs)[0]
    scale = reference.abs().max().item()
    return {
        "sites": code_sites(name, model),
        "optimize": fused(fusion_pass.report(optimized)),
        "backend": fused(backend.report),
        "error": max((out - reference).abs().max().item() / scale for out in (by_optimize, by_backend)),
        "misses": misses(fusion_pass.report(optimized)) + misses(backend.report),
    }


def _cell(values: tuple[int, ...]) -> str:
    return " / ".join(map(str, values))


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| model | sites in its code | fused by `optimize()` | fused by the backend | near-misses (optimize + backend) |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        reasons = "; ".join(f"{n} x {reason}" for reason, n in row["misses"].most_common()) or "none"
        lines.append(f"| {name} | {_cell(row['sites'])} | {_cell(row['optimize'])} | {_cell(row['backend'])} | {reasons} |")
    totals = [tuple(map(sum, zip(*(row[k] for row in rows.values())))) for k in ("sites", "optimize", "backend")]
    lines.append(f"| **all** | {_cell(totals[0])} | {_cell(totals[1])} | {_cell(totals[2])} | |")
    worst = max(row["error"] for row in rows.values())
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    kernels = "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "their PyTorch references"
    lines.append("")
    lines.append(f"Cells: modulations / gates / q/k norm pairs. Largest relative output difference: {worst:.1e} "
                 f"({versions}, fp32, CPU; fused ops ran {kernels}).")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = README.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN not in readme:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block to replace")
    README.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    parser.add_argument("models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64
    text = table({name: measure(name) for name in args.models})
    sys.stdout.write(text + "\n")
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()
