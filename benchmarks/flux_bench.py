"""Flux-dev-shaped ``FluxTransformer2DModel`` (diffusers): eager, ``optimize()``,
``optimize(cuda_graphs=True)`` and ``torch.compile`` side by side, one process, one GPU.

    python3 benchmarks/flux_bench.py --out OUT_DIR [--config dev|tiny] [--repeat 10]

Shapes (``--config dev``, issue 13's target): 19 double + 38 single blocks, hidden 3072
(24 heads x 128), ``guidance_embeds=True``, bf16, random weights built on the GPU, 4096 image +
512 text tokens, batch 1. Per mode: the median step (CUDA events, after warm-up), set-up
(``optimize()`` + its first call, which holds any capture done on first call; ``torch.compile``'s
first call), peak memory, fused sites (the report) and the relative error against a float32
run of the same weights and inputs, next to eager's. ``--config tiny`` runs a small smoke
version (also on the CPU with host timers). Writes ``flux_bench.json`` and ``flux_bench.md``.
Modes (``--modes``, comma-separated): eager, compile, and ``optimize`` with any of ``+cudagraph``
(``cuda_graphs=True``) and ``+levers`` (the opt-in families too: ``patterns.OPT_IN``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import timeit
from pathlib import Path
from types import SimpleNamespace

import torch

from fusion_pass.bench.environment import environment, environment_line
from fusion_pass.bench.profiling import _init_cupti, _profile, _profile_text, write_cprofile
from fusion_pass.bench.timing import percentile, rel_err, time_calls
from reference_models.diffusers_tiny import cast_inputs

CONFIGS = {
    # FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json)
    "dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "tiny": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
                 guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}
TOKENS = {"dev": (4096, 512), "tiny": (64, 16)}


def make_inputs(cfg: dict, img_tokens: int, txt_tokens: int, device, dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    side = int(img_tokens ** 0.5)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                         indexing="ij"), -1).reshape(-1, 3).float()
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return dict(
        hidden_states=rand(1, img_tokens, cfg["in_channels"]),
        encoder_hidden_states=rand(1, txt_tokens, cfg["joint_attention_dim"]),
        pooled_projections=rand(1, cfg["pooled_projection_dim"]),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_ids=img_ids.to(device), txt_ids=torch.zeros(txt_tokens, 3, device=device),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        return_dict=False,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="dev")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--modes", default="eager,optimize,optimize+cudagraph,compile")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--new-shape", action="store_true",
                        help="optimize modes: also time the first call (and the step) at a smaller image grid")
    parser.add_argument("--profile", action="store_true",
                        help="also write flux_profile.txt: each mode's kernels by total time (one step)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also write flux_setup_cprofile.txt: the N costliest functions of the first optimize "
                             "mode's set-up (optimize() + its first call, main thread; its set-up time then "
                             "includes cProfile's overhead)")
    args = parser.parse_args(argv)
    from diffusers import FluxTransformer2DModel

    import fusion_pass
    from patterns import FAMILY_NAMES, OPT_IN_NAMES

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    cfg = CONFIGS[args.config]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg).to(dtype).eval()
    build_s = time.perf_counter() - start
    inputs = make_inputs(cfg, *TOKENS[args.config], device, dtype)
    results: dict = {"config": args.config, "dtype": args.dtype, "tokens": TOKENS[args.config],
                     "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "build_s": round(build_s, 1),
                     "environment": environment(cuda), "modes": {}}
    torch.set_grad_enabled(False)

    fp32 = copy.deepcopy(model).float()
    ref32 = fp32(**cast_inputs(inputs, torch.float32))[0].float()
    del fp32
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    profiles: list[str] = []
    if args.profile and cuda:
        _init_cupti()
    for mode in args.modes.split(","):
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        profiler = None
        if args.cprofile and mode.startswith("optimize") and not any(m.startswith("optimize") for m in results["modes"]):
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        start = time.perf_counter()
        report = None
        if mode == "eager":
            target = model
        elif mode.split("+")[0] == "optimize" and set(mode.split("+")[1:]) <= {"cudagraph", "levers"}:
            fusion_pass.restore(model)
            options = set(mode.split("+")[1:])
            levers = [*FAMILY_NAMES, *OPT_IN_NAMES] if "levers" in options else None
            target = fusion_pass.optimize(model, cuda_graphs="cudagraph" in options, patterns=levers)
            report = lambda: fusion_pass.report(model)  # noqa: E731
        elif mode == "compile":
            fusion_pass.restore(model)
            torch._dynamo.reset()
            target = torch.compile(model)
        else:
            raise SystemExit(f"unknown mode {mode}")
        out = target(**inputs)[0]
        sync()
        setup_s = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
            write_cprofile(profiler, args.out / "flux_setup_cprofile.txt", args.cprofile)
        err = rel_err(out, ref32)
        del out
        times = time_calls(lambda: target(**inputs), args.repeat, cuda, warmup=args.warmup)
        record = {"step_ms": round(statistics.median(times), 3), "p90_ms": round(percentile(times, 0.9), 3),
                  "setup_s": round(setup_s, 2), "err_vs_fp32": err}
        if cuda:
            record["peak_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        if report is not None:
            rep = report()
            record["fused"] = rep.totals()
            record["near_misses"] = {name: len(f.near_misses) for name, f in rep.families.items()}
            record["fallbacks"] = [f"{where or '<root>'}: {reason} ({calls} calls)" for where, reason, calls in rep.fallbacks]
            root = model.__dict__.get("forward")
            if getattr(root, "guard", None) is not None:  # the root's own per-call checks (shaped capture)
                record["root_checks_us"] = {
                    "subtree_guard": _us(root.guard.holds), "signature": _us(lambda: root.signature.required_values((), inputs)),
                    "metadata_reads": len(root.guard.reads), "shaped": root.signature.shaped is not None}
            graphed = [f.graphs for f in (m.__dict__.get("forward") for m in model.modules())
                       if getattr(f, "graphs", None) is not None]
            if graphed:  # cuda_graphs=True: which installed forwards replayed (FX-captured and Dynamo blocks)
                record["cuda_graphs"] = {"forwards": len(graphed), "replaying": sum(g.replays > 0 for g in graphed),
                                         "replays": sum(g.replays for g in graphed)}
        if report is not None and args.new_shape:  # a second resolution: the root captured again at it
            tokens = int(TOKENS[args.config][0] ** 0.5 * 3 / 4) ** 2  # a square grid 3/4 as wide (dev: 48 x 48)
            other = make_inputs(cfg, tokens, TOKENS[args.config][1], device, dtype, seed=1)
            start = time.perf_counter()
            target(**other)
            sync()
            record["new_shape"] = {"img_tokens": tokens,
                                   "first_call_s": round(time.perf_counter() - start, 2),
                                   "step_ms": round(statistics.median(time_calls(lambda: target(**other), 3, cuda, warmup=1)), 3),
                                   "fallbacks": [f"{where or '<root>'}: {reason} ({calls} calls)"
                                                 for where, reason, calls in report().fallbacks]}
        if args.profile:
            profiles.append(_profile_text("flux", mode, _profile(lambda _: target(**inputs), None,
                                                                 SimpleNamespace(cuda=cuda), top=40)))
        results["modes"][mode] = record
        print(mode, json.dumps(record), flush=True)
        del target
    fusion_pass.restore(model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flux_bench.json").write_text(json.dumps(results, indent=2))
    (args.out / "flux_bench.md").write_text(_markdown(results))
    if profiles:
        (args.out / "flux_profile.txt").write_text(f"# {environment_line(results['environment'])}\n\n" + "".join(profiles))
    return 0


def _us(fn, number: int = 200) -> float:
    """Median microseconds of one call of ``fn`` (host only: the checks never touch the GPU)."""
    return round(statistics.median(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6, 2)


def _markdown(results: dict) -> str:
    modes = results["modes"]
    eager = modes.get("eager", {})
    compiled = modes.get("compile", {})
    lines = [f"# Flux ({results['config']}, {results['params_b']:.2f}B params) {results['dtype']}, "
             f"tokens {results['tokens'][0]} image + {results['tokens'][1]} text, batch 1",
             "", f"environment: {environment_line(results['environment'])}", "",
             "| mode | step ms | x eager | x compile | set-up s | peak MB | err vs fp32 | x eager's err |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in modes.items():
        ratio = lambda other: f"{r['step_ms'] / other['step_ms']:.3f}" if other else "-"  # noqa: E731
        err_ratio = f"{r['err_vs_fp32'] / eager['err_vs_fp32']:.3f}" if eager else "-"
        lines.append(f"| {mode} | {r['step_ms']:.2f} | {ratio(eager)} | {ratio(compiled)} | {r['setup_s']:.2f} | "
                     f"{r.get('peak_mb', '-')} | {r['err_vs_fp32']:.3e} | {err_ratio} |")
    for mode, r in modes.items():
        if "fused" in r:
            lines.append(f"\n{mode} fused (per family): {r['fused']}; near-misses: {r['near_misses']}")
        if "cuda_graphs" in r:
            g = r["cuda_graphs"]
            lines.append(f"\n{mode}: {g['replaying']} of {g['forwards']} installed forwards replayed as CUDA graphs "
                         f"({g['replays']} replays)")
        if r.get("fallbacks"):
            lines.append(f"\n{mode} run-time fallbacks: " + "; ".join(r["fallbacks"][:8]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
