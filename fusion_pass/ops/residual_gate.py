"""Gated residual: `fusion_pass::residual_gate(residual, y, gate) -> residual + gate * y`.

residual, y: `[..., D]`; gate broadcasts to them, typically a `[B, 1, D]` chunk view of a
`[B, 1, 6D]` modulation, read through strides. Shape and dtype are those of the unfused
expression. The kernel is `layernorm_modulate`'s with NORMALIZE off (fp32 arithmetic, one
rounding); other dtypes, an operand that adds dims, D > MAX_BLOCK or CPU tensors outside
`interpret_on_cpu()` run the reference.
"""

from torch import Tensor

from .direct import fused_op
from .launch import Launch, launch_mode
from .layernorm_modulate import run_residual_norm_modulate
from .reference_autograd import register_reference_autograd


def reference_residual_gate(residual: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    return residual + gate * y


def _residual_gate(residual: Tensor, y: Tensor, gate: Tensor, launch: Launch) -> Tensor:
    """The op's body (`launch_mode(residual)`) and fake impl (`Launch.NONE`): kernel or reference."""
    outputs = run_residual_norm_modulate(residual, y=y, gate=gate, launch=launch)
    if outputs is not None:
        return outputs.residual
    return reference_residual_gate(residual, y, gate)


@fused_op("residual_gate")
def residual_gate(residual: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """`residual + gate * y` in one kernel."""
    return _residual_gate(residual, y, gate, launch_mode(residual))


@residual_gate.register_fake
def _(residual, y, gate):
    return _residual_gate(residual, y, gate, Launch.NONE)


register_reference_autograd(residual_gate, reference_residual_gate)
