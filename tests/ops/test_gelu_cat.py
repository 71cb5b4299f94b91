"""`fusion_pass::gelu_cat`: `cat((a, gelu(b)), -1)` against the unfused expression and float64, on
the single-stream block's operands (a contiguous attention output, b a strided split view),
awkward shapes, mixed dtypes, the fallbacks, and its torch.library registration."""

from importlib import import_module

import pytest
import torch
import torch.nn.functional as F

import fusion_pass.ops as ops
from fusion_pass.ops import MAX_BLOCK
from ops_testing import FLOAT_DTYPES, assert_accurate, assert_inductor_launches_the_kernel, randn

# The interpreter's numpy exp overflows to inf for very negative inputs of the tanh form, as meant.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

gelu_cat_module = import_module("fusion_pass.ops.gelu_cat")
launch = import_module("fusion_pass.ops.launch")
APPROXIMATIONS = ("none", "tanh")


def block_operands(lead, a_cols, b_cols, dtype, device="cpu", *, a_dtype=None):
    """(a, b) as a single-stream block makes them: a contiguous `[*lead, a_cols]`; b the
    `[*lead, b_cols]` split view of a linear output `[*lead, 3 * a_cols + b_cols]`."""
    linear1 = randn(*lead, 3 * a_cols + b_cols, dtype=dtype, scale=3.0, device=device)
    a = randn(*lead, a_cols, dtype=a_dtype or dtype, scale=2.0, device=device)
    return a, linear1[..., 3 * a_cols:]


def gelu_cat_float64(a, b, approximate):
    return torch.cat((a.double(), F.gelu(b.double(), approximate=approximate)), -1)


def assert_gelu_cat_accurate(a, b, approximate, dtype, *, interpreted, dim=-1):
    """The fused op against the unfused expression and float64 (`assert_accurate`)."""
    fused = ops.gelu_cat(a, b, dim, approximate)
    reference = ops.reference_gelu_cat(a, b, dim, approximate)
    assert_accurate(fused, reference, gelu_cat_float64(a, b, approximate), dtype, interpreted=interpreted)


def assert_runs_reference(a, b, dim=-1, approximate="tanh"):
    torch.testing.assert_close(
        ops.gelu_cat(a, b, dim, approximate), ops.reference_gelu_cat(a, b, dim, approximate), rtol=0.0, atol=0.0
    )


SHAPES = [
    ((2, 8), 64, 100),  # odd Db
    ((2, 5), 24, 40),  # narrow rows: several rows per program
    ((3, 1), 33, 96),  # L = 1, odd Da
    ((1, 16), 16, 48),  # batch 1
    ((12,), 10, 33),  # 2-D
    ((), 7, 9),  # 1-D: one row
    ((2, 3, 2), 16, 48),  # 4-D
]


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lead, a_cols, b_cols", SHAPES, ids=[f"{lead}-{a}-{b}" for lead, a, b in SHAPES])
def test_kernel_matches_float64_on_split_views(interpreted, lead, a_cols, b_cols, dtype, approximate):
    a, b = block_operands(lead, a_cols, b_cols, dtype)
    assert_gelu_cat_accurate(a, b, approximate, dtype, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("dim", [2, -1])
def test_positive_last_dim_takes_the_kernel(interpreted, dim):
    a, b = block_operands((2, 4), 16, 40, torch.float16)
    assert_gelu_cat_accurate(a, b, "tanh", torch.float16, interpreted=True, dim=dim)
    assert interpreted.count == 1


def test_transposed_operands_are_read_through_their_own_row_order(interpreted):
    """a is `[L, B, D]` transposed to `[B, L, D]`, b a `[B, L, D]` view: each keeps its layout."""
    a = randn(6, 2, 20, dtype=torch.float32).transpose(0, 1)
    b = randn(2, 6, 70, dtype=torch.float32, scale=3.0)[..., 5:55]
    assert_gelu_cat_accurate(a, b, "none", torch.float32, interpreted=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("a_dtype, b_dtype", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.float16)], ids=str)
