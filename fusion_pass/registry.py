"""The fused ops the pass can emit, by small named key (shared by the pass and its tests).

``outputs`` names the fields of a multi-tensor result, in order, so graph code refers to
``ResidualNormOut.normed`` by name rather than by a magic index."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import fusion_pass.ops  # noqa: F401  (registers torch.ops.fusion_pass.*)


@dataclass(frozen=True)
class FusedOp:
    key: str
    outputs: tuple[str, ...] | None = None  # None: a single tensor

    @property
    def op(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.fusion_pass, self.key).default

    def output_index(self, field: str) -> int:
        if self.outputs is None or field not in self.outputs:
            raise KeyError(f"{self.key} has no output field {field!r}")
        return self.outputs.index(field)


FUSED_OPS: dict[str, FusedOp] = {
    op.key: op
    for op in (
        FusedOp("layernorm_scale_shift"),
        FusedOp("rmsnorm_scale_shift"),
        FusedOp("residual_gate"),
        FusedOp("residual_gate_layernorm_scale_shift", outputs=("residual", "normed")),
        FusedOp("qk_rmsnorm", outputs=("q", "k")),
        FusedOp("qk_rmsnorm_cat", outputs=("q", "k", "v")),
        FusedOp("qk_rmsnorm_rope", outputs=("q", "k")),
        FusedOp("qk_rmsnorm_cat_rope", outputs=("q", "k")),
        FusedOp("residual_add_layernorm", outputs=("residual", "normed")),
        FusedOp("qk_layernorm", outputs=("q", "k")),
        FusedOp("gelu_cat"),
        FusedOp("linear_group"),
        FusedOp("linear_gelu"),
        FusedOp("linear_rows"),
    )
}
