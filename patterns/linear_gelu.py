"""Linear -> tanh GELU, for the GEMM's bias + GELU epilogue.

Matches    ``F.gelu(F.linear(x, W, b), approximate="tanh")``: the double-stream DiT block's MLP
           (``nn.Sequential(nn.Linear, GELU(approximate="tanh"), nn.Linear)``; Hunyuan3D-2: two a
           double block, ``img_mlp`` and ``txt_mlp``).
Accepts    ``nn.Linear`` / ``nn.GELU`` modules (normalized to the functions) and a
           ``.contiguous()`` between them (Hunyuan3D's own ``GELU`` module calls
           ``gelu(x.contiguous())``: a Linear's output is contiguous, so it is value-identical).
Skips      a GELU whose input is not a Linear's output.
Refuses    (near-miss) the erf GELU (``approximate="none"``: the epilogue computes the tanh form),
           a Linear without a bias (the epilogue adds one), and a pre-activation (or its
           ``.contiguous()``) also used elsewhere.
Emits      ``fusion_pass::linear_gelu(x, W, b, "tanh")``: cuBLASLt's epilogue on CUDA in
           float16/bfloat16, the unfused expression everywhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch.nn.functional as F
from torch import fx

from fusion_pass.match import Match, MatchContext, NearMiss, describe, is_call, linear_arguments, only_user, scan

NAME = "linear_gelu"


@dataclass
class LinearGeluSite:
    """The nodes of one matched ``gelu(linear(x, W, b))``."""

    gelu: fx.Node
    linear: fx.Node
    copy: fx.Node | None  # the ``.contiguous()`` between them, when there is one
    x: fx.Node
    weight: Any
    bias: Any


def _is_contiguous_call(node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "contiguous"
            and len(node.args) == 1 and not node.kwargs)


def match_site(gelu: fx.Node, ctx: MatchContext) -> LinearGeluSite | NearMiss | None:
    """Match the Linear feeding the GELU node ``gelu`` (None: not a candidate)."""
    if not is_call(gelu, F.gelu) or not gelu.args:
        return None
    source = gelu.args[0]
    copy = source if _is_contiguous_call(source) else None
    linear = copy.args[0] if copy is not None else source
    arguments = linear_arguments(linear)
    if arguments is None:
        return None
    miss = lambda reason: NearMiss(NAME, ctx.where(linear), reason)  # noqa: E731
    approximate = gelu.kwargs.get("approximate", "none")
    if approximate != "tanh" or set(gelu.kwargs) - {"approximate"} or len(gelu.args) != 1:
        return miss(f"GELU approximate is {approximate!r}: the epilogue computes the tanh form only")
    x, weight, bias = arguments
    if bias is None:
        return miss("Linear has no bias: the epilogue adds one")
    for node in (linear, copy):
        if node is not None and only_user(node) is None:
            others = ", ".join(describe(u) for u in node.users if u not in (gelu, copy))
            return miss(f"the Linear's output is also used by {others}")
    if not isinstance(x, fx.Node):
        return miss("Linear input is not a tensor node")
    return LinearGeluSite(gelu, linear, copy, x, weight, bias)


class LinearGelu:
    name = NAME
    op_key = "linear_gelu"
    math = 'gelu(linear(x, W, b), approximate="tanh")'
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        for site in scan(graph, ctx, lambda node: match_site(node, ctx)):
            yield site if isinstance(site, NearMiss) else self.to_match(site, ctx)

    def to_match(self, site: LinearGeluSite, ctx: MatchContext) -> Match:
        internal = (site.linear,) if site.copy is None else (site.copy, site.linear)
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(site.x, site.weight, site.bias, "tanh"),
            anchors=(site.gelu,),
            internal=internal,
            where=ctx.where(site.linear),
            detail="tanh",
        )