def test_mixed_dtypes_promote_like_cat_with_gelu_rounded_to_b_dtype(interpreted, a_dtype, b_dtype):
    a, b = block_operands((2, 4), 16, 40, b_dtype, a_dtype=a_dtype)
    fused = ops.gelu_cat(a, b, -1, "tanh")
    reference = ops.reference_gelu_cat(a, b, -1, "tanh")
    assert fused.dtype == reference.dtype == torch.promote_types(a_dtype, b_dtype)
    torch.testing.assert_close(fused[..., :16], reference[..., :16], rtol=0.0, atol=0.0)  # a: exact
    # gelu(b) is rounded to b's dtype, as the unfused F.gelu returns it: within an ulp of it.
    torch.testing.assert_close(fused[..., 16:].to(b_dtype), reference[..., 16:].to(b_dtype))
    assert interpreted.count == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_nan_and_large_values_behave_like_unfused(interpreted, approximate):
    a, b = block_operands((2, 3), 8, 16, torch.float32)
    a[0, 0, 1] = float("nan")
    b[0, 1, :5] = torch.tensor([float("nan"), 1e4, -1e4, 30.0, -30.0])
    fused = ops.gelu_cat(a, b, -1, approximate)
    torch.testing.assert_close(fused, ops.reference_gelu_cat(a, b, -1, approximate), equal_nan=True)
    assert torch.equal(fused.isnan(), ops.reference_gelu_cat(a, b, -1, approximate).isnan())
    assert interpreted.count == 1


def test_repeated_call_signature_reuses_its_launch_plan(interpreted):
    ops.gelu_cat(*block_operands((2, 4), 16, 40, torch.float32), -1, "tanh")
    misses = gelu_cat_module._launch_plan.cache_info().misses
    assert_gelu_cat_accurate(*block_operands((2, 4), 16, 40, torch.float32), "tanh", torch.float32, interpreted=True)
    assert gelu_cat_module._launch_plan.cache_info().misses == misses
    assert interpreted.count == 2


# Rows wider than a program's chunk of columns (Flux-dev: a 3072, b 12288 > MAX_BLOCK) are cut
# into chunks, one program each; the last chunk of each operand is partial.
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_rows_cut_into_column_chunks(interpreted, monkeypatch, dtype):
    monkeypatch.setattr(launch, "COLUMN_CHUNK", 16)
    a, b = block_operands((2, 3), 40, 70, dtype)  # 3 chunks of a, 5 of b, both last partial
    assert_gelu_cat_accurate(a, b, "tanh", dtype, interpreted=True)
    assert interpreted.count == 1


def test_a_and_b_wider_than_one_block_take_the_kernel(interpreted):
    a, b = block_operands((2,), MAX_BLOCK + 3, MAX_BLOCK + 5, torch.float32)
    assert_gelu_cat_accurate(a, b, "none", torch.float32, interpreted=True)
    assert interpreted.count == 1


# --- where the kernel does not apply: the reference, bit for bit ---------------------------

def test_cpu_outside_interpret_on_cpu_is_reference_bit_exact(launches):
    assert_runs_reference(*block_operands((2, 4), 16, 40, torch.float16))
    assert launches.count == 0


@pytest.mark.parametrize(
    "lead, a_cols, b_cols, dtype",
    [
        ((2, 4), 16, 40, torch.float64),  # dtype
        ((2, 0), 16, 40, torch.float32),  # no rows
        ((2, 4), 0, 40, torch.float32),  # empty a
    ],
    ids=["float64", "no-rows", "empty-a"],
)
def test_unsupported_operands_run_reference(interpreted, lead, a_cols, b_cols, dtype):
    assert_runs_reference(*block_operands(lead, a_cols, b_cols, dtype))
    assert interpreted.count == 0


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_cat_along_a_leading_dim_runs_reference(interpreted, dim):
    a, b = randn(2, 4, 16, dtype=torch.float32), randn(2, 4, 16, dtype=torch.float32)
    assert_runs_reference(a, b, dim)
    assert interpreted.count == 0


def test_rows_that_do_not_coalesce_run_reference(interpreted):
    a = torch.randn(400 * 16).as_strided((2, 3, 4, 16), (200 * 16, 50 * 16, 10 * 16, 1))
    assert_runs_reference(a, torch.randn(2, 3, 4, 8))
    assert interpreted.count == 0


