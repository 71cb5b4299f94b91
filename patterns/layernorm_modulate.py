"""LayerNorm -> scale-shift (adaLN modulation).

Matches    ``LN(x) * (1 + scale) + shift``, LN over the last dim, any affine weight/bias.
Accepts    either operand order of ``*`` and ``+``; ``1 + s`` / ``s + 1`` / ``1.0 + s``;
           ``torch.addcmul(shift, LN(x), 1 + scale)``; ``nn.LayerNorm`` modules and
           ``F.layer_norm`` calls; shift/scale of any broadcastable shape (``[B,1,D]``
           chunk views, ``[B,D]`` after ``[:, None, :]`` or ``unsqueeze(1)``, ``[D]``).
Refuses    (near-miss) scale without the ``+1``, an offset other than 1, LN over more than
           the last dim, an LN or modulated value that other nodes also use, and (when the
           graph has shapes) shift or scale that broadcast over the hidden dim.
Emits      ``fusion_pass::layernorm_scale_shift(x, shift, scale, eps, weight, bias)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.match import (
    Match, MatchContext, NearMiss, broadcasts_over_last_dim, describe, is_call, is_number,
    only_user, other_operand, scan,
)

NAME = "layernorm_modulate"


@dataclass
class LayerNormModulateSite:
    """The nodes of one matched ``LN(x) * (1 + scale) + shift``."""

    norm: fx.Node
    product: fx.Node
    result: fx.Node
    x: fx.Node
    shift: fx.Node
    scale: fx.Node
    one_plus_scale: fx.Node
    eps: float | fx.Node
    weight: fx.Node | None
    bias: fx.Node | None

    @property
    def internal(self) -> tuple[fx.Node, ...]:
        return (self.norm, self.product, self.one_plus_scale)


def match_site(norm: fx.Node, ctx: MatchContext) -> LayerNormModulateSite | NearMiss | None:
    """Match the modulation that follows the LayerNorm node ``norm`` (None: not a candidate)."""
    if not is_call(norm, canon.LAYER_NORM):
        return None
    x, shape, weight, bias, eps = norm.args
    users = list(norm.users)
    products = [u for u in users if is_call(u, canon.MUL)]
    if not products:
        return None
    miss = lambda reason: NearMiss(NAME, ctx.where(norm), reason)  # noqa: E731
    if len(users) > 1:
        others = ", ".join(describe(u) for u in users if u is not products[0])
        return miss(f"LayerNorm output is also used by {others}")
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        return miss(f"LayerNorm normalizes over {shape}, not just the last dim")
    if not isinstance(x, fx.Node) or not (is_number(eps) or isinstance(eps, fx.Node)):
        return miss("LayerNorm input or eps is not a plain tensor/number")
    product = products[0]
    one_plus = other_operand(product, norm)
    if not is_call(one_plus, canon.ADD) or not is_number(one_plus.args[0]):
        return miss("scale has no +1: LN(x) is multiplied by a tensor that is not (1 + scale)")
    if not is_number(one_plus.args[0], 1):
        return miss(f"scale offset is {one_plus.args[0]}, not 1")
    scale = one_plus.args[1]
    result = only_user(product)
    if result is None or not is_call(result, canon.ADD):
        return miss("modulated LayerNorm is not followed by a single + shift")
    shift = other_operand(result, product)
    if not isinstance(shift, fx.Node) or not isinstance(scale, fx.Node):
        return miss("shift or scale is a Python number, not a tensor")
    for operand, label in ((shift, "shift"), (scale, "scale")):
        if broadcasts_over_last_dim(operand, x):
            return miss(f"{label} broadcasts over the hidden dim")
    eps = eps if isinstance(eps, fx.Node) else float(eps)  # a node: Dynamo's symbolic float (dynamic=True)
    return LayerNormModulateSite(norm, product, result, x, shift, scale, one_plus, eps, weight, bias)


def describe_eps(eps: float | fx.Node) -> str:
    return f"eps={eps:g}" if isinstance(eps, float) else "eps=symbolic"


class LayerNormModulate:
    name = NAME
    op_key = "layernorm_scale_shift"
    math = "LN(x) * (1 + scale) + shift"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        for site in scan(graph, ctx, lambda node: match_site(node, ctx)):
            yield site if isinstance(site, NearMiss) else self.to_match(site, ctx)

    def to_match(self, site: LayerNormModulateSite, ctx: MatchContext) -> Match:
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(site.x, site.shift, site.scale, site.eps, site.weight, site.bias),
            anchors=(site.result,),
            internal=site.internal,
            where=ctx.where(site.norm),
            detail=describe_eps(site.eps) + (", affine" if site.weight is not None else ""),
        )

