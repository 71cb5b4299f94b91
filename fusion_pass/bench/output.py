"""How results are written and drawn: bench.json, bench.md, bench.png, the profiles, the console summary."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .settings import Settings
from .spec import FILES, MODES, RUN_ORDER
from .targets import _targets


def _write_outputs(results, profiles, settings: Settings, console, *, chart: bool) -> None:
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    if chart:
        results["targets"] = _targets(results)
    (out / "bench.json").write_text(json.dumps(_finite(results), indent=1, allow_nan=False) + "\n")
    (out / "bench.md").write_text(_markdown(results))
    for mode, texts in profiles.items():
        header = (f"# fusion_pass bench: top-20 kernels by total time per step, mode {mode}\n"
                  f"# {results['env'].get('device')}, torch {results['env'].get('torch')}, "
                  f"triton {results['env'].get('triton')}, {results['env'].get('date')}\n\n")
        (out / f"profile_{mode}.txt").write_text(header + ("".join(texts) or "(not profiled)\n"))
    if chart:
        if not _chart(results, out / "bench.png", console):
            (out / "bench.png").unlink(missing_ok=True)  # no stale chart of an earlier run


def _finite(value):
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _mode_row(group: dict[str, Any], mode: str, record: dict[str, Any], width: int = 200) -> list[str]:
    """One summary row: step, x eager, setup, peak (x eager), errors, kernels, GEMM+attn share."""
    if record.get("status") != "ok":
        text = record.get("error") or record.get("reason") or record.get("status")
        return [mode, f"{record.get('status', '?').upper()}: {text}"[:width], "", "", "", "", "", "", ""]
    eager = group["modes"].get("eager", {})
    step = record["step_ms"]
    vs_eager = step["median"] / eager["step_ms"]["median"] if eager.get("status") == "ok" else None
    peak = record.get("peak_mb")
    peak_ratio = peak / eager["peak_mb"] if peak is not None and eager.get("peak_mb") else None
    profile = record.get("profile") or {}
    return [
        mode,
        f"{step['median']:.2f} ({step['p10']:.2f}-{step['p90']:.2f})",
        _fmt(vs_eager, ".2f"),
        _fmt(record.get("setup_s"), ".1f"),
        f"{_fmt(peak, '.0f')} ({_fmt(peak_ratio, '.2f')})" if peak is not None else "-",
        _fmt(record.get("err_vs_eager"), ".1e"),
        _fmt(record.get("err_vs_fp32"), ".1e"),
        _fmt(profile.get("kernels"), "d"),
        _fmt(100 * profile["gemm_attn_fraction"] if profile.get("gemm_attn_fraction") is not None else None, ".0f"),
    ]

SUMMARY_COLUMNS = ("mode", "step ms (p10-p90)", "x eager", "setup s", "peak MB (x eager)", "err eager",
                   "err fp32", "kernels", "GEMM+attn %")


def _markdown(results: dict[str, Any]) -> str:
    env = results["env"]
    lines = ["# fusion_pass bench", "",
             f"{env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, python {env.get('python')}, "
             f"driver {env.get('driver')}; {env.get('date')}; status: {results.get('status')}", "",
             "`" + " ".join(results.get("argv", [])) + "`", "",
             "Step = one denoiser call at B=2 (CFG batch), median of the timed steps (p10-p90); errors are "
             "||out - ref|| / ||ref|| against eager in the same dtype and against the float32 model; peak memory "
             "is the mode's own (weights copy + activations + CUDA-graph pools), set-up included.", ""]
    for group in results["groups"]:
        if group.get("status") == "error":
            lines += [f"## {group['config']} / {group['dtype']}", "", f"Set-up failed: `{group['error']}`", ""]
            continue
        lines += [f"## {group['config']} / {group['dtype']}", "",
                  f"{group['model']}, {group['parameters'] / 1e9:.2f}B parameters, x {group['shapes']['x']}, "
                  f"cond {group['shapes']['cond']}; "
                  f"eager error vs float32 {_fmt(group.get('eager_vs_fp32'), '.2e')}", "",
                  "| " + " | ".join(SUMMARY_COLUMNS) + " | setup is |", "|" + "---|" * (len(SUMMARY_COLUMNS) + 1)]
        for mode, record in group["modes"].items():
            row = _mode_row(group, mode, record)
            cells = [cell.replace("|", "/") for cell in row] + [record.get("setup_what", "")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += _lever_lines(group)
        fused = {m: r["fusion"].get("fused_vs_expected") or r["fusion"]["counts"] for m, r in group["modes"].items()
                 if r.get("status") == "ok" and "fusion" in r}
        if fused:
            lines += [""] + [f"- {m} fused (fused/expected): {json.dumps(v)}" for m, v in fused.items()]
        e2e = group.get("e2e")
        if e2e:
            lines += ["", f"End to end ({e2e.get('steps')} steps, CFG {e2e.get('guidance_scale')}): "
                          + (e2e.get("reason") or e2e.get("error") or ""), ""]
            if e2e.get("modes"):
                lines += ["| mode | total s | per step ms | x eager speed-up | err vs eager | err vs fp32 |",
                          "|---|---|---|---|---|---|"]
                for mode, r in e2e["modes"].items():
                    if r.get("status") != "ok":
                        lines.append(f"| {mode} | {r.get('error')} | | | | |")
                        continue
                    lines.append(f"| {mode} | {r['total_s']:.2f} | {r['per_step_ms']:.1f} | "
                                 f"{_fmt(r.get('speedup_vs_eager'), '.2f')} | {_fmt(r.get('err_vs_eager'), '.1e')} | "
                                 f"{_fmt(r.get('err_vs_fp32'), '.1e')} |")
        lines.append("")
    if results.get("targets"):
        lines += ["## Targets", "", "| group | target | value | limit | status | detail |", "|---|---|---|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['group']} | {t['target']} | {_fmt(t['value'], '.3f')} | {t['limit']} | "
                         f"**{t['status']}** | {t['detail']} |")
        lines.append("")
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    return "\n".join(lines)


def _lever_lines(group: dict[str, Any]) -> list[str]:
    """Each lever mode against its base mode, measured in the same run: the lever's gain."""
    modes = group["modes"]
    rows = []
    for mode, record in modes.items():
        spec = MODES[mode]
        base = modes.get(spec.base or "", {})
        if not spec.levers or record.get("status") != "ok" or base.get("status") != "ok":
            continue
        step, base_step = record["step_ms"]["median"], base["step_ms"]["median"]
        kernels = (record.get("profile") or {}).get("kernels"), (base.get("profile") or {}).get("kernels")
        counts = {k: v for k, v in record.get("fusion", {}).get("counts", {}).items() if k in spec.levers}
        rows.append(f"| {mode} | {spec.base} | {step:.2f} | {base_step:.2f} | {step - base_step:+.2f} | "
                    f"{_fmt(kernels[0], 'd')} / {_fmt(kernels[1], 'd')} | {_fmt(record.get('peak_mb'), '.0f')} / "
                    f"{_fmt(base.get('peak_mb'), '.0f')} | {_fmt(record.get('setup_s'), '.2f')} | {json.dumps(counts)} |")
    if not rows:
        return []
    return ["", "Levers (opt-in families) against their base mode, same run:", "",
            "| mode | base | step ms | base ms | delta ms | kernels (base) | peak MB (base) | setup s | sites |",
            "|---|---|---|---|---|---|---|---|---|", *rows]


