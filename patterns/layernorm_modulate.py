"""LayerNorm (or RMSNorm) -> scale-shift (adaLN modulation).

Matches    ``LN(x) * (1 + scale) + shift``, LN over the last dim, any affine weight/bias; the same
           of an RMSNorm (LTX-Video's ``norm1(x) * (1 + scale_msa) + shift_msa``).
Accepts    one LayerNorm feeding several modulations and nothing else (SD3.5's
           ``SD35AdaLayerNormZeroX``: one fused call each, every call normalizing x itself);
           either operand order of ``*`` and ``+``; ``1 + s`` / ``s + 1`` / ``1.0 + s``;
           ``torch.addcmul(shift, LN(x), 1 + scale)``; ``nn.LayerNorm`` modules and
           ``F.layer_norm`` calls; shift/scale of any broadcastable shape (``[B,1,D]``
           chunk views, ``[B,D]`` after ``[:, None, :]`` or ``unsqueeze(1)``, ``[D]``). RMSNorms:
           ``F.rms_norm`` / ``nn.RMSNorm`` (any weight, a number eps) and diffusers'
           ``RMSNorm(elementwise_affine=False)`` as ``normalize`` spells it,
           ``(x.to(f32) * rsqrt(mean(x.to(f32) ** 2, -1, True) + eps)).to(x.dtype)`` (no casts
           for fp32 x; also uncast ``x * rsqrt(...)``: the fused op then computes in fp32, never
           less accurately).
Refuses    (near-miss) an RMSNorm whose fp32 result is never cast back to x's dtype, or whose
           eps is not a number, a LayerNorm rounded to another dtype before the modulation
           (``LN(x).to(torch.float16) * ...``; casts to its own dtype are gone after ``normalize``),
           scale without the ``+1``, an offset other than 1, LN over more than
           the last dim, an LN output that a non-modulation also uses, a modulated value that
           other nodes also use, and (when the
           graph has shapes) shift or scale that broadcast over the hidden dim.
Emits      ``fusion_pass::layernorm_scale_shift(x, shift, scale, eps, weight, bias)``;
           ``fusion_pass::rmsnorm_scale_shift(x, shift, scale, eps, weight)`` for an RMSNorm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.match import (
    Match, MatchContext, NearMiss, broadcasts_over_last_dim, describe, is_call, is_cast, is_number,
    only_user, operand_orders, other_operand, reduces_last_dim_only, tensor_meta,
)
from patterns.qk_rmsnorm import is_dtype_of, rsqrt_of_mean_square

NAME = "layernorm_modulate"


@dataclass
class LayerNormModulateSite:
    """The nodes of one matched ``LN(x) * (1 + scale) + shift`` (``rms``: an RMSNorm; bias None)."""

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
    rms: bool = False
    norm_nodes: tuple[fx.Node, ...] = ()  # a decomposed RMSNorm's other nodes (rsqrt, mean, casts, ...)

    @property
    def internal(self) -> tuple[fx.Node, ...]:
        return (self.norm, *self.norm_nodes, self.product, self.one_plus_scale)


def match_site(norm: fx.Node, ctx: MatchContext, skip: frozenset = frozenset()) -> LayerNormModulateSite | NearMiss | None:
    """Match a modulation that follows the LayerNorm node ``norm`` (None: not a candidate).
    When the LayerNorm feeds several modulations (and nothing else), the first whose
    product is not in ``skip`` is returned: each becomes its own fused call."""
    if is_call(norm, canon.RMS_NORM):
        return _functional_rms_modulation(norm, ctx, skip)
    if is_call(norm, canon.MUL):
        return _decomposed_rms_modulation(norm, ctx, skip)
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


def _functional_rms_modulation(norm: fx.Node, ctx: MatchContext, skip: frozenset):
    """``F.rms_norm(x, (D,), weight, eps) * (1 + scale) + shift`` (None: not a modulation)."""
    x, shape, weight, eps = norm.args
    return _rms_site(norm, norm, x, shape, weight, eps, (), ctx, skip)


def _decomposed_rms_modulation(norm: fx.Node, ctx: MatchContext, skip: frozenset):
    """diffusers' unweighted ``RMSNorm`` as ``normalize`` spells it, ``u * rsqrt(mean(u ** 2, -1,
    True) + eps)`` with ``u = x.to(f32)`` (then cast back to x's dtype) or ``u = x``, modulated
    (None: not an RMSNorm, or not modulated)."""
    for u, rsqrt in operand_orders(norm):
        statistic = rsqrt_of_mean_square(rsqrt, u)
        if statistic is not None:
            break
    else:
        return None
    add, mean, square = statistic
    upcasts = is_cast(u) and u.args[1] is torch.float32
    x = u.args[0] if upcasts else u
    cast = only_user(norm)
    casts_back = cast is not None and is_cast(cast) and is_dtype_of(cast.args[1], x)
    normed = cast if casts_back else norm
    nodes = (rsqrt, add, mean, square, *((u,) if upcasts else ()), *((cast,) if casts_back else ()))
    _, dim, keepdim = mean.args
    x_meta = tensor_meta(x)
    if not reduces_last_dim_only(dim, x_meta.dim() if x_meta is not None else None) or keepdim is not True:
        return None  # not a row RMSNorm: no candidate (qk_rmsnorm reports these)
    site = _rms_site(norm, normed, x, (None,), None, add.args[0], nodes, ctx, skip)
    if isinstance(site, LayerNormModulateSite) and upcasts and not casts_back:
        return NearMiss(NAME, ctx.where(norm), "RMSNorm is computed in fp32 and never cast back to the input dtype")
    return site


def _rms_site(norm, normed, x, shape, weight, eps, nodes, ctx, skip) -> LayerNormModulateSite | NearMiss | None:
    """The site of ``normed * (1 + scale) + shift``, ``normed`` the RMSNorm's (cast) output and
    its only user the product (None: not modulated, so not a candidate)."""
    product = only_user(normed)
    if product is None or product in skip or not is_call(product, canon.MUL):
        return None
    modulation = _modulation(product, normed, x)
    if isinstance(modulation, str):
        return None
    miss = lambda reason: NearMiss(NAME, ctx.where(norm), reason)  # noqa: E731
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        return miss(f"RMSNorm normalizes over {shape}, not just the last dim")
    if not is_number(eps) or not isinstance(x, fx.Node):
        return miss("RMSNorm input or eps is not a plain tensor/number (eps=None: finfo(dtype).eps)")
    product, one_plus, scale, result, shift = modulation
    return LayerNormModulateSite(normed, product, result, x, shift, scale, one_plus, float(eps), weight, None,
                                 rms=True, norm_nodes=tuple(n for n in (norm, *nodes) if n is not normed))


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
        args = (site.x, site.shift, site.scale, site.eps, site.weight)
        return Match(
            family=self.name,
            op_key="rmsnorm_scale_shift" if site.rms else self.op_key,
            args=args if site.rms else (*args, site.bias),
            anchors=(site.result,),
            internal=site.internal,
            where=ctx.where(site.norm),
            detail=("rms_norm, " if site.rms else "") + describe_eps(site.eps)
            + (", affine" if site.weight is not None else ""),
        )

