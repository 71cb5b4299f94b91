"""Hypothesis strategies for fuzzing fusion_pass (used by ``tests/test_fuzz.py``).

A drawn :class:`Program` describes a small DiT-like network: a residual stream ``x [B, L, D]``
run through a few segments, each ``x = x + gate * branch(LN(x) * (1 + scale) + shift)``, where
every part is optional and spelled one of the ways the pattern modules accept (operand orders,
``+``/``.add``/``torch.add``/``addcmul``, module vs functional LayerNorm, ``1 + s``/``s + 1``,
chunk layouts, ``unsqueeze(1)``/``[:, None, :]``/``[:, None]``, ...). A branch may be an
attention whose q/k RMSNorms (again in any accepted spelling) feed
``F.scaled_dot_product_attention``, optionally jointly with a second token stream, or a
single-stream block's parallel MLP ``fc2(cat((a, gelu(b)), -1))`` with ``a, b`` split from
one projection (the gelu_cat family).

A part may instead carry one *planted near-miss* (``miss``): a spelling the pass must leave
unfused and report with a reason. :func:`expected_sites` and :func:`expected_near_misses` derive,
from the program alone, what the pass must report: the program is plain data, so a failing
example prints as a readable description of the network.

``GeneratedNet(program)`` runs the program; its forward interprets the (static) description, so
``torch.fx`` and Dynamo both capture it as one straight-line graph.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import strategies as st
from torch import nn

from patterns import FAMILY_NAMES

FX, DYNAMO = "optimize", "compile"  # the two ways the pass sees a graph
CHAIN, LN_MOD, GATE, QK = "residual_layernorm_modulate", "layernorm_modulate", "residual_gate", "qk_rmsnorm"

# --- what the pass must report for each planted near-miss -----------------------------------
# family, a phrase of the reason, and the paths on which it is a near-miss (shapes are known
# only in Dynamo graphs; on the optimize() path those sites fuse and the fused op computes
# the exact broadcast).
BOTH, SHAPES_ONLY = (FX, DYNAMO), (DYNAMO,)
LN_MISSES = {
    "scale_without_plus_one": ("scale has no +1", BOTH),
    "scale_offset_two": ("scale offset is 2", BOTH),
    "norm_output_has_extra_user": ("LayerNorm output is also used by", BOTH),
    "modulated_product_has_extra_user": ("not followed by a single + shift", BOTH),
    "norm_over_last_two_dims": ("not just the last dim", BOTH),
    "shift_broadcast_over_hidden": ("shift broadcasts over the hidden dim", SHAPES_ONLY),
    "scale_broadcast_over_hidden": ("scale broadcasts over the hidden dim", SHAPES_ONLY),
}
GATE_MISSES = {
    "gate_multiplies_residual": ("the gate multiplies the residual", BOTH),
    "gate_product_has_extra_user": ("gate * y is also used by", BOTH),
    "gate_broadcast_over_hidden": ("gate broadcasts over the hidden dim", SHAPES_ONLY),
}
NO_PARTNER = "no partner norm"
QK_MISSES = {  # reasons per attention stream: (the planted one, the ones it causes)
    "eps_differs_between_q_and_k": ("eps differs between q and k",),
    "q_norm_over_non_last_dim": ("not the last dim", NO_PARTNER),
    "q_and_k_norm_over_non_last_dim": ("not the last dim", "not the last dim"),
    "q_upcast_never_cast_back": ("never cast back", NO_PARTNER),
    "only_q_normed": (NO_PARTNER,),
    "v_normed_too": ("does not feed an attention's query or key",),
}
CHAIN_CONFLICT = "ordering conflict"
QK_CAT = "qk_rmsnorm_cat"
RES_LN = "residual_layernorm"
QK_CAT_MISSES = {  # why a joint attention's two q/k pairs and three cats do not fold (the first cause checked)
    "q_has_extra_user": "the normed q of a stream is also used by",
    "cast": "other than all by `.to(v)` of their stream",
    "v_normed_too": "no cat of the streams' v",  # also for separate q/k/v projections
}
BROADCAST_OVER_HIDDEN = ("shift_broadcast_over_hidden", "scale_broadcast_over_hidden")
GELU_CAT = "gelu_cat"
GELU_CAT_MISSES = {
    "gelu_has_extra_user": "GELU output is also used by",
    "gelu_on_first_operand": "GELU is on the first cat operand",
}

# --- spellings -----------------------------------------------------------------------------
ONE_PLUS = ("1 + s", "s + 1", "1.0 + s", "s.add(1)", "torch.add(s, 1)")
MUL = ("*", "mul", "torch.mul")
ADD = ("+", "add", "torch.add", "addcmul", "Tensor.addcmul")
NORM_FORMS = ("module", "functional", "functional_kwargs", "functional_list")
AFFINE = ("none", "weight_and_bias", "weight_only")
EPS = (1e-6, 1e-5, 1e-3, 0.1)
LAYOUTS = ("chunk_3d", "chunk_2d", "vector")  # [B,1,kD] chunks; [B,kD] chunks unsqueezed; [D] params
AXIS = ("unsqueeze(1)", "[:, None, :]", "[:, None]")
RMS_FORMS = ("official", "method_chain", "no_cast", "functional", "module")
SQUARE = ("** 2", "pow(2)", "x * x", "square()", "torch.pow")
UPCAST = ("float()", "to(torch.float32)", "to(dtype=torch.float32)")
DOWNCAST = ("to(dtype=dtype)", "to(dtype)", "to(x.dtype)")
QKV = ("reshape_permute_unpack", "unbind", "einops", "chunk", "separate")
NORM_AT = ("heads_last", "before_transpose", "before_head_split")  # [B,H,L,Dh], [B,L,H,Dh], [B,L,H*Dh]
BRANCHES = ("linear", "mlp", "attention", "gelu_cat")
GELU_SPLITS = ("split", "chunk_like_split", "slices")  # how a, b come out of one projection
GELU_CAT_DIMS = ("-1", "2", "dim=-1")  # the cat's dim: 2 is the last of [B, L, D]
DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64)  # fp32 twice as often


@dataclass(frozen=True)
class Modulation:
    """Where a segment's shift/scale/gate come from: ``lin(silu(vec))`` chunked into ``parts``
    (``chunk_3d``: after adding the token axis; ``chunk_2d``: before, each chunk then gets it),
    or learned ``[D]`` vectors. ``offset`` picks this segment's three; ``shared`` reuses the
    previous segment's chunks (the second half of a chunk(6), as in a DiT double block)."""

    layout: str
    parts: int
    offset: int
    axis: str
    chunk_dim_negative: bool
    unpack: bool
    shared: bool