def _chart(results: dict[str, Any], path: Path, console) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        console.print(f"[yellow]warning: no chart ({_one_line(exc)}); install matplotlib for bench.png[/yellow]")
        return False
    groups = [g for g in results["groups"] if any(r.get("status") == "ok" for r in g["modes"].values())]
    if not groups:
        return False
    cols = min(2, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.2 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        names, medians, lo, hi, colors, notes = [], [], [], [], [], []
        for mode in RUN_ORDER:
            record = group["modes"].get(mode)
            if not record:
                continue
            names.append(mode)
            if record.get("status") != "ok":  # an empty slot that says why
                medians.append(0.0), lo.append(0.0), hi.append(0.0), colors.append("none")
                notes.append(f" {record.get('status')}")
                continue
            step = record["step_ms"]
            medians.append(step["median"])
            lo.append(step["median"] - step["p10"])
            hi.append(step["p90"] - step["median"])
            colors.append("#1f77b4" if MODES[mode].fusion else "#999999")
            notes.append(f" {step['median']:.1f}")
        y = list(range(len(names)))
        ax.barh(y, medians, xerr=[lo, hi], color=colors, capsize=2)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        for i, (value, high, note) in enumerate(zip(medians, hi, notes)):
            ax.text(value + high, i, note, va="center", fontsize=7)
        ax.set_xlim(0, 1.15 * max(m + h for m, h in zip(medians, hi)))
        ax.set_xlabel("ms per step (median, p10-p90)")
        ax.set_title(f"{group['config']} / {group['dtype']}", fontsize=10)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"fusion_pass bench: {results['env'].get('device')} (blue: with fusion_pass)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _print_summary(results: dict[str, Any], console) -> None:
    """The compact tables, printed last (the GPU box returns only the last 12,000 characters):
    one row per mode, the end-to-end line per group, the decided targets, the notes."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1),
                  title="step = one denoiser call (B=2); peak = the mode's own memory (x eager's); "
                        "err = ||out - ref|| / ||ref|| vs eager and vs float32", title_justify="left")
    table.add_column("group", no_wrap=True)
    for column in SUMMARY_COLUMNS:
        table.add_column(column, no_wrap=True)
    for group in results["groups"]:
        if group.get("status") == "error":
            table.add_row(_label(group), "SET-UP FAILED", group["error"][:36], end_section=True)
            continue
        rows = list(group["modes"].items())
        for i, (mode, record) in enumerate(rows):
            table.add_row(_label(group) if i == 0 else "", *_mode_row(group, mode, record, width=36),
                          end_section=i == len(rows) - 1)
    console.print(table)
    for group in results["groups"]:
        e2e = group.get("e2e")
        if not e2e:
            continue
        parts = []
        for mode, r in (e2e.get("modes") or {}).items():
            if r.get("status") == "ok":
                parts.append(f"{mode} {r['total_s']:.2f} s x{_fmt(r.get('speedup_vs_eager'), '.2f', '1')} "
                             f"(err {_fmt(r.get('err_vs_eager'), '.0e')} / fp32 {_fmt(r.get('err_vs_fp32'), '.0e')})")
            else:
                parts.append(f"{mode} ERROR {r.get('error', '')[:60]}")
        detail = "; ".join(parts) or f"{e2e.get('status')}: {e2e.get('reason') or e2e.get('error') or ''}"
        console.print(f"e2e {_label(group)}, {e2e.get('steps')} steps: {detail}")
    decided = [t for t in results["targets"] if t["status"] != "n/a" or "not run" not in t["detail"]]
    if decided:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1),
                      title="targets (n/a rows of modes not run: see bench.md)", title_justify="left")
        for column in ("group", "target", "value", "limit", "status", "detail"):
            table.add_column(column, no_wrap=True)
        style = {"PASS": "green", "MISS": "bold red", "n/a": "yellow"}
        labels = {f"{g['config']}/{g['dtype']}": _label(g) for g in results["groups"]}
        for t in decided:
            table.add_row(labels.get(t["group"], t["group"]), t["target"], _fmt(t["value"], ".3f"), str(t["limit"]),
                          f"[{style[t['status']]}]{t['status']}[/]", t["detail"][:48])
        console.print(table)
    for note in results.get("notes", []):
        console.print(f"note: {note}")
    out = Path(results["settings"]["out"])
    console.print(f"{results.get('status')}; {results.get('elapsed_s', 0):.0f} s; "
                  f"wrote {', '.join(name for name in FILES if (out / name).exists())} to {out}")


_SHORT_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _label(group: dict[str, Any]) -> str:
    """``h3d-2mini fp16``: a group in a dozen characters."""
    return f"{group['config'].replace('hunyuan3d-', 'h3d-')} {_SHORT_DTYPES.get(group['dtype'], group['dtype'])}"


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:300]


def _short_line(record: dict[str, Any]) -> str:
    step = record["step_ms"]
    parts = [f"{step['median']:.2f} ms (p10 {step['p10']:.2f}, p90 {step['p90']:.2f})",
             f"setup {record['setup_s']:.2f} s",
             f"err eager {record['err_vs_eager']:.1e} fp32 {record['err_vs_fp32']:.1e}"]
    if "peak_mb" in record:
        parts.append(f"peak {record['peak_mb']:.0f} MB")
    if "profile" in record:
        parts.append(f"{record['profile']['kernels']} kernels")
    return ", ".join(parts)