@pytest.mark.parametrize(
    "b, approximate",
    [
        (torch.randn(2, 5, 8), "tanh"),  # leading dims differ
        (torch.randn(2, 4, 8, device="meta"), "tanh"),  # another device
        (torch.randn(2, 4, 8), "exact"),  # not an approximation F.gelu knows
    ],
    ids=["leading-dims", "device", "approximate"],
)
def test_invalid_arguments_raise_like_unfused(interpreted, b, approximate):
    a = torch.randn(2, 4, 16)
    with pytest.raises(RuntimeError) as unfused:
        ops.reference_gelu_cat(a, b, -1, approximate)
    with pytest.raises(RuntimeError, match=str(unfused.value)):
        ops.gelu_cat(a, b, -1, approximate)
    assert interpreted.count == 0


# --- torch.library registration ---------------------------------------------------------------

def small_operands(dtype, requires_grad=False):
    """Small a and strided b, leaves (b views a linear1 output that needs no gradient)."""
    a, b = block_operands((2, 3), 8, 12, dtype)
    return a.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_on_reference_path(dtype, approximate):
    a, b = small_operands(dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.fusion_pass.gelu_cat.default, (a, b, -1, approximate))


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_opcheck_on_kernel_path(interpreted, approximate):
    torch.library.opcheck(torch.ops.fusion_pass.gelu_cat.default, (*small_operands(torch.float32), 2, approximate))
    assert interpreted.count > 0


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_gradcheck_in_float64(approximate):
    a, b = small_operands(torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.gelu_cat(a, b, -1, approximate), (a, b))


def test_gradients_equal_autograd_through_reference():
    a, b = small_operands(torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 20, dtype=torch.float64)
    fused = torch.autograd.grad(ops.gelu_cat(a, b, -1, "tanh"), (a, b), grad)
    reference = torch.autograd.grad(ops.reference_gelu_cat(a, b, -1, "tanh"), (a, b), grad)
    for actual, expected in zip(fused, reference):
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)


def linear1_gelu_cat(attn, linear1):
    """The block's spelling over a linear1 output: split, then the fused op."""
    _, mlp = torch.split(linear1, [attn.shape[-1], linear1.shape[-1] - attn.shape[-1]], dim=-1)
    return ops.gelu_cat(attn, mlp, 2, "tanh")


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_runs_the_kernel_behind_the_fake_impl(interpreted, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(linear1_gelu_cat, fullgraph=True, backend="eager", dynamic=dynamic)  # the op stays whole
    attn, linear1 = torch.randn(2, 3, 8), torch.randn(2, 3, 24)
    expected = ops.reference_gelu_cat(attn, linear1[..., 8:], 2, "tanh")
    torch.testing.assert_close(compiled(attn, linear1), expected)
    assert interpreted.count == 1


# --- on the H200 (`make test-gpu`): Hunyuan3D-2 shapes ------------------------------------------

HIDDEN, MLP_HIDDEN = 1024, 4096


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("length", [1, 1370, 3072 + 1370])  # one token, condition tokens, the joint sequence
def test_kernel_on_gpu_matches_float64(launches, poisoned_outputs, length, dtype, approximate):
    a, b = block_operands((2, length), HIDDEN, MLP_HIDDEN, dtype, device="cuda")
    assert_gelu_cat_accurate(a, b, approximate, dtype, interpreted=False)
    assert launches.count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_flux_single_block_rows_on_gpu(launches, poisoned_outputs, dtype):
    """Flux-dev's single block: attention 3072 wide, MLP half 12288 (> MAX_BLOCK: column chunks),
    over 512 text + 4096 image tokens."""
    a, b = block_operands((1, 4608), 3072, 12288, dtype, device="cuda")
    assert_gelu_cat_accurate(a, b, "tanh", dtype, interpreted=False)
    assert launches.count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_dtypes_on_gpu(launches):
    a, b = block_operands((2, 1370), HIDDEN, MLP_HIDDEN, torch.float32, device="cuda", a_dtype=torch.float16)
    fused, reference = ops.gelu_cat(a, b, -1, "tanh"), ops.reference_gelu_cat(a, b, -1, "tanh")
    torch.testing.assert_close(fused, reference)
    assert launches.count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dynamic", [False, True])
def test_inductor_launches_the_kernel_itself(dynamic):
    attn = randn(2, 1370, HIDDEN, dtype=torch.float16, device="cuda")
    linear1 = randn(2, 1370, HIDDEN + MLP_HIDDEN, dtype=torch.float16, device="cuda")
    assert_inductor_launches_the_kernel(linear1_gelu_cat, (attn, linear1), "_gelu_cat_kernel", dynamic=dynamic)
