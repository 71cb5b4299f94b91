"""Stage 4, rewrite: apply the families' matches to a normalized graph.

For each family in registry order, every :class:`~fusion_pass.match.Match` it yields is
applied at once (later candidates see the rewritten graph):

1. the fused call is inserted after its last input and no earlier than just before its
   first anchor; if a user of an anchor would then precede it, the match becomes a
   near-miss ("ordering conflict") and the graph is left as it was;
2. each anchor's uses are redirected to the fused result (a named field of it for
   multi-output ops, a ``torch.split`` view of it for ops that concatenate their anchors'
   results, cast back to the input dtype where the match asks for it and the metadata does
   not show the dtypes already equal);
3. anchors and internal nodes that nothing uses any more are erased; internal nodes with
   other users stay (so a shared ``1 + scale`` keeps feeding its other users);
4. an earlier match whose fused call this one erased (a family that folds another's calls
   into a larger op, e.g. both streams' ``qk_rmsnorm`` calls and their cats) moves from
   ``matches`` to ``folded``: its sites were fused, its call no longer runs. Its weight
   owners pass to the folding match.

Invariants: every value a node outside the match could observe is unchanged (same
values, dtypes, shapes); no node is erased while used; fake-tensor metadata, where the
graph has it, is computed for new nodes by running the ops' fake implementations.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves

from fusion_pass.match import Match, MatchContext, NearMiss, PatternFamily, tensor_meta
from fusion_pass.registry import FUSED_OPS


@dataclass
class RewriteResult:
    matches: list[Match] = field(default_factory=list)  # applied: each fused call is in the graph
    near_misses: list[NearMiss] = field(default_factory=list)
    folded: list[Match] = field(default_factory=list)  # applied, then folded into a later match's call


def rewrite(graph: fx.Graph, families: Iterable[PatternFamily], ctx: MatchContext) -> RewriteResult:
    result = RewriteResult()
    inserted: dict[fx.Node, Match] = {}  # fused call -> the match that inserted it
    for family in families:
        for item in family.find(graph, ctx):
            if isinstance(item, NearMiss):
                result.near_misses.append(item)
                continue
            outcome = apply_match(graph, item, ctx)
            if isinstance(outcome, str):
                result.near_misses.append(NearMiss(item.family, item.where, outcome))
                continue
            for node in item.internal:
                if node in inserted and node in ctx.erased:
                    folded = inserted.pop(node)
                    result.matches.remove(folded)
                    result.folded.append(folded)
                    item.weight_owners += folded.weight_owners
            inserted[outcome] = item
            result.matches.append(item)
    graph.lint()
    return result


def apply_match(graph: fx.Graph, match: Match, ctx: MatchContext) -> fx.Node | str:
    """Apply ``match`` and return its fused call; return a reason instead when no valid
    insertion point exists. The call goes right after the last of its inputs, or right before
    the first anchor when that is later (node positions: FX's node order, ``Node.__lt__``)."""
    inputs = [a for a in _flatten(match.args) if isinstance(a, fx.Node)]
    matched = set(match.anchors) | set(match.internal)
    point = max([*inputs, min(match.anchors).prev])
    outside_users = [u for a in match.anchors for u in a.users if u not in matched]
    if outside_users and min(outside_users) <= point:
        return "ordering conflict: a result is used before all inputs of the fused op exist"
    fused_op = FUSED_OPS[match.op_key]
    with graph.inserting_after(point):
        fused = graph.call_function(fused_op.op, tuple(match.args))
    fused.meta = _meta_for(fused, dict(match.anchors[-1].meta))
    cursor = parts = fused
    if match.split_sizes is not None:
        with graph.inserting_after(cursor):
            parts = graph.call_function(torch.split, (fused, list(match.split_sizes), -1))
        parts.meta = _meta_for(parts, dict(match.anchors[0].meta))
        cursor = parts
    for index, (anchor, field_name, cast_to) in enumerate(zip(match.anchors, match.output_fields, match.cast_outputs)):
        value = fused
        if match.split_sizes is not None:
            with graph.inserting_after(cursor):
                value = graph.call_function(operator.getitem, (parts, index))
            value.meta = _meta_for(value, dict(anchor.meta))
            cursor = value
        elif field_name is not None:
            with graph.inserting_after(cursor):
                value = graph.call_function(operator.getitem, (fused, fused_op.output_index(field_name)))
            value.meta = _meta_for(value, dict(anchor.meta))
            cursor = value
        if cast_to is not None and not _known_same_dtype(value, cast_to):
            value, cursor = _cast_like(graph, value, cast_to, cursor, anchor)
        anchor.replace_all_uses_with(value)
    _erase_unused(graph, match, ctx)
    return fused


def _known_same_dtype(value: fx.Node, like: fx.Node) -> bool:
    """Both dtypes are in the graph's metadata and equal: a cast would return ``value`` itself."""
    value_meta, like_meta = tensor_meta(value), tensor_meta(like)
    return value_meta is not None and like_meta is not None and value_meta.dtype == like_meta.dtype


def _cast_like(graph, value: fx.Node, like: fx.Node, cursor: fx.Node, anchor: fx.Node):
    """``value.to(like.dtype)``: the dtype as a constant when the graph knows it."""
    meta = tensor_meta(like)
    with graph.inserting_after(cursor):
        dtype = meta.dtype if meta is not None else graph.call_function(getattr, (like, "dtype"))
    cursor = dtype if isinstance(dtype, fx.Node) else cursor
    with graph.inserting_after(cursor):
        cast = graph.call_method("to", (value, dtype))
    cast.meta = dict(anchor.meta)
    return cast, cast


def _erase_unused(graph: fx.Graph, match: Match, ctx: MatchContext) -> None:
    for node in sorted(set(match.anchors) | set(match.internal), reverse=True):
        if not node.users and node.op not in ("placeholder", "output"):
            graph.erase_node(node)
            ctx.erased.add(node)


def _flatten(args) -> Iterable:
    for arg in args:
        if isinstance(arg, (tuple, list)):
            yield from _flatten(arg)
        else:
            yield arg


def _meta_for(node: fx.Node, base: dict) -> dict:
    """Meta for a new node: the anchor's module stack, and a fake value computed by
    running the node's target on its inputs' fake values, when they all have one."""
    meta = {k: v for k, v in base.items() if k not in ("example_value", "val", "tensor_meta")}
    fake_args = []
    for arg in node.args:
        if isinstance(arg, fx.Node):
            value = arg.meta.get("example_value", arg.meta.get("val"))
            if value is None:
                return meta
            fake_args.append(value)
        else:
            fake_args.append(arg)
    # the fake mode the graph's metadata was made in (Dynamo's; not the compile's current one)
    mode = next((v.fake_mode for v in tree_leaves(fake_args) if isinstance(v, FakeTensor)), None)
    if mode is None:
        return meta
    try:
        with mode:
            meta["example_value"] = node.target(*fake_args)
    except Exception:  # noqa: BLE001 - metadata is an aid for later passes, never required
        pass
    return meta
