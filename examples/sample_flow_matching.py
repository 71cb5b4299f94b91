"""Flow-matching sampling as Hunyuan3D-2's pipeline runs it, with the optimized DiT against
the original: the final latents agree, and each loop is timed.

    python examples/sample_flow_matching.py                   # tiny, CPU, 5 steps: seconds
    python examples/sample_flow_matching.py --config hunyuan3d-2 --device cuda --dtype float16   # 50 steps

The loop is hy3dgen 2.0.2's (``hy3dgen/shapegen/``), minus the image encoder and the VAE:
- ``pipelines.py``, ``Hunyuan3DDiTFlowMatchingPipeline.__call__``: ``sigmas =
  np.linspace(0, 1, num_inference_steps)``; with classifier-free guidance the latents are
  doubled, the condition is ``cat([cond, uncond])`` (``encode_cond``; the unconditional
  embedding is zeros), the model gets ``t = timestep / 1000``, i.e. sigma itself, and
  ``noise_pred = uncond + guidance_scale * (cond - uncond)`` with guidance_scale 5.0.
  Guidance-distilled models (``guidance_embed``, the turbo variants) skip CFG and get
  ``guidance=[5.0] * batch`` instead.
- ``schedulers.py``, ``FlowMatchEulerDiscreteScheduler``: ``set_timesteps(sigmas=...)`` with the
  default shift 1.0 keeps the sigmas and appends a final 1.0; ``step`` computes
  ``prev_sample = sample.float() + (sigma_next - sigma) * model_output`` and casts it back to
  the model output's dtype. Sigma runs from 0 (noise) to 1 (data) -- "our timesteps are
  reversed" -- so the last of the ``steps`` calls moves by 1 - 1 = 0: the pipeline spends it
  anyway, and so do we, to time the same work.
"""
from __future__ import annotations

import copy
import sys
import time

import torch
from rich.console import Console

import fusion_pass
from common import DTYPES, build, model_parser
from reference_models import DiTConfig, get_config

# max|optimized - original| / max|original| of the final latents allowed per dtype. Larger
# than for one call: per-step differences add up, and CFG multiplies the difference between
# the conditional and unconditional predictions by the guidance scale.
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 1e-1}
GUIDANCE_SCALE = 5.0


def parse_args(argv):
    parser = model_parser(__doc__)
    parser.add_argument("--steps", type=int,
                        help="denoising steps (default: 5 on the CPU, 50 on CUDA, the pipeline's default)")
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 50 if torch.device(args.device).type == "cuda" else 5
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    return args


@torch.inference_mode()
def sample(model, noise: torch.Tensor, cond: torch.Tensor, steps: int, config: DiTConfig, guidance_scale: float):
    """Euler flow-matching sampling from ``noise`` under condition ``cond`` (batch of one image)."""
    sigmas = torch.linspace(0, 1, steps, dtype=torch.float32)
    sigmas = torch.cat([sigmas, torch.ones(1)])  # set_timesteps appends sigma = 1
    use_cfg = not config.guidance_embed
    if use_cfg:
        contexts = {"main": torch.cat([cond, torch.zeros_like(cond)])}  # [cond, uncond]
        extra = {}
    else:
        contexts = {"main": cond}
        extra = {"guidance": torch.full((noise.shape[0],), guidance_scale, dtype=noise.dtype, device=noise.device)}
    latents = noise
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        model_input = torch.cat([latents] * 2) if use_cfg else latents
        t = torch.full((model_input.shape[0],), sigma, dtype=latents.dtype, device=latents.device)
        noise_pred = model(model_input, t, contexts, **extra)
        if use_cfg:
            pred_cond, pred_uncond = noise_pred.chunk(2)
            noise_pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        latents = (latents.float() + (sigma_next - sigma) * noise_pred).to(noise_pred.dtype)
    return latents


def timed(device: torch.device, fn, *args):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = get_config(args.config)

    original = build(args)
    optimized = fusion_pass.optimize(copy.deepcopy(original))
    report = fusion_pass.report(optimized)
    console.print(f"optimized: {report.total} sites fused ({', '.join(f'{k} {v}' for k, v in report.counts().items())})")

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, config.latent_tokens, config.in_channels, generator=generator).to(device, dtype)
    cond = torch.randn(1, config.cond_tokens, config.context_in_dim, generator=generator).to(device, dtype)
    run = (noise, cond, args.steps, config, args.guidance_scale)

    sample(original, noise, cond, 2, config, args.guidance_scale)  # warm up both (allocator, kernel caches)
    sample(optimized, noise, cond, 2, config, args.guidance_scale)
    expected, seconds_original = timed(device, sample, original, *run)
    actual, seconds_optimized = timed(device, sample, optimized, *run)

    error = float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())
    ok = bool(torch.isfinite(actual).all()) and error <= TOLERANCE[args.dtype]
    per_step = lambda seconds: f"{seconds:.2f} s ({1e3 * seconds / args.steps:.1f} ms/step)"  # noqa: E731
    console.print(f"{args.steps} steps, {'CFG batch 2' if not config.guidance_embed else 'guidance embedded'}, "
                  f"{args.dtype} on {device}: original {per_step(seconds_original)}, "
                  f"optimized {per_step(seconds_optimized)}, speed-up {seconds_original / seconds_optimized:.2f}x")
    console.print(f"final latents: max relative error {error:.3g} (tolerance {TOLERANCE[args.dtype]:g}): "
                  f"{'ok' if ok else 'TOO LARGE'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
