"""q/k RMSNorm pairs.

Matches    an RMSNorm of the query and one of the key that feed the same attention call
           (``scaled_dot_product_attention``, through casts, views, permutes and ``cat``),
           normalized over the last (head) dim and coming from the same projection.
Accepts    the upcast spelling ``(x.float() * rsqrt(mean(x**2, -1, keepdim=True) + eps)).to(x.dtype) * w``
           (also ``x.pow(2)``, ``x * x``, ``x.square()``, ``.to(torch.float32)``, a cast back
           to ``x.dtype`` read from the graph or known from shapes), the same without any cast
           (``x * rsqrt(...) * w``: the fused op then computes in fp32, never less accurately),
           ``F.rms_norm`` / ``nn.RMSNorm`` with a weight; diffusers' ``RMSNorm`` as ``normalize``
           respells it (the upcast spelling in Dynamo graphs; in FX graphs, without dtypes,
           a norm of ``x.to(promote_types(x.dtype, T))``, see ``_rms_of_unknown_dtype``).
Refuses    (near-miss) eps that differs between q and k, a norm with no partner, a norm that
           feeds no attention, a reduction over a dim other than the last, ``keepdim=False``,
           a cast back to a dtype that is not the input's, an fp32 result never cast back.
Emits      ``fusion_pass::qk_rmsnorm(q, k, q_weight, k_weight, eps)`` -> ``(q, k)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.match import (
    Match, MatchContext, NearMiss, is_call, is_cast, is_number, operand_orders, reduces_last_dim_only, scan,
    tensor_meta,
)
from patterns.attention_inputs import pair_norms

NAME = "qk_rmsnorm"


@dataclass
class RMSNormSite:
    """One matched RMSNorm: ``out = norm(x) * weight``."""

    out: fx.Node
    x: fx.Node
    weight: fx.Node
    eps: float | None
    internal: tuple[fx.Node, ...]
    casts_back: bool  # F.rms_norm semantics: the result has x's dtype whatever the weight's


def match_rms_norm(node: fx.Node, ctx: MatchContext) -> RMSNormSite | NearMiss | None:
    """Match an RMSNorm whose output is ``node`` (None: not a candidate)."""
    if is_call(node, canon.RMS_NORM):
        return _functional_site(node, ctx)
    if not is_call(node, canon.MUL):
        return None
    for normed, weight in operand_orders(node):
        cast = normed if is_cast(normed) else None
        core = cast.args[0] if cast is not None else normed
        if not is_call(core, canon.MUL) or not isinstance(weight, fx.Node):
            continue
        for upcast, rsqrt in operand_orders(core):
            statistic = rsqrt_of_mean_square(rsqrt, upcast)
            if statistic is None:
                continue
            return _decomposed_site(node, ctx, cast, core, upcast, weight, rsqrt, statistic)
    return None


def rsqrt_of_mean_square(rsqrt, source):
    """``rsqrt(eps + mean(square(source), dim, keepdim))`` -> (add, mean, square) or None."""
    if not is_call(rsqrt, canon.RSQRT) or not is_call(rsqrt.args[0], canon.ADD):
        return None
    add = rsqrt.args[0]
    if not is_number(add.args[0]) or not is_call(add.args[1], canon.MEAN):
        return None
    mean = add.args[1]
    square = mean.args[0]
    is_square = (is_call(square, canon.POW) and square.args == (source, 2)) or (
        is_call(square, canon.MUL) and square.args == (source, source)
    )
    return (add, mean, square) if is_square else None


def _decomposed_site(node, ctx, cast, core, upcast, weight, rsqrt, statistic):
    add, mean, square = statistic
    miss = lambda reason: NearMiss(NAME, ctx.where(node), reason)  # noqa: E731
    x, upcasts = upcast, False
    if is_cast(upcast) and upcast.args[1] is torch.float32:
        x, upcasts = upcast.args[0], True
    _, dim, keepdim = mean.args
    x_meta = tensor_meta(x)
    if not reduces_last_dim_only(dim, x_meta.dim() if x_meta is not None else None):
        return miss(f"RMSNorm reduces over dim {dim}, not the last dim")
    if keepdim is not True:
        return miss("RMSNorm mean is taken without keepdim=True")
    if upcasts and cast is None:
        return miss("normalized value is computed in fp32 and never cast back to the input dtype")
    if cast is not None and not is_dtype_of(cast.args[1], x):
        return miss("normalized value is cast to a dtype that is not (provably) the input's")
    internal = [node, core, rsqrt, add, mean, square]
    if cast is not None:
        internal.insert(1, cast)
        if isinstance(cast.args[1], fx.Node):
            internal.append(cast.args[1])
    if upcasts:
        internal.append(upcast)
    return RMSNormSite(node, x, weight, float(add.args[0]), tuple(internal), casts_back=False)


def is_dtype_of(dtype, x: fx.Node) -> bool:
    if isinstance(dtype, fx.Node):
        return dtype.op == "call_function" and dtype.target is getattr and dtype.args == (x, "dtype")
    meta = tensor_meta(x)
    return isinstance(dtype, torch.dtype) and meta is not None and meta.dtype == dtype


def _functional_site(node, ctx):
    x, shape, weight, eps = node.args
    miss = lambda reason: NearMiss(NAME, ctx.where(node), reason)  # noqa: E731
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        return miss(f"rms_norm normalizes over {shape}, not just the last dim")
    if not isinstance(weight, fx.Node):
        return miss("rms_norm has no weight")
    if eps is not None and not is_number(eps):
        return miss("rms_norm eps is not a number")
    return RMSNormSite(node, x, weight, None if eps is None else float(eps), (node,), casts_back=True)


class QKRMSNorm:
    name = NAME
    op_key = "qk_rmsnorm"
    math = "q * rsqrt(mean(q^2) + eps) * w_q  and  k * rsqrt(mean(k^2) + eps) * w_k"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        sites = []
        for site in scan(graph, ctx, lambda node: match_rms_norm(node, ctx)):
            if isinstance(site, NearMiss):
                yield site
            else:
                sites.append(site)
        yield from self._pairs(sites, ctx)

    def _pairs(self, sites: list[RMSNormSite], ctx: MatchContext) -> Iterator[Match | NearMiss]:
        pairs, feeding_none, unpaired = pair_norms(sites, lambda site: site.out, lambda site: site.x)
        for site in feeding_none:
            yield NearMiss(NAME, ctx.where(site.out), "RMSNorm does not feed an attention's query or key")
        for q, k in pairs:
            if q.eps != k.eps:
                yield NearMiss(NAME, ctx.where(q.out), f"eps differs between q and k norm ({q.eps} vs {k.eps})")
            else:
                yield self.to_match(q, k, ctx)
        for site in unpaired:
            yield NearMiss(NAME, ctx.where(site.out), "RMSNorm has no partner norm on the other of query/key")

    def to_match(self, q: RMSNormSite, k: RMSNormSite, ctx: MatchContext) -> Match:
        casts = (q.x, k.x) if q.casts_back or k.casts_back else (None, None)
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(q.x, k.x, q.weight, k.weight, q.eps),
            anchors=(q.out, k.out),
            internal=q.internal + k.internal,
            where=ctx.where(q.out),
            detail=f"eps={q.eps:g}" if q.eps is not None else "eps=finfo(dtype).eps",
            output_fields=("q", "k"),
            cast_outputs=casts,
            weight_owners=tuple(_owner(w) for w in (q.weight, k.weight) if _owner(w)),
        )


def _owner(weight: fx.Node) -> tuple[str, str] | None:
    """``("a.b", "scale")`` for a ``get_attr`` of ``a.b.scale`` (a parameter of a module)."""
    if weight.op != "get_attr":
        return None
    owner, _, attr = weight.target.rpartition(".")
    return owner, attr
