"""Chained residual -> LayerNorm -> scale-shift.

Matches    ``r = residual + gate * y`` whose new residual ``r`` feeds
           ``LN(r) * (1 + scale) + shift``: the two halves of consecutive DiT sub-blocks.
Accepts    every LayerNorm spelling the two single families accept (it reuses their matchers;
           an RMSNorm half is left to ``layernorm_modulate``: this op normalizes with LayerNorm);
           ``r`` may have other users (the next residual add): the op returns ``r`` too.
Refuses    (near-miss) chains whose halves match but whose fused call would have to run
           before its own inputs exist or after a user of ``r`` (an ordering conflict).
           Each half that fails its own guards is left to its own family.
Emits      ``fusion_pass::residual_gate_layernorm_scale_shift(residual, y, gate, shift, scale,
           eps, weight, bias)`` -> ``ResidualNormOut(residual, normed)``, replacing ``r`` and the
           modulated output.
"""
from __future__ import annotations

from typing import Iterator

from torch import fx

from fusion_pass.match import Match, MatchContext, NearMiss, scan
from patterns import layernorm_modulate, residual_gate

NAME = "residual_layernorm_modulate"


class ResidualNormChain:
    name = NAME
    op_key = "residual_gate_layernorm_scale_shift"
    covers = (layernorm_modulate.NAME, residual_gate.NAME)  # each site is one site of each half
    math = "r = residual + gate * y;  LN(r) * (1 + scale) + shift"

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        for norm_site in scan(graph, ctx, lambda node: layernorm_modulate.match_site(node, ctx)):
            if not isinstance(norm_site, layernorm_modulate.LayerNormModulateSite) or norm_site.rms:
                continue  # the chained op normalizes with LayerNorm only
            gate_site = residual_gate.match_site(norm_site.x, ctx)
            if isinstance(gate_site, residual_gate.ResidualGateSite):
                yield self.to_match(gate_site, norm_site, ctx)

    def to_match(self, gate, norm, ctx: MatchContext) -> Match:
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(gate.residual, gate.y, gate.gate, norm.shift, norm.scale, norm.eps, norm.weight, norm.bias),
            anchors=(gate.result, norm.result),
            internal=(gate.product, *norm.internal),
            where=ctx.where(norm.norm),
            detail=layernorm_modulate.describe_eps(norm.eps),
            output_fields=("residual", "normed"),
            cast_outputs=(None, None),
        )
