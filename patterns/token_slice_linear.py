"""A Linear of a token slice ``x[:, a:b]``, with the bias in the GEMM's epilogue.

Matches    ``F.linear(x[:, a:b], W, b)``: a slice along dim 1 (the tokens) of a batch-major
           tensor, as Hunyuan3D's double blocks split the joint attention output into its text
           and image streams (``attn[:, :L_txt]``, ``attn[:, L_txt:]``) before each ``proj``.
Accepts    either bound (or both) given, as numbers or graph values; ``nn.Linear`` modules
           (normalized to ``F.linear``).
Skips      Linears of anything but such a slice (their input flattens to one matrix, and
           ``F.linear`` already adds the bias in the epilogue).
Refuses    (near-miss) a Linear without a bias (nothing to move into the epilogue) and a slice
           with a step.
Emits      ``fusion_pass::linear_rows(x[:, a:b], W, b)``: one bias-epilogue GEMM per batch row on
           CUDA for small batches, instead of a batched GEMM and a broadcast bias add;
           ``F.linear`` itself everywhere else.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterator

from torch import fx

from fusion_pass.match import Match, MatchContext, NearMiss, is_call, linear_arguments, scan, tensor_meta

NAME = "token_slice_linear"


@dataclass
class TokenSliceLinearSite:
    linear: fx.Node
    x: fx.Node  # the slice
    weight: Any
    bias: Any


def is_token_slice(node: Any) -> bool:
    """``t[:, a:b]`` (a getitem of a full slice, then a slice), or with a trailing ``...``."""
    if not is_call(node, operator.getitem) or not isinstance(node.args[1], tuple):
        return False
    index = [i for i in node.args[1] if i is not Ellipsis] if node.args[1][-1:] == (Ellipsis,) else list(node.args[1])
    return (len(index) == 2 and index[0] == slice(None, None, None) and isinstance(index[1], slice))


def match_site(linear: fx.Node, ctx: MatchContext) -> TokenSliceLinearSite | NearMiss | None:
    arguments = linear_arguments(linear)
    if arguments is None:
        return None
    x, weight, bias = arguments
    if not is_token_slice(x):
        return None
    meta = tensor_meta(x)
    if meta is not None and meta.dim() != 3:
        return None
    miss = lambda reason: NearMiss(NAME, ctx.where(linear), reason)  # noqa: E731
    if x.args[1][1].step is not None:
        return miss("the token slice has a step")
    if bias is None:
        return miss("Linear has no bias: nothing to move into the GEMM's epilogue")
    return TokenSliceLinearSite(linear, x, weight, bias)


class TokenSliceLinear:
    name = NAME
    op_key = "linear_rows"
    math = "linear(x[:, a:b], W, b)"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        for site in scan(graph, ctx, lambda node: match_site(node, ctx)):
            yield site if isinstance(site, NearMiss) else self.to_match(site, ctx)

    def to_match(self, site: TokenSliceLinearSite, ctx: MatchContext) -> Match:
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(site.x, site.weight, site.bias),
            anchors=(site.linear,),
            internal=(),
            where=ctx.where(site.linear),
            detail="per-row bias-epilogue GEMMs on CUDA",
        )
