"""RMSNorm + adaLN modulation (LTX-Video's `norm1(x) * (1 + scale_msa) + shift_msa`):

    fusion_pass::rmsnorm_scale_shift(x, shift, scale, eps, weight) -> out
        out = F.rms_norm(x, (D,), weight, eps) * (1 + scale) + shift

x: `[..., D]`, any strides; shift, scale broadcast to x (`[B, 1, D]` chunk views, `[B, D]` after
`unsqueeze(1)`, `[D]`); weight: `[D]` in x's dtype, or None. The output's dtype and shape are those
of the unfused expression (x's dtype promoted with shift's and scale's). The kernel is
`layernorm_modulate`'s with the RMS switch on: fp32 arithmetic, `x * rsqrt(mean(x^2) + eps)`, one
rounding on store, where the unfused spelling (diffusers' `RMSNorm`) also rounds the norm to x's
dtype before modulating it. Other dtypes, a weight of another dtype, D > MAX_BLOCK or CPU
tensors outside `interpret_on_cpu()` run the reference.
"""

import torch.nn.functional as F
from torch import Tensor

from .direct import fused_op
from .launch import Launch, launch_mode
from .layernorm_modulate import run_residual_norm_modulate
from .reference_autograd import register_reference_autograd


def reference_rmsnorm_scale_shift(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, weight: Tensor | None = None
) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps) * (1 + scale) + shift


def _rmsnorm_scale_shift(x, shift, scale, eps, weight, launch: Launch) -> Tensor:
    """The op's body (`launch_mode(x)`) and fake impl (`Launch.NONE`): kernel or reference."""
    outputs = run_residual_norm_modulate(x, shift=shift, scale=scale, weight=weight, eps=eps, rms=True, launch=launch)
    if outputs is not None:
        return outputs.normed
    return reference_rmsnorm_scale_shift(x, shift, scale, eps, weight)


@fused_op("rmsnorm_scale_shift")
def rmsnorm_scale_shift(x: Tensor, shift: Tensor, scale: Tensor, eps: float, weight: Tensor | None = None) -> Tensor:
    """`F.rms_norm(x, (D,), weight, eps) * (1 + scale) + shift` in one kernel."""
    return _rmsnorm_scale_shift(x, shift, scale, eps, weight, launch_mode(x))


@rmsnorm_scale_shift.register_fake
def _(x, shift, scale, eps, weight=None):
    return _rmsnorm_scale_shift(x, shift, scale, eps, weight, Launch.NONE)


register_reference_autograd(rmsnorm_scale_shift, reference_rmsnorm_scale_shift)
