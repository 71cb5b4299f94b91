"""LayerNorm -> scale-shift (adaLN modulation).

Matches    ``LN(x) * (1 + scale) + shift``, LN over the last dim, any affine weight/bias.
Accepts    one LayerNorm feeding several modulations and nothing else (SD3.5's
           ``SD35AdaLayerNormZeroX``: one fused call each, every call normalizing x itself);
           either operand order of ``*`` and ``+``; ``1 + s`` / ``s + 1`` / ``1.0 + s``;
           ``torch.addcmul(shift, LN(x), 1 + scale)``; ``nn.LayerNorm`` modules and
           ``F.layer_norm`` calls; shift/scale of any broadcastable shape (``[B,1,D]``
           chunk views, ``[B,D]`` after ``[:, None, :]`` or ``unsqueeze(1)``, ``[D]``).
Refuses    (near-miss) an RMSNorm modulated the same way (LTX; no fused op yet), a LayerNorm rounded to another dtype before the modulation
           (``LN(x).to(torch.float16) * ...``; casts to its own dtype are gone after ``normalize``),
           scale without the ``+1``, an offset other than 1, LN over more than
           the last dim, an LN output that a non-modulation also uses, a modulated value that
           other nodes also use, and (when the
           graph has shapes) shift or scale that broadcast over the hidden dim.
Emits      ``fusion_pass::layernorm_scale_shift(x, shift, scale, eps, weight, bias)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.match import (
    Match, MatchContext, NearMiss, broadcasts_over_last_dim, describe, is_call, is_cast, is_number,
    only_user, operand_orders, other_operand,
)
from patterns.qk_rmsnorm import rsqrt_of_mean_square

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


def match_site(norm: fx.Node, ctx: MatchContext, skip: frozenset = frozenset()) -> LayerNormModulateSite | NearMiss | None:
    """Match a modulation that follows the LayerNorm node ``norm`` (None: not a candidate).
    When the LayerNorm feeds several modulations (and nothing else), the first whose
    product is not in ``skip`` is returned: each becomes its own fused call."""
    if is_call(norm, canon.RMS_NORM) or _is_unweighted_rms_norm(norm):
        return _rms_modulation(norm, ctx)
    if not is_call(norm, canon.LAYER_NORM):
        return None
    x, shape, weight, bias, eps = norm.args
    users = list(norm.users)
    products = [u for u in users if is_call(u, canon.MUL) and u not in skip]
    miss = lambda reason: NearMiss(NAME, ctx.where(norm), reason)  # noqa: E731
    if not products:
        rounded = _rounded_before_modulation(users)
        return None if rounded is None else miss(f"LayerNorm output is rounded to {rounded} before the modulation")
    others = [u for u in users if not is_call(u, canon.MUL)]
    if others:
        return miss(f"LayerNorm output is also used by {', '.join(describe(u) for u in others)}")
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        return miss(f"LayerNorm normalizes over {shape}, not just the last dim")
    if not isinstance(x, fx.Node) or not (is_number(eps) or isinstance(eps, fx.Node)):
        return miss("LayerNorm input or eps is not a plain tensor/number")
    modulations = [_modulation(product, norm, x) for product in products]
    reason = next((m for m in modulations if isinstance(m, str)), None)
    if reason is not None:
        return miss(reason if len(users) == 1 else f"LayerNorm feeds {len(users)} products, one not a modulation: {reason}")
    product, one_plus, scale, result, shift = modulations[0]
    eps = eps if isinstance(eps, fx.Node) else float(eps)  # a node: Dynamo's symbolic float (dynamic=True)
    return LayerNormModulateSite(norm, product, result, x, shift, scale, one_plus, eps, weight, bias)


def _is_unweighted_rms_norm(node: fx.Node) -> bool:
    """``x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps)`` (diffusers' ``RMSNorm`` without weight)."""
    return is_call(node, canon.MUL) and any(
        rsqrt_of_mean_square(rsqrt, x) is not None for x, rsqrt in operand_orders(node))


def _rms_modulation(norm: fx.Node, ctx: MatchContext) -> NearMiss | None:
    """An RMSNorm modulated like a LayerNorm (LTX: ``rms_norm(x) * (1 + scale) + shift``): the
    same shape of site, which the fused op cannot compute yet (it normalizes with LayerNorm)."""
    products = [u for u in norm.users if is_call(u, canon.MUL)]
    if len(products) != 1 or isinstance(_modulation(products[0], norm, norm), str):
        return None
    return NearMiss(NAME, ctx.where(norm), "RMSNorm modulation: the fused op normalizes with LayerNorm only")


def _rounded_before_modulation(users: list[fx.Node]):
    """The dtype a LayerNorm's only user casts it to, when that cast feeds a modulation's
    product (``normalize`` has dropped casts to the norm's own dtype: this one rounds)."""
    if len(users) != 1 or not is_cast(users[0]):
        return None
    cast = users[0]
    return cast.args[1] if any(is_call(u, canon.MUL) for u in cast.users) else None


def _modulation(product: fx.Node, norm: fx.Node, x: fx.Node) -> tuple | str:
    """``(product, one_plus, scale, result, shift)`` of ``norm * (1 + scale) + shift``, or why not."""
    one_plus = other_operand(product, norm)
    if not is_call(one_plus, canon.ADD) or not is_number(one_plus.args[0]):
        return "scale has no +1: LN(x) is multiplied by a tensor that is not (1 + scale)"
    if not is_number(one_plus.args[0], 1):
        return f"scale offset is {one_plus.args[0]}, not 1"
    scale = one_plus.args[1]
    result = only_user(product)
    if result is None or not is_call(result, canon.ADD):
        return "modulated LayerNorm is not followed by a single + shift"
    shift = other_operand(result, product)
    if not isinstance(shift, fx.Node) or not isinstance(scale, fx.Node):
        return "shift or scale is a Python number, not a tensor"
    for operand, label in ((shift, "shift"), (scale, "scale")):
        if broadcasts_over_last_dim(operand, x):
            return f"{label} broadcasts over the hidden dim"
    return product, one_plus, scale, result, shift


def describe_eps(eps: float | fx.Node) -> str:
    return f"eps={eps:g}" if isinstance(eps, float) else "eps=symbolic"


class LayerNormModulate:
    name = NAME
    op_key = "layernorm_scale_shift"
    math = "LN(x) * (1 + scale) + shift"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        for norm in list(graph.nodes):
            tried: set[fx.Node] = set()  # one LayerNorm may feed several modulations
            while ctx.live(norm):
                site = match_site(norm, ctx, frozenset(tried))
                if site is None:
                    break
                yield site if isinstance(site, NearMiss) else self.to_match(site, ctx)
                if isinstance(site, NearMiss):
                    break
                tried.add(site.product)

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

