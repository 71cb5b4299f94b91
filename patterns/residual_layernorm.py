"""Pre-LN residual add feeding a LayerNorm.

Matches    ``r = x + y`` where the branch ``y`` is computed from ``x`` (``x = x + f(x)``), and
           ``LN(r)`` over the last dim: a pre-LN block's residual feeding the next sublayer's
           LayerNorm (hy3dgen's ShapeVAE: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``).
Accepts    either operand order of ``+``; ``nn.LayerNorm`` modules and ``F.layer_norm`` calls,
           affine or not; ``r`` with other users (the next residual add): the op returns it too.
           Runs after the modulation and gate families, so a LayerNorm that is modulated, or a
           residual that is gated, is theirs.
Skips      sums with no residual structure (neither operand computed from the other), sums
           with a number, ``x + gate * y`` (the gate family's, fused or refused there).
Refuses    (near-miss) a LayerNorm over more than the last dim, and (when the graph has shapes)
           a branch that broadcasts to the residual's shape or a sum of two dtypes.
Emits      ``fusion_pass::residual_add_layernorm(x, y, weight, bias, eps)`` -> ``(residual, normed)``,
           replacing ``r`` and ``LN(r)``.
"""
from __future__ import annotations

from typing import Iterator

from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.match import (
    Match, MatchContext, NearMiss, depends_on, is_call, is_number, producer, scan, tensor_meta,
)

NAME = "residual_layernorm"


def match_site(norm: fx.Node, ctx: MatchContext) -> Match | NearMiss | None:
    """The residual add feeding the LayerNorm ``norm`` (None: not a candidate)."""
    if not is_call(norm, canon.LAYER_NORM) or not is_call(norm.args[0], canon.ADD):
        return None
    total, shape, weight, bias, eps = norm.args
    a, b = total.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or total.kwargs:
        return None
    if any(is_call(operand, canon.MUL) for operand in (a, b)) or is_number(a) or is_number(b):
        return None  # x + gate * y is the gate family's
    if depends_on(b, producer(a)):
        x, y = a, b
    elif depends_on(a, producer(b)):
        x, y = b, a
    else:
        return None
    miss = lambda reason: NearMiss(NAME, ctx.where(norm), reason)  # noqa: E731
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        return miss(f"LayerNorm normalizes over {shape}, not just the last dim")
    if not (is_number(eps) or isinstance(eps, fx.Node)):
        return miss("LayerNorm eps is not a number")
    metas = [tensor_meta(v) for v in (x, y, total)]
    if None not in metas:
        if not (metas[0].shape == metas[1].shape == metas[2].shape):
            return miss("the residual add broadcasts one operand")
        if metas[0].dtype != metas[1].dtype:
            return miss(f"the residual add mixes {metas[0].dtype} and {metas[1].dtype}")
    return Match(
        family=NAME,
        op_key="residual_add_layernorm",
        args=(x, y, weight, bias, eps if isinstance(eps, fx.Node) else float(eps)),
        anchors=(total, norm),
        internal=(),
        where=ctx.where(norm),
        detail="affine" if weight is not None else "",
        output_fields=("residual", "normed"),
        cast_outputs=(None, None),
    )


class ResidualLayerNorm:
    name = NAME
    op_key = "residual_add_layernorm"
    math = "r = x + y;  LN(r)"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        yield from scan(graph, ctx, lambda node: match_site(node, ctx))
