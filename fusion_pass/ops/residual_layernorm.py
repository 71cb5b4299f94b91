"""Pre-LN residual add + LayerNorm, two outputs from one read of each input:

    fusion_pass::residual_add_layernorm(x, y, weight, bias, eps) -> (residual, normed)
        residual = x + y
        normed   = F.layer_norm(residual, (D,), weight, bias, eps)

the `x = x + f(x)` of a pre-LN block feeding the next block's (or sublayer's) LayerNorm
(hy3dgen's ShapeVAE: `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`). x, y: `[..., D]` of one
shape (no broadcast), any strides; weight, bias: `[D]` or None, in the residual's dtype (as
F.layer_norm requires). Shapes and dtypes are those of the unfused code (residual: x and y's
promoted dtype). The kernel is `layernorm_modulate`'s with the gate and the modulation off: fp32
arithmetic, each output rounded once, the LayerNorm taken of the residual as rounded and
returned, as the unfused code does. Other dtypes, y of another shape, D > MAX_BLOCK or CPU
tensors outside `interpret_on_cpu()` run the reference.
"""

import torch.nn.functional as F
from torch import Tensor

from .direct import fused_op
from .launch import Launch, launch_mode
from .layernorm_modulate import ResidualNormOut, run_residual_norm_modulate
from .reference_autograd import register_reference_autograd


def reference_residual_add_layernorm(
    x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    residual = x + y
    return residual, F.layer_norm(residual, (residual.shape[-1],), weight, bias, eps)


def _residual_add_layernorm(x, y, weight, bias, eps, launch: Launch) -> tuple[Tensor, Tensor]:
    """The op's body (`launch_mode(x)`) and fake impl (`Launch.NONE`): kernel or reference."""
    outputs = run_residual_norm_modulate(x, y=y, weight=weight, bias=bias, eps=eps, normalize=True, launch=launch)
    if outputs is not None:
        return outputs.residual, outputs.normed
    return reference_residual_add_layernorm(x, y, weight, bias, eps)


@fused_op("residual_add_layernorm")
def _residual_add_layernorm_op(
    x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    return _residual_add_layernorm(x, y, weight, bias, eps, launch_mode(x))


@_residual_add_layernorm_op.register_fake
def _(x, y, weight, bias, eps):
    return _residual_add_layernorm(x, y, weight, bias, eps, Launch.NONE)


register_reference_autograd(_residual_add_layernorm_op, reference_residual_add_layernorm)


def residual_add_layernorm(
    x: Tensor, y: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> ResidualNormOut:
    """`r = x + y` and `F.layer_norm(r, (D,), weight, bias, eps)`, each input read once."""
    return ResidualNormOut(*_residual_add_layernorm_op(x, y, weight, bias, eps))
