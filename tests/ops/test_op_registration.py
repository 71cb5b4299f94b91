"""torch.library registration of the fused ops: schema, fake impls, autograd, torch.compile."""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import fusion_pass.ops as ops
from ops_testing import OP_CASES, outputs


def overload(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.fusion_pass, name).default


def small_args(name: str, dtype: torch.dtype, requires_grad: bool = False) -> list:
    """Tiny inputs with LayerNorm weight and bias where the op takes them."""
    case = OP_CASES[name]
    shape = (2, 2, 3, 8) if name.startswith("qk_") else (2, 3, 8)  # q/k ops: [B, H, L, D]
    affine = {"affine": True} if "layernorm" in name else {}
    args = list(case.make_args(shape, dtype, "chunk", **affine))
    # Leaves: views into one modulation tensor would share gradients.
    return [a.detach().clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", OP_CASES)
def test_opcheck_on_reference_path(name, dtype):
    torch.library.opcheck(overload(name), small_args(name, dtype, requires_grad=True))


@pytest.mark.parametrize("name", OP_CASES)
def test_opcheck_on_kernel_path(interpreted, name):
    torch.library.opcheck(overload(name), small_args(name, torch.float32))
    assert interpreted.count > 0


def test_opcheck_in_place_qk_rmsnorm(interpreted):
    torch.library.opcheck(overload("qk_rmsnorm_"), small_args("qk_rmsnorm", torch.float32))
    assert interpreted.count > 0


GRADCHECK_TOLERANCES: dict = {}
"""The official RMSNorm computes in fp32 (`x.float()`) even for fp64 inputs, so its finite
differences need fp32-sized steps and tolerances."""


@pytest.mark.parametrize("name", OP_CASES)
def test_gradcheck_in_float64(name):
    args = small_args(name, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(OP_CASES[name].op, args, **GRADCHECK_TOLERANCES.get(name, {}))


@pytest.mark.parametrize("name", OP_CASES)
def test_gradients_equal_autograd_through_reference(name):
    case = OP_CASES[name]
    args = small_args(name, torch.float64, requires_grad=True)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    grad_outputs = [torch.randn_like(out) for out in outputs(case.reference(*args))]
    fused_grads = torch.autograd.grad(outputs(case.op(*args)), tensors, grad_outputs)
    reference_grads = torch.autograd.grad(outputs(case.reference(*args)), tensors, grad_outputs)
    for fused, reference in zip(fused_grads, reference_grads):
        torch.testing.assert_close(fused, reference, rtol=0.0, atol=0.0)


def call_every_op(x, y, modulation, q, k, head_weight):
    shift, scale, gate = modulation.chunk(3, dim=-1)
    normed = ops.layernorm_scale_shift(x, shift, scale, 1e-6)
    r = ops.residual_gate(x, normed, gate)
    chained = ops.residual_gate_layernorm_scale_shift(r, y, gate, shift, scale, 1e-6)
    q_out, k_out = ops.qk_rmsnorm(q, k, head_weight, head_weight, 1e-6)
    ops.qk_rmsnorm_(q, k, head_weight, head_weight, None)
    return chained.residual, chained.normed, q_out, k_out, q, k


def every_op_inputs() -> tuple:
    qkv = torch.randn(2, 4, 3 * 2 * 8)
    q, k, _ = qkv.reshape(2, 4, 3, 2, 8).permute(2, 0, 3, 1, 4)
    return torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 1, 24), q, k, torch.randn(8)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_traces_every_op(backend):
    torch._dynamo.reset()
    compiled = torch.compile(call_every_op, fullgraph=True, backend=backend)
    inputs = every_op_inputs()
    expected = call_every_op(*[t.clone() for t in inputs])
    for actual, reference in zip(compiled(*inputs), expected):
        torch.testing.assert_close(actual, reference)


def test_dynamo_runs_kernels_behind_fake_impls(interpreted):
    """Dynamo alone keeps each op whole: the compiled call runs the kernels."""
    torch._dynamo.reset()
    compiled = torch.compile(call_every_op, fullgraph=True, backend="eager")
    inputs = every_op_inputs()
    with ops.interpret_on_cpu():
        expected = call_every_op(*[t.clone() for t in inputs])
    for actual, reference in zip(compiled(*inputs), expected):
        torch.testing.assert_close(actual, reference)
    assert interpreted.count == 10  # four functional ops and one in-place op, twice each


def aot_graph_targets(fn, *inputs) -> set[str]:
    """The call targets of the forward graph that AOTAutograd hands a compiler for `fn`."""
    targets: set[str] = set()

    def record(gm, _example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record))
    with torch.no_grad():
        compiled(*inputs)
    return targets


