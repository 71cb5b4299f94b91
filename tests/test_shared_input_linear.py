"""Horizontal fusion of Linears that share one input (``patterns/shared_input_linear.py``) and the
op it emits (``fusion_pass::linear_group``): exact outputs, the one-buffer parameter layout, and
that checkpoints, ``load_state_dict`` and ``.to()`` keep working after ``optimize()``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusion_pass
import fusion_pass.ops as ops
from fusion_pass.install import graph_of
from fusion_pass.ops.linear_group import group_weights, packed_rows
from fusion_pass.packing import pack_parameters

FAMILY = "shared_input_linear"
D = 16


class Modulation(nn.Module):
    """Hunyuan3D's ``Modulation`` in a spelling FX traces: ``lin(silu(vec))[:, None, :]`` chunked."""

    def __init__(self, dim, multiplier):
        super().__init__()
        self.multiplier = multiplier
        self.lin = nn.Linear(dim, multiplier * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


class ModulatedStack(nn.Module):
    """``blocks`` modulations of one ``vec`` (6 and 3 chunks alternating, as double and single
    blocks), each ``silu`` written once per module, and a final ``Sequential(SiLU, Linear)``
    adaLN whose output is chunked on dim 1 and indexed with ``[:, None, :]``:
    ``blocks + 1`` Linears of one input."""

    def __init__(self, blocks=3, dim=D):
        super().__init__()
        self.mods = nn.ModuleList([Modulation(dim, 6 if i % 2 == 0 else 3) for i in range(blocks)])
        self.final = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        for mod in self.mods:
            out = mod(vec)
            shift, scale, gate = out[0], out[1], out[2]
            x = x + gate * ((1 + scale) * x + shift)
        shift, scale = self.final(vec).chunk(2, dim=1)
        return x * (1 + scale[:, None, :]) + shift[:, None, :]


def inputs(dtype=torch.float32, batch=2):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 5, D, generator=generator, dtype=dtype),
            torch.randn(batch, D, generator=generator, dtype=dtype))


def optimized(model):
    return fusion_pass.optimize(model, patterns=[FAMILY])


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def fused_counts(model):
    source = graph_of(model)
    return source.count("linear_group_direct("), source.count("torch._C._nn.linear(")


def test_linears_of_one_input_become_one_group_with_exact_outputs():
    torch.manual_seed(0)
    model = ModulatedStack(blocks=3)
    x, vec = inputs()
    expected = model(x, vec)
    optimized(model)
    report = fusion_pass.report(model)
    assert report.counts() == {FAMILY: 1}  # one group: the 3 modulations and the final adaLN Linear
    assert fused_counts(model) == (1, 0)  # one fused call, no Linear left in the graph
    assert graph_of(model).count("silu(") == 1  # the four silu(vec) are one value
    torch.testing.assert_close(model(x, vec), expected, rtol=0, atol=0)


def test_parameters_become_views_of_one_buffer_and_keep_identity_keys_and_values():
    torch.manual_seed(0)
    model = ModulatedStack(blocks=3)
    params_before = dict(model.named_parameters())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    optimized(model)
    assert dict(model.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[name] for name, p in model.named_parameters())
    state = model.state_dict()
    assert list(state) == list(state_before)
    assert all(torch.equal(state[k], v) for k, v in state_before.items())
    weights = [lin.weight for lin in linears(model)]
    biases = [lin.bias for lin in linears(model)]
    assert group_weights(weights, biases) is not None
    storages = {w.untyped_storage().data_ptr() for w in weights}
    assert len(storages) == 1


def test_load_state_dict_after_optimize_takes_effect():
    torch.manual_seed(0)
    model, twin = ModulatedStack(), ModulatedStack()
    optimized(model)
    model.load_state_dict(twin.state_dict())
    x, vec = inputs()
    torch.testing.assert_close(model(x, vec), twin(x, vec), rtol=0, atol=0)
    assert group_weights([lin.weight for lin in linears(model)], [lin.bias for lin in linears(model)]) is not None


def test_to_float64_after_optimize_stays_exact():
    torch.manual_seed(0)
    model = ModulatedStack()
    reference = ModulatedStack()
    reference.load_state_dict(model.state_dict())
    optimized(model)
    model.to(torch.float64)
    reference.to(torch.float64)
    assert group_weights([lin.weight for lin in linears(model)], [lin.bias for lin in linears(model)]) is None
    x, vec = inputs(torch.float64)
    torch.testing.assert_close(model(x, vec), reference(x, vec), rtol=0, atol=0)


