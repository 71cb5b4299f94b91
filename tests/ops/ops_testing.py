"""Inputs and accuracy checks shared by the fused-op tests.

Accuracy is measured against a float64 evaluation of the same math, in units of
`eps(dtype) * max|truth|` (one unit is about one ulp of the largest output), and the fused
kernel must be no less accurate than the unfused PyTorch reference (it rounds fewer times).
"""

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import torch

import fusion_pass.ops as ops

# `fusion_pass.ops.qk_rmsnorm` is the op (the package exports it under its module's name):
# import_module returns the module itself.
KERNELS = (
    (import_module("fusion_pass.ops.layernorm_modulate"), "_residual_norm_modulate_kernel"),
    (import_module("fusion_pass.ops.qk_rmsnorm"), "_qk_rmsnorm_kernel"),
    (import_module("fusion_pass.ops.gelu_cat"), "_gelu_cat_kernel"),
    (import_module("fusion_pass.ops.qk_rmsnorm_cat"), "_qk_rmsnorm_cat_kernel"),
    (import_module("fusion_pass.ops.qk_rmsnorm_rope"), "_qk_rmsnorm_rope_kernel"),
    (import_module("fusion_pass.ops.qk_layernorm"), "_qk_layernorm_kernel"),
)
"""Every fused-op kernel, as (its module, its name there): what the launch-counting fixtures patch."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TOLERANCE_UNITS = {torch.float32: 8.0, torch.float16: 2.0, torch.bfloat16: 2.0}
"""Error allowed against float64, in units of eps(dtype) * max|truth|. fp32 leaves room for
the summation order of mean and variance over up to 1000 columns."""

INTERPRETER_BF16_UNITS = 1.0
"""The Triton interpreter truncates bf16 casts instead of rounding: one more ulp."""

OPERAND_LAYOUTS = ("chunk", "shared", "vector", "full", "over_d")
"""How shift/scale/gate broadcast to x `[B, ..., D]`: `chunk`: `[B, 1.., D]` non-contiguous
chunks of one `[B, 1.., 6D]` tensor, as the model's Modulation makes them; `shared`:
`[1, .., 1, D]`; `vector`: `[D]`; `full`: x's shape; `over_d`: `[B, .., 1]`."""

ROW_CASES = [
    ((2, 8, 64), "chunk"),
    ((2, 8, 100), "chunk"),
    ((2, 4, 1000), "chunk"),
    ((3, 1, 100), "chunk"),  # L = 1
    ((1, 16, 100), "chunk"),  # batch 1
    ((12, 100), "chunk"),  # 2-D x with [B, D] operands
    ((2, 3, 4, 100), "chunk"),  # 4-D x
    ((2, 8, 100), "shared"),
    ((2, 8, 100), "vector"),
    ((2, 8, 100), "full"),
    ((2, 8, 100), "over_d"),
]
"""(x shape, operand layout) pairs the row-wise ops are tested on: awkward D, L = 1, batch 1,
2-D and 4-D x, and every operand layout."""


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, mean: float = 0.0, device="cpu") -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale + mean).to(dtype)


def modulation_operands(x_shape, layout: str, dtype: torch.dtype, count: int, device="cpu") -> list[torch.Tensor]:
    """`count` operands (shift, scale, gate, ...) laid out as `layout` (see OPERAND_LAYOUTS)."""
    *lead, d = x_shape
    if layout == "chunk":
        modulation = randn(lead[0], *[1] * (len(lead) - 1), 6 * d, dtype=dtype, scale=0.5, device=device)
        return list(modulation.chunk(6, dim=-1)[:count])
    shapes = {
        "shared": (*[1] * len(lead), d),
        "vector": (d,),
        "full": tuple(x_shape),
        "over_d": (*lead, 1),
    }
    return [randn(*shapes[layout], dtype=dtype, scale=0.5, device=device) for _ in range(count)]


