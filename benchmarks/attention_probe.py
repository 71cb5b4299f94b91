"""Can a Triton flash-attention forward beat the SDPA backend PyTorch picks (cuDNN) at the DiTs' shapes?

Issue 14's profile puts 20.1 of Hunyuan3D-2's 41.2 ms of kernels in cuDNN's SDPA on [2, 16, 4442, 64] fp16
(418 us a call, 387 TFLOP/s). This probe times, side by side in one process (CUDA events, warm-up, median of
repeats), SDPA's default backend against a Triton forward in several variants and tile settings, and checks
each against SDPA (max abs difference, and against an fp64 reference on a slice of heads):

- ``ptr``: pointer loads, full key blocks unmasked, the last block masked;
- ``exp16``: as ``ptr``, with the softmax exponentials taken two at a time in half precision
  (``ex2.approx.f16x2`` / ``ex2.approx.ftz.bf16x2``): the probabilities are rounded to the input dtype for
  the P @ V product anyway, so the exponent's rounding costs about as much as that rounding;
- ``ws``: as ``ptr`` with ``tl.range(..., warp_specialize=True)`` (skipped where this Triton refuses it).

    python3 benchmarks/attention_probe.py --out DIR     (CUDA only; writes attention_probe.md/.json)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fusion_pass.bench.timing import kernel_us


@triton.jit
def _exp2_half(x, IS_BF16: tl.constexpr):
    """2**x for a half-precision tensor, two lanes per instruction."""
    if IS_BF16:
        return tl.inline_asm_elementwise("ex2.approx.ftz.bf16x2 $0, $1;", "=r,r", [x], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x], dtype=tl.float16,
                                     is_pure=True, pack=2)


@triton.jit
def _attn_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, n_ctx, offs_n, qk_scale,
                MASKED: tl.constexpr, EXP16: tl.constexpr, IS_BF16: tl.constexpr):
    if MASKED:
        keep = (start_n + offs_n) < n_ctx
        k = tl.load(k_ptrs, mask=keep[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=keep[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, k) * qk_scale
    if MASKED:
        qk = tl.where(keep[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    if EXP16:
        p = _exp2_half((qk - m_new[:, None]).to(v.dtype), IS_BF16)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    else:
        p32 = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p32, 1)
        p = p32.to(v.dtype)
    acc = acc * alpha[:, None]
    acc = tl.dot(p, v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, O, qk_scale, H, n_ctx,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              EXP16: tl.constexpr, WS: tl.constexpr, IS_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=offs_m[:, None] < n_ctx,
                other=0.0)
    k_base = K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None]
    v_base = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (n_ctx // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base + start_n * skn, v_base + start_n * svn, start_n,
                                    n_ctx, offs_n, qk_scale, False, EXP16, IS_BF16)
    if n_full < n_ctx:
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base + n_full * skn, v_base + n_full * svn, n_full,
                                    n_ctx, offs_n, qk_scale, True, EXP16, IS_BF16)
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=offs_m[:, None] < n_ctx)


def triton_attention(q, k, v, *, block_m, block_n, num_warps, num_stages, exp16=False, ws=False):
    """softmax(q k^T / sqrt(D)) v for q, k, v [B, H, L, D] (last dim contiguous); returns [B, H, L, D]."""
    B, H, L, D = q.shape
    o = torch.empty_like(q)
    grid = (triton.cdiv(L, block_m), B * H)
    _attn_fwd[grid](q, k, v, o, (1.0 / math.sqrt(D)) * 1.4426950408889634, H, L,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                    HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, EXP16=exp16, WS=ws,
                    IS_BF16=q.dtype == torch.bfloat16, num_warps=num_warps, num_stages=num_stages)
    return o


CONFIGS = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
           (128, 128, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (256, 64, 8, 3), (256, 128, 8, 2)]


def probe(shape, dtype, variants, rows):
    B, H, L, D = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    # the model's layout: one [B, L, 3, H, D] projection viewed as [B, H, L, D] (strided)
    qkv = torch.randn(B, L, 3, H, D, device="cuda", dtype=dtype, generator=gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    flops = 4 * B * H * L * L * D
    ref = F.scaled_dot_product_attention(q, k, v)
    hs = slice(0, 2)
    exact = F.scaled_dot_product_attention(q[:, hs].double(), k[:, hs].double(), v[:, hs].double())
    sdpa_err = (ref[:, hs].double() - exact).abs().max().item()
    sdpa_us = kernel_us(lambda: F.scaled_dot_product_attention(q, k, v))
    rows.append(dict(shape=list(shape), dtype=str(dtype), variant="sdpa-default", config=None, us=sdpa_us,
                     tflops=flops / sdpa_us / 1e6, x_sdpa=1.0, err_fp64=sdpa_err, diff_sdpa=0.0))
    print(f"{shape} {dtype} sdpa {sdpa_us:.1f} us {flops / sdpa_us / 1e6:.0f} TFLOP/s err {sdpa_err:.2e}",
          flush=True)
    for name in variants:
        for cfg in CONFIGS:
            bm, bn, nw, ns = cfg
            kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, exp16=name == "exp16", ws=name == "ws")
            try:
                out = triton_attention(q, k, v, **kw)
                torch.cuda.synchronize()
                us = kernel_us(lambda: triton_attention(q, k, v, **kw))
            except Exception as exc:  # a config this Triton cannot build: recorded, not fatal
                print(f"  {name} {cfg}: failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                rows.append(dict(shape=list(shape), dtype=str(dtype), variant=name, config=cfg,
                                 error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                continue
            err = (out[:, hs].double() - exact).abs().max().item()
            diff = (out.float() - ref.float()).abs().max().item()
            rows.append(dict(shape=list(shape), dtype=str(dtype), variant=name, config=cfg, us=us,
                             tflops=flops / us / 1e6, x_sdpa=us / sdpa_us, err_fp64=err, diff_sdpa=diff))
            print(f"  {name} {cfg}: {us:.1f} us ({us / sdpa_us:.3f}x sdpa) err {err:.2e} diff {diff:.2e}",
                  flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default="ptr,exp16,ws")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    rows = []
    shapes = [((2, 16, 4442, 64), torch.float16), ((2, 16, 4442, 64), torch.bfloat16),
              ((2, 16, 1882, 64), torch.float16), ((1, 24, 4608, 128), torch.bfloat16)]
    for shape, dtype in shapes:
        probe(shape, dtype, variants, rows)
    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version())
    (args.out / "attention_probe.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# attention probe: {meta}", "",
             "| shape | dtype | variant | BLOCK_M, BLOCK_N, warps, stages | us | TFLOP/s | x sdpa | err fp64 | diff sdpa |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['variant']} | {r['config']} | failed | | | | |")
        else:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['variant']} | {r['config']} | {r['us']:.1f} | "
                         f"{r['tflops']:.0f} | {r['x_sdpa']:.3f} | {r['err_fp64']:.2e} | {r['diff_sdpa']:.2e} |")
    (args.out / "attention_probe.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
