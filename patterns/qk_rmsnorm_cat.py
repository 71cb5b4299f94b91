"""Joint attention's concatenation of two streams, folded into their q/k RMSNorm.

Matches    a double-stream block's ``cat((q_0', q_1'), d)``, ``cat((k_0', k_1'), d)`` and
           ``cat((v_0, v_1), d)``, where ``(q_i', k_i')`` is stream i's ``fusion_pass::qk_rmsnorm``
           result (the ``qk_rmsnorm`` family, which runs first, wrote that call) and ``v_i`` is cut
           from the projection stream i's q and k come from (the third rearranged view).
Accepts    ``torch.cat`` / ``concat`` / ``concatenate``, operands in a tuple or list, dim positional
           or keyword; the normed q and k fed straight to their cats, or all four through
           ``.to(v_i)`` (the official ``QKNorm``); any other use of the v views.
Skips      cats with no normed q operand (a k cat is read from its q cat); joint q or k that feed
           a rotation (``patterns/qk_rmsnorm_cat_rope.py``'s candidates, Flux's double blocks).
Refuses    (near-miss) a q cat that joins anything but two streams' normed q, eps that differs
           between the streams, a normed q or k (or its cast) with another user, normed k not
           concatenated in the q cat's order, casts other than ``.to(v_i)`` on all four, no cat of
           the streams' v in that order, cats on different dims.
Emits      ``fusion_pass::qk_rmsnorm_cat(q0, k0, v0, q1, k1, v1, q_weight0, k_weight0, q_weight1,
           k_weight1, eps, dim, cast_to_v)`` -> ``(q, k, v)``, replacing both ``qk_rmsnorm`` calls
           and the three cats. The two ``qk_rmsnorm`` sites stay in that family's report as folded
           (``Report.totals`` counts them; ``counts`` counts calls), and this family's site is the fold.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterator

from torch import fx

from fusion_pass.match import (
    Match, MatchContext, NearMiss, cat_arguments, describe, is_call, is_cast, scan, tensor_meta,
)
from fusion_pass.registry import FUSED_OPS
from patterns.attention_inputs import origin
from patterns.qk_rmsnorm_rope import match_rope

NAME = "qk_rmsnorm_cat"
_QK_RMSNORM = FUSED_OPS["qk_rmsnorm"]
_Q, _K = _QK_RMSNORM.output_index("q"), _QK_RMSNORM.output_index("k")


@dataclass
class NormedOperand:
    """A cat operand read from field ``index`` of a ``qk_rmsnorm`` call, through ``casts``."""

    call: fx.Node
    index: int
    field: fx.Node  # the getitem of the call's result
    casts: tuple[fx.Node, ...]  # ``.to(...)`` nodes from the field to the operand, innermost first

    @property
    def value(self) -> fx.Node:
        return self.casts[-1] if self.casts else self.field

    @property
    def chain(self) -> tuple[fx.Node, ...]:
        return (self.field, *self.casts)


def normed_operand(value: Any) -> NormedOperand | None:
    """``value`` as a (possibly cast) field of a ``qk_rmsnorm`` call, or None."""
    casts = []
    while is_cast(value):
        casts.insert(0, value)
        value = value.args[0]
    if not is_call(value, operator.getitem) or not is_call(value.args[0], _QK_RMSNORM.op):
        return None
    call, index = value.args
    if len(call.args) != 5 or call.kwargs:
        return None
    return NormedOperand(call, index, value, tuple(casts))


def _field(call: fx.Node, index: int) -> NormedOperand | None:
    """Field ``index`` of ``call``, followed through the one cast among each node's users."""
    fields = [u for u in call.users if is_call(u, operator.getitem) and u.args[1] == index]
    if len(fields) != 1:
        return None
    value = fields[0]
    while len(casts := [u for u in value.users if is_cast(u) and u.args[0] is value]) == 1:
        value = casts[0]
    return normed_operand(value)


def _other_user(operand: NormedOperand, cat: fx.Node) -> fx.Node | None:
    """A user of the operand's field or casts other than the next cast or, at the end, ``cat``."""
    for node, following in zip(operand.chain, (*operand.chain[1:], cat)):
        other = next((u for u in node.users if u is not following), None)
        if other is not None:
            return other
    return None


def _same_dim(a: Any, b: Any, ndim: int | None) -> bool:
    if a == b:
        return True
    return ndim is not None and isinstance(a, int) and isinstance(b, int) and a % ndim == b % ndim


@dataclass
class JointCats:
    """A cat of two streams' normed q (``q_cat``) and the cat of their normed k in that order."""

    q_cat: fx.Node
    k_cat: fx.Node | None  # None: not found
    queries: list[NormedOperand | None]  # per cat operand
    keys: list[NormedOperand | None]  # the k fields of the queries' calls
    dim: Any

    def refusal(self) -> str | None:
        """Why the streams' norms and cats cannot fold into one call, or None."""
        operands = cat_arguments(self.q_cat)[0]
        if len(operands) != 2 or any(n is None or n.index != _Q for n in self.queries):
            others = [describe(t) for t, n in zip(operands, self.queries) if n is None or n.index != _Q]
            return (f"the q cat joins {', '.join(others) or 'more than two streams'}, "
                    "not just two streams' normed q")
        calls = tuple(n.call for n in self.queries)
        if calls[0] is calls[1]:
            return "the q cat joins one stream's normed q twice"
        eps = tuple(call.args[4] for call in calls)
        if eps[0] != eps[1]:
            return f"eps differs between the streams' q/k norms ({eps[0]} vs {eps[1]})"
        if self.k_cat is None:
            return "the streams' normed k are not concatenated in the q cat's order"
        for q, k, call in zip(self.queries, self.keys, calls):
            for label, operand, cat in (("q", q, self.q_cat), ("k", k, self.k_cat)):
                other = _other_user(operand, cat)
                if other is not None:
                    return f"the normed {label} of a stream is also used by {describe(other)}"
            other = next((u for u in call.users if u not in (q.field, k.field)), None)
            if other is not None:
                return f"a stream's qk_rmsnorm result is also used by {describe(other)}"
        return None

    def same_dim(self, cat: fx.Node) -> bool:
        """Whether ``cat`` joins along the q cat's dim."""
        meta = tensor_meta(self.q_cat)
        return _same_dim(self.dim, cat_arguments(cat)[1], meta.dim() if meta is not None else None)


