"""Benchmark the fused ops against the unfused PyTorch expressions they replace (CUDA only).

For each op at Hunyuan3D-2 shapes (B = 2, L in {3072, 1370, 4442}, hidden 1024, 16 heads of 64)
and one past the 60 MB L2 of an H200 (B = 8, L = 4442), and for the ops of other models at those
models' shapes (`model_workloads`: Flux-dev, hidden 3072, 24 heads of 128, 4096 + 512 tokens,
batch 1; hy3dgen's ShapeVAE, width 1024, 16 heads of 64, 3072 latents, 10,000 decoder queries
a chunk), in fp16 and bf16, CUDA-graph timed (`triton.testing.do_bench_cudagraph`, median):

- fused op, eager unfused expression, `torch.compile` of the unfused expression (us);
- achieved bandwidth = (each input read once at its real size, broadcast operands included,
  + each output written once) / fused time, and its ratio to a device copy measured in the same
  run (`dst.copy_(src)`, bytes read + written);
- host time per call over 2,000 calls without synchronising, on a small input (L = 1): the
  fused op through torch.ops, through `fusion_pass.ops.direct` (optimize's graphs), and eager.

Writes `ops_bench.json` and `ops_bench.md` (device, torch, triton versions) to `--out`.
Run from the repository root: `python3 benchmarks/ops_bench.py --out docs/bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fusion_pass.ops as ops  # noqa: E402
from fusion_pass.ops.direct import direct_call  # noqa: E402

HIDDEN = 1024
HEADS = 16
TXT_TOKENS = 1370  # the condition stream of the double blocks' joint attention
EPS = 1e-6
SHAPES = [(2, 3072), (2, 1370), (2, 4442), (8, 4442)]  # (B, L); the last is past the L2
DTYPES = [torch.float16, torch.bfloat16]
FLUX_HIDDEN, FLUX_HEADS, FLUX_TOKENS = 3072, 24, 4096 + 512  # Flux-dev: image + text tokens, batch 1
FLUX_TEXT_TOKENS = 512  # of FLUX_TOKENS, the text stream's (stream 0 of the double blocks' joint attention)
VAE_WIDTH, VAE_HEADS, VAE_LATENTS = 1024, 16, 3072  # Hunyuan3D-2's ShapeVAE (assumed config: see model_workloads)
VAE_QUERIES = 10_000  # points per decoder chunk (`num_chunks` of hy3dgen's volume decoders)
HOST_CALLS = 2000
COPY_BYTES = 1 << 30


@dataclass
class Workload:
    """One op on concrete inputs: `fused()` and `unfused(*args)` compute the same outputs."""

    op: str
    args: tuple
    fused: Callable[[], object]
    unfused: Callable[..., object]


@dataclass
class Timing:
    op: str
    dtype: str
    batch: int
    tokens: int
    bytes_moved: int
    fused_us: float
    eager_us: float
    compile_us: float
    fused_gbps: float
    fraction_of_copy: float
    speedup_vs_eager: float
    speedup_vs_compile: float


@dataclass
class HostOverhead:
    op: str
    fused_us_per_call: float  # through torch.ops (the dispatcher): Dynamo/Inductor graphs
    direct_us_per_call: float  # fusion_pass.ops.direct: what optimize()'s graphs call
    eager_us_per_call: float


def workloads(batch: int, tokens: int, dtype: torch.dtype, device: str = "cuda") -> list[Workload]:
    """The ops on model-like inputs: shift/scale/gate are chunk views of one `[B, 1, 6D]`
    modulation, q/k/v are `[B, H, L, D/H]` views of one qkv projection output; qk_rmsnorm_cat
    joins a `TXT_TOKENS` stream and an L stream (the double block's joint attention); gelu_cat
    is the single block's `cat(attn, gelu(mlp))` with mlp a split view of the 7D projection."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    x, y = randn(batch, tokens, HIDDEN), randn(batch, tokens, HIDDEN)
    shift, scale, gate = randn(batch, 1, 6 * HIDDEN).chunk(6, dim=-1)[:3]
    q, k, v = heads(randn(batch, tokens, 3 * HIDDEN))
    q_txt, k_txt, v_txt = heads(randn(batch, TXT_TOKENS, 3 * HIDDEN))
    q_weight, k_weight = randn(HIDDEN // HEADS), randn(HIDDEN // HEADS)
    mlp = randn(batch, tokens, 7 * HIDDEN)[..., 3 * HIDDEN:]  # the single block's split view

    def workload(op: str, fused: Callable, unfused: Callable, *args) -> Workload:
        return Workload(op, args, lambda: fused(*args), unfused)

    return [
        workload("layernorm_scale_shift", ops.layernorm_scale_shift, ops.reference_layernorm_scale_shift,
                 x, shift, scale, EPS),
        workload("residual_gate", ops.residual_gate, ops.reference_residual_gate, x, y, gate),
        workload("residual_gate_layernorm_scale_shift", ops.residual_gate_layernorm_scale_shift,
                 ops.reference_residual_gate_layernorm_scale_shift, x, y, gate, shift, scale, EPS),
        workload("qk_rmsnorm", ops.qk_rmsnorm, ops.reference_qk_rmsnorm, q, k, q_weight, k_weight, EPS),
        workload("qk_rmsnorm_cat", ops.qk_rmsnorm_cat, ops.reference_qk_rmsnorm_cat,
                 q_txt, k_txt, v_txt, q, k, v, q_weight, k_weight, q_weight, k_weight, EPS, 2, True),
        workload("gelu_cat", ops.gelu_cat, ops.reference_gelu_cat, x, mlp, 2, "tanh"),
    ]


def model_workloads(dtype: torch.dtype, flux_tokens: int = FLUX_TOKENS, vae_tokens: int = VAE_LATENTS,
                    vae_queries: int = VAE_QUERIES, device: str = "cuda") -> list[tuple[Workload, int, int]]:
    """(workload, batch, tokens) of the ops other models need, at their shapes:

    - `qk_rmsnorm_rope`: Flux-dev's single block, q/k `to_q(x).unflatten(-1, (24, 128))`
      `[1, L, 24, 128]`, bf16/fp16 weights, fp32 tables `cos[None, :, None, :]` (interleaved);
    - `gelu_cat`: Flux-dev's single block, `cat(attn [1, L, 3072], gelu(proj_mlp [1, L, 12288]))`
      (rows wider than one block: column chunks);
    - `qk_rmsnorm_cat_rope`: Flux-dev's double block, the same q/k of the text (512 tokens) and image
      (4096) streams, each with its own weights, joined on dim 1 and rotated by the joint tables;
    - `residual_add_layernorm`: a pre-LN residual of width 3072 (Flux's hidden size) and of the
      ShapeVAE's latent transformer (width 1024, affine LayerNorm);
    - `qk_layernorm`: the ShapeVAE's self-attention (q, k `torch.split`s of `qkv.view(B, N, 16, 192)`)
      and its decoder's cross-attention (q `[1, 10000, 16, 64]` queries, k a split of the latents'
      kv `[1, 3072, 16, 128]`).

    The ShapeVAE config (width 1024, 16 heads, 3072 latents, `qk_norm=True`) is Hunyuan3D-2's
    vae as we read it; the file's defaults leave them to the checkpoint's config."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    def workload(op: str, fused: Callable, unfused: Callable, *args) -> Workload:
        return Workload(op, args, lambda: fused(*args), unfused)

    head_dim = FLUX_HIDDEN // FLUX_HEADS
    q, k = (randn(1, flux_tokens, FLUX_HIDDEN).unflatten(-1, (FLUX_HEADS, head_dim)) for _ in "qk")

    def tables(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:  # interleaved, `[1, L, 1, D]`, fp32
        positions = torch.arange(tokens, device=device, dtype=torch.float32)[:, None]
        angles = positions * 10000.0 ** (-torch.arange(0, head_dim, 2, device=device) / head_dim)
        angles = angles.repeat_interleave(2, -1)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    rope = workload("qk_rmsnorm_rope", ops.qk_rmsnorm_rope, ops.reference_qk_rmsnorm_rope,
                    q, k, randn(head_dim), randn(head_dim), EPS, *tables(flux_tokens), True)
    text = max(1, flux_tokens * FLUX_TEXT_TOKENS // FLUX_TOKENS)  # 512 of 4608; 1 of the host timing's 1
    image = max(1, flux_tokens - text)
    streams = [randn(1, n, FLUX_HIDDEN).unflatten(-1, (FLUX_HEADS, head_dim)) for n in (text, text, image, image)]
    cat_rope = workload("qk_rmsnorm_cat_rope", ops.qk_rmsnorm_cat_rope, ops.reference_qk_rmsnorm_cat_rope,
                        *streams, *(randn(head_dim) for _ in range(4)), EPS, 1, *tables(text + image), True)

    def residual_layernorm(tokens: int, width: int) -> Workload:
        return workload("residual_add_layernorm", ops.residual_add_layernorm, ops.reference_residual_add_layernorm,
                        randn(1, tokens, width), randn(1, tokens, width), randn(width), randn(width), EPS)

    vae_dim = VAE_WIDTH // VAE_HEADS
    qkv = randn(1, vae_tokens, 3 * VAE_WIDTH).view(1, vae_tokens, VAE_HEADS, 3 * vae_dim)
    vae_q, vae_k, _ = torch.split(qkv, vae_dim, dim=-1)
    queries = randn(1, vae_queries, VAE_WIDTH).view(1, vae_queries, VAE_HEADS, vae_dim)
    latent_k, _ = torch.split(randn(1, vae_tokens, 2 * VAE_WIDTH).view(1, vae_tokens, VAE_HEADS, 2 * vae_dim), vae_dim, -1)
    params = [randn(vae_dim) for _ in range(4)]
    flux_gelu_cat = workload("gelu_cat", ops.gelu_cat, ops.reference_gelu_cat, randn(1, flux_tokens, FLUX_HIDDEN),
                             randn(1, flux_tokens, 4 * FLUX_HIDDEN), 2, "tanh")
    return [
        (rope, 1, flux_tokens),
        (flux_gelu_cat, 1, flux_tokens),
        (cat_rope, 1, text + image),
        (residual_layernorm(flux_tokens, FLUX_HIDDEN), 1, flux_tokens),
        (residual_layernorm(vae_tokens, VAE_WIDTH), 1, vae_tokens),
        (workload("qk_layernorm", ops.qk_layernorm, ops.reference_qk_layernorm, vae_q, vae_k, *params, EPS),
         1, vae_tokens),
        (workload("qk_layernorm", ops.qk_layernorm, ops.reference_qk_layernorm, queries, latent_k, *params, EPS),
         1, vae_queries),
    ]


def heads(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v: `[B, H, L, D/H]` views of a `[B, L, 3D]` projection, as `rearrange` makes them."""
    batch, tokens, _ = qkv.shape
    return qkv.reshape(batch, tokens, 3, HEADS, HIDDEN // HEADS).permute(2, 0, 3, 1, 4).unbind(0)


def as_tuple(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def bytes_moved(inputs: tuple, outputs: tuple[torch.Tensor, ...]) -> int:
    """Each tensor at its real size: a `[B, 1, D]` view counts B * D elements, not B * L * D."""
    tensors = [t for t in (*inputs, *outputs) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def median_us(fn: Callable[[], object]) -> float:
    fn()  # compile (Triton, Inductor) before the graph capture
    return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3


def copy_gbps() -> dict[str, float]:
    """Device copy bandwidth (bytes read + written) of a 1 GiB `dst.copy_(src)`, CUDA-graph timed
    and stream timed (`do_bench`): inside a graph the copy may become a copy-engine memcpy node,
    slower than the copy kernel the stream runs. The faster is the ceiling ops are held to."""
    src = torch.empty(COPY_BYTES // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    graph_us = median_us(lambda: dst.copy_(src))
    stream_us = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e3
    graph, stream = 2 * COPY_BYTES / graph_us / 1e3, 2 * COPY_BYTES / stream_us / 1e3
    return {"copy_gbps_graph": graph, "copy_gbps_stream": stream, "copy_gbps": max(graph, stream)}


def time_workload(w: Workload, batch: int, tokens: int, dtype: torch.dtype, copy: float) -> Timing:
    fused_out = as_tuple(w.fused())
    for actual, expected in zip(fused_out, as_tuple(w.unfused(*w.args))):
        torch.testing.assert_close(actual, expected, atol=0.1, rtol=0.02)
    compiled = torch.compile(w.unfused, dynamic=False)
    fused_us = median_us(w.fused)
    eager_us = median_us(lambda: w.unfused(*w.args))
    compile_us = median_us(lambda: compiled(*w.args))
    moved = bytes_moved(w.args, fused_out)
    gbps = moved / fused_us / 1e3
    return Timing(
        w.op, str(dtype).removeprefix("torch."), batch, tokens, moved, fused_us, eager_us, compile_us,
        gbps, gbps / copy, eager_us / fused_us, compile_us / fused_us,
    )


def host_us_per_call(fn: Callable[[], object]) -> float:
    """Host time per call, calls queued without synchronising (the GPU work is tiny)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / HOST_CALLS * 1e6


def host_overheads() -> list[HostOverhead]:
    def direct(w: Workload) -> Callable[[], object]:
        call = direct_call(getattr(torch.ops.fusion_pass, w.op).default)
        return lambda: call(*w.args)

    small = [*workloads(2, 1, torch.float16), *(w for w, _, _ in model_workloads(torch.float16, 1, 1, 1)[:5])]
    return [
        HostOverhead(w.op, host_us_per_call(w.fused), host_us_per_call(direct(w)),
                     host_us_per_call(lambda w=w: w.unfused(*w.args)))
        for w in small
    ]


def markdown(meta: dict, timings: list[Timing], overheads: list[HostOverhead]) -> str:
    lines = [
        f"# Fused ops on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}; CUDA-graph medians. Device copy (read + write): "
        f"{meta['copy_gbps_stream']:.0f} GB/s stream-timed, {meta['copy_gbps_graph']:.0f} GB/s in a CUDA graph; "
        "'of copy' is against the faster. B = 8 moves well past the 60 MB L2; smaller shapes may stay "
        "partly L2-resident between graph replays.",
        "",
        "| op | dtype | B x L | MB moved | fused us | eager us | compile us | fused GB/s | of copy | vs eager | vs compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in timings:
        lines.append(
            f"| {t.op} | {t.dtype} | {t.batch} x {t.tokens} | {t.bytes_moved / 1e6:.1f} | {t.fused_us:.1f} | "
            f"{t.eager_us:.1f} | {t.compile_us:.1f} | {t.fused_gbps:.0f} | {t.fraction_of_copy:.0%} | "
            f"{t.speedup_vs_eager:.2f}x | {t.speedup_vs_compile:.2f}x |"
        )
    lines += [
        "",
        f"Host time per call ({HOST_CALLS} calls, L = 1 (B = 2 at Hunyuan3D-2 widths, B = 1 at the other "
        "models'), fp16, no sync):",
        "",
        "| op | fused via torch.ops us/call | fused direct (optimize) us/call | eager unfused us/call |",
        "|---|---|---|---|",
    ]
    lines += [f"| {o.op} | {o.fused_us_per_call:.1f} | {o.direct_us_per_call:.1f} | {o.eager_us_per_call:.1f} |"
              for o in overheads]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="directory for the JSON and markdown")
    out_dir = parser.parse_args().out
    if not torch.cuda.is_available():
        sys.exit("ops_bench needs a CUDA device")
    torch._dynamo.config.recompile_limit = 64  # one static compile per op, shape and dtype
    copy = copy_gbps()
    timings = [
        time_workload(w, batch, tokens, dtype, copy["copy_gbps"])
        for dtype in DTYPES
        for batch, tokens in SHAPES
        for w in workloads(batch, tokens, dtype)
    ] + [
        time_workload(w, batch, tokens, dtype, copy["copy_gbps"])
        for dtype in DTYPES
        for w, batch, tokens in model_workloads(dtype)
    ]
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        **copy,
    }
    overheads = host_overheads()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**meta, "timings": [asdict(t) for t in timings], "host_overhead": [asdict(o) for o in overheads]}
    (out_dir / "ops_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "ops_bench.md").write_text(markdown(meta, timings, overheads))
    print((out_dir / "ops_bench.md").read_text())


if __name__ == "__main__":
    main()
