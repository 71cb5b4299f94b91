"""Eager calls of a fused op without the torch.library dispatcher, where nothing needs it.

A call through `torch.ops.fusion_pass.<op>` passes the autograd wrapper, a redispatch and
Dynamo's disable wrapper before reaching the op's Python body: ~40 us per call on the H200
box's CPU, as much as the body itself, and ~200 calls per Hunyuan3D-2 step. Graphs that
`optimize()` installs run eagerly, so they call `direct_call(op)` instead: the same body,
entered directly when

- no autograd is needed (grad mode off, or no tensor argument requires grad),
- nothing is tracing (Dynamo, or a dispatch / function mode such as FakeTensorMode), and
- every tensor argument is a plain `torch.Tensor` (or `nn.Parameter`), not a subclass;

and through the dispatcher otherwise. Both paths run the same body: the results are identical.
Ops are defined with `fused_op`, which registers the op and records its body.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .launch import PLAIN_TENSOR_TYPES

_BODIES: dict[Any, Callable] = {}  # op overload -> the op's Python body (same signature)
_DIRECT: dict[Any, Callable] = {}  # op overload -> its direct-call wrapper, built once


def fused_op(name: str, *, opaque: bool = False) -> Callable:
    """Decorator: `torch.library.triton_op("fusion_pass::<name>", mutates_args=())` of the
    function (`custom_op` when `opaque`: torch.compile calls it whole, never its body), which is
    also recorded as the body that `direct_call` may enter directly.

    A `triton_op` is a custom op that torch.compile decomposes into its body (AOTAutograd calls
    it under `FunctionalTensorMode`; its launch goes into the graph through `wrap_triton`, see
    `launch.Launch`), so Inductor allocates the outputs and launches the kernel with its own
    launcher instead of calling the op through the dispatcher (~40 us a call). `torch.export`
    keeps the op whole. Each op registers its own fake impl, which launches nothing."""

    def define(body: Callable):
        define_op = torch.library.custom_op if opaque else torch.library.triton_op
        op = define_op(f"fusion_pass::{name}", mutates_args=())(body)
        _BODIES[getattr(torch.ops.fusion_pass, name).default] = body
        return op

    return define


def direct_call(overload) -> Callable | None:
    """The direct-call wrapper of an op overload (`torch.ops.fusion_pass.<op>.default`), or
    None for an op without a registered body."""
    if overload not in _DIRECT and overload in _BODIES:
        _DIRECT[overload] = _wrap(overload, _BODIES[overload])
    return _DIRECT.get(overload)


def call_directly(graph) -> int:
    """Point every call of a fused op in the FX graph ``graph`` at its direct-call wrapper
    (for graphs that run eagerly); returns how many calls it changed."""
    changed = 0
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            direct = direct_call(node.target)
            if direct is not None:
                node.target, changed = direct, changed + 1
    return changed


def _wrap(overload, body: Callable) -> Callable:
    def call(*args):
        if _needs_dispatcher(args):
            return overload(*args)
        return body(*args)

    call.__name__ = f"{overload.name().split('::')[-1]}_direct"  # what the generated graph code shows
    call.__qualname__ = call.__name__
    call.__doc__ = f"`{overload}` without the dispatcher where nothing needs it (see fusion_pass.ops.direct)."
    return call


def _needs_dispatcher(args: tuple) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return True
    grad = torch.is_grad_enabled()
    for arg in args:
        if type(arg) in PLAIN_TENSOR_TYPES:  # most arguments: checked first (this runs on every fused call)
            if grad and arg.requires_grad:
                return True
        elif isinstance(arg, torch.Tensor):  # a subclass
            return True
        elif isinstance(arg, (list, tuple)) and _needs_dispatcher(arg):  # Tensor[] arguments too
            return True
    return False
