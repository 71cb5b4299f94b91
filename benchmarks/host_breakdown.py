"""Where the host time of one fused-op call goes, layer by layer, on a CUDA machine.

    python3 benchmarks/host_breakdown.py

For `residual_gate_layernorm_scale_shift` on tiny fp16 tensors (B=2, L=1, D=1024: the GPU
work is negligible), times N back-to-back calls without synchronising (host time per call):
the torch.library op, the direct call that optimize()'s graphs make (the op's body without
the dispatcher), the body's planning alone, `launch_kernel` (compiled-kernel reuse) alone,
and a plain Triton `kernel[grid](...)` launch.
"""
import time

import torch

from fusion_pass.ops import layernorm_modulate as lm
from fusion_pass.ops.direct import direct_call
from fusion_pass.ops.launch import launch_kernel

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
    call = lm._launch_plan(key, r.stride())
    call_args = (residual, y, gate, shift, scale, None, None, r, out, 1e-6)

    rows = {
        "eager unfused expression": lambda: lm.reference_residual_gate_layernorm_scale_shift(*args),
        "torch.ops op (dispatcher + autograd wrapper + body)": lambda: op(*args),
        "direct call, as optimize()'s graphs make it (body, no dispatcher)": lambda: direct_call(op)(*args),
        "planning only (keys + cached plans + 2 empty_like)": lambda: (
            lm._output_dtypes(*key), torch.empty_like(residual), torch.empty_like(residual),
            lm._launch_plan(key, r.stride())),
        "launch_kernel only (compiled kernel reused)": lambda: launch_kernel(
            lm._residual_norm_modulate_kernel, call, call_args),
        "Triton kernel[grid](...) only": lambda: lm._residual_norm_modulate_kernel[(call.programs,)](
            *call_args, *call.tail, **call.constexprs, num_warps=call.num_warps),
    }
    for name, fn in rows.items():
        print(f"{per_call_us(fn):8.1f} us  {name}")


if __name__ == "__main__":
    main()
