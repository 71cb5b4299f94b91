"""q/k LayerNorm pairs.

Matches    a LayerNorm of the query and one of the key over their last (head) dim that feed the
           same attention call (through views, casts and RoPE: ``attention_inputs.py``), paired by
           the projection, or the hidden states, they were cut from.
Accepts    ``nn.LayerNorm`` modules and ``F.layer_norm`` calls, affine or not (CogVideoX's
           ``qk_norm="layer_norm"``, hy3dgen's ShapeVAE ``qk_norm=True``); q and k of different
           shapes (cross-attention, k a ``split`` of a kv projection). Runs after the modulation
           family, so a modulated LayerNorm is never taken here.
Skips      LayerNorms that feed no attention's query or key (they are other families' or none).
Refuses    (near-miss) eps that differs between q and k, a norm with no partner on the other side,
           a norm over more than the last dim.
Emits      ``fusion_pass::qk_layernorm(q, k, q_weight, q_bias, k_weight, k_bias, eps)`` -> ``(q, k)``.
"""
from __future__ import annotations

from typing import Iterator

from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.match import Match, MatchContext, NearMiss, is_call, is_number, scan
from patterns.attention_inputs import attention_roles, pair_norms

NAME = "qk_layernorm"


def _norm_or_miss(node: fx.Node, ctx: MatchContext) -> fx.Node | NearMiss | None:
    if not is_call(node, canon.LAYER_NORM) or not attention_roles(node):
        return None
    x, shape, _, _, eps = node.args
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        return NearMiss(NAME, ctx.where(node), f"LayerNorm normalizes over {shape}, not just the last dim")
    if not isinstance(x, fx.Node) or not is_number(eps):
        return NearMiss(NAME, ctx.where(node), "LayerNorm input or eps is not a plain tensor/number")
    return node


class QKLayerNorm:
    name = NAME
    op_key = "qk_layernorm"
    math = "LN(q) and LN(k) over the head dim"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        norms = []
        for found in scan(graph, ctx, lambda node: _norm_or_miss(node, ctx)):
            if isinstance(found, NearMiss):
                yield found
            else:
                norms.append(found)
        pairs, _, unpaired = pair_norms(norms, lambda norm: norm, lambda norm: norm.args[0])
        for q, k in pairs:
            if q.args[4] != k.args[4]:
                yield NearMiss(NAME, ctx.where(q), f"eps differs between q and k norm ({q.args[4]} vs {k.args[4]})")
            else:
                yield self.to_match(q, k, ctx)
        for norm in unpaired:
            yield NearMiss(NAME, ctx.where(norm), "LayerNorm has no partner norm on the other of query/key")

    def to_match(self, q: fx.Node, k: fx.Node, ctx: MatchContext) -> Match:
        (q_x, _, q_w, q_b, eps), (k_x, _, k_w, k_b, _) = q.args, k.args
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(q_x, k_x, q_w, q_b, k_w, k_b, float(eps)),
            anchors=(q, k),
            internal=(),
            where=ctx.where(q),
            detail=f"eps={eps:g}" + (", affine" if q_w is not None else ""),
            output_fields=("q", "k"),
            cast_outputs=(None, None),
        )
