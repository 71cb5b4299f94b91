"""hy3dgen's ShapeVAE decoding of one latent, eager vs ``optimize()`` (and CUDA graphs), side by side.

    python3 benchmarks/shapevae_bench.py --out OUT_DIR [--octree-resolution 256]

Real width (Hunyuan3D-2's VAE config, ``reference_models.shapevae``), random weights, fp16, batch 1:
(1) the latent transformer (``post_kl`` + 16 pre-LN blocks over 3072 tokens), CUDA-event median per
call; (2) one ``geo_decoder`` chunk of 8000 query points (the pipeline's ``num_chunks``); (3) the
whole dense-grid volume decoding at ``--octree-resolution`` (hy3dgen's ``VanillaVolumeDecoder``,
(R+1)^3 points), wall time. Each optimized output is compared with eager's and with a float32 run.
Writes ``shapevae_bench.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fusion_pass.bench.environment import environment, environment_line
from fusion_pass.bench.timing import rel_err, time_calls
from reference_models.shapevae import ShapeVAEConfig, ShapeVAEDecoder



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--octree-resolution", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="a tiny config (CPU smoke run)")
    args = parser.parse_args(argv)
    import fusion_pass

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    cfg = ShapeVAEConfig(num_latents=64, width=64, heads=4, num_decoder_layers=2) if args.small else ShapeVAEConfig()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    with torch.device(device):
        base = ShapeVAEDecoder(cfg).eval()
    latents = torch.randn(1, cfg.num_latents, cfg.embed_dim, device=device)
    queries = torch.rand(1, 8000, 3, device=device) * 2 - 1
    fp32 = copy.deepcopy(base).float()
    ref32_tokens = fp32(latents)
    ref32_chunk = fp32.geo_decoder(queries=queries, latents=ref32_tokens)
    del fp32
    model = base.to(dtype)
    lat, q = latents.to(dtype), queries.to(dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results = {"config": dataclasses.asdict(cfg), "dtype": str(dtype),
               "octree_resolution": args.octree_resolution, "environment": environment(cuda), "modes": {}}
    eager_out = {}
    for mode in ("eager", "optimize", "optimize+cudagraph"):
        fusion_pass.restore(model)
        start = time.perf_counter()
        if mode != "eager":
            fusion_pass.optimize(model, cuda_graphs=mode == "optimize+cudagraph")
        tokens = model(lat).clone()
        chunk = model.geo_decoder(queries=q, latents=tokens).clone()
        sync()
        setup_s = time.perf_counter() - start
        t_tok = time_calls(lambda: model(lat), args.repeat, cuda, warmup=3)
        t_chunk = time_calls(lambda: model.geo_decoder(queries=q, latents=tokens), args.repeat, cuda, warmup=3)
        sync()
        start = time.perf_counter()
        grid = model.volume(tokens, args.octree_resolution)
        sync()
        volume_s = time.perf_counter() - start
        record = {"setup_s": round(setup_s, 2), "transformer_ms": round(statistics.median(t_tok), 3),
                  "chunk_ms": round(statistics.median(t_chunk), 3), "volume_s": round(volume_s, 3),
                  "err_tokens_vs_fp32": rel_err(tokens, ref32_tokens), "err_chunk_vs_fp32": rel_err(chunk, ref32_chunk)}
        if mode == "eager":
            eager_out = {"tokens": tokens, "chunk": chunk, "grid": grid}
        else:
            record["err_grid_vs_eager"] = rel_err(grid, eager_out["grid"])
            record["fused"] = {k: v for k, v in fusion_pass.report(model).totals().items() if v}
        results["modes"][mode] = record
        print(mode, json.dumps(record), flush=True)
        del grid
    fusion_pass.restore(model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shapevae_bench.json").write_text(json.dumps(results, indent=2, default=str))
    eager = results["modes"]["eager"]
    lines = [f"# hy3dgen ShapeVAE decoding, {dtype}, octree resolution {args.octree_resolution}", "",
             f"environment: {environment_line(results['environment'])}", "",
             "| mode | transformer ms | x eager | geo chunk (8000 pts) ms | x eager | volume s | x eager | set-up s | err tokens vs fp32 | err chunk vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        lines.append(f"| {mode} | {r['transformer_ms']:.3f} | {r['transformer_ms'] / eager['transformer_ms']:.3f} | "
                     f"{r['chunk_ms']:.3f} | {r['chunk_ms'] / eager['chunk_ms']:.3f} | {r['volume_s']:.3f} | "
                     f"{r['volume_s'] / eager['volume_s']:.3f} | {r['setup_s']:.2f} | {r['err_tokens_vs_fp32']:.2e} | "
                     f"{r['err_chunk_vs_fp32']:.2e} |")
    for mode, r in results["modes"].items():
        if "fused" in r:
            lines.append(f"\n{mode}: fused {r['fused']}; grid error vs eager {r['err_grid_vs_eager']:.2e}")
    (args.out / "shapevae_bench.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