def layernorm_params(d: int, dtype: torch.dtype, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random LayerNorm (weight, bias), away from the identity."""
    return randn(d, dtype=dtype, scale=0.5, mean=1.0, device=device), randn(d, dtype=dtype, scale=0.5, device=device)


def as_float64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.double() for t in tensors]


def layout(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of the dims that have more than one element (the others' strides are arbitrary)."""
    return tuple(stride for size, stride in zip(t.shape, t.stride()) if size > 1)


def assert_accurate(
    actual: torch.Tensor,
    reference: torch.Tensor,
    truth: torch.Tensor,
    dtype: torch.dtype,
    *,
    interpreted: bool,
) -> None:
    """`actual` (fused) matches `reference` (unfused) in shape, dtype and layout, is within
    TOLERANCE_UNITS of the float64 `truth`, and, in fp16/bf16, is no less accurate than
    `reference` but for one unit (plus the interpreter's bf16 truncation), since it rounds
    once where the unfused ops round after each step. `dtype` is the precision computed in."""
    assert (actual.shape, actual.dtype, layout(actual)) == (reference.shape, reference.dtype, layout(reference))
    interpreter_units = INTERPRETER_BF16_UNITS if interpreted and dtype == torch.bfloat16 else 0.0
    unit = torch.finfo(dtype).eps * truth.abs().max().item()
    allowed = (TOLERANCE_UNITS[dtype] + interpreter_units) * unit
    torch.testing.assert_close(actual.double(), truth, rtol=0.0, atol=allowed)
    torch.testing.assert_close(reference.double(), truth, rtol=0.0, atol=TOLERANCE_UNITS[dtype] * unit)
    if dtype == torch.float32:
        return  # both compute in fp32: they differ by summation order, not by roundings
    fused_error = (actual.double() - truth).abs().max().item()
    reference_error = (reference.double() - truth).abs().max().item()
    assert fused_error <= reference_error + (1.0 + interpreter_units) * unit, (fused_error, reference_error)


def outputs(result) -> tuple[torch.Tensor, ...]:
    """An op's result as a tuple of tensors (named tuples are tuples already)."""
    return result if isinstance(result, tuple) else (result,)


def assert_inductor_launches_the_kernel(op: Callable, args, kernel_name: str, *, dynamic: bool) -> None:
    """torch.compile (Inductor) of `op` on CUDA `args` decomposes the `triton_op`: the generated
    code launches `kernel_name` itself, never calls a `fusion_pass` op through the dispatcher,
    and computes what the eager op does. Inductor compiles the kernel itself (its own launch
    options), so a row's fp32 sums may round differently: outputs agree within
    `TOLERANCE_UNITS` of the output dtype, not bit for bit."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    expected = outputs(op(*args))
    actual, codes = run_and_get_code(torch.compile(op, fullgraph=True, dynamic=dynamic), *args)
    code = "\n".join(codes)
    assert kernel_name in code and "torch.ops.fusion_pass" not in code, code[-3000:]
    for got, want in zip(outputs(actual), expected, strict=True):
        unit = torch.finfo(want.dtype).eps * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0.0, atol=TOLERANCE_UNITS[want.dtype] * unit)


def qkv_views(q_shape, dtype: torch.dtype, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Strided q, k of shape `q_shape = [B, H, L, D]`, cut from one qkv projection output
    `[B, L, 3 * H * D]` the way the model's rearrange does (last dim stride 1, others not)."""
    b, h, length, d = q_shape
    qkv = randn(b, length, 3 * h * d, dtype=dtype, scale=2.0, mean=0.5, device=device)
    q, k, _ = qkv.reshape(b, length, 3, h, d).permute(2, 0, 3, 1, 4)
    return q, k


def rmsnorm_float64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@dataclass(frozen=True)
class OpCase:
    """A fused op with what the generic tests need to call and judge it."""

    op: Callable  # Python-level function (named-tuple wrapper where the op has several outputs)
    reference: Callable  # the unfused PyTorch expression
    make_args: Callable  # (x_shape, dtype, layout, device) -> positional args, eps included
    truth: Callable  # float64 evaluation of the math on the same args
    x_shape: tuple[int, ...]  # a small shape of the first argument for generic tests
    model_shape: Callable[[int], tuple[int, ...]]  # first argument's shape at L tokens (Hunyuan3D-2)
    broadcast_operand: int | None  # index in the args of an operand that broadcasts (shift, gate, weight);
    # None for an op without one (F.layer_norm's weight and bias are exactly `[D]` in x's dtype)


def _layernorm_args(x_shape, dtype, layout="chunk", device="cpu", affine=False):
    x = randn(*x_shape, dtype=dtype, scale=3.0, mean=1.0, device=device)
    shift, scale = modulation_operands(x_shape, layout, dtype, 2, device)
    weight, bias = layernorm_params(x_shape[-1], dtype, device) if affine else (None, None)
    return x, shift, scale, 1e-6, weight, bias


def _rmsnorm_args(x_shape, dtype, layout="chunk", device="cpu", affine=False):
    x, shift, scale, eps, weight, _ = _layernorm_args(x_shape, dtype, layout, device, affine)
    return x, shift, scale, eps, weight


def _residual_norm_args(x_shape, dtype, layout="chunk", device="cpu", affine=False):
    residual, shift, scale, eps, weight, bias = _layernorm_args(x_shape, dtype, layout, device, affine)
    y = randn(*x_shape, dtype=dtype, scale=2.0, device=device)
    (gate,) = modulation_operands(x_shape, layout, dtype, 1, device)
    return residual, y, gate, shift, scale, eps, weight, bias


def _residual_gate_args(x_shape, dtype, layout="chunk", device="cpu"):
    residual, y, gate = _residual_norm_args(x_shape, dtype, layout, device)[:3]
    return residual, y, gate


def _residual_add_layernorm_args(x_shape, dtype, layout="unused", device="cpu", affine=False):
    """x, y `[..., D]` of one shape (a pre-LN residual and its sublayer's output)."""
    x = randn(*x_shape, dtype=dtype, scale=3.0, mean=1.0, device=device)
    y = randn(*x_shape, dtype=dtype, scale=2.0, device=device)
    weight, bias = layernorm_params(x_shape[-1], dtype, device) if affine else (None, None)
    return x, y, weight, bias, 1e-6


def _qk_args(q_shape, dtype, layout="unused", device="cpu"):
    q, k = qkv_views(q_shape, dtype, device)
    q_weight, k_weight = (randn(q_shape[-1], dtype=dtype, scale=0.5, mean=1.0, device=device) for _ in "qk")
    return q, k, q_weight, k_weight, 1e-6


ROPE_FORMS = ("interleaved", "half", "complex")
"""RoPE tables as the models pass them: `interleaved` (Flux, HunyuanVideo, LTX: diffusers'
`use_real_unbind_dim=-1`, cos/sin `[L, D]` repeat-interleaved), `half` (`use_real_unbind_dim=-2`,
cos/sin `[L, D]` = cat of two halves), `complex` (QwenImage's `freqs_cis`: one value per pair,
cos/sin the `[L, D/2]` strided views `view_as_real(freqs_cis).unbind(-1)`)."""


def rope_tables(length: int, d: int, form: str, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of RoPE angles `p * 10000^(-2j/D)` at positions p = 3, 10, 17, ... (not 0:
    one token still rotates), laid out as `form` (see ROPE_FORMS)."""
    positions = torch.arange(length, dtype=torch.float64) * 7 + 3
    angles = positions[:, None] * 10000.0 ** (-2 * torch.arange(d // 2, dtype=torch.float64) / d)
    if form == "complex":
        freqs_cis = torch.polar(torch.ones_like(angles), angles).to(device, dtype.to_complex())
        return torch.view_as_real(freqs_cis).unbind(-1)
    if form == "interleaved":
        angles = angles.repeat_interleave(2, dim=-1)
    else:
        angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def _rope_args(q_shape, dtype, layout="unused", device="cpu", form="interleaved"):
    """q/k RMSNorm + RoPE arguments: `[B, H, L, D]` qkv views, weights, cos/sin `[L, D]` in `form`,
    fp32 as diffusers' position embedders make them (fp64 for fp64 q/k: gradcheck)."""
    q, k, q_weight, k_weight, eps = _qk_args(q_shape, dtype, layout, device)
    cos, sin = rope_tables(q_shape[-2], q_shape[-1], form, torch.promote_types(dtype, torch.float32), device)
    return q, k, q_weight, k_weight, eps, cos, sin, form != "half"


def sequence_major(batch: int, length: int, heads: int, d: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """`to_q(x).unflatten(-1, (H, D))` as Flux/QwenImage/HunyuanVideo make q or k: a `[B, L, H, D]`
    view of a `[B, L, H * D]` projection."""
    return randn(batch, length, heads * d, dtype=dtype, scale=2.0, mean=0.5, device=device).unflatten(-1, (heads, d))


JOINT_EXTRA_TOKENS = 3
"""Stream 1 of the joint ops' generic arguments has this many more tokens than stream 0."""


def _cat_rope_args(q0_shape, dtype, layout="unused", device="cpu", form="interleaved"):
    """Flux's double-block q/k: two streams of `[B, L_i, H, D]` projection views, L_1 = L_0 +
    JOINT_EXTRA_TOKENS, per-stream weights, joined on dim 1 and rotated by `[1, L_0 + L_1, 1, D]`
    tables in `form` (fp32, as diffusers' position embedders make them; fp64 for fp64 inputs)."""
    b, length, h, d = q0_shape
    streams = [[sequence_major(b, n, h, d, dtype, device) for _ in "qk"] for n in (length, length + JOINT_EXTRA_TOKENS)]
    weights = [randn(d, dtype=dtype, scale=0.5, mean=1.0, device=device) for _ in range(4)]
    cos, sin = rope_tables(2 * length + JOINT_EXTRA_TOKENS, d, form, torch.promote_types(dtype, torch.float32), device)
    return (*streams[0], *streams[1], *weights, 1e-6, 1, cos[None, :, None, :], sin[None, :, None, :], form != "half")


def _qk_layernorm_args(q_shape, dtype, layout="unused", device="cpu", affine=True):
    """`[B, H, L, D]` qkv views and (affine) LayerNorm weight and bias for each."""
    q, k = qkv_views(q_shape, dtype, device)
    params = [*layernorm_params(q_shape[-1], dtype, device), *layernorm_params(q_shape[-1], dtype, device)]
    return (q, k, *(params if affine else [None] * 4), 1e-6)


def _on_float64(reference: Callable) -> Callable:
    return lambda *args: reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))


def _row_case(op: Callable, reference: Callable, make_args: Callable, broadcast_operand: int) -> OpCase:
    """An op over `[B, L, D]` rows whose reference is exact when evaluated in float64."""
    return OpCase(op, reference, make_args, _on_float64(reference), (2, 8, 100), lambda length: (2, length, 1024),
                  broadcast_operand)


OP_CASES = {
    "layernorm_scale_shift": _row_case(
        ops.layernorm_scale_shift, ops.reference_layernorm_scale_shift, _layernorm_args, broadcast_operand=1
    ),
    "rmsnorm_scale_shift": _row_case(
        ops.rmsnorm_scale_shift, ops.reference_rmsnorm_scale_shift, _rmsnorm_args, broadcast_operand=1
    ),
    "residual_gate": _row_case(
        ops.residual_gate, ops.reference_residual_gate, _residual_gate_args, broadcast_operand=2
    ),
    "residual_gate_layernorm_scale_shift": _row_case(
        ops.residual_gate_layernorm_scale_shift,
        ops.reference_residual_gate_layernorm_scale_shift,
        _residual_norm_args,
        broadcast_operand=2,
    ),
    "qk_rmsnorm": OpCase(
        op=ops.qk_rmsnorm,
        reference=ops.reference_qk_rmsnorm,
        make_args=_qk_args,
        truth=lambda q, k, q_weight, k_weight, eps: (rmsnorm_float64(q, q_weight, eps), rmsnorm_float64(k, k_weight, eps)),
        x_shape=(2, 2, 4, 64),
        model_shape=lambda length: (2, 16, length, 64),
        broadcast_operand=2,
    ),
    "residual_add_layernorm": _row_case(
        ops.residual_add_layernorm, ops.reference_residual_add_layernorm, _residual_add_layernorm_args,
        broadcast_operand=1,
    ),
    "qk_layernorm": OpCase(
        op=ops.qk_layernorm,
        reference=ops.reference_qk_layernorm,
        make_args=_qk_layernorm_args,
        truth=_on_float64(ops.reference_qk_layernorm),
        x_shape=(2, 2, 4, 64),
        model_shape=lambda length: (2, 16, length, 64),  # 16 heads of 64 (ShapeVAE width 1024)
        broadcast_operand=None,
    ),
    "qk_rmsnorm_rope": OpCase(
        op=ops.qk_rmsnorm_rope,
        reference=ops.reference_qk_rmsnorm_rope,
        make_args=_rope_args,
        truth=_on_float64(ops.reference_qk_rmsnorm_rope),  # in fp64 the reference rounds nowhere
        x_shape=(2, 2, 4, 64),
        model_shape=lambda length: (1, 24, length, 128),  # Flux-dev: 24 heads of 128
        broadcast_operand=2,
    ),
    "qk_rmsnorm_cat_rope": OpCase(
        op=ops.qk_rmsnorm_cat_rope,
        reference=ops.reference_qk_rmsnorm_cat_rope,
        make_args=_cat_rope_args,
        truth=_on_float64(ops.reference_qk_rmsnorm_cat_rope),
        x_shape=(2, 4, 2, 64),  # q0 [B, L_0, H, D]
        model_shape=lambda length: (1, length, 24, 128),  # Flux-dev: 24 heads of 128
        broadcast_operand=None,  # a weight that adds dims cannot be concatenated with the other stream
    ),
}
"""Every functional fused op; the generic tests (fallbacks, opcheck, gradcheck, compile, GPU)
run over these. Row-wise numerics also run over `ROW_CASES` (all but qk_rmsnorm)."""

BROADCAST_OPS = [name for name, case in OP_CASES.items() if case.broadcast_operand is not None]
"""The ops with an operand that may broadcast (and promote): the generic broadcast tests run on these."""

ROW_OPS = ["layernorm_scale_shift", "rmsnorm_scale_shift", "residual_gate", "residual_gate_layernorm_scale_shift"]


def assert_op_accurate(case: OpCase, args, dtype: torch.dtype, *, interpreted: bool) -> None:
    """Every output of `case.op(*args)` passes `assert_accurate` against reference and truth."""
    fused = outputs(case.op(*args))
    reference = outputs(case.reference(*args))
    truth = outputs(case.truth(*args))
    assert len(fused) == len(reference) == len(truth)
    for actual, expected, exact in zip(fused, reference, truth):
        assert_accurate(actual, expected, exact, dtype, interpreted=interpreted)
