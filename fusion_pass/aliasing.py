"""Which nodes of a graph may share memory with a tensor that the graph writes in place.

Used by ``normalize`` before it merges repeated pure reads of one value (``x.float()``
twice): two reads of a tensor that nothing writes see the same values, wherever they sit.

A written tensor is the first argument of an in-place operation (``out[..., 0::2] = v``,
``x.add_(y)``). Its *alias class* is every node that may share its storage: walk back
through view-like nodes to the node that created the storage; when that is a fresh
allocation (``torch.empty_like(q)``, ``zeros``, ``clone``, the result of ``a & b``), the class is that base and
everything derived from it through view-like nodes. When the base is anything else (an
input, a parameter, a result that may itself be a view of an input), the writes cannot be
bounded and :func:`written_aliases` answers None: the caller must assume anything may change.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}

#: may return a view of (share storage with) their first argument
_VIEW_METHODS = {
    "to", "type", "type_as", "view", "view_as", "reshape", "reshape_as", "unsqueeze", "squeeze", "expand",
    "expand_as", "permute", "transpose", "contiguous", "flatten", "unflatten", "narrow", "select", "chunk",
    "split", "split_with_sizes", "unbind", "detach", "t", "as_strided", "movedim", "float", "half", "bfloat16",
    "double", "bool", "int", "long",
}
_VIEW_FUNCTIONS = {
    operator.getitem, torch.unsqueeze, torch.reshape, torch.flatten, torch.squeeze, torch.permute,
    torch.transpose, torch.narrow, torch.select, torch.chunk, torch.split, torch.unbind, torch.detach,
    torch.movedim,
}
#: return new storage that no input shares (allocations, and out-of-place arithmetic on tensors)
_ALLOCATIONS = {
    torch.empty, torch.empty_like, torch.zeros, torch.zeros_like, torch.ones, torch.ones_like, torch.full,
    torch.full_like, torch.clone, torch.cat, torch.stack, torch.where, operator.add, operator.sub, operator.mul,
    operator.truediv, operator.neg, operator.and_, operator.or_, operator.xor, operator.invert, operator.eq,
    operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
}
_ALLOCATING_METHODS = {"new_empty", "new_zeros", "new_ones", "new_full", "clone", "repeat"}


def mutates(node: fx.Node, root: nn.Module | None) -> bool:
    """Whether ``node`` may modify a tensor in place (conservatively: user modules may)."""
    if node.op == "call_module":
        return root is None or not type(root.get_submodule(node.target)).__module__.startswith("torch.nn")
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        schema_mutates = getattr(getattr(node.target, "_schema", None), "is_mutable", False)
        return node.target in _IN_PLACE_OPERATORS or schema_mutates or getattr(node.target, "__name__", "").endswith("_")
    return False


def is_view_like(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def written_aliases(graph: fx.Graph, root: nn.Module | None) -> set[fx.Node] | None:
    """Every node that may share storage with a tensor written in place; None when a write
    cannot be bounded (an in-place op on a non-fresh tensor, a module call that may write)."""
    aliases: set[fx.Node] = set()
    for node in graph.nodes:
        if not mutates(node, root):
            continue
        written = node.args[0] if node.op != "call_module" and node.args else None
        if not isinstance(written, fx.Node):
            return None
        base = _storage_base(written)
        if base is None:
            return None
        aliases |= _derived_views(base)
    return aliases


def _storage_base(node: fx.Node) -> fx.Node | None:
    """The fresh allocation ``node`` is a view of, or None when it is not provably one."""
    while is_view_like(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    fresh = (node.op == "call_function" and node.target in _ALLOCATIONS) or (
        node.op == "call_method" and node.target in _ALLOCATING_METHODS
    )
    return node if fresh else None


def _derived_views(base: fx.Node) -> set[fx.Node]:
    found, pending = {base}, [base]
    while pending:
        current = pending.pop()
        for user in current.users:
            if user not in found and is_view_like(user) and user.args and user.args[0] is current:
                found.add(user)
                pending.append(user)
    return found
