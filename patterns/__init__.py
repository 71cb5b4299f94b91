"""Pattern families, one module each. The registry order is the matching order: the
chained family runs first so it can claim residual/norm pairs before the single families
take their halves; ``qk_rmsnorm_cat_rope``, ``qk_rmsnorm_cat`` and ``qk_rmsnorm_rope`` run after
``qk_rmsnorm``, whose calls they fold (the first takes the joint cats that feed a RoPE, before the
second looks at joint cats); ``residual_layernorm`` runs after the modulation and gate families, whose
residuals and LayerNorms it must not take.
Adding a family: a module here and one line in ``FAMILIES`` (or ``OPT_IN``)."""
from __future__ import annotations

from patterns.gelu_cat import GeluCat
from patterns.layernorm_modulate import LayerNormModulate
from patterns.linear_gelu import LinearGelu
from patterns.qk_layernorm import QKLayerNorm
from patterns.qk_rmsnorm import QKRMSNorm
from patterns.qk_rmsnorm_cat import QKRMSNormCat
from patterns.qk_rmsnorm_cat_rope import QKRMSNormCatRope
from patterns.qk_rmsnorm_rope import QKRMSNormRope
from patterns.residual_gate import ResidualGate
from patterns.residual_layernorm import ResidualLayerNorm
from patterns.residual_norm_chain import ResidualNormChain
from patterns.shared_input_linear import SharedInputLinear
from patterns.token_slice_linear import TokenSliceLinear

FAMILIES = (
    ResidualNormChain(),
    LayerNormModulate(),
    ResidualGate(),
    QKRMSNorm(),
    QKLayerNorm(),
    GeluCat(),
    QKRMSNormCatRope(),
    QKRMSNormCat(),
    QKRMSNormRope(),
    ResidualLayerNorm(),
)

OPT_IN = (
    SharedInputLinear(),
    LinearGelu(),
    TokenSliceLinear(),
)
"""Families applied only when named in ``patterns`` (``optimize(model, patterns=[*FAMILY_NAMES,
"shared_input_linear"])``), after the default ones: performance levers still to be measured
on the GPU before they become defaults. ``shared_input_linear`` also changes where parameters
live (``fusion_pass/packing.py``), and on Hunyuan3D-2 finds its Linears only once capture sees
inside ``Modulation``."""

FAMILY_NAMES = tuple(family.name for family in FAMILIES)
OPT_IN_NAMES = tuple(family.name for family in OPT_IN)


def select(names=None):
    """The families named in ``names`` (the default ``FAMILIES`` when None), in registry order. The chained
    family comes along only when both of its halves are selected or it is named itself;
    ``qk_rmsnorm`` comes along with ``qk_rmsnorm_cat``, ``qk_rmsnorm_cat_rope`` and ``qk_rmsnorm_rope``,
    which fold its calls."""
    if names is None:
        return FAMILIES
    names = set(names)
    unknown = names - set(FAMILY_NAMES) - set(OPT_IN_NAMES)
    if unknown:
        raise ValueError(f"unknown pattern famil{'y' if len(unknown) == 1 else 'ies'} "
                         f"{sorted(unknown)}; choose from {list(FAMILY_NAMES + OPT_IN_NAMES)}")
    halves = {"layernorm_modulate", "residual_gate"}
    if halves <= names:
        names.add("residual_layernorm_modulate")
    if names & {"qk_rmsnorm_cat", "qk_rmsnorm_cat_rope", "qk_rmsnorm_rope"}:
        names.add("qk_rmsnorm")
    return tuple(family for family in FAMILIES + OPT_IN if family.name in names)
