"""Sweep the row-wise kernels' launch settings (rows per program, warps) on the GPU (CUDA only).

`fusion_pass.ops.launch.row_settings` picks, for rows of D elements, a block of
`next_power_of_2(D)` columns, `BLOCK_ROWS` rows per program and a warp count. This script times
every fused op of `ops_bench.py` at the Hunyuan3D-2 joint shape (B = 2, L = 4442) and past the
L2 (B = 8, L = 4442), fp16, CUDA-graph medians, under each (rows, warps) in a grid around the
heuristic's choice, and reports each configuration's bandwidth against a device copy measured
in the same run: the evidence for the heuristic's constants.

Writes `row_settings_sweep.json` and `row_settings_sweep.md` to `--out`.
Run from the repository root: `python3 benchmarks/row_settings_sweep.py --out /tmp/sweep`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops_bench import as_tuple, bytes_moved, copy_gbps, median_us, workloads  # noqa: E402

from fusion_pass.ops import launch  # noqa: E402

SHAPES = [(8, 4442), (2, 4442)]  # past the L2 first: the bandwidth target is set there
ROW_FACTORS = (0.25, 0.5, 1, 2, 4, 8)  # rows per program, relative to the heuristic's
WARPS = (1, 2, 4, 8, 16)
OP_MODULES = ("layernorm_modulate", "qk_rmsnorm", "qk_rmsnorm_cat", "gelu_cat")


def scaled_rows(block_rows: int, rows_factor: float) -> int:
    return max(int(block_rows * rows_factor), 1)


def patch_row_settings(rows_factor: float, warps: int | None):
    """Make every op module's `row_settings` return the heuristic's block with `rows_factor`
    times its rows and `warps` warps (None: the heuristic's own settings). Returns an undo."""
    heuristic = launch.row_settings

    def settings(n_cols: int, elem_bytes: int) -> launch.RowSettings:
        base = heuristic(n_cols, elem_bytes)
        if warps is None:
            return base
        return launch.RowSettings(base.block_size, scaled_rows(base.block_rows, rows_factor), warps)

    modules = [sys.modules[f"fusion_pass.ops.{name}"] for name in OP_MODULES]
    for module in modules:
        module.row_settings = settings

    def undo() -> None:
        for module in modules:
            module.row_settings = heuristic

    return undo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds; stops sweeping past it")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    copy = copy_gbps()
    rows: list[dict] = []
    for batch, tokens in SHAPES:
        for w in workloads(batch, tokens, torch.float16):
            moved = bytes_moved(w.args, as_tuple(w.fused()))
            base = launch.row_settings(w.args[0].shape[-1], w.args[0].element_size())
            distinct = {(scaled_rows(base.block_rows, f), n): (f, n) for f in reversed(ROW_FACTORS) for n in WARPS}
            configs = [(1, None), *distinct.values()]  # factors that clamp to the same rows run once
            for factor, warps in configs:
                if time.perf_counter() - start > args.time_budget:
                    break
                undo = patch_row_settings(factor, warps)
                try:
                    us = median_us(w.fused)
                finally:
                    undo()
                rows.append(dict(
                    op=w.op, batch=batch, tokens=tokens, heuristic=warps is None,
                    block_rows=base.block_rows if warps is None else scaled_rows(base.block_rows, factor),
                    num_warps=base.num_warps if warps is None else warps,
                    us=us, gbps=moved / us / 1e3, of_copy=moved / us / 1e3 / copy["copy_gbps"],
                ))
                print(json.dumps(rows[-1]), flush=True)
    meta = dict(
        device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **copy, seconds=time.perf_counter() - start,
    )
    (args.out / "row_settings_sweep.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (args.out / "row_settings_sweep.md").write_text(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Row-kernel launch settings on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; fp16, CUDA-graph medians; "
        f"'of copy' against {meta['copy_gbps']:.0f} GB/s. Per op and shape: the heuristic's settings "
        "and the five fastest of the grid.",
        "",
        "| op | B x L | rows/program | warps | us | GB/s | of copy | heuristic |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["batch"], row["tokens"]), []).append(row)
    for (op, batch, tokens), group in groups.items():
        shown = [r for r in group if r["heuristic"]] + sorted((r for r in group if not r["heuristic"]), key=lambda r: r["us"])[:5]
        for r in shown:
            lines.append(
                f"| {op} | {batch} x {tokens} | {r['block_rows']} | {r['num_warps']} | {r['us']:.1f} | "
                f"{r['gbps']:.0f} | {r['of_copy']:.0%} | {'yes' if r['heuristic'] else ''} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
