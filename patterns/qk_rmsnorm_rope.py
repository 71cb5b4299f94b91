"""q/k RMSNorm followed by rotary position embedding (RoPE), folded into one call.

Matches    a ``fusion_pass::qk_rmsnorm`` call (the ``qk_rmsnorm`` family, which runs first, wrote
           it) whose normed q and normed k each feed only diffusers' real-valued rotary embedding
           ``(n.float() * cos + rotate(n).float() * sin).to(n.dtype)``, q and k with one cos and sin
           (``apply_rotary_emb(use_real=True)`` of ``models/embeddings.py``, LTX's own copy).
Accepts    rotate interleaved (``use_real_unbind_dim=-1``; Flux single blocks, HunyuanVideo, LTX):
           ``stack([-n_imag, n_real], -1).flatten(-2)`` of ``n.reshape(..., D/2, 2).unbind(-1)`` (or
           ``unflatten(-1, (-1, 2))``); rotate half (``use_real_unbind_dim=-2``):
           ``cat([-n_imag, n_real], -1)`` of ``n.reshape(..., 2, D/2).unbind(-2)``; with or without the
           fp32 upcasts and the final cast back (casts to a value's own dtype are gone after
           ``normalize``); either operand order of ``+`` and ``*``; cos/sin ``[..., D]`` of any shape that
           broadcasts into q's and k's without widening them.
Skips      q/k norms whose results feed no rotation (``cat`` first: Flux's double blocks, the
           ``qk_rmsnorm_cat_rope`` family's).
Refuses    (near-miss) only one of q and k rotated, q and k rotated with different tables or layouts,
           a normed q or k also used besides its rotation, a rotation whose result has another dtype
           or shape than the normed value, cos/sin not D wide or widening q.
Needs      shapes (Dynamo's ``example_value``): without them no reshape is proven to split the last
           dim into pairs, and the qk_rmsnorm call stays as it is.
Emits      ``fusion_pass::qk_rmsnorm_rope(q, k, q_weight, k_weight, eps, cos, sin, interleaved)``
           -> ``(q, k)``, replacing the ``qk_rmsnorm`` call (its site is reported as folded) and both
           rotations.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.match import (
    Match, MatchContext, NearMiss, cat_arguments, describe, is_call, is_cast, only_user, operand_orders, scan,
    same_shape, tensor_meta,
)
from fusion_pass.registry import FUSED_OPS

NAME = "qk_rmsnorm_rope"
_QK_RMSNORM = FUSED_OPS["qk_rmsnorm"]
_Q, _K = _QK_RMSNORM.output_index("q"), _QK_RMSNORM.output_index("k")


@dataclass
class RopeSite:
    """One rotation ``n * cos + rotate(n) * sin`` of a normed value ``n``."""

    out: fx.Node
    cos: fx.Node
    sin: fx.Node
    interleaved: bool
    nodes: tuple[fx.Node, ...]  # every node of the rotation, ``out`` included


def match_rope(n: fx.Node) -> RopeSite | str | None:
    """The rotation applied to ``n`` (and nothing else applied to it), a reason it is not
    fusable, or None when ``n`` feeds no rotation."""
    reads = [n, *(u for u in n.users if is_cast(u) and u.args[1] is torch.float32)]
    users = {u for r in reads for u in r.users if u not in reads}
    splits = [u for u in users if _pair_split(u, n) is not None]
    products = [u for u in users if is_call(u, canon.MUL)]
    if not splits or not products:
        return None  # a head split of two heads looks like a pair split: no product, no rotation
    if len(splits) != 1 or len(products) != 1 or len(users) != 2:
        others = ", ".join(describe(u) for u in users if u not in splits[:1] + products[:1])
        return f"the normed value is also used by {others or 'a second rotation'}"
    rotated = _rotation(splits[0], n, _pair_split(splits[0], n))
    if isinstance(rotated, str):
        return rotated
    rotation, interleaved, rotate_nodes = rotated
    rotated_read = only_user(rotation)
    rotated_read = rotated_read if is_cast(rotated_read) and rotated_read.args[1] is torch.float32 else rotation
    sin_product = only_user(rotated_read)
    cos_product = products[0]
    total = only_user(cos_product)
    if not is_call(sin_product, canon.MUL) or not is_call(total, canon.ADD) or only_user(sin_product) is not total:
        return "the rotated value is not added as `n * cos + rotate(n) * sin`"
    cos = next(b for a, b in operand_orders(cos_product) if a in reads)
    sin = next((b for a, b in operand_orders(sin_product) if a is rotated_read), None)
    out = only_user(total) if is_cast(only_user(total)) else total
    reason = _shapes_differ(n, out, cos, sin)
    if reason:
        return reason
    nodes = (*reads[1:], splits[0], *rotate_nodes, *({rotated_read} - {rotation}), cos_product, sin_product, total,
             *({out} - {total}))
    return RopeSite(out, cos, sin, interleaved, nodes)


def match_qk_rope(q: fx.Node, k: fx.Node) -> tuple[RopeSite, RopeSite] | str | None:
    """The rotations of q and of k (``match_rope``) with one cos, sin and layout, a reason they
    are not that, or None when neither is rotated."""
    sites = [match_rope(q), match_rope(k)]
    if sites == [None, None]:
        return None
    for label, site in zip("qk", sites):
        if isinstance(site, str):
            return f"{label}: {site}"
        if site is None:
            return f"only {'k' if label == 'q' else 'q'} is rotated"
    q_site, k_site = sites
    if (q_site.cos, q_site.sin, q_site.interleaved) != (k_site.cos, k_site.sin, k_site.interleaved):
        return "q and k are rotated with different tables or layouts"
    return q_site, k_site


def _pair_split(node: fx.Node, n: fx.Node) -> bool | None:
    """Whether ``node`` reshapes ``n``'s last dim D into pairs: True for ``(D/2, 2)`` (interleaved),
    False for ``(2, D/2)`` (halves), None for anything else (also where the graph has no shapes)."""
    if not (is_call(node, canon.RESHAPE) or (node.op == "call_method" and node.target == "unflatten")):
        return None
    n_meta, split_meta = tensor_meta(n), tensor_meta(node)
    if n_meta is None or split_meta is None or n_meta.shape[-1] % 2:
        return None
    width, rows, split = n_meta.shape[-1], tuple(n_meta.shape[:-1]), tuple(split_meta.shape)
    for shape, interleaved in ((rows + (width // 2, 2), True), (rows + (2, width // 2), False)):
        if same_shape(split, shape):
            return interleaved
    return None


def _rotation(split: fx.Node, n: fx.Node, interleaved: bool) -> tuple[fx.Node, bool, tuple[fx.Node, ...]] | str:
    """``(rotate(n), interleaved, its nodes)`` from the split of ``n`` into pairs, or why not."""
    n_meta, split_meta = tensor_meta(n), tensor_meta(split)
    unbind_dim = -1 if interleaved else -2
    unbind = only_user(split)
    if unbind is not None and unbind.target is torch.view_as_complex:
        return "the rotation is complex (torch.view_as_complex), not one of the real forms"
    if not (unbind is not None and _unbinds(unbind, unbind_dim, split_meta.dim())):
        return "the pairs are not unbound along the split dim"
    halves = {u.args[1]: u for u in unbind.users if is_call(u, operator.getitem)}
    if set(halves) != {0, 1} or len(unbind.users) != 2:
        return "the unbound pair is not read as (real, imag)"
    real, imag = halves[0], halves[1]
    neg = only_user(imag)
    if not is_call(neg, operator.neg):
        return "the rotation does not negate the second of each pair"
    combined = only_user(neg)
    if combined is None or only_user(real) is not combined:
        return "the rotation does not combine (-imag, real)"
    if interleaved:
        stacked = is_call(combined, torch.stack) and _tensors_and_dim(combined) in (
            ((neg, real), -1), ((neg, real), split_meta.dim() - 1))
        flat = only_user(combined)
        if not (stacked and flat is not None and flat.op == "call_method" and flat.target == "flatten"):
            return "the rotation is not `stack([-imag, real], -1).flatten(...)`"
        rotation, nodes = flat, (unbind, real, imag, neg, combined, flat)
    else:
        arguments = cat_arguments(combined)
        if arguments is None or tuple(arguments[0]) != (neg, real) or arguments[1] not in (-1, n_meta.dim() - 1):
            return "the rotation is not `cat([-imag, real], -1)`"
        rotation, nodes = combined, (unbind, real, imag, neg, combined)
    rotation_meta = tensor_meta(rotation)
    if rotation_meta is None or rotation_meta.shape != n_meta.shape:
        return "the rotated value does not have the normed value's shape"
    return rotation, interleaved, nodes


def _unbinds(node: fx.Node, dim: int, ndim: int) -> bool:
    if not ((node.op == "call_method" and node.target == "unbind") or is_call(node, torch.unbind)):
        return False
    given = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return given in (dim, ndim + dim)


def _tensors_and_dim(node: fx.Node) -> tuple[tuple[Any, ...], Any]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return tuple(tensors), dim


def _shapes_differ(n: fx.Node, out: fx.Node, cos: Any, sin: Any) -> str | None:
    n_meta, out_meta = tensor_meta(n), tensor_meta(out)
    if out_meta is None or out_meta.shape != n_meta.shape or out_meta.dtype != n_meta.dtype:
        return "the rotated result has another shape or dtype than the normed value"
    for label, table in (("cos", cos), ("sin", sin)):
        meta = tensor_meta(table)
        if meta is None or meta.shape[-1] != n_meta.shape[-1] or meta.dim() > n_meta.dim():
            return f"{label} is not a [..., D] table"
        if torch.broadcast_shapes(meta.shape, n_meta.shape) != n_meta.shape:
            return f"{label} widens the normed value"
    return None


def _normed(call: fx.Node, index: int) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """Field ``index`` of ``call`` followed through casts to its own dtype: (value, nodes)."""
    fields = [u for u in call.users if is_call(u, operator.getitem) and u.args[1] == index]
    if len(fields) != 1:
        return None
    value, nodes = fields[0], [fields[0]]
    while (cast := only_user(value)) is not None and is_cast(cast) and canon.known_dtype(value) == cast.args[1]:
        value = cast
        nodes.append(cast)
    return value, tuple(nodes)


class QKRMSNormRope:
    name = NAME
    op_key = "qk_rmsnorm_rope"
    math = "rope(rmsnorm(q) * w_q) and rope(rmsnorm(k) * w_k), one cos/sin"
    covers = ()

    def find(self, graph: fx.Graph, ctx: MatchContext) -> Iterator[Match | NearMiss]:
        yield from scan(graph, ctx, lambda node: self._match_at(node, ctx))

    def _match_at(self, call: fx.Node, ctx: MatchContext) -> Match | NearMiss | None:
        if not is_call(call, _QK_RMSNORM.op) or len(call.args) != 5 or call.kwargs:
            return None
        normed = [_normed(call, index) for index in (_Q, _K)]
        if None in normed or len(call.users) != 2:
            return None
        sites = match_qk_rope(normed[0][0], normed[1][0])
        if sites is None:
            return None
        if isinstance(sites, str):
            return NearMiss(NAME, ctx.where(call), sites)
        q, k = sites
        return Match(
            family=self.name,
            op_key=self.op_key,
            args=(*call.args, q.cos, q.sin, q.interleaved),
            anchors=(q.out, k.out),
            internal=(call, *normed[0][1], *normed[1][1], *q.nodes, *k.nodes),
            where=ctx.where(call),
            detail=("interleaved" if q.interleaved else "rotate half")
            + (f", eps={call.args[4]:g}" if call.args[4] is not None else ""),
            output_fields=("q", "k"),
            cast_outputs=(None, None),
        )
