"""Residual plus gate.

Matches    ``residual + gate * y`` where ``y`` (the branch) is computed from ``residual``
           (or, when ``residual`` is itself ``h + a``, from ``h``): the structural signature
           of a gated residual connection ``x + g * f(x)``.
Accepts    any operand order of ``+`` and ``*``; ``torch.addcmul(residual, gate, y)``;
           ``torch.add``/``Tensor.add``/``mul`` spellings; gate of any broadcastable shape.
Skips      a sum of two products (RoPE's ``x * cos + rotate(x) * sin``), not a residual
           stream; products with a raw norm output as an operand (``shift + s * LN(x)`` is a
           modulation, left to the LayerNorm family even when it refused it).
Refuses    (near-miss) a product also used elsewhere, a product whose operands do not
           depend on the residual (e.g. the gate multiplies the residual, not the branch),
           and (when the graph has shapes) a gate broadcast over the hidden dim or a
           residual that is itself broadcast to the output's shape.
Emits      ``fusion_pass::residual_gate(residual, y, gate)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.match import (
    Match, MatchContext, NearMiss, broadcasts_over_last_dim, depends_on, describe, is_call,
    operand_orders, producer, scan, tensor_meta,
)

NAME = "residual_gate"


@dataclass
class ResidualGateSite:
    """The nodes of one matched ``residual + gate * y``."""

    result: fx.Node
    product: fx.Node
    residual: fx.Node
    gate: fx.Node
    y: fx.Node


def match_site(node: fx.Node, ctx: MatchContext) -> ResidualGateSite | NearMiss | None:
    """Match a gated residual whose final ``+`` is ``node`` (None: not a candidate)."""
    if not is_call(node, canon.ADD):
        return None
    candidates = [
        (residual, product) for residual, product in operand_orders(node)
        if is_call(product, canon.MUL) and isinstance(residual, fx.Node)
        and all(isinstance(arg, fx.Node) for arg in product.args)
        and not any(is_call(arg, canon.LAYER_NORM) or is_call(arg, canon.RMS_NORM) for arg in product.args)
    ]
    if not candidates:
        return None
    reasons = []
    for residual, product in candidates:
        roots = _stream_roots(residual)
        branches = [b for b in product.args if any(depends_on(b, root) for root in roots)]
        if not branches:
            if not is_call(residual, canon.MUL) and any(depends_on(residual, producer(operand))
                                                        for operand in product.args):
                reasons.append("the gate multiplies the residual, not the branch computed from it")
            continue  # otherwise a + b * c with no residual structure: not a candidate
        if len(product.users) > 1:
            user = next(u for u in product.users if u is not node)
            reasons.append(f"gate * y is also used by {describe(user)}")
            continue
        if any(broadcasts_over_last_dim(operand, node) for operand in product.args):
            reasons.append("gate broadcasts over the hidden dim")
            continue
        y = branches[-1]
        gate = product.args[0] if y is product.args[1] else product.args[1]
        res_meta, out_meta = tensor_meta(residual), tensor_meta(node)
        if res_meta is not None and out_meta is not None and res_meta.shape != out_meta.shape:
            reasons.append("residual is broadcast to the output's shape")
            continue
        return ResidualGateSite(node, product, residual, gate, y)
    return NearMiss(NAME, ctx.where(node), reasons[0]) if reasons else None


def _stream_roots(residual: fx.Node) -> tuple[fx.Node, ...]:
    """What a branch may be computed from: the residual itself or, when the residual is the
    sum of an earlier residual connection ``h + a``, that stream's previous value ``h``
    (SD3.5's dual attention: ``h = h + g1 * attn(n1); h = h + g2 * attn2(n2)``, where ``n1``
    and ``n2`` are both modulations of the LayerNorm of the first ``h``)."""
    roots = [producer(residual)]
    if is_call(residual, canon.ADD):
        roots += [producer(a) for a in residual.args if isinstance(a, fx.Node)]
    return tuple(roots)




class ResidualGate:
    name = NAME
    op_key = "residual_gate"
    math = "residual + gate * y"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        for site in scan(graph, ctx, lambda node: match_site(node, ctx)):
            yield site if isinstance(site, NearMiss) else self.to_match(site, ctx)

    def to_match(self, site: ResidualGateSite, ctx: MatchContext) -> Match:
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(site.residual, site.y, site.gate),
            anchors=(site.result,),
            internal=(site.product,),
            where=ctx.where(site.y),
        )
