"""Stage 3, match: what a pattern family is, what it returns, and small helpers to read a
canonical graph (see ``normalize.py``).

A family looks at a normalized graph and yields, per candidate, either a :class:`Match`
(an exact rewrite it vouches for) or a :class:`NearMiss` (looked like a candidate, failed
a guard, left untouched, with one human reason). Families never edit the graph: the
rewrite stage applies a Match (``rewrite.py``), so every family gets the same insertion,
replacement and dead-node rules.

Shapes are known only when the graph carries metadata (Dynamo's ``example_value``);
guards that need them are skipped otherwise, because every fused op computes the exact
unfused expression for any shapes at run time (it falls back to PyTorch itself where
its kernel does not apply).
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.registry import FUSED_OPS


@dataclass(frozen=True)
class NearMiss:
    """A candidate the family refused, and why (one human sentence)."""

    family: str
    where: str
    reason: str


@dataclass
class Match:
    """One exact rewrite: call ``op_key``'s fused op on ``args`` and let it replace ``anchors``.

    ``anchors[i]`` is replaced by field ``output_fields[i]`` of the op's result (``None``
    for a single-tensor result). ``internal`` nodes are erased once nothing uses them.
    ``cast_outputs[i]``, when set, is a node whose dtype anchor ``i`` is cast back to.
    ``weight_owners`` lists ``(module path, attribute)`` of norm parameters read here,
    for the parameter-alias step of installation. ``split_sizes``, when set, says the op
    returns one tensor whose last dim concatenates the anchors' results: anchor ``i`` is
    replaced by view ``i`` of ``torch.split(result, split_sizes, -1)``. ``pack`` lists groups
    of parameter paths (relative to the graph's module) that installation lays out
    consecutively in one buffer each (``fusion_pass/packing.py``)."""

    family: str
    op_key: str
    args: tuple
    anchors: tuple[fx.Node, ...]
    internal: tuple[fx.Node, ...]
    where: str
    detail: str = ""
    output_fields: tuple[str | None, ...] = (None,)
    cast_outputs: tuple[fx.Node | None, ...] = (None,)
    weight_owners: tuple[tuple[str, str], ...] = ()
    split_sizes: tuple[int, ...] | None = None
    pack: tuple[tuple[str, ...], ...] = ()


class PatternFamily(Protocol):
    """What ``patterns/`` provides for each family; see ``patterns/__init__.py``."""

    name: str
    op_key: str
    math: str
    covers: tuple[str, ...]  # families whose sites this one's sites also count as (chains)

    def find(self, graph: fx.Graph, ctx: "MatchContext") -> Iterator[Match | NearMiss]:
        """Yield matches and near-misses; called again after each applied match."""


@dataclass
class MatchContext:
    """What a family may know besides the graph: the module path the graph came from
    (prefix for report locations), the module itself when the graph reads its attributes
    (``get_attr`` nodes; None for Dynamo graphs, whose parameters are placeholders), and the
    nodes that earlier rewrites erased (a family iterating over a snapshot of the graph
    skips those)."""

    path: str = ""
    root: Any = None  # nn.Module | None
    erased: set = field(default_factory=set)

    def live(self, node: fx.Node) -> bool:
        return node not in self.erased

    def where(self, node: fx.Node) -> str:
        """The module path a node came from (innermost module on its stack)."""
        stack = node.meta.get("nn_module_stack")
        inner = ""
        if stack:
            inner = _clean_module_path(list(stack.values())[-1][0])
        if self.path and inner:
            return f"{self.path}.{inner}"
        return self.path or inner or "<root>"


def _clean_module_path(path: str) -> str:
    """Dynamo spells paths as ``L['self'].blocks[0].norm`` or ``L__self___blocks_0``."""
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path.strip(".")


def scan(graph: fx.Graph, ctx: MatchContext, match_at) -> Iterator:
    """``match_at(node)`` for every live node of a snapshot of ``graph``; yields the results
    that are not None (a family's site or a NearMiss), so a family can rewrite as it goes."""
    for node in list(graph.nodes):
        if ctx.live(node):
            found = match_at(node)
            if found is not None:
                yield found


# --- reading canonical nodes ------------------------------------------------------------

def is_call(node: Any, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def is_cast(node: Any) -> bool:
    return (
        isinstance(node, fx.Node) and node.op == "call_method"
        and node.target == canon.CAST_METHOD and len(node.args) == 2 and not node.kwargs
    )


def is_number(value: Any, equal_to: float | None = None) -> bool:
    if not isinstance(value, numbers.Number) or isinstance(value, bool):
        return False
    return equal_to is None or value == equal_to


def operand_orders(node: fx.Node) -> Sequence[tuple[Any, Any]]:
    """Both operand orders of a commutative binary node."""
    a, b = node.args
    return ((a, b), (b, a))


def other_operand(node: fx.Node, known: fx.Node) -> Any:
    a, b = node.args
    return b if a is known else a


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The fake/meta tensor a graph records for ``node`` (Dynamo ``example_value``, or
    ``val``), or None when the graph has no shapes."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def same_shape(a, b) -> bool:
    """Whether two shapes are known equal; symbolic sizes (a dynamic-shape Dynamo graph) count
    as equal only when provably so, without adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(x == y if isinstance(x, int) and isinstance(y, int)
                                    else statically_known_true(x == y) for x, y in zip(a, b))


def reduces_last_dim_only(dim: Any, ndim: int | None) -> bool:
    """``dim`` of a reduction names exactly the last dimension."""
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    if not isinstance(dim, int):
        return False
    return dim == -1 or (ndim is not None and dim == ndim - 1)


def broadcasts_over_last_dim(operand: Any, full: Any) -> bool:
    """True when shapes are known and ``operand`` repeats one value across the last dim
    of ``full`` (a per-row, not per-channel, operand)."""
    op_meta, full_meta = tensor_meta(operand), tensor_meta(full)
    if op_meta is None or full_meta is None or full_meta.dim() == 0:
        return False
    return (op_meta.dim() == 0 or op_meta.shape[-1] == 1) and full_meta.shape[-1] != 1


def describe(node: Any) -> str:
    """A short human name for a node in near-miss reasons."""
    if not isinstance(node, fx.Node):
        return repr(node)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


def depends_on(node: fx.Node, ancestor: fx.Node) -> bool:
    """True when ``ancestor`` is (transitively) an input of ``node``. The search stops at nodes
    before ``ancestor`` in the graph (FX's node order, ``Node.__lt__``, kept up to date by every
    insertion: an input always comes before its users)."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        if current in seen or current < ancestor:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


def producer(value: fx.Node) -> fx.Node:
    """The node that computed ``value``: for a field of an earlier fused op returning
    ``(residual, normed)``, the fused call itself, from which ``normed`` is computed too.
    (Other multi-output nodes, such as ``chunk``, are not unwrapped: chunks are siblings.)"""
    source = value.args[0] if value.op == "call_function" and value.target is operator.getitem else None
    if isinstance(source, fx.Node) and source.target in _MULTI_OUTPUT_FUSED:
        return source
    return value


_MULTI_OUTPUT_FUSED = {fused.op for fused in FUSED_OPS.values() if fused.outputs}


CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)


def cat_arguments(node: Any) -> tuple[tuple[Any, ...], Any] | None:
    """``(tensors, dim)`` of a ``torch.cat`` (``concat``, ``concatenate``) call, arguments
    positional or keyword, dim 0 by default; None for any other node or an ``out=`` call."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in CAT_FUNCTIONS):
        return None
    if set(node.kwargs) - {"tensors", "dim"}:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return (tuple(tensors), dim) if isinstance(tensors, (tuple, list)) else None


def linear_arguments(node: Any) -> tuple[Any, Any, Any] | None:
    """``(x, weight, bias)`` of a canonical ``F.linear(x, weight[, bias])`` call (bias None when
    absent); None for any other node."""
    if not is_call(node, canon.LINEAR) or node.kwargs or len(node.args) not in (2, 3):
        return None
    x, weight, bias = (*node.args, None) if len(node.args) == 2 else node.args
    return x, weight, bias
