"""Composite backward for the functional fused ops: differentiate their PyTorch reference.

The forward saves its inputs; the backward recomputes the reference under `enable_grad` and
returns `torch.autograd.grad` of it for every tensor input that needs a gradient (None for the
others and for non-tensor arguments such as eps). First-order only: the returned gradients
carry no graph, so a double backward raises instead of computing a wrong value.
"""

from collections.abc import Callable
from typing import Any

import torch


def register_reference_autograd(op: Any, reference: Callable[..., Any]) -> None:
    """Give the custom op `op` the gradients of `reference` (same positional signature)."""

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in inputs))
        ctx.non_tensor_inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]

    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        wanted = [i for i, t in enumerate(saved) if t is not None and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            inputs = [
                t.detach().requires_grad_(i in wanted) if t is not None else other
                for i, (t, other) in enumerate(zip(saved, ctx.non_tensor_inputs))
            ]
            outputs = reference(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
            grads = torch.autograd.grad(
                [o for o, _ in pairs],
                [inputs[i] for i in wanted],
                [g for _, g in pairs],
                allow_unused=True,
            )
        result: list[torch.Tensor | None] = [None] * len(saved)
        for i, grad in zip(wanted, grads):
            result[i] = grad
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)