@dataclass(frozen=True)
class LNModulate:
    form: str
    affine: str
    eps: float
    one_plus: str
    mul: str
    norm_first: bool
    add: str
    shift_first: bool
    one_plus_has_extra_user: bool  # still fuses: ``1 + scale`` keeps feeding its other user
    result_has_extra_user: bool  # still fuses: the fused result feeds both users
    miss: str | None  # a key of LN_MISSES
    broadcast_from_residual: bool  # for *_broadcast_over_hidden: computed from x, else an input
    axis_after_one_plus: bool = False  # chunk_2d: ``(1 + s)[:, None]`` (AdaLayerNormContinuous), not ``1 + s[:, None]``


@dataclass(frozen=True)
class Gate:
    mul: str
    gate_first: bool
    add: str
    residual_first: bool
    miss: str | None  # a key of GATE_MISSES
    broadcast_from_residual: bool


@dataclass(frozen=True)
class RMS:
    form: str
    square: str
    upcast: str
    downcast: str
    weight_first: bool
    eps_first: bool


@dataclass(frozen=True)
class Attention:
    heads: int
    head_dim: int
    qkv: str
    norm_at: str
    q_norm: RMS
    k_norm: RMS
    eps: float
    cast_to_v: bool
    joint: bool  # a second token stream ``c`` attends jointly (cat on the token axis)
    q_has_extra_user: bool  # still fuses
    miss: str | None  # a key of QK_MISSES

    @property
    def pairs(self) -> int:
        """q/k pairs that fuse."""
        if self.miss not in (None, "v_normed_too"):
            return 0
        return 1 + self.joint  # q and k from separate projections pair by the stream they project


@dataclass(frozen=True)
class GeluCat:
    """``fc2(cat((a, gelu(b)), dim))``, ``a, b = fc1(h)`` split into hidden and 2 * hidden + 1."""

    approximate: str  # "none" or "tanh"
    module: bool  # an ``nn.GELU`` module, else ``F.gelu``
    contiguous: bool  # ``gelu(b.contiguous())``: the copy is skipped, b read through its strides
    as_list: bool  # ``cat([a, g])``, else a tuple
    dim: str  # a key of GELU_CAT_DIMS
    split: str  # a key of GELU_SPLITS
    miss: str | None  # a key of GELU_CAT_MISSES


@dataclass(frozen=True)
class Segment:
    modulation: Modulation
    norm: LNModulate | None
    branch: str
    attention: Attention | None
    gelu_cat: GeluCat | None
    gate: Gate | None  # None: ungated ``x + branch``; for the final segment: no residual at all
    final: bool  # ``lin(LN-modulate(x))``, no residual: the last layer of a DiT
    early_user_of_input: bool  # plants a chain ordering conflict (see expected_near_misses)


@dataclass(frozen=True)
class Program:
    hidden: int
    cond_dim: int
    batch: int
    tokens: int
    joint_tokens: int
    dtype: torch.dtype
    modulations_first: bool
    segments: tuple[Segment, ...]
    seed: int

    def planted(self) -> Counter:
        """Planted near-misses by name (for statistics)."""
        found = Counter()
        for seg in self.segments:
            for part in (seg.norm, seg.gate, seg.attention, seg.gelu_cat):
                if part is not None and part.miss:
                    found[part.miss] += 1
            if seg.early_user_of_input:
                found["chain_ordering_conflict"] += 1
        return found


# --- strategies ----------------------------------------------------------------------------

def sometimes(strategy, one_in: int):
    """``strategy``'s value about one time in ``one_in``, else None."""
    return st.one_of(*([st.none()] * (one_in - 1)), strategy)


