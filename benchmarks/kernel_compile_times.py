"""How long each Triton kernel of a first optimized call takes to compile for an H200, measured on this host's
CPU (issue 14, cold set-up: which compile is the first call's critical path?).

The official model of ``--config`` in fp16 on the CPU, optimized and called once on few tokens with every
fused op's launch recorded, not made (``fusion_pass.bench.kernel_specs.record_launches``, in a child process
under ``TRITON_INTERPRET=1``). A kernel's block sizes and warps follow from its row width and dtype
(``launch.row_settings``), not from the token count, so few tokens give the specialisations of the real call;
the token counts keep the real call's divisibility by 16 (``--latents``, ``--cond-tokens``). The weights are
left uninitialised (nothing is computed from them that matters here). Then each distinct specialisation is
compiled for ``GPUTarget("cuda", 90, 32)`` into an empty cache (Triton's bundled ptxas, no GPU), after
Triton's source hash (``triton_key``, which ``precompile.warm_triton`` computes during ``optimize()``): one
after the other, then in a pool of ``--workers`` threads as ``precompile`` does.

    python3 benchmarks/kernel_compile_times.py --out DIR [--config hunyuan3d-2] [--workers 2] [--one-body off]

Writes ``kernel_compile_times.md`` and ``.json`` (``kernel_compile_times_two_bodies.*`` with ``--one-body off``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def record(config: str, latents: int, cond_tokens: int) -> list[dict]:
    """The distinct launches of one optimized fp16 call (run with TRITON_INTERPRET=1)."""
    import torch

    import fusion_pass
    from fusion_pass.bench.kernel_specs import record_launches
    from reference_models import example_inputs, load_official

    torch.set_grad_enabled(False)
    model = load_official(config, device="meta", dtype=torch.float16).to_empty(device="cpu").eval()
    inputs = example_inputs(config, latents=latents, cond_tokens=cond_tokens, dtype=torch.float16, seed=0)
    fusion_pass.optimize(model)
    return record_launches(lambda: inputs.call(model))


def _switches(constexprs: dict) -> str:
    """The constexprs that are switches or sizes (``HAS_GATE=1``, ``BLOCK_D=1024``), not stride placeholders."""
    return ", ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items()
                     if k.isupper() or k.startswith("BLOCK"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--config", default="hunyuan3d-2")
    parser.add_argument("--latents", type=int, default=16, help="2 x 16 latent rows: divisible by 16, as 2 x 3072")
    parser.add_argument("--cond-tokens", type=int, default=10,
                        help="2 x 10 condition rows and 2 x 26 joint rows: not divisible by 16, as 2 x 1370 and 2 x 4442")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one-body", choices=("as-planned", "off"), default="as-planned",
                        help="off: compile qk_rmsnorm_cat with one tile body per stream (ONE_BODY=False), as before")
    parser.add_argument("--record-to", type=Path, help=argparse.SUPPRESS)  # (the child process's job)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.record_to:
        args.record_to.write_text(json.dumps(record(args.config, args.latents, args.cond_tokens)))
        return 0

    from fusion_pass.bench.environment import environment, environment_line
    from fusion_pass.bench.kernel_specs import compile_in_subprocess

    with tempfile.TemporaryDirectory() as scratch:
        launches_file = Path(scratch) / "launches.json"
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        subprocess.run([sys.executable, __file__, "--config", args.config, "--latents", str(args.latents),
                        "--cond-tokens", str(args.cond_tokens), "--record-to", str(launches_file)], env=env, check=True)
        launches = json.loads(launches_file.read_text())
        for launch in launches:
            if args.one_body == "off" and "ONE_BODY" in launch["constexprs"]:
                launch["constexprs"]["ONE_BODY"] = False
        runs = {way: compile_in_subprocess(launches, workers, cache_dir=tempfile.mkdtemp(dir=scratch))
                for way, workers in (("serial", 1), ("threads", args.workers))}  # an empty cache each
    failed = [(launch["name"], r["error"]) for way in runs.values() for launch, r in zip(launches, way["results"])
              if "error" in r]
    if failed:
        raise SystemExit(f"compiles failed: {failed}")
    serial, threaded = ([r["seconds"] for r in runs[way]["results"]] for way in ("serial", "threads"))
    rows = sorted(zip(launches, serial, threaded, runs["serial"]["results"]), key=lambda r: -r[1])
    data = {"environment": environment(False), "config": args.config, "workers": args.workers,
            "one_body": args.one_body, "launches": launches, "serial_s": serial, "threads_s": threaded,
            "serial_wall_s": runs["serial"]["wall_s"], "threads_wall_s": runs["threads"]["wall_s"],
            "ptx": [{k: r[k] for k in ("ptx_lines", "vector_loads", "vector_stores")} for r in runs["serial"]["results"]]}
    lines = [f"# Compile time of each Triton kernel of a first optimized {args.config} call (fp16), for sm_90, "
             "on this host's CPU", "", f"environment: {environment_line(data['environment'])}", "",
             f"{len(launches)} distinct specialisations; one after the other {data['serial_wall_s']:.2f} s, "
             f"{args.workers} threads {data['threads_wall_s']:.2f} s (after triton_key); qk_rmsnorm_cat's one tile "
             f"body for both streams: {args.one_body}.", "",
             "| kernel | constexprs | warps | compile s (serial) | compile s (in threads) | PTX lines | vector loads / stores |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {launch['name']} | {_switches(launch['constexprs'])} | {launch['num_warps']} | {s:.3f} | {t:.3f} | "
              f"{r['ptx_lines']} | {r['vector_loads']} / {r['vector_stores']} |" for launch, s, t, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "kernel_compile_times" + ("_two_bodies" if args.one_body == "off" else "")
        (args.out / f"{stem}.md").write_text(text)
        (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
