"""GELU concatenated after another tensor.

Matches    ``torch.cat((a, F.gelu(b', approximate=...)), dim)``: the single-stream DiT block's
           ``linear2(cat(attn, gelu(mlp)))``, where ``mlp`` is a strided split view.
Accepts    ``b'`` either ``b`` or ``b.contiguous()`` (value-identical: the op reads ``b`` through
           its strides and the copy is skipped); a tuple or list of operands; ``dim`` positional
           or keyword, negative or not; both GELU approximations ("none" and "tanh").
Skips      cats with no GELU operand.
Refuses    (near-miss) a GELU result also used elsewhere, a cat of more than two operands, GELU
           on the first operand, an ``approximate`` that is not a constant, a ``dim`` that is not
           a number, and (when the graph has shapes) a cat along a dim other than the last.
Emits      ``fusion_pass::gelu_cat(a, b, dim, approximate)``.

``nn.GELU`` module calls arrive as ``F.gelu`` calls (``normalize`` respells them), as do
Dynamo graphs and modules whose own forward calls ``F.gelu`` (Hunyuan3D's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch.nn.functional as F
from torch import fx

from fusion_pass.match import (
    Match, MatchContext, NearMiss, cat_arguments, describe, is_call, is_number, scan, tensor_meta,
)
from fusion_pass.ops.gelu_cat import APPROXIMATIONS

NAME = "gelu_cat"


@dataclass
class GeluCatSite:
    """The nodes of one matched ``cat((a, gelu(b')), dim)``."""

    cat: fx.Node
    gelu: fx.Node
    copy: fx.Node | None  # ``b.contiguous()`` when ``b'`` is one
    a: fx.Node
    b: fx.Node
    dim: int
    approximate: str


def match_site(cat: fx.Node, ctx: MatchContext) -> GeluCatSite | NearMiss | None:
    """Match the GELU-and-cat whose ``cat`` is ``cat`` (None: not a candidate)."""
    arguments = cat_arguments(cat)
    if arguments is None:
        return None
    operands, dim = arguments
    if not any(is_call(t, F.gelu) for t in operands):
        return None
    miss = lambda reason: NearMiss(NAME, ctx.where(cat), reason)  # noqa: E731
    if len(operands) != 2:
        return miss(f"cat has {len(operands)} operands; the fused op concatenates two, (a, gelu(b))")
    a, gelu = operands
    if not is_call(gelu, F.gelu):
        return miss("GELU is on the first cat operand; the fused op applies it to the second")
    if len(gelu.users) > 1:
        other = next(u for u in gelu.users if u is not cat)
        return miss(f"GELU output is also used by {describe(other)}")
    approximate = gelu.kwargs.get("approximate", "none")
    if approximate not in APPROXIMATIONS:
        return miss(f"GELU approximate is {approximate!r}, not a constant 'none' or 'tanh'")
    if not (is_number(dim) and isinstance(dim, int)):
        return miss(f"cat dim {describe(dim)} is not a number")
    out_meta = tensor_meta(cat)
    if out_meta is not None and dim not in (-1, out_meta.dim() - 1):
        return miss(f"cat along dim {dim}, not the last dim")
    source = gelu.args[0] if gelu.args else gelu.kwargs["input"]
    copy = source if _is_contiguous_call(source) else None
    b = copy.args[0] if copy is not None else source
    return GeluCatSite(cat, gelu, copy, a, b, dim, approximate)


def _is_contiguous_call(node: Any) -> bool:
    return (
        isinstance(node, fx.Node) and node.op == "call_method" and node.target == "contiguous"
        and len(node.args) == 1 and set(node.kwargs) <= {"memory_format"}
    )


class GeluCat:
    name = NAME
    op_key = "gelu_cat"
    math = "cat((a, gelu(b)), -1)"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        for site in scan(graph, ctx, lambda node: match_site(node, ctx)):
            yield site if isinstance(site, NearMiss) else self.to_match(site, ctx)

    def to_match(self, site: GeluCatSite, ctx: MatchContext) -> Match:
        internal = (site.gelu,) if site.copy is None else (site.gelu, site.copy)
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(site.a, site.b, site.dim, site.approximate),
            anchors=(site.cat,),
            internal=internal,
            where=ctx.where(site.gelu),
            detail=f"approximate={site.approximate}",
        )
