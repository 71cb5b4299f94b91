"""Guards: assumptions a captured graph was specialised on, checked every time it runs.

FX tracing cannot take a Python branch on a traced tensor (``if torch.is_floating_point(t):``).
For a small set of *metadata* predicates, whose value follows from the dtypes of the
inputs and parameters alone (never from tensor values, so checking one never syncs the
GPU), capture assumes the usual answer, follows that branch, and records an
:func:`assume` node in the graph at the branch point. When a call disagrees, the node
raises :class:`GuardFailed` and the installed forward reruns the module's original
forward: an exact fallback, because capture accepts a guard only where nothing before it
in the graph modifies state (see ``capture.py``).

Data-dependent branches (``if x.sum() > 0``) are not guardable: the module stays uncaptured.

Iterating the pieces of ``x.chunk(n)`` (or a slice of them: Hunyuan3D's ``Modulation`` does
``ModulationOut(*out[:3])``) follows the assumption that chunk made ``n`` pieces (it makes fewer
when the dim is too short), checked by an ``assume`` on ``len(pieces) == n``: the number follows
from shapes alone, like the predicates above.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from fusion_pass.explain import source_expression

#: predicate -> the value assumed at capture (the common case in inference code)
ASSUMED_FUNCTIONS = {torch.is_floating_point: True, torch.is_complex: False}
ASSUMED_METHODS = {"is_floating_point": True, "is_complex": False}


class GuardFailed(Exception):
    """A call broke an assumption its graph was captured under."""


@fx.node.has_side_effect
def assume(value, expected: bool, what: str) -> None:
    """Raise :class:`GuardFailed` unless ``bool(value) == expected`` (``what``: the predicate)."""
    if bool(value) != expected:
        raise GuardFailed(f"{what} is {not expected}; the graph was captured assuming {expected}")


def assumption_for(node: fx.Node) -> tuple[bool, str] | None:
    """``(assumed value, description)`` when ``node`` computes a guardable predicate."""
    if node.op == "call_function" and node.target in ASSUMED_FUNCTIONS:
        return ASSUMED_FUNCTIONS[node.target], f"torch.{node.target.__name__}({source_expression(node.args[0])})"
    if node.op == "call_method" and node.target in ASSUMED_METHODS:
        return ASSUMED_METHODS[node.target], f"{source_expression(node.args[0])}.{node.target}()"
    return None


def chunk_count(node: fx.Node) -> tuple[fx.Node, int, range] | None:
    """``(chunk node, n, which pieces)`` when ``node`` is ``x.chunk(n, ...)`` / ``torch.chunk(x, n, ...)``
    with a constant ``n``, or a constant slice of one; None otherwise."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
        inner = chunk_count(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if inner is None:
            return None
        chunk, n, pieces = inner
        return chunk, n, pieces[node.args[1]]
    is_chunk = (node.op == "call_method" and node.target == "chunk") or (
        node.op == "call_function" and node.target is torch.chunk)
    if not is_chunk:
        return None
    n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    return node, n, range(n)


def guards_in(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "call_function" and node.target is assume]


def describe_guard(guard: fx.Node) -> str:
    """``"torch.is_floating_point(1000.0 * t) is True"``: what an ``assume`` node checks, in
    the forward's own terms (see ``explain.source_expression``)."""
    _, expected, what = guard.args
    return f"{what} is {expected}"

