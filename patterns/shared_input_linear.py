"""Linears that share one input, as one GEMM (horizontal fusion).

Matches    two or more ``F.linear(x, W_i, b_i)`` of one input ``x``: the same node, or calls of one
           pure elementwise function on the same arguments (Hunyuan3D-2's 64 modulation Linears
           and its final adaLN Linear each compute ``lin(silu(vec))`` of the one ``vec``, with a
           ``silu`` per module: those duplicates count as one input and are computed once).
Accepts    any number of Linears with one ``in_features``, weight dtype and device, all with a
           bias or all without (Linears of one input that differ there form separate groups);
           any use of the outputs (``chunk``, ``[:, None, :]``, ...): each output becomes a
           ``torch.split`` view of the group's result, the same shape and values.
Refuses    (near-miss) a Linear of a shared input whose weight or bias is not a parameter of the
           captured module (a graph input, as in torch.compile's graphs, or a computed tensor:
           its storage cannot be laid out), a parameter used by more than one Linear of the graph,
           and a Linear left alone in its group by a different in_features, dtype, device or bias.
           Duplicate inputs are not merged in a graph with in-place operations (two equal calls
           could then see different values).
Emits      ``fusion_pass::linear_group(x, [W_i], [b_i])`` and ``torch.split`` of its result by the
           out_features; installation lays the W_i (and the b_i) out consecutively in one buffer
           (``fusion_pass/packing.py``), so the op is one cuBLAS GEMM with its bias epilogue. The
           op checks that layout on every call and otherwise runs the separate Linears (exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fusion_pass import normalize as canon
from fusion_pass.match import Match, MatchContext, NearMiss, describe, linear_arguments

NAME = "shared_input_linear"

PURE_FUNCTIONS = (F.silu, F.gelu, F.relu, torch.sigmoid, torch.tanh)
"""Elementwise functions whose calls on the same arguments are one value (for the input key)."""


@dataclass
class LinearSite:
    """One Linear of a shared input, with its parameters resolved."""

    linear: fx.Node
    x: fx.Node  # its own input node (a duplicate of the group's input, or the input itself)
    weight: fx.Node
    bias: fx.Node | None
    out_features: int
    props: tuple  # (in_features, dtype, device, has bias): Linears of one group agree on these


DEFAULT_KWARGS = {"inplace": False, "approximate": "none"}
"""Keyword arguments of PURE_FUNCTIONS that change nothing when given their default
(``F.silu(v)`` from ``nn.SiLU`` and a traced ``F.silu(v, inplace=False)`` are one value)."""


def input_key(x: Any, merge_duplicates: bool) -> Any:
    """What identifies the value ``x``: the node, or for a pure function call of the same
    arguments, the call (``silu(vec)`` written once per module is one value)."""
    if not (merge_duplicates and isinstance(x, fx.Node) and x.op == "call_function" and x.target in PURE_FUNCTIONS):
        return x
    kwargs = {k: v for k, v in x.kwargs.items() if not (k in DEFAULT_KWARGS and v == DEFAULT_KWARGS[k])}
    if kwargs.get("inplace"):
        return x
    return (x.target, canon._hashable(x.args), canon._hashable(kwargs))


def parameter_of(node: Any, root: nn.Module | None) -> nn.Parameter | None:
    """The module parameter a ``get_attr`` node reads, or None."""
    if root is None or not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        return root.get_parameter(node.target)
    except AttributeError:
        return None


def site_of(linear: fx.Node, ctx: MatchContext, uses: dict[int, int]) -> LinearSite | str:
    """The site of one Linear whose input is shared, or the reason it cannot join a group."""
    x, weight_node, bias_node = linear_arguments(linear)
    weight = parameter_of(weight_node, ctx.root)
    bias = parameter_of(bias_node, ctx.root) if bias_node is not None else None
    if weight is None or (bias_node is not None and bias is None):
        what = "weight" if weight is None else "bias"
        return (f"{what} {describe(weight_node if weight is None else bias_node)} is not a parameter of the "
                "captured module (a graph input or a computed tensor): its storage cannot be laid out")
    if weight.dim() != 2 or (bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0])):
        return f"weight {tuple(weight.shape)} / bias shapes are not a Linear's [N, K] / [N]"
    shared = [p for p in (weight, bias) if p is not None and uses[id(p)] > 1]
    if shared:
        return "a parameter of this Linear is used by another Linear of the graph (tied weights)"
    props = (weight.shape[1], weight.dtype, weight.device, bias is not None)
    return LinearSite(linear, x, weight_node, bias_node, weight.shape[0], props)


def describe_props(props: tuple) -> str:
    in_features, dtype, device, has_bias = props
    return f"in_features={in_features}, {str(dtype).replace('torch.', '')}, {device}, {'bias' if has_bias else 'no bias'}"


class SharedInputLinear:
    name = NAME
    op_key = "linear_group"
    math = "[linear(x, W_i, b_i)] -> split(linear(x, cat(W_i), cat(b_i)))"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        merge = not any(canon.mutates(node, ctx.root) for node in graph.nodes)
        by_input: dict[Any, list[fx.Node]] = {}
        for node in graph.nodes:
            parts = linear_arguments(node)
            if parts is not None and isinstance(parts[0], fx.Node):
                by_input.setdefault(input_key(parts[0], merge), []).append(node)
        uses: dict[int, int] = {}
        for linears in by_input.values():
            for linear in linears:
                for node in linear_arguments(linear)[1:]:
                    param = parameter_of(node, ctx.root)
                    if param is not None:
                        uses[id(param)] = uses.get(id(param), 0) + 1
        for linears in by_input.values():
            if len(linears) < 2:
                continue
            groups: dict[tuple, list[LinearSite]] = {}
            for linear in linears:
                site = site_of(linear, ctx, uses)
                if isinstance(site, str):
                    yield NearMiss(NAME, ctx.where(linear), site)
                else:
                    groups.setdefault(site.props, []).append(site)
            for props, sites in groups.items():
                if len(sites) >= 2:
                    yield self.to_match(sites, ctx)
                    continue
                others = "; ".join(describe_props(p) for p in groups if p != props) or "the others were refused"
                yield NearMiss(NAME, ctx.where(sites[0].linear),
                               f"alone in its group ({describe_props(props)}); the other Linears of its input: {others}")

    def to_match(self, sites: list[LinearSite], ctx: MatchContext) -> Match:
        x = sites[0].x
        duplicates = tuple(dict.fromkeys(s.x for s in sites if s.x is not x))
        has_bias = sites[0].bias is not None
        n = len(sites)
        pack = (tuple(s.weight.target for s in sites),)
        if has_bias:
            pack += (tuple(s.bias.target for s in sites),)
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(x, [s.weight for s in sites], [s.bias for s in sites] if has_bias else []),
            anchors=tuple(s.linear for s in sites),
            internal=duplicates,
            where=ctx.where(sites[0].linear),
            detail=f"{n} Linears of {describe(x)}, {describe_props(sites[0].props)}, "
                   f"out_features {sum(s.out_features for s in sites)}",
            output_fields=(None,) * n,
            cast_outputs=(None,) * n,
            split_sizes=tuple(s.out_features for s in sites),
            pack=pack,
        )