def rarely(one_in: int):
    """True about one time in ``one_in``."""
    return st.integers(1, one_in).map(lambda n: n == one_in)


def ln_modulates(miss=sometimes(st.sampled_from(sorted(LN_MISSES)), 4)):
    @st.composite
    def build(draw):
        chosen = draw(miss)
        form = "functional" if chosen == "norm_over_last_two_dims" else draw(st.sampled_from(NORM_FORMS))
        affine = "none" if chosen == "norm_over_last_two_dims" else draw(st.sampled_from(AFFINE))
        add = draw(st.sampled_from(ADD))
        if chosen == "modulated_product_has_extra_user":
            add = draw(st.sampled_from(ADD[:3]))  # addcmul has no separate product node
        return LNModulate(
            form=form, affine=affine, eps=draw(st.sampled_from(EPS)), one_plus=draw(st.sampled_from(ONE_PLUS)),
            mul=draw(st.sampled_from(MUL)), norm_first=draw(st.booleans()), add=add,
            shift_first=draw(st.booleans()), one_plus_has_extra_user=draw(st.booleans()),
            result_has_extra_user=draw(st.booleans()), miss=chosen, broadcast_from_residual=draw(st.booleans()),
            axis_after_one_plus=draw(st.booleans()),
        )

    return build()


def gates(miss=sometimes(st.sampled_from(sorted(GATE_MISSES)), 4)):
    @st.composite
    def build(draw):
        chosen = draw(miss)
        add = draw(st.sampled_from(ADD))
        if chosen == "gate_product_has_extra_user":
            add = draw(st.sampled_from(ADD[:3]))
        return Gate(
            mul=draw(st.sampled_from(MUL)), gate_first=draw(st.booleans()), add=add,
            residual_first=draw(st.booleans()), miss=chosen, broadcast_from_residual=draw(st.booleans()),
        )

    return build()


@st.composite
def rms_spellings(draw, forms=RMS_FORMS):
    return RMS(
        form=draw(st.sampled_from(forms)), square=draw(st.sampled_from(SQUARE)), upcast=draw(st.sampled_from(UPCAST)),
        downcast=draw(st.sampled_from(DOWNCAST)), weight_first=draw(st.booleans()), eps_first=draw(st.booleans()),
    )


def attentions(miss=sometimes(st.sampled_from(sorted(QK_MISSES)), 3)):
    @st.composite
    def build(draw):
        chosen = draw(miss)
        qkv = draw(st.sampled_from(QKV))
        at = NORM_AT if qkv in ("chunk", "separate") else NORM_AT[:1]
        decomposed_q = chosen in ("q_norm_over_non_last_dim", "q_and_k_norm_over_non_last_dim")
        return Attention(
            heads=draw(st.integers(1, 3)), head_dim=draw(st.integers(2, 9)), qkv=qkv, norm_at=draw(st.sampled_from(at)),
            q_norm=draw(rms_spellings(forms=("official", "method_chain") if chosen == "q_upcast_never_cast_back"
                                      else RMS_FORMS[:3] if decomposed_q else RMS_FORMS)),
            k_norm=draw(rms_spellings(
                forms=RMS_FORMS[:3] if chosen == "q_and_k_norm_over_non_last_dim" else RMS_FORMS)),
            eps=draw(st.sampled_from(EPS[:3])),
            cast_to_v=chosen == "q_upcast_never_cast_back" or draw(st.booleans()),
            joint=draw(st.booleans()), q_has_extra_user=draw(st.booleans()), miss=chosen,
        )

    return build()


def gelu_cats(miss=sometimes(st.sampled_from(sorted(GELU_CAT_MISSES)), 4)):
    @st.composite
    def build(draw):
        return GeluCat(
            approximate=draw(st.sampled_from(("none", "tanh"))), module=draw(st.booleans()),
            contiguous=draw(st.booleans()), as_list=draw(st.booleans()), dim=draw(st.sampled_from(GELU_CAT_DIMS)),
            split=draw(st.sampled_from(GELU_SPLITS)), miss=draw(miss),
        )

    return build()