class TwoInputs(nn.Module):
    """Two Linears of ``a`` and two of ``b``: two groups."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2, self.b1, self.b2 = (nn.Linear(D, D) for _ in range(4))

    def forward(self, a, b):
        return self.a1(a) + self.a2(a) + self.b1(b) * self.b2(b)


def test_linears_of_different_inputs_form_separate_groups():
    torch.manual_seed(0)
    model = TwoInputs()
    a, b = inputs()[1], inputs()[1] * 2
    expected = model(a, b)
    optimized(model)
    assert fusion_pass.report(model).counts() == {FAMILY: 2}
    torch.testing.assert_close(model(a, b), expected, rtol=0, atol=0)


class Mixed(nn.Module):
    """Three Linears of one input: ``other`` differs as ``kind`` says (bias, tied weight)."""

    def __init__(self, kind):
        super().__init__()
        self.one, self.two = nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.other = nn.Linear(D, D, bias=kind != "no bias")
        if kind == "tied":
            self.other.weight = self.one.weight

    def forward(self, x):
        return self.one(x).sum(-1) + self.two(x).sum(-1) + self.other(x).sum(-1)


@pytest.mark.parametrize("kind, reason", [("no bias", "alone in its group"), ("tied", "tied weights")])
def test_near_miss_linear_is_left_unfused_with_a_reason(kind, reason):
    torch.manual_seed(0)
    model = Mixed(kind)
    x = inputs()[1]
    expected = model(x)
    optimized(model)
    report = fusion_pass.report(model)
    misses = [m.reason for m in report.families[FAMILY].near_misses]
    assert any(reason in m for m in misses), misses
    if kind == "tied":  # the two Linears of the tied weight are refused; nothing is left to group
        assert report.counts() == {FAMILY: 0}
    else:  # one and two are grouped; other stays a Linear
        assert report.counts() == {FAMILY: 1}
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_linear_of_another_weight_dtype_is_left_alone_in_its_group():
    """A float64 Linear of the same input (it could run only under autocast): matched on the
    graph alone, never executed."""
    from torch import fx

    from fusion_pass.pipeline import fuse_graph
    from patterns import select

    model = Mixed("bias")
    model.other.double()
    graph = fx.symbolic_trace(model).graph
    result = fuse_graph(graph, select([FAMILY]), root=model)
    assert [m.detail.split(",")[0] for m in result.matches] == ["2 Linears of x (x)"]
    assert [m.reason.split(" (")[0] for m in result.near_misses] == ["alone in its group"]
    assert "float64" in result.near_misses[0].reason


def test_a_single_linear_is_not_a_candidate():
    model = nn.Sequential(nn.SiLU(), nn.Linear(D, D))
    optimized(model)
    report = fusion_pass.report(model)
    assert report.counts() == {FAMILY: 0} and not report.families[FAMILY].near_misses


class InPlace(nn.Module):
    """``silu(v)`` twice with ``v`` modified in place between: not one value."""

    def __init__(self):
        super().__init__()
        self.one, self.two = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, v):
        first = self.one(F.silu(v))
        v.mul_(2)
        return first + self.two(F.silu(v))


def test_duplicate_inputs_are_not_merged_across_an_in_place_update():
    torch.manual_seed(0)
    model = InPlace()
    v = inputs()[1]
    expected = model(v.clone())
    optimized(model)
    assert fusion_pass.report(model).counts() == {FAMILY: 0}
    torch.testing.assert_close(model(v.clone()), expected, rtol=0, atol=0)


def test_weights_that_are_graph_inputs_are_refused():
    """torch.compile hands the backend parameters as placeholders: nothing to lay out."""
    torch.manual_seed(0)
    model = TwoInputs()
    backend = fusion_pass.backend(inner="eager", patterns=[FAMILY])
    a = inputs()[1]
    expected = model(a, a)
    torch.testing.assert_close(torch.compile(model, backend=backend, fullgraph=True)(a, a), expected)
    misses = [m.reason for m in backend.report.families[FAMILY].near_misses]
    assert misses and all("not a parameter of the captured module" in m for m in misses)


# --- the op ----------------------------------------------------------------------------------

def split_rows(total, sizes, *inner, dtype=torch.float32):
    buffer = torch.randn(total, *inner, dtype=dtype)
    return buffer, list(buffer.split(sizes))


def test_op_on_packed_parameters_is_one_gemm_equal_to_the_separate_linears():
    _, weights = split_rows(9, [4, 2, 3], D)
    _, biases = split_rows(9, [4, 2, 3])
    x = torch.randn(3, 2, D)
    assert packed_rows(weights) is not None and packed_rows(biases) is not None
    torch.testing.assert_close(ops.linear_group(x, weights, biases), ops.reference_linear_group(x, weights, biases))
    torch.testing.assert_close(ops.linear_group(x, weights, []), ops.reference_linear_group(x, weights, []))


@pytest.mark.parametrize("layout", ["gap", "order", "strided", "dtype", "separate"])
def test_packed_rows_refuses_anything_but_consecutive_row_blocks(layout):
    buffer = torch.randn(10, D)
    blocks = {
        "gap": [buffer[0:3], buffer[4:6]],
        "order": [buffer[3:5], buffer[0:3]],
        "strided": [buffer[0:3, ::2], buffer[3:6, ::2]],
        "dtype": [buffer[0:3], buffer[3:6].view(torch.int32)],
        "separate": [torch.randn(3, D), torch.randn(2, D)],
    }[layout]
    assert packed_rows(blocks) is None


def test_op_backward_matches_the_reference():
    weights = [torch.randn(3, D, requires_grad=True), torch.randn(5, D, requires_grad=True)]
    biases = [torch.randn(3, requires_grad=True), torch.randn(5, requires_grad=True)]
    x = torch.randn(2, D, requires_grad=True)
    grad = torch.randn(2, 8)
    got = torch.autograd.grad(ops.linear_group(x, weights, biases), [x, *weights, *biases], grad)
    want = torch.autograd.grad(ops.reference_linear_group(x, weights, biases), [x, *weights, *biases], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_pack_parameters_refuses_mixed_dtypes_and_changes_nothing():
    model = nn.ModuleDict({"a": nn.Linear(D, D), "b": nn.Linear(D, D).double()})
    pointers = [p.data_ptr() for p in model.parameters()]
    assert not pack_parameters(model, ("a.weight", "b.weight"))
    assert [p.data_ptr() for p in model.parameters()] == pointers


@pytest.mark.gpu
def test_packing_on_cuda_keeps_peak_memory_and_outputs(cuda):
    """Staged through host memory: packing 4 x 64 MB of weights adds no device peak."""
    torch.manual_seed(0)
    model = ModulatedStack(blocks=4, dim=2048).to(cuda, torch.float16)
    x = torch.randn(2, 5, 2048, device=cuda, dtype=torch.float16)
    vec = torch.randn(2, 2048, device=cuda, dtype=torch.float16)
    expected = model(x, vec)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    optimized(model)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() <= before + 2**20
    assert group_weights([lin.weight for lin in linears(model)], [lin.bias for lin in linears(model)]) is not None
    got = model(x, vec)  # one GEMM against separate ones: cuBLAS may sum in another order
    assert float((got.float() - expected.float()).norm() / expected.float().norm()) <= 1e-3


def test_official_modulations_and_final_adaln_are_one_group():
    """Hunyuan3D's ``Modulation.lin`` (two a double block, one a single block) and ``LastLayer``'s
    adaLN Linear all compute ``lin(silu(vec))`` of one ``vec``: one group of 2 * depth + single + 1."""
    from patterns import FAMILY_NAMES
    from reference_models import example_inputs, get_config, load_official

    model, config = load_official("tiny"), get_config("tiny")
    inputs = example_inputs("tiny", seed=0)
    expected = inputs.call(model)
    fusion_pass.optimize(model, patterns=[*FAMILY_NAMES, FAMILY])
    (site,) = fusion_pass.report(model).families[FAMILY].sites
    assert site.detail.startswith(f"{2 * config.depth + config.depth_single_blocks + 1} Linears of silu")
    assert graph_of(model).count("silu(") == 2  # the group's one and time_in's MLP's (of another input)
    fused = {family: n for family, n in fusion_pass.report(model).totals().items() if n}  # no other family fused
    assert fused == {**config.expected_sites(), FAMILY: 1}
    torch.testing.assert_close(inputs.call(model), expected, rtol=0, atol=0)


def test_gradients_through_the_group_equal_the_unfused_models():
    """With autograd on, the op goes through the dispatcher (its weights arrive in a list) and
    differentiates the separate Linears: each parameter gets its own gradient."""
    torch.manual_seed(0)
    model, reference = ModulatedStack(), ModulatedStack()
    reference.load_state_dict(model.state_dict())
    optimized(model)
    x, vec = inputs()
    model(x, vec).square().sum().backward()
    reference(x, vec).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
