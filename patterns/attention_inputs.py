"""Which attention input a q/k norm feeds, and which projection it was cut from: shared by
the q/k norm families (``qk_rmsnorm``, ``qk_layernorm``) to pair a query norm with its key norm.

Between a q/k norm and ``scaled_dot_product_attention`` real models put views (head split,
``permute``), casts, the joint-attention ``cat`` and RoPE (``x * cos + rotate(x) * sin``,
in either of diffusers' real-valued forms, or written into ``out[..., 0::2]`` in place as
Wan does). :func:`attention_roles` follows the norm's value forward through any of these,
up to a bound, and stops at anything that mixes rows or channels (a linear, a matmul, a
norm, another attention). Pairing only decides which norms to fuse together; the rewrite
replaces the norms' outputs alone, so what the walk passes through is never changed.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import fx

from fusion_pass import normalize as canon
from fusion_pass.aliasing import mutates
from fusion_pass.match import CAT_FUNCTIONS, is_call

ATTENTION = canon.ATTENTION
QUERY, KEY = 0, 1
_MAX_HOPS = 24  # diffusers' interleaved RoPE is ~10 nodes deep; views and casts add a few
_STOPS = {
    canon.LINEAR, canon.LAYER_NORM, canon.RMS_NORM, torch.matmul, torch.bmm, torch.mm, torch.baddbmm,
    operator.matmul, F.group_norm, torch.einsum, getattr, ATTENTION,
}
_SHAPE_ONLY = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like}
#: methods whose second argument lends only a dtype, shape or device (``q.to(v)``)
_LIKE_METHODS = {"to", "type_as", "view_as", "expand_as", "reshape_as"}
_VIEW_METHODS = {"to", "contiguous", "permute", "transpose", "reshape", "view", "expand", "unbind", "chunk", "split",
                 "unflatten", "flatten", "squeeze", "unsqueeze"}
_VIEW_FUNCTIONS = {*CAT_FUNCTIONS, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze, operator.getitem,
                   torch.unbind, torch.chunk, torch.split, torch.flatten, torch.squeeze}


def attention_roles(out: fx.Node) -> set[tuple[fx.Node, int]]:
    """The ``(attention node, QUERY or KEY)`` pairs that ``out``'s value reaches. A value that
    reaches both the query and the key of one attention has no role in it (ambiguous)."""
    roles: set[tuple[fx.Node, int]] = set()
    seen, frontier = {out}, [out]
    for _ in range(_MAX_HOPS):
        following = []
        for value in frontier:
            for user in value.users:
                if is_call(user, ATTENTION):
                    roles.update((user, i) for i, arg in enumerate(user.args[:2]) if arg is value)
                    continue
                carrier = _carrier(user, value)
                if carrier is not None and carrier not in seen:
                    seen.add(carrier)
                    following.append(carrier)
        frontier = following
    both = {attention for attention, role in roles if (attention, 1 - role) in roles}
    return {(attention, role) for attention, role in roles if attention not in both}


def _carrier(user: fx.Node, value: fx.Node) -> fx.Node | None:
    """The node whose result holds ``value``'s data after ``user``, or None where it stops."""
    if user.op not in ("call_function", "call_method") or user.target in _STOPS or user.target in _SHAPE_ONLY:
        return None
    if user.op == "call_method" and user.target in _LIKE_METHODS and (not user.args or user.args[0] is not value):
        return None
    if mutates(user, None):
        written = user.args[0] if user.args else None
        return written if isinstance(written, fx.Node) and written is not value else None
    return user


def is_view_like(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op != "call_function":
        return False
    return node.target in _VIEW_FUNCTIONS or getattr(node.target, "__module__", "").startswith("einops")


def origin(node: fx.Node) -> fx.Node:
    """Walk back through views/splits to the tensor a q or k slice was cut from."""
    while is_view_like(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def stream_source(node: fx.Node) -> fx.Node:
    """The hidden states a q or k was projected from: through views to the projection,
    then through its ``linear`` to the linear's input (separate ``to_q``/``to_k`` projections
    of one stream share it). A projection adapted by peft's LoRA, ``base(x) + lora_B(lora_A(x))
    * scaling``, is followed through its base layer's ``linear``."""
    cut_from = origin(node)
    projection = cut_from
    while is_call(projection, operator.add) and isinstance(projection.args[0], fx.Node):
        projection = origin(projection.args[0])
    if is_call(projection, canon.LINEAR) and isinstance(projection.args[0], fx.Node):
        return origin(projection.args[0])
    return cut_from


def partner(q_x: fx.Node, key_inputs: list[fx.Node], single: bool) -> int | None:
    """Index in ``key_inputs`` of the key norm input that pairs with query norm input ``q_x``:
    the one cut from the same projection, else the one projected from the same hidden
    states, else the only one when the attention has a single query and key norm."""
    for same in (origin, stream_source):
        matches = [i for i, k_x in enumerate(key_inputs) if same(k_x) is same(q_x)]
        if len(matches) == 1:
            return matches[0]
    return 0 if single and len(key_inputs) == 1 else None


Site = TypeVar("Site")


def pair_norms(sites: list[Site], out_of: Callable[[Site], fx.Node], input_of: Callable[[Site], fx.Node]):
    """Pair q/k norm sites that feed one attention's query and key (see :func:`partner`).
    Returns ``(pairs, feeding_none, unpaired)``: the ``(q, k)`` pairs, the sites whose output
    reaches no attention's query or key, and the sites that do but found no partner."""
    by_attention: dict[fx.Node, dict[int, list[Site]]] = defaultdict(lambda: defaultdict(list))
    feeding_none = []
    for site in sites:
        roles = attention_roles(out_of(site))
        if not roles:
            feeding_none.append(site)
        for attention, role in roles:
            by_attention[attention][role].append(site)
    pairs, paired = [], set()
    for roles in by_attention.values():
        queries, keys = roles.get(QUERY, []), roles.get(KEY, [])
        for q in queries:
            index = partner(input_of(q), [input_of(k) for k in keys], single=len(queries) == 1)
            k = None if index is None else keys[index]
            if k is not None and id(k) not in paired and id(q) not in paired:
                paired.update((id(q), id(k)))
                pairs.append((q, k))
    unpaired = [site for site in sites if id(site) not in paired and all(site is not s for s in feeding_none)]
    return pairs, feeding_none, unpaired
