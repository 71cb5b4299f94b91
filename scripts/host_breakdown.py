"""Where the host time of one fused-op call goes, layer by layer, on a CUDA machine.

    python3 scripts/host_breakdown.py

For `residual_gate_layernorm_scale_shift` on tiny fp16 tensors (B=2, L=1, D=1024: the GPU
work is negligible), times N back-to-back calls without synchronising (host time per call):
the torch.library op, the op's Python body (no dispatcher), the body's planning alone, the
Triton `kernel[grid](...)` launch alone, and the compiled kernel's own launcher.
"""
import time

import torch

from fusion_pass.ops import layernorm_modulate as lm
from fusion_pass.ops.launch import row_settings

N = 3000


def per_call_us(fn) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(N):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / N * 1e6


def main():
    dev, dt, D = "cuda", torch.float16, 1024
    residual, y = (torch.randn(2, 1, D, device=dev, dtype=dt) for _ in range(2))
    mod = torch.randn(2, 1, 6 * D, device=dev, dtype=dt)
    shift, scale, gate = mod.chunk(6, dim=-1)[:3]
    args = (residual, y, gate, shift, scale, 1e-6, None, None)
    op = torch.ops.fusion_pass.residual_gate_layernorm_scale_shift.default

    r, out = torch.empty_like(residual), torch.empty_like(residual)
    key = (False, *(lm.tensor_key(t) for t in (residual, y, gate, shift, scale, None, None)))
    plan = lm._launch_plan(key, r.stride())
    settings = row_settings(plan.n_cols, plan.elem_bytes)
    grid = (settings.programs(plan.n_rows),)
    kernel_args = (residual, y, gate, shift, scale, None, None, r, out, 1e-6, *plan.args)
    meta = dict(**plan.constexprs, BLOCK_ROWS=settings.block_rows, BLOCK_D=settings.block_size,
                num_warps=settings.num_warps)
    compiled = lm._residual_norm_modulate_kernel[grid](*kernel_args, **meta)
    bound = [*kernel_args, *(meta[k] for k in list(plan.constexprs) + ["BLOCK_ROWS", "BLOCK_D"])]

    rows = {
        "eager unfused expression": lambda: lm.reference_residual_gate_layernorm_scale_shift(*args),
        "torch.ops op (dispatcher + autograd wrapper + body)": lambda: op(*args),
        "op body (planning + empty_like + Triton launch)": lambda: lm._residual_gate_layernorm_scale_shift(*args, launch=True),
        "planning only (keys + cached plans + 2 empty_like)": lambda: (
            lm._output_dtypes(*key), torch.empty_like(residual), torch.empty_like(residual),
            lm._launch_plan(key, r.stride())),
        "Triton kernel[grid](...) only": lambda: lm._residual_norm_modulate_kernel[grid](*kernel_args, **meta),
    }
    try:
        runner = compiled[grid]
        runner(*bound)
        rows["compiled kernel launcher only (CompiledKernel[grid])"] = lambda: runner(*bound)
    except Exception as exc:  # noqa: BLE001 - the launcher API differs between Triton versions
        print(f"CompiledKernel[grid] not usable here: {type(exc).__name__}: {exc}")
    for name, fn in rows.items():
        print(f"{per_call_us(fn):8.1f} us  {name}")


if __name__ == "__main__":
    main()