@st.composite
def modulations(draw, can_share: bool):
    layout = draw(st.sampled_from(LAYOUTS))
    parts = draw(st.sampled_from((3, 6))) if layout != "vector" else 3
    shared = can_share and layout != "vector" and draw(st.booleans())
    return Modulation(
        layout=layout, parts=parts, offset=3 * draw(st.integers(0, parts // 3 - 1)), axis=draw(st.sampled_from(AXIS)),
        chunk_dim_negative=draw(st.booleans()), unpack=draw(st.booleans()), shared=shared,
    )


@st.composite
def segments(draw, previous: Segment | None, modulations_first: bool, final: bool):
    can_share = previous is not None and previous.modulation.layout != "vector" and previous.modulation.parts == 6 \
        and previous.modulation.offset == 0 and not previous.modulation.shared
    modulation = draw(modulations(can_share))
    if modulation.shared:
        modulation = replace(previous.modulation, offset=3, shared=True)
    norm = None if not final and draw(rarely(5)) else draw(ln_modulates())
    branch = "linear" if final else draw(st.sampled_from(BRANCHES))
    attention = draw(attentions()) if branch == "attention" else None
    gelu_cat = draw(gelu_cats()) if branch == "gelu_cat" else None
    gate = None if final or draw(rarely(5)) else draw(gates())
    # An early user of the segment's input conflicts with a chained fused op only when this
    # segment's shift/scale are computed after it (lazily, unshared, not parameters).
    lazy = not modulations_first and not modulation.shared and modulation.layout != "vector"
    early = previous is not None and lazy and draw(rarely(8))
    return Segment(modulation, norm, branch, attention, gelu_cat, gate, final, early)


@st.composite
def programs(draw, dtypes=st.sampled_from(DTYPES)):
    modulations_first = draw(st.booleans())
    count = draw(st.integers(1, 4))
    with_final = draw(st.booleans())
    built: list[Segment] = []
    for i in range(count + with_final):
        built.append(draw(segments(built[-1] if built else None, modulations_first, final=i == count)))
    return Program(
        hidden=draw(st.integers(2, 33)), cond_dim=draw(st.integers(2, 6)), batch=draw(st.integers(1, 3)),
        tokens=draw(st.integers(1, 6)), joint_tokens=draw(st.integers(1, 4)), dtype=draw(dtypes),
        modulations_first=modulations_first, segments=tuple(built), seed=draw(st.integers(0, 2**16)),
    )


# --- what the pass must report -------------------------------------------------------------

def _ln_fuses(norm: LNModulate | None, path: str) -> bool:
    return norm is not None and (norm.miss is None or path not in LN_MISSES[norm.miss][1])


def _gate_fuses(gate: Gate | None, path: str) -> bool:
    return gate is not None and (gate.miss is None or path not in GATE_MISSES[gate.miss][1])


def _chains(program: Program, path: str) -> list[bool]:
    """Per segment: its norm would chain with the previous segment's gated residual."""
    segs = program.segments
    return [i > 0 and _ln_fuses(s.norm, path) and _gate_fuses(segs[i - 1].gate, path) for i, s in enumerate(segs)]


def _conflicts(seg: Segment) -> bool:
    """A chained op for this segment's norm would have to run after a user of its residual
    input: the planted early user, or a shift/scale computed from the residual itself."""
    computed_from_residual = (
        seg.norm is not None and seg.norm.broadcast_from_residual and seg.norm.miss in BROADCAST_OVER_HIDDEN)
    return seg.early_user_of_input or computed_from_residual


def expected_sites(program: Program, path: str) -> dict[str, int]:
    """Fused sites per family, as the pass's report counts them."""
    segs, chains = program.segments, _chains(program, path)
    conflicts = [c and _conflicts(s) for c, s in zip(chains, segs)]
    chained = [c and not conflict for c, conflict in zip(chains, conflicts)]
    counts = dict.fromkeys(FAMILY_NAMES, 0)  # families the generator never builds fuse nothing
    counts[CHAIN] = sum(chained)
    for i, seg in enumerate(segs):
        counts[LN_MOD] += _ln_fuses(seg.norm, path) and not chained[i]
        gate_chained = i + 1 < len(segs) and chained[i + 1]
        counts[GATE] += _gate_fuses(seg.gate, path) and not gate_chained
        attention = _as_seen(seg.attention, program, path)
        if attention is not None:
            counts[QK] += attention.pairs
            if _fold(attention, path) == "fold":  # both pairs become one qk_rmsnorm_cat call
                counts[QK] -= 2
                counts[QK_CAT] += 1
        if seg.gelu_cat is not None and seg.gelu_cat.miss is None:
            counts[GELU_CAT] += 1
    counts[RES_LN] = sum(kind == "fuses" for kind in _pre_ln_residuals(program, path))
    return counts


def _pre_ln_residuals(program: Program, path: str) -> list[str]:
    """Per ungated residual ``x + y`` whose sum feeds the next segment's LayerNorm while that
    LayerNorm's modulation does not fuse (it stays a LayerNorm of the sum): "fuses", or "miss"
    for a LayerNorm over two dims (``residual_layernorm`` refuses it)."""
    segs = program.segments
    kinds = []
    for seg, following in zip(segs, segs[1:]):
        if seg.gate is None and not seg.final and following.norm is not None and not _ln_fuses(following.norm, path):
            kinds.append("miss" if following.norm.miss == "norm_over_last_two_dims" else "fuses")
    return kinds


def expected_near_misses(program: Program, path: str) -> Counter:
    """``(family, reason phrase)`` -> how many near-misses the report must list."""
    found = Counter()
    for seg, chain in zip(program.segments, _chains(program, path)):
        if seg.norm is not None and seg.norm.miss and path in LN_MISSES[seg.norm.miss][1]:
            found[LN_MOD, LN_MISSES[seg.norm.miss][0]] += 1
        if seg.gate is not None and seg.gate.miss and path in GATE_MISSES[seg.gate.miss][1]:
            found[GATE, GATE_MISSES[seg.gate.miss][0]] += 1
        if chain and _conflicts(seg):
            found[CHAIN, CHAIN_CONFLICT] += 1
        attention = _as_seen(seg.attention, program, path)
        if attention is not None:
            for reason in _qk_reasons(attention):
                found[QK, reason] += 1
            if _fold(attention, path) in QK_CAT_MISSES:
                found[QK_CAT, QK_CAT_MISSES[_fold(attention, path)]] += 1
        if seg.gelu_cat is not None and seg.gelu_cat.miss:
            found[GELU_CAT, GELU_CAT_MISSES[seg.gelu_cat.miss]] += 1
    found[RES_LN, LN_MISSES["norm_over_last_two_dims"][0]] += _pre_ln_residuals(program, path).count("miss")
    return found


def _as_seen(att: Attention | None, program: Program, path: str) -> Attention | None:
    """The attention as the pass sees it: in an fp32 Dynamo graph (dtypes known) an upcast
    ``x.float()`` of fp32 x is no cast at all (``normalize`` drops it), so a q norm never
    cast back is the plain spelling."""
    if att is not None and att.miss == "q_upcast_never_cast_back" and path == DYNAMO and program.dtype == torch.float32:
        return replace(att, miss=None)
    return att


def _fold(att: Attention, path: str) -> str | None:
    """How a joint attention's q/k pairs and cats fold into ``qk_rmsnorm_cat``: None (no
    candidate: single stream, unpaired, or q/k reshaped between norm and cat), "fold", or the
    key in QK_CAT_MISSES of the first cause that stops it."""
    if not (att.joint and att.pairs == 2 and att.norm_at == "heads_last"):
        return None
    if att.q_has_extra_user:
        return "q_has_extra_user"
    # F.rms_norm / nn.RMSNorm results are cast back to x's dtype after the fused call, unless the
    # graph's dtypes show the call already returns it (Dynamo graphs: the rewrite adds no cast)
    casts_back = path == FX and any(norm.form in ("functional", "module") for norm in (att.q_norm, att.k_norm))
    # separate projections: v is cut from none of q's or k's projections, so a .to(v) cast does not
    # count as their stream's, and no v cat is found
    v_elsewhere = att.miss == "v_normed_too" or att.qkv == "separate"
    if casts_back or (att.cast_to_v and v_elsewhere):  # .to(x.dtype), or .to(a v of no stream)
        return "cast"
    return "v_normed_too" if v_elsewhere else "fold"


def _qk_reasons(att: Attention) -> list[str]:
    """The qk_rmsnorm near-miss reasons one attention branch must produce."""
    return list(QK_MISSES[att.miss]) * (1 + att.joint) if att.miss else []


# --- the network ---------------------------------------------------------------------------

def _mul(a, b, spelling):
    if spelling == "*":
        return a * b
    return a.mul(b) if spelling == "mul" else torch.mul(a, b)


def _add_product(addend, a, b, spec_add, mul, addend_first, sides=None):
    """``addend + a * b`` in the given spelling; ``sides`` receives the product when given."""
    if spec_add == "addcmul":
        return torch.addcmul(addend, a, b)
    if spec_add == "Tensor.addcmul":
        return addend.addcmul(a, b)
    product = _mul(a, b, mul)
    if sides is not None:
        sides.append(product)
    first, second = (addend, product) if addend_first else (product, addend)
    if spec_add == "+":
        return first + second
    return first.add(second) if spec_add == "add" else torch.add(first, second)


def _one_plus(scale, spelling, miss):
    if miss == "scale_without_plus_one":
        return scale
    if miss == "scale_offset_two":
        return 2 + scale
    return {
        "1 + s": lambda s: 1 + s,
        "s + 1": lambda s: s + 1,
        "1.0 + s": lambda s: 1.0 + s,
        "s.add(1)": lambda s: s.add(1),
        "torch.add(s, 1)": lambda s: torch.add(s, 1),
    }[spelling](scale)


def _add_token_axis(t, axis):
    if axis == "unsqueeze(1)":
        return t.unsqueeze(1)
    return t[:, None, :] if axis == "[:, None, :]" else t[:, None]


def _square(x, spelling):
    return {
        "** 2": lambda v: v ** 2, "pow(2)": lambda v: v.pow(2), "x * x": lambda v: v * v,
        "square()": lambda v: v.square(), "torch.pow": lambda v: torch.pow(v, 2),
    }[spelling](x)


def _upcast(x, spelling):
    if spelling == "float()":
        return x.float()
    return x.to(torch.float32) if spelling == "to(torch.float32)" else x.to(dtype=torch.float32)


def rms_norm(x, weight, eps, spec: RMS, module: nn.Module | None, dim=-1, cast_back=True):
    """q or k RMSNorm in the spelling ``spec`` (``module``: an ``nn.RMSNorm`` for that form)."""
    if spec.form == "module":
        return module(x)
    if spec.form == "functional":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    source = x if spec.form == "no_cast" else _upcast(x, spec.upcast)
    mean = torch.mean(_square(source, spec.square), dim=dim, keepdim=True) if spec.form == "official" \
        else _square(source, spec.square).mean(dim, keepdim=True)
    shifted = eps + mean if spec.eps_first else mean + eps
    inverse = torch.rsqrt(shifted) if spec.form == "official" else shifted.rsqrt()
    normed = source * inverse
    if spec.form != "no_cast" and cast_back:
        normed = {
            "to(dtype=dtype)": lambda v: v.to(dtype=dtype), "to(dtype)": lambda v: v.to(dtype),
            "to(x.dtype)": lambda v: v.to(x.dtype),
        }[spec.downcast](normed)
    return weight * normed if spec.weight_first else normed * weight


class AttentionBranch(nn.Module):
    """Parameters of one attention branch (its computation is in ``GeneratedNet``)."""

    def __init__(self, hidden: int, spec: Attention):
        super().__init__()
        inner = spec.heads * spec.head_dim
        width = inner if spec.norm_at == "before_head_split" else spec.head_dim
        streams = ("x", "c") if spec.joint else ("x",)
        self.eps_q = spec.eps
        self.eps_k = spec.eps * 10 if spec.miss == "eps_differs_between_q_and_k" else spec.eps
        for s in streams:
            if spec.qkv == "separate":
                for name in "qkv":
                    self.add_module(f"{s}_{name}_proj", nn.Linear(hidden, inner))
            else:
                self.add_module(f"{s}_qkv", nn.Linear(hidden, 3 * inner))
            self.add_module(f"{s}_proj", nn.Linear(inner, hidden))
            roles = (("q", spec.q_norm, self.eps_q), ("k", spec.k_norm, self.eps_k), ("v", spec.q_norm, self.eps_q))
            for role, rms, eps in roles:
                self.register_parameter(f"{s}_{role}_scale", nn.Parameter(torch.randn(width) * 0.2 + 1))
                if rms.form == "module":
                    norm = nn.RMSNorm(width, eps=eps)
                    nn.init.normal_(norm.weight, 1.0, 0.2)
                    self.add_module(f"{s}_{role}_norm", norm)


class SegmentParams(nn.Module):
    def __init__(self, program: Program, seg: Segment):
        super().__init__()
        d = program.hidden
        mod = seg.modulation
        if mod.layout == "vector":
            self.shift = nn.Parameter(torch.randn(d) * 0.5)
            self.scale = nn.Parameter(torch.randn(d) * 0.5)
            self.gate = nn.Parameter(torch.randn(d) * 0.5 + 1)
        elif not mod.shared:
            self.modulation = nn.Linear(program.cond_dim, mod.parts * d)
        if seg.norm is not None:
            norm = seg.norm
            if norm.form == "module":
                self.norm = nn.LayerNorm(d, eps=norm.eps, elementwise_affine=norm.affine != "none",
                                         bias=norm.affine == "weight_and_bias")
                if norm.affine != "none":
                    nn.init.normal_(self.norm.weight, 1.0, 0.2)
                if norm.affine == "weight_and_bias":
                    nn.init.normal_(self.norm.bias, 0.0, 0.2)
            else:
                if norm.affine != "none":
                    self.norm_weight = nn.Parameter(torch.randn(d) * 0.2 + 1)
                if norm.affine == "weight_and_bias":
                    self.norm_bias = nn.Parameter(torch.randn(d) * 0.2)
            if norm.miss in BROADCAST_OVER_HIDDEN and norm.broadcast_from_residual:
                self.per_token = nn.Linear(d, 1)
        if seg.gate is not None and seg.gate.miss == "gate_broadcast_over_hidden" and seg.gate.broadcast_from_residual:
            self.per_token_gate = nn.Linear(d, 1)
        if seg.branch == "linear":
            self.lin = nn.Linear(d, d)
        elif seg.branch == "mlp":
            self.fc1, self.fc2 = nn.Linear(d, 2 * d + 1), nn.Linear(2 * d + 1, d)
        elif seg.branch == "gelu_cat":
            self.fc1, self.fc2 = nn.Linear(d, 3 * d + 1), nn.Linear(3 * d + 1, d)
            if seg.gelu_cat.module:
                self.act = nn.GELU(approximate=seg.gelu_cat.approximate)
        else:
            self.attn = AttentionBranch(d, seg.attention)


class GeneratedNet(nn.Module):
    """``forward(x, vec, c, tok)`` -> ``(x, *side outputs)``: x [B, L, D] the residual stream,
    vec [B, C] the conditioning, c [B, Lc, D] a second token stream, tok [B, L, 1] per-token values."""

    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        self.segments = nn.ModuleList(SegmentParams(program, seg) for seg in program.segments)

    def forward(self, x, vec, c, tok):
        sides: list = []
        chunks: dict[int, tuple] = {}
        if self.program.modulations_first:
            for i in range(len(self.program.segments)):
                self._modulation(i, vec, chunks)
        for i, seg in enumerate(self.program.segments):
            if seg.early_user_of_input:
                sides.append(torch.tanh(x))
            x = self._segment(i, seg, x, vec, c, tok, chunks, sides)
        return (x, *sides)

    def _modulation(self, i, vec, chunks):
        """Chunks of segment ``i``'s modulation (computed once; shared ones come from ``i - 1``)."""
        mod = self.program.segments[i].modulation
        if mod.layout == "vector":
            params = self.segments[i]
            return params.shift, params.scale, params.gate
        if mod.shared:
            return self._modulation(i - 1, vec, chunks)
        if i not in chunks:
            m = self.segments[i].modulation(F.silu(vec))
            if mod.layout == "chunk_3d":
                m = _add_token_axis(m, mod.axis)
                dim = -1 if mod.chunk_dim_negative else 2
            else:
                dim = -1 if mod.chunk_dim_negative else 1
            if mod.unpack and mod.parts == 3:
                a, b, g = m.chunk(3, dim=dim)
                chunks[i] = (a, b, g)
            elif mod.unpack:
                a, b, g, a2, b2, g2 = m.chunk(6, dim=dim)
                chunks[i] = (a, b, g, a2, b2, g2)
            else:
                chunks[i] = m.chunk(mod.parts, dim)
        return chunks[i]

    def _part(self, i, vec, chunks, which):
        mod = self.program.segments[i].modulation
        value = self._modulation(i, vec, chunks)[mod.offset + which]
        return _add_token_axis(value, mod.axis) if mod.layout == "chunk_2d" else value

    def _segment(self, i, seg: Segment, x, vec, c, tok, chunks, sides):
        params = self.segments[i]
        h = x if seg.norm is None else self._ln_modulate(i, seg.norm, x, vec, tok, chunks, sides)
        if seg.branch == "linear":
            y = params.lin(h)
        elif seg.branch == "mlp":
            y = params.fc2(F.gelu(params.fc1(h), approximate="tanh"))
        elif seg.branch == "gelu_cat":
            y = self._gelu_cat(params, seg.gelu_cat, h, sides)
        else:
            y = self._attention(params.attn, seg.attention, h, c, sides)
        if seg.final:
            return y
        if seg.gate is None:
            return x + y
        return self._gated_residual(i, seg.gate, x, y, vec, tok, chunks, sides)

    def _ln_modulate(self, i, spec: LNModulate, x, vec, tok, chunks, sides):
        params = self.segments[i]
        mod = self.program.segments[i].modulation
        shift, scale = self._part(i, vec, chunks, 0), self._part(i, vec, chunks, 1)
        view_after = spec.axis_after_one_plus and mod.layout == "chunk_2d" and spec.miss not in BROADCAST_OVER_HIDDEN
        if view_after:  # the token axis goes on after the +1: normalize moves it back onto the scale
            scale = self._modulation(i, vec, chunks)[mod.offset + 1]
        if spec.miss in BROADCAST_OVER_HIDDEN:
            per_token = params.per_token(x) if spec.broadcast_from_residual else tok
            if spec.miss == "shift_broadcast_over_hidden":
                shift = per_token
            else:
                scale = per_token
        d = self.program.hidden
        weight = getattr(params, "norm_weight", None)
        bias = getattr(params, "norm_bias", None)
        if spec.form == "module":
            n = params.norm(x)
        elif spec.miss == "norm_over_last_two_dims":
            n = F.layer_norm(x, x.shape[-2:], eps=spec.eps)
        elif spec.form == "functional":
            n = F.layer_norm(x, (d,), weight, bias, spec.eps)
        elif spec.form == "functional_kwargs":
            n = F.layer_norm(x, normalized_shape=(d,), weight=weight, bias=bias, eps=spec.eps)
        else:
            n = F.layer_norm(x, [d], weight=weight, bias=bias, eps=spec.eps)
        if spec.miss == "norm_output_has_extra_user":
            sides.append(n)
        one_plus = _one_plus(scale, spec.one_plus, spec.miss)
        if spec.one_plus_has_extra_user:
            sides.append(one_plus)
        if view_after:
            one_plus = _add_token_axis(one_plus, mod.axis)
        a, b = (n, one_plus) if spec.norm_first else (one_plus, n)
        product_sides = sides if spec.miss == "modulated_product_has_extra_user" else None
        out = _add_product(shift, a, b, spec.add, spec.mul, spec.shift_first, product_sides)
        if spec.result_has_extra_user:
            sides.append(out)
        return out

    def _gelu_cat(self, params, spec: GeluCat, h, sides):
        d = self.program.hidden
        both = params.fc1(h)
        if spec.split == "split":
            a, b = both.split([d, 2 * d + 1], dim=-1)
        elif spec.split == "chunk_like_split":
            a, b = torch.split(both, [d, 2 * d + 1], -1)
        else:
            a, b = both[..., :d], both[..., d:]
        if spec.contiguous:
            b = b.contiguous()
        g = params.act(b) if spec.module else F.gelu(b, approximate=spec.approximate)
        if spec.miss == "gelu_has_extra_user":
            sides.append(g)
        operands = (g, a) if spec.miss == "gelu_on_first_operand" else (a, g)
        operands = list(operands) if spec.as_list else operands
        if spec.dim == "dim=-1":
            cat = torch.cat(operands, dim=-1)
        else:
            cat = torch.cat(operands, int(spec.dim))
        return params.fc2(cat)

    def _gated_residual(self, i, spec: Gate, x, y, vec, tok, chunks, sides):
        gate = self._part(i, vec, chunks, 2)
        if spec.miss == "gate_broadcast_over_hidden":
            gate = self.segments[i].per_token_gate(x) if spec.broadcast_from_residual else tok
        if spec.miss == "gate_multiplies_residual":
            addend, a, b = y, *((gate, x) if spec.gate_first else (x, gate))
        else:
            addend, a, b = x, *((gate, y) if spec.gate_first else (y, gate))
        product_sides = sides if spec.miss == "gate_product_has_extra_user" else None
        return _add_product(addend, a, b, spec.add, spec.mul, spec.residual_first, product_sides)

    def _attention(self, params: AttentionBranch, spec: Attention, h, c, sides):
        streams = [("x", h)] + ([("c", c)] if spec.joint else [])
        qs, ks, vs, lengths = [], [], [], []
        for name, tokens in streams:
            q, k, v = self._qkv(params, spec, name, tokens)
            lengths.append(tokens.shape[1])
            q, k, v = self._qk_norms(params, spec, name, q, k, v)
            if spec.q_has_extra_user:
                sides.append(q)
            if spec.cast_to_v:
                q, k = q.to(v), k.to(v)
            qs.append(self._heads(q, spec))
            ks.append(self._heads(k, spec))
            vs.append(self._heads(v, spec))
        if spec.joint:  # condition tokens first, as in a DiT double block
            q, k, v = (torch.cat([c_part, x_part], dim=2) for x_part, c_part in (qs, ks, vs))
        else:
            q, k, v = qs[0], ks[0], vs[0]
        out = F.scaled_dot_product_attention(q, k, v)
        if spec.joint:
            c_out, x_out = out[:, :, : lengths[1]], out[:, :, lengths[1]:]
            sides.append(params.c_proj(self._merge_heads(c_out, spec)))
            out = x_out
        return params.x_proj(self._merge_heads(out, spec))

    def _qkv(self, params, spec: Attention, name, tokens):
        """q, k, v of one stream, laid out for ``spec.norm_at``."""
        B, L, _ = tokens.shape
        H, Dh = spec.heads, spec.head_dim
        if spec.qkv == "separate":
            q, k, v = (getattr(params, f"{name}_{r}_proj")(tokens) for r in "qkv")
        else:
            qkv = getattr(params, f"{name}_qkv")(tokens)
            if spec.qkv == "reshape_permute_unpack":
                q, k, v = qkv.reshape(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)
                return q, k, v
            if spec.qkv == "unbind":
                parts = qkv.view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
                return parts[0], parts[1], parts[2]
            if spec.qkv == "einops":
                q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=H)
                return q, k, v
            q, k, v = qkv.chunk(3, dim=-1)
        if spec.norm_at == "before_head_split":
            return q, k, v
        q, k, v = (t.reshape(B, L, H, Dh) for t in (q, k, v))
        if spec.norm_at == "before_transpose":
            return q, k, v
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _heads(self, t, spec: Attention):
        """[B, H, L, Dh] from the layout the norms ran in."""
        if spec.norm_at == "heads_last" or spec.qkv not in ("chunk", "separate"):
            return t
        if spec.norm_at == "before_head_split":
            t = t.reshape(t.shape[0], t.shape[1], spec.heads, spec.head_dim)
        return t.transpose(1, 2)

    def _merge_heads(self, out, spec: Attention):
        if spec.qkv == "einops":
            return rearrange(out, "B H L D -> B L (H D)")
        B, H, L, Dh = out.shape
        return out.transpose(1, 2).reshape(B, L, H * Dh)

    def _qk_norms(self, params, spec: Attention, name, q, k, v):
        miss = spec.miss
        q_dim = -2 if miss in ("q_norm_over_non_last_dim", "q_and_k_norm_over_non_last_dim") else -1
        k_dim = -2 if miss == "q_and_k_norm_over_non_last_dim" else -1
        if miss == "v_normed_too":
            v = rms_norm(v, getattr(params, f"{name}_v_scale"), params.eps_q, spec.q_norm,
                         getattr(params, f"{name}_v_norm", None))
        q = rms_norm(q, getattr(params, f"{name}_q_scale"), params.eps_q, spec.q_norm,
                     getattr(params, f"{name}_q_norm", None), dim=q_dim, cast_back=miss != "q_upcast_never_cast_back")
        if miss != "only_q_normed":
            k = rms_norm(k, getattr(params, f"{name}_k_scale"), params.eps_k, spec.k_norm,
                         getattr(params, f"{name}_k_norm", None), dim=k_dim)
        return q, k, v


def build(program: Program) -> GeneratedNet:
    """The network of ``program`` with deterministic random weights, in ``program.dtype``."""
    torch.manual_seed(program.seed)
    return GeneratedNet(program).to(program.dtype).eval()


def inputs(program: Program, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """``(x, vec, c, tok)`` drawn in fp32 from the program's seed, then cast."""
    g = torch.Generator().manual_seed(program.seed + 1)
    B, L, D = program.batch, program.tokens, program.hidden
    shapes = ((B, L, D), (B, program.cond_dim), (B, program.joint_tokens, D), (B, L, 1))
    dtype = program.dtype if dtype is None else dtype
    return tuple(torch.randn(*shape, generator=g).to(dtype) for shape in shapes)
