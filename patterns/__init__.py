"""Pattern families, one module each. The registry order is the matching order: the
chained family runs first so it can claim residual/norm pairs before the single families
take their halves; ``qk_rmsnorm_cat`` and ``qk_rmsnorm_rope`` run after ``qk_rmsnorm``, whose
calls they fold; ``residual_layernorm`` runs after the modulation and gate families, whose
residuals and LayerNorms it must not take.
Adding a family: a module here and one line in ``FAMILIES``."""
from __future__ import annotations

from patterns.gelu_cat import GeluCat
from patterns.layernorm_modulate import LayerNormModulate
from patterns.qk_layernorm import QKLayerNorm
from patterns.qk_rmsnorm import QKRMSNorm
from patterns.qk_rmsnorm_cat import QKRMSNormCat
from patterns.qk_rmsnorm_rope import QKRMSNormRope
from patterns.residual_gate import ResidualGate
from patterns.residual_layernorm import ResidualLayerNorm
from patterns.residual_norm_chain import ResidualNormChain

FAMILIES = (
    ResidualNormChain(),
    LayerNormModulate(),
    ResidualGate(),
    QKRMSNorm(),
    QKLayerNorm(),
    GeluCat(),
    QKRMSNormCat(),
    QKRMSNormRope(),
    ResidualLayerNorm(),
)

FAMILY_NAMES = tuple(family.name for family in FAMILIES)


def select(names=None):
    """The families named in ``names`` (all when None), in registry order. The chained
    family comes along only when both of its halves are selected or it is named itself;
    ``qk_rmsnorm`` comes along with ``qk_rmsnorm_cat`` and ``qk_rmsnorm_rope``, which fold its calls."""
    if names is None:
        return FAMILIES
    names = set(names)
    unknown = names - set(FAMILY_NAMES)
    if unknown:
        raise ValueError(f"unknown pattern famil{'y' if len(unknown) == 1 else 'ies'} "
                         f"{sorted(unknown)}; choose from {list(FAMILY_NAMES)}")
    halves = {"layernorm_modulate", "residual_gate"}
    if halves <= names:
        names.add("residual_layernorm_modulate")
    if names & {"qk_rmsnorm_cat", "qk_rmsnorm_rope"}:
        names.add("qk_rmsnorm")
    return tuple(family for family in FAMILIES if family.name in names)
