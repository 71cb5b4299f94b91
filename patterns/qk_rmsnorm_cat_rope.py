"""Joint attention's q/k RMSNorm of two streams, their concatenation and the RoPE of the joint
sequence, folded into one call.

Matches    Flux's double-stream attention (diffusers' ``FluxAttnProcessor``): ``q = cat((q_0', q_1'), d)``
           and ``k = cat((k_0', k_1'), d)`` of two streams' ``fusion_pass::qk_rmsnorm`` results (the
           ``qk_rmsnorm`` family, which runs first, wrote those calls; ``joint_cats`` of
           ``patterns/qk_rmsnorm_cat.py`` reads them), each then rotated by diffusers' real-valued
           rotary embedding, q and k with one cos and sin (``match_rope`` of
           ``patterns/qk_rmsnorm_rope.py``).
Accepts    the cat spellings ``qk_rmsnorm_cat`` accepts, on any dim but the head dim; the rotation
           spellings ``qk_rmsnorm_rope`` accepts (interleaved or rotate half, with or without the
           fp32 casts and the cast back); any v: its cat stays as it is (Flux's v has its own
           projection, so the cat of v is a plain copy either way).
Skips      joint cats whose q and k feed no rotation (``qk_rmsnorm_cat``'s candidates: Hunyuan3D).
Refuses    (near-miss) what ``qk_rmsnorm_cat`` refuses of the q/k cats (an operand other than two
           streams' normed q, eps that differs between the streams, normed k not concatenated in
           the q cat's order, a normed q or k with another user), a normed q or k cast before its
           cat, only one of the joint q and k rotated, q and k rotated with different tables or
           layouts, a rotation ``match_rope`` refuses, q and k cats on different dims or on the
           head dim.
Needs      shapes (Dynamo's ``example_value``), as ``qk_rmsnorm_rope``: without them no rotation is
           recognised and the cats are ``qk_rmsnorm_cat``'s.
Emits      ``fusion_pass::qk_rmsnorm_cat_rope(q0, k0, q1, k1, q_weight0, k_weight0, q_weight1,
           k_weight1, eps, dim, cos, sin, interleaved)`` -> ``(q, k)``, replacing both ``qk_rmsnorm``
           calls, both cats and both rotations. The two ``qk_rmsnorm`` sites stay in that family's
           report as folded (``Report.totals`` counts them, ``counts`` counts calls), and this
           family's site is the fold: one per double block.
"""
from __future__ import annotations

from typing import Iterator

from torch import fx

from fusion_pass.match import Match, MatchContext, NearMiss, scan, tensor_meta
from patterns.qk_rmsnorm_cat import joint_cats, rotated
from patterns.qk_rmsnorm_rope import match_qk_rope

NAME = "qk_rmsnorm_cat_rope"


class QKRMSNormCatRope:
    name = NAME
    op_key = "qk_rmsnorm_cat_rope"
    math = "rope(cat(qk_rmsnorm(q_0, k_0), qk_rmsnorm(q_1, k_1))) over tokens, one cos/sin"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        yield from scan(graph, ctx, lambda node: self._match_at(node, ctx))

    def _match_at(self, node: fx.Node, ctx: MatchContext) -> Match | NearMiss | None:
        joint = joint_cats(node)
        if joint is None or not rotated(joint):
            return None
        miss = lambda reason: NearMiss(NAME, ctx.where(node), reason)  # noqa: E731
        reason = joint.refusal()
        if reason is not None:
            return miss(reason)
        if any(n.casts for n in (*joint.queries, *joint.keys)):
            return miss("a normed q or k is cast before its cat")
        sites = match_qk_rope(joint.q_cat, joint.k_cat)
        if isinstance(sites, str):  # never None: ``rotated`` found a rotation
            return miss(sites)
        if not joint.same_dim(joint.k_cat):
            return miss("the q and k cats are on different dims")
        meta = tensor_meta(joint.q_cat)
        if not isinstance(joint.dim, int) or meta is None or joint.dim % meta.dim() == meta.dim() - 1:
            return miss("the streams are concatenated along the head dim, not along the tokens")
        q, k = sites
        calls = [n.call for n in joint.queries]
        eps = calls[0].args[4]
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(*calls[0].args[:2], *calls[1].args[:2], *calls[0].args[2:4], *calls[1].args[2:4],
                  eps, joint.dim, q.cos, q.sin, q.interleaved),
            anchors=(q.out, k.out),
            internal=(*calls, *(node for n in (*joint.queries, *joint.keys) for node in n.chain),
                      joint.q_cat, joint.k_cat, *q.nodes, *k.nodes),
            where=ctx.where(node),
            detail=f"dim={joint.dim}, " + ("interleaved" if q.interleaved else "rotate half")
            + (f", eps={eps:g}" if eps is not None else ""),
            output_fields=("q", "k"),
            cast_outputs=(None, None),
        )