def joint_cats(node: fx.Node) -> JointCats | None:
    """``node`` as a cat of normed q (at least one operand a ``qk_rmsnorm`` call's q), with the
    cat of the k of the same calls in the same order looked up; None for any other node."""
    arguments = cat_arguments(node)
    if arguments is None:
        return None
    operands, dim = arguments
    queries = [normed_operand(t) for t in operands]
    if not any(n is not None and n.index == _Q for n in queries):
        return None
    keys = [_field(n.call, _K) if n is not None else None for n in queries]
    return JointCats(node, _k_cat(keys) if len(keys) == 2 else None, queries, keys, dim)


def _k_cat(keys: list[NormedOperand | None]) -> fx.Node | None:
    """A cat of exactly both streams' normed k, in stream order."""
    if None in keys:
        return None
    values = (keys[0].value, keys[1].value)
    for user in values[0].users:
        arguments = cat_arguments(user)
        if arguments is not None and arguments[0] == values:
            return user
    return None


def rotated(joint: JointCats) -> bool:
    """Whether the joint q or k feeds a rotation: the ``qk_rmsnorm_cat_rope`` family's candidate."""
    return any(cat is not None and match_rope(cat) is not None for cat in (joint.q_cat, joint.k_cat))


class QKRMSNormCat:
    name = NAME
    op_key = "qk_rmsnorm_cat"
    math = "cat(qk_rmsnorm(q_0, k_0), qk_rmsnorm(q_1, k_1)) and cat(v_0, v_1) over tokens"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        yield from scan(graph, ctx, lambda node: self._match_at(node, graph, ctx))

    def _match_at(self, node: fx.Node, graph: fx.Graph, ctx: MatchContext) -> Match | NearMiss | None:
        joint = joint_cats(node)
        if joint is None or rotated(joint):
            return None
        miss = lambda reason: NearMiss(NAME, ctx.where(node), reason)  # noqa: E731
        reason = joint.refusal()
        if reason is not None:
            return miss(reason)
        normed, keys, k_cat, dim = joint.queries, joint.keys, joint.k_cat, joint.dim
        projections = tuple(origin(n.call.args[0]) for n in normed)
        casts = [n.casts for n in (*normed, *keys)]  # q0, q1, k0, k1
        v_like = [c[0].args[1] if len(c) == 1 else None for c in casts] if any(casts) else []
        if v_like and not (
            all(isinstance(v, fx.Node) and origin(v) is projections[i % 2] for i, v in enumerate(v_like))
            and v_like[0] is v_like[2] and v_like[1] is v_like[3]
        ):
            return miss("the normed q and k are cast before the cats, other than all by `.to(v)` of their stream")
        v_cats = [cat for cat in self._v_cats(graph, projections, node, k_cat)
                  if not v_like or cat_arguments(cat)[0] == tuple(v_like[:2])]
        if not v_cats:
            return miss("no cat of the streams' v (views of their q/k projection) in the q cat's order")
        v_cat = next((cat for cat in v_cats if joint.same_dim(cat)), v_cats[0])
        if not (joint.same_dim(k_cat) and joint.same_dim(v_cat)):
            dims = (dim, cat_arguments(k_cat)[1], cat_arguments(v_cat)[1])
            return miss(f"the q, k and v cats are on different dims {dims}")
        return self.to_match(node, k_cat, v_cat, normed, keys, dim, cast_to_v=bool(v_like), ctx=ctx)

    @staticmethod
    def _v_cats(graph: fx.Graph, projections: tuple[fx.Node, ...], q_cat: fx.Node, k_cat: fx.Node) -> list[fx.Node]:
        """The cats of two tensors cut from stream 0's and stream 1's q/k projection, in that order."""
        found = []
        for node in graph.nodes:
            arguments = cat_arguments(node)
            if node in (q_cat, k_cat) or arguments is None or len(arguments[0]) != 2:
                continue
            if all(isinstance(t, fx.Node) and origin(t) is p for t, p in zip(arguments[0], projections)):
                found.append(node)
        return found

    def to_match(self, q_cat, k_cat, v_cat, queries, keys, dim, *, cast_to_v: bool, ctx: MatchContext) -> Match:
        (q0, q1), (k0, k1) = queries, keys
        v0, v1 = cat_arguments(v_cat)[0]
        eps = q0.call.args[4]
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(q0.call.args[0], k0.call.args[1], v0, q1.call.args[0], k1.call.args[1], v1,
                  q0.call.args[2], k0.call.args[3], q1.call.args[2], k1.call.args[3], eps, dim, cast_to_v),
            anchors=(q_cat, k_cat, v_cat),
            internal=(q0.call, q1.call, *(node for n in (q0, q1, k0, k1) for node in n.chain)),
            where=ctx.where(q_cat),
            detail=f"dim={dim}, " + (f"eps={eps:g}" if eps is not None else "eps=finfo(dtype).eps")
            + (", cast to v" if cast_to_v else ""),
            output_fields=("q", "k", "v"),
            cast_outputs=(None, None, None),
        )
