"""Host cost of the per-call checks added for diffusers models, timed on the CPU (tiny configs).

    PYTHONPATH=. python3 benchmarks/check_costs_cpu.py --out OUT_DIR

What the README's "What is checked on every call" table quotes for them, on the machine it runs
on (no GPU needed: these are Python-side checks), each the median of 5 rounds of 2,000 calls:
- the subtree guard of tiny SD3's root graph, which re-reads the parameter metadata its trace
  read as values (``guards.HeldMetadata``), and how many reads that is;
- for a call of tiny Flux's double block: flattening its arguments and ``cuda_graphs.call_key``,
  the global-state check (Dynamo's ``GlobalStateGuard``), and the block graph's own Dynamo guard
  manager (``ClassCompile.guards_for``), with its number of guards.
Writes ``check_costs_cpu.json`` and ``check_costs_cpu.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._C._dynamo.guards import GlobalStateGuard
from torch.utils._pytree import tree_flatten

import fusion_pass
from fusion_pass.bench.environment import environment, environment_line
from fusion_pass.cuda_graphs import call_key
from reference_models.diffusers_tiny import MODELS


def per_call_us(check, calls: int = 2000, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            check()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def block_call(model, path: str, kwargs: dict) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` the block at ``path`` is called with in one forward of ``model``."""
    block, seen = model.get_submodule(path), []
    handle = block.register_forward_pre_hook(lambda _m, args, kw: seen.append((args, kw)), with_kwargs=True)
    with torch.no_grad():
        model(**kwargs)
    handle.remove()
    return seen[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = {}

    sd3 = fusion_pass.optimize(MODELS["sd3"].build())
    sd3(**MODELS["sd3"].inputs())
    root = sd3.__dict__["forward"]
    rows["SD3 root: subtree guard incl. metadata reads"] = (per_call_us(root.guard.holds), f"{len(root.metadata)} reads")

    flux_model = MODELS["flux"].build()
    flux = fusion_pass.optimize(flux_model)
    flux(**MODELS["flux"].inputs())
    block = flux.transformer_blocks[0].__dict__["forward"]
    call_args, call_kwargs = block_call(flux, "transformer_blocks.0", MODELS["flux"].inputs())
    flat, spec = tree_flatten((call_args, call_kwargs))
    rows["Flux double block: flatten arguments + call_key"] = (
        per_call_us(lambda: call_key(*tree_flatten((call_args, call_kwargs)))), f"{len(flat)} leaves")
    state = GlobalStateGuard()
    rows["global state (GlobalStateGuard.check)"] = (per_call_us(state.check), "")
    frame = block._frame(call_args, call_kwargs)
    guards = block.compiled.guards_for(frame)
    rows["Flux double block: its graph's Dynamo guard manager"] = (
        per_call_us(lambda: guards.check(frame)), block.compiled.graph_guards[0].split(" (")[0])
    rows["Flux double block: subtree guard"] = (per_call_us(block.guard.holds), "")

    env = environment(False)
    result = {"environment": env, "rows": {k: {"us_per_call": round(v, 2), "note": n} for k, (v, n) in rows.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check_costs_cpu.json").write_text(json.dumps(result, indent=2))
    lines = ["# Per-call check costs (tiny diffusers models, host only)", "",
             f"environment: {environment_line(env)}", "", "| check | us per call | |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {n} |" for k, (v, n) in rows.items()]
    (args.out / "check_costs_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
