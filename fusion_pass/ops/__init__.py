"""Fused Triton ops of fusion_pass, registered under the `fusion_pass::` torch.library namespace.

Importing this package registers every op; it imports no graph code. Each op module holds its
kernel, the op with its fake impl and autograd, and `reference_<op>`, the plain PyTorch
expression that is both the fallback (CPU, other dtypes, odd shapes) and the test oracle.
Where an op declines its kernel on CUDA (or interpreted CPU) tensors and runs that reference, the
decline is recorded once per call signature with its reason (`reference_runs`).
"""

from .gelu_cat import gelu_cat, reference_gelu_cat
from .launch import MAX_BLOCK, interpret_on_cpu, use_triton
from .layernorm_modulate import (
    ResidualNormOut,
    layernorm_scale_shift,
    reference_layernorm_scale_shift,
    reference_residual_gate_layernorm_scale_shift,
    residual_gate_layernorm_scale_shift,
)
from .qk_layernorm import qk_layernorm, reference_qk_layernorm
from .qk_rmsnorm import QKNormOut, qk_rmsnorm, qk_rmsnorm_, reference_qk_rmsnorm
from .qk_rmsnorm_cat import QKVCatOut, qk_rmsnorm_cat, reference_qk_rmsnorm_cat
from .qk_rmsnorm_cat_rope import qk_rmsnorm_cat_rope, reference_qk_rmsnorm_cat_rope
from .qk_rmsnorm_rope import qk_rmsnorm_rope, reference_qk_rmsnorm_rope
from .linear_gelu import linear_gelu, reference_linear_gelu
from .linear_group import linear_group, reference_linear_group
from .linear_rows import linear_rows, reference_linear_rows
from .residual_gate import reference_residual_gate, residual_gate
from .residual_layernorm import reference_residual_add_layernorm, residual_add_layernorm
from .rmsnorm_modulate import reference_rmsnorm_scale_shift, rmsnorm_scale_shift

__all__ = [
    "MAX_BLOCK",
    "QKNormOut",
    "QKVCatOut",
    "ResidualNormOut",
    "gelu_cat",
    "interpret_on_cpu",
    "layernorm_scale_shift",
    "qk_layernorm",
    "linear_gelu",
    "linear_group",
    "linear_rows",
    "qk_rmsnorm",
    "qk_rmsnorm_",
    "qk_rmsnorm_cat",
    "qk_rmsnorm_cat_rope",
    "qk_rmsnorm_rope",
    "reference_gelu_cat",
    "reference_layernorm_scale_shift",
    "reference_qk_layernorm",
    "reference_linear_gelu",
    "reference_linear_group",
    "reference_linear_rows",
    "reference_qk_rmsnorm",
    "reference_qk_rmsnorm_cat",
    "reference_qk_rmsnorm_cat_rope",
    "reference_qk_rmsnorm_rope",
    "reference_residual_add_layernorm",
    "reference_residual_gate",
    "reference_residual_gate_layernorm_scale_shift",
    "reference_rmsnorm_scale_shift",
    "residual_add_layernorm",
    "residual_gate",
    "residual_gate_layernorm_scale_shift",
    "rmsnorm_scale_shift",
    "use_triton",
]
