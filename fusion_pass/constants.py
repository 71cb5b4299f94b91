"""Tensor constants of a captured graph, held by the graph's code, never by the module.

A forward that builds a tensor from Python values alone (``torch.arange(half) / half``)
computes the same tensor on every call; FX evaluates it once while tracing. Capture keeps
that value in a :class:`TensorConstant` node (a call with no inputs) instead of registering
it as a module attribute, so ``vars(module)``, ``state_dict()`` and checkpoints are unchanged.
Capture accepts constants only when tracing drew no random numbers (a random draw frozen
into a constant would change the model).

``fold_device_moves`` (run by ``normalize``) replaces ``constant.to(x.device)`` with a
per-device cached copy: the official timestep embedding copies a CPU ``arange`` to the GPU
on every call, a host-blocking copy that also makes the step impossible to capture as a
CUDA graph. The fold applies only when nothing downstream can write into the cached
tensor (every user up to the first op that returns a new tensor is known not to mutate).
"""
from __future__ import annotations

import itertools
import operator

import torch
from torch import fx

_ids = itertools.count()


class TensorConstant:
    """A graph node target returning one fixed tensor; ``on(device)`` returns a copy on
    ``device``, made once per device and then reused."""

    def __init__(self, value: torch.Tensor):
        self.value = value.detach()
        self.__name__ = f"tensor_constant_{next(_ids)}"  # FX code generation names the global by it
        self.__module__ = __name__
        self._copies: dict[torch.device, torch.Tensor] = {}

    def __call__(self) -> torch.Tensor:
        return self.value

    def on(self, device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        if device == self.value.device:
            return self.value
        copy = self._copies.get(device)
        if copy is None:
            copy = self._copies[device] = self.value.to(device)
        return copy

    def __repr__(self) -> str:
        return f"TensorConstant({tuple(self.value.shape)}, {self.value.dtype}, {self.value.device})"


def constant_node(graph: fx.Graph, value: torch.Tensor) -> fx.Node:
    return graph.call_function(TensorConstant(value), ())


def fold_device_moves(graph: fx.Graph) -> int:
    """``constant.to(<x>.device)`` -> ``constant.on(<x>.device)``; returns the number folded."""
    folded = 0
    for node in list(graph.nodes):
        if not _is_device_move_of_constant(node) or not _never_written(node):
            continue
        source = node.args[0]
        with graph.inserting_before(node):
            cached = graph.call_function(source.target.on, (node.args[1],))
        cached.meta = dict(node.meta)
        node.replace_all_uses_with(cached)
        graph.erase_node(node)
        if not source.users:
            graph.erase_node(source)
        folded += 1
    return folded


def _is_device_move_of_constant(node: fx.Node) -> bool:
    if node.op != "call_method" or node.target != "to" or node.kwargs or len(node.args) != 2:
        return False
    source, device = node.args
    is_constant = isinstance(source, fx.Node) and isinstance(source.target, TensorConstant)
    reads_device = isinstance(device, torch.device) or (
        isinstance(device, fx.Node) and device.op == "call_function" and device.target is getattr
        and device.args[1:] == ("device",)
    )
    return is_constant and reads_device


#: functions whose result is a new tensor (never a view of an input) and that write nothing
_FRESH_RESULT = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.matmul, torch.cat, torch.stack, torch.exp, torch.cos, torch.sin, torch.sqrt,
    torch.rsqrt, torch.add, torch.mul, torch.sub, torch.div,
}
_FRESH_METHODS = {"cos", "sin", "exp", "sqrt", "rsqrt", "add", "mul", "sub", "div", "clone", "sum", "mean", "prod",
                  "norm", "pow", "neg", "abs"}
#: functions and methods that may return a view of their input but never write to it
_VIEW_FUNCTIONS = {operator.getitem, torch.unsqueeze, torch.reshape, torch.flatten, torch.squeeze}
_VIEW_METHODS = {"to", "float", "half", "double", "view", "reshape", "unsqueeze", "squeeze", "expand",
                 "permute", "transpose", "contiguous", "flatten", "type"}


def _never_written(node: fx.Node) -> bool:
    """Whether no user of ``node``, or of any view of it, can modify it in place."""
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            kind = _classify(user)
            if kind == "view":
                pending.append(user)
            elif kind != "fresh":
                return False
    return True


def _classify(node: fx.Node) -> str:
    if "out" in node.kwargs:
        return "unknown"
    if node.op == "call_function":
        if node.target in _FRESH_RESULT:
            return "fresh"
        if node.target in _VIEW_FUNCTIONS:
            return "view"
    if node.op == "call_method":
        if node.target in _FRESH_METHODS:
            return "fresh"
        if node.target in _VIEW_METHODS:
            return "view"
    return "unknown"
