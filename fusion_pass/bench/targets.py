"""The issue's targets, decided per group: PASS / MISS, or n/a with the reason."""
from __future__ import annotations

from typing import Any

from .spec import MODES


TARGETS = {
    "optimize_vs_eager": 0.60,
    "optimize_vs_compile": 1.00,
    "optimize_setup_s": 5.0,
    "backend_vs_compile": 0.90,
    "backend_compile_time": 1.00,
    "peak_memory": 1.00,
    "cudagraph_vs_reduce_overhead": 1.00,
    "fidelity": 1.10,
    "cudagraph_vs_compile": 0.90,  # issue 14: past torch.compile
    "mini_cudagraph_vs_reduce_overhead": 0.95,  # issue 14
}


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios the issue targets, per group: PASS / MISS, or n/a with the reason."""
    rows: list[dict[str, Any]] = []
    for group in results["groups"]:
        if group.get("status") == "error":
            continue
        key = f"{group['config']}/{group['dtype']}"
        modes = group["modes"]

        def ok(name):
            return modes.get(name, {}).get("status") == "ok"

        def step(name):
            return modes[name]["step_ms"]["median"]

        def why(*names):
            for name in names:
                if not ok(name):
                    state = modes.get(name, {})
                    reason = state.get("reason") or state.get("error") or "not in --modes"
                    return f"{name}: {state.get('status', 'not run')} ({reason})"[:120]
            return "not measured"

        def add(name, value, limit, why_missing=None, detail=""):
            if value is None:
                rows.append({"group": key, "target": name, "status": "n/a", "value": None, "limit": limit,
                             "detail": why_missing or "not measured"})
            else:
                rows.append({"group": key, "target": name, "status": "PASS" if value <= limit else "MISS",
                             "value": round(value, 4), "limit": limit, "detail": detail})

        both = lambda a, b: ok(a) and ok(b)  # noqa: E731
        add("optimize step / eager", step("optimize") / step("eager") if both("optimize", "eager") else None,
            TARGETS["optimize_vs_eager"], why("optimize", "eager"))
        add("optimize step / compile", step("optimize") / step("compile") if both("optimize", "compile") else None,
            TARGETS["optimize_vs_compile"], why("optimize", "compile"))
        add("optimize set-up s", modes["optimize"]["setup_s"] if ok("optimize") else None, TARGETS["optimize_setup_s"],
            why("optimize"), detail="wall time of optimize()")
        add("backend step / compile", step("backend-inductor") / step("compile")
            if both("backend-inductor", "compile") else None, TARGETS["backend_vs_compile"],
            why("backend-inductor", "compile"))
        add("backend compile s / compile's", modes["backend-inductor"]["setup_s"] / modes["compile"]["setup_s"]
            if both("backend-inductor", "compile") else None, TARGETS["backend_compile_time"],
            why("backend-inductor", "compile"), detail="first call incl. compile; backend-inductor ran first")
        if ok("eager") and "peak_mb" in modes["eager"]:
            eager_peak = modes["eager"]["peak_mb"]
            ratios = {m: r["peak_mb"] / eager_peak for m, r in modes.items()
                      if m != "eager" and r.get("status") == "ok" and "peak_mb" in r}
            worst = max(ratios, key=ratios.get) if ratios else None
            add("peak memory / eager's (worst)", ratios[worst] if worst else None, TARGETS["peak_memory"],
                detail=f"{worst}" if worst else "")
        else:
            add("peak memory / eager's (worst)", None, TARGETS["peak_memory"], "eager not measured on CUDA")
        if "mini" in group["config"]:
            add("optimize+cudagraph step / reduce-overhead",
                step("optimize+cudagraph") / step("compile-reduce-overhead")
                if both("optimize+cudagraph", "compile-reduce-overhead") else None,
                TARGETS["cudagraph_vs_reduce_overhead"], why("optimize+cudagraph", "compile-reduce-overhead"))
        for mode in ("optimize+cudagraph", "optimize+cudagraph+levers"):  # issue 14's targets
            if mode not in modes:
                continue
            if "mini" in group["config"]:
                add(f"{mode} step / reduce-overhead (issue 14)", step(mode) / step("compile-reduce-overhead")
                    if both(mode, "compile-reduce-overhead") else None,
                    TARGETS["mini_cudagraph_vs_reduce_overhead"], why(mode, "compile-reduce-overhead"))
            else:
                add(f"{mode} step / compile (issue 14)", step(mode) / step("compile") if both(mode, "compile") else None,
                    TARGETS["cudagraph_vs_compile"], why(mode, "compile"))
        eager_err = group.get("eager_vs_fp32")
        if group["dtype"] == "float32":
            add("fused err fp32 / eager's (worst)", None, TARGETS["fidelity"],
                "float32: eager is the float32 reference")
            continue
        fusion = {m: r["err_vs_fp32"] / max(eager_err, 1e-7) for m, r in modes.items()
                  if MODES[m].fusion and r.get("status") == "ok" and eager_err is not None}
        worst = max(fusion, key=fusion.get) if fusion else None
        add("fused err fp32 / eager's (worst)", fusion[worst] if worst else None, TARGETS["fidelity"],
            detail=worst or "")
    return rows