def test_aot_autograd_decomposes_the_functional_ops_into_their_bodies(interpreted):
    """The functional ops are `triton_op`s: AOTAutograd traces their bodies (on the CPU, where
    no kernel can be traced, the reference; on CUDA the kernel launch, see test_ops_gpu.py), so
    Inductor sees plain aten ops or a Triton kernel, not an opaque op. The in-place op (a plain
    custom op) stays, functionalised."""
    targets = aot_graph_targets(call_every_op, *every_op_inputs())
    assert not any("fusion_pass" in t for t in targets), targets
    assert {"aten.native_layer_norm.default", "aten.rsqrt.default", "auto_functionalized_v2"} <= targets, targets
    assert interpreted.count == 1  # the in-place op, at run time


class EveryFunctionalOp(torch.nn.Module):
    def forward(self, x, y, modulation, q, k, head_weight):
        shift, scale, gate = modulation.chunk(3, dim=-1)
        normed = ops.layernorm_scale_shift(x, shift, scale, 1e-6)
        r = ops.residual_gate(x, normed, gate)
        chained = ops.residual_gate_layernorm_scale_shift(r, y, gate, shift, scale, 1e-6)
        q_out, k_out = ops.qk_rmsnorm(q, k, head_weight, head_weight, 1e-6)
        return chained.residual, chained.normed, q_out, k_out


def test_torch_export_keeps_the_ops_whole():
    """`torch.export` does not decompose `triton_op`s: the exported program calls each op once
    and computes what the module does."""
    inputs = every_op_inputs()
    exported = torch.export.export(EveryFunctionalOp(), inputs)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    fused = sorted(t for t in targets if t.startswith("fusion_pass."))
    assert fused == [
        "fusion_pass.layernorm_scale_shift.default",
        "fusion_pass.qk_rmsnorm.default",
        "fusion_pass.residual_gate.default",
        "fusion_pass.residual_gate_layernorm_scale_shift.default",
    ], targets
    for actual, expected in zip(exported.module()(*inputs), EveryFunctionalOp()(*inputs), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)


NEW_FAMILY_OPS = ["qk_rmsnorm_rope", "qk_rmsnorm_cat_rope", "qk_layernorm", "residual_add_layernorm"]


@pytest.mark.parametrize("name", NEW_FAMILY_OPS)
def test_dynamo_keeps_the_op_whole_and_runs_its_kernel(interpreted, name):
    case = OP_CASES[name]
    args = small_args(name, torch.float32)
    expected = outputs(case.op(*args))
    torch._dynamo.reset()
    actual = outputs(torch.compile(case.op, fullgraph=True, backend="eager")(*args))
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)
    assert interpreted.count == 2  # eager, then behind Dynamo


@pytest.mark.parametrize("name", NEW_FAMILY_OPS)
def test_torch_export_keeps_the_op_whole(name):
    case = OP_CASES[name]
    args = small_args(name, torch.float32)

    class Call(torch.nn.Module):
        def forward(self, *tensors):
            it = iter(tensors)
            return tuple(case.op(*(next(it) if isinstance(a, torch.Tensor) else a for a in args)))

    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    exported = torch.export.export(Call(), tensors)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if t.startswith("fusion_pass.")] == [f"fusion_pass.{name}.default"], targets
    for got, want in zip(exported.module()(*tensors), outputs(case.op(*args)), strict=True):
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)
