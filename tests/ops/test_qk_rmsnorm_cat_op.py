"""`fusion_pass::qk_rmsnorm_cat`: both streams' q/k RMSNorm and the q, k, v cats of a joint
attention, against the unfused expression and float64, on the views a rearranged qkv projection
gives, awkward lengths, mixed dtypes, the fallbacks, its torch.library registration and (marked
gpu) the H200 shapes."""

from importlib import import_module

import pytest
import torch
from einops import rearrange

import fusion_pass.ops as ops
from fusion_pass.ops import MAX_BLOCK
from fusion_pass.ops.launch import tensor_key
from ops_testing import FLOAT_DTYPES, assert_accurate, assert_inductor_launches_the_kernel, randn, rmsnorm_float64

qk_rmsnorm_cat_module = import_module("fusion_pass.ops.qk_rmsnorm_cat")


def stream(batch, heads, length, d, dtype, device="cpu"):
    """q, k, v `[B, H, L, D]` of one stream: the official rearrange of a qkv projection output."""
    qkv = randn(batch, length, 3 * heads * d, dtype=dtype, scale=2.0, mean=0.5, device=device)
    q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=heads)
    return q, k, v


def joint_args(lengths=(3, 5), dtype=torch.float32, *, batch=2, heads=2, d=64, cast_to_v=True, eps=1e-6,
               dim=2, device="cpu", dtypes=None):
    """Arguments of the op for a double-stream block: (txt, img) streams of `lengths` tokens
    (of `dtypes` per stream, default both `dtype`), per-channel weights away from 1."""
    dtypes = dtypes or (dtype, dtype)
    streams = [stream(batch, heads, length, d, dt, device) for length, dt in zip(lengths, dtypes)]
    weights = [randn(d, dtype=dt, scale=0.5, mean=1.0, device=device) for dt in dtypes for _ in "qk"]
    return (*streams[0], *streams[1], *weights, eps, dim, cast_to_v)


def with_weights(args, make):
    """`args` with each of the four weights `w` replaced by `make(w)`."""
    args = list(args)
    args[6:10] = [make(w) for w in args[6:10]]
    return args


def joint_float64(q0, k0, v0, q1, k1, v1, q_weight0, k_weight0, q_weight1, k_weight1, eps, dim, cast_to_v):
    """The op's math in float64 (`cast_to_v` only rounds, so it has no float64 counterpart)."""

    def cat(a, b):
        return torch.cat((a, b), dim)

    return (
        cat(rmsnorm_float64(q0, q_weight0, eps), rmsnorm_float64(q1, q_weight1, eps)),
        cat(rmsnorm_float64(k0, k_weight0, eps), rmsnorm_float64(k1, k_weight1, eps)),
        cat(v0.double(), v1.double()),
    )


def assert_joint_accurate(args, dtype, *, interpreted=True):
    """Each output of the op against the unfused expression and float64 (`assert_accurate`)."""
    fused, reference, truth = ops.qk_rmsnorm_cat(*args), ops.reference_qk_rmsnorm_cat(*args), joint_float64(*args)
    for actual, expected, exact in zip(fused, reference, truth):
        assert_accurate(actual, expected, exact, dtype, interpreted=interpreted)


def assert_runs_reference(args):
    for fused, reference in zip(ops.qk_rmsnorm_cat(*args), ops.reference_qk_rmsnorm_cat(*args)):
        torch.testing.assert_close(fused, reference, rtol=0.0, atol=0.0)


LENGTHS = [(3, 5), (1, 4), (6, 1), (1, 1)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_rearranged_qkv_views_of_two_streams_match_float64(interpreted, lengths, dtype):
    assert_joint_accurate(joint_args(lengths, dtype), dtype)
    assert interpreted.count == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_without_cast_to_v_the_result_is_the_plain_concatenation(interpreted, dtype):
    assert_joint_accurate(joint_args((2, 3), dtype, cast_to_v=False), dtype)
    assert interpreted.count == 1


def test_outputs_are_contiguous_joint_q_k_v_named_fields(interpreted):
    out = ops.qk_rmsnorm_cat(*joint_args((3, 5), torch.float16, batch=2, heads=2, d=64))
    assert out._fields == ("q", "k", "v")
    for tensor in out:
        assert tensor.shape == (2, 2, 8, 64) and tensor.is_contiguous() and tensor.dtype == torch.float16
    assert interpreted.count == 1


@pytest.mark.parametrize("d", [16, 100], ids=str)
def test_odd_head_width_and_batch_one(interpreted, d):
    assert_joint_accurate(joint_args((2, 7), torch.float16, batch=1, heads=3, d=d), torch.float16)
    assert interpreted.count == 1


@pytest.mark.parametrize("cast_to_v, dtype", [(False, torch.float32), (True, torch.float16)])
def test_fp32_weights_promote_unless_cast_to_v(interpreted, cast_to_v, dtype):
    args = with_weights(joint_args((2, 3), torch.float16, cast_to_v=cast_to_v), torch.Tensor.float)
    assert {t.dtype for t in ops.qk_rmsnorm_cat(*args)[:2]} == {dtype}
    assert_joint_accurate(args, torch.float16)
    assert interpreted.count == 2


def test_zero_dim_fp32_weights_keep_fp16_outputs(interpreted):
    args = with_weights(joint_args((2, 3), torch.float16, cast_to_v=False), lambda w: torch.tensor(0.75))
    assert {t.dtype for t in ops.qk_rmsnorm_cat(*args)} == {torch.float16}
    assert_joint_accurate(args, torch.float16)
    assert interpreted.count == 2


@pytest.mark.parametrize("cast_to_v", [False, True])
def test_streams_of_different_dtypes_promote_like_cat(interpreted, cast_to_v):
    args = joint_args((2, 3), dtypes=(torch.float16, torch.bfloat16), cast_to_v=cast_to_v)
    assert {t.dtype for t in ops.qk_rmsnorm_cat(*args)} == {torch.float32}
    assert_joint_accurate(args, torch.bfloat16)
    assert interpreted.count == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_eps_none_is_each_inputs_dtype_epsilon(interpreted, dtype):
    args = list(joint_args((2, 3), dtype))
    args[0] = args[0] / 1000  # small enough that eps matters
    explicit = ops.qk_rmsnorm_cat(*args[:10], torch.finfo(dtype).eps, *args[11:])
    for actual, expected in zip(ops.qk_rmsnorm_cat(*args[:10], None, *args[11:]), explicit):
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)
    assert interpreted.count == 2


@pytest.mark.parametrize("lead", [(2, 3), (3,), ()], ids=str)
def test_contiguous_inputs_of_any_leading_rank(interpreted, lead):
    def tensors(length, d):
        return [randn(*lead, length, d, dtype=torch.float32, scale=2.0) for _ in "qkv"]

    weights = [randn(24, dtype=torch.float32, mean=1.0) for _ in "qkqk"]
    args = (*tensors(3, 24), *tensors(4, 24), *weights, 1e-6, -2, False)
    assert_joint_accurate(args, torch.float32)
    assert interpreted.count == 1


def test_v_of_another_width_than_q_and_k(interpreted):
    q0, k0, _ = stream(2, 2, 3, 32, torch.float16)
    q1, k1, _ = stream(2, 2, 5, 32, torch.float16)
    v0, v1 = (randn(2, 2, length, 48, dtype=torch.float16) for length in (3, 5))
    weights = [randn(32, dtype=torch.float16, mean=1.0) for _ in "qkqk"]
    assert_joint_accurate((q0, k0, v0, q1, k1, v1, *weights, 1e-6, -2, True), torch.float16)
    assert interpreted.count == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nan_and_inf_propagate_like_unfused(interpreted):
    args = joint_args((2, 3), torch.float32)
    args[0][0, 0, 1, 3] = float("nan")  # q of stream 0
    args[5][1, 1, 2, 5] = float("inf")  # v of stream 1
    for fused, expected in zip(ops.qk_rmsnorm_cat(*args), ops.reference_qk_rmsnorm_cat(*args)):
        assert torch.equal(fused.isnan(), expected.isnan()) and torch.equal(fused.isinf(), expected.isinf())
        torch.testing.assert_close(fused, expected, equal_nan=True)
    assert interpreted.count == 1


@pytest.mark.parametrize("case", ["alike", "dtypes differ", "a weight's column stride differs"])
def test_streams_alike_share_one_kernel_body_with_the_same_values(interpreted, case):
    # one tile body for both streams (ONE_BODY, half the code to compile) exactly when the streams'
    # q, k, v and weights pairwise share dtype and column stride; one body per stream otherwise
    dtypes = (torch.float16, torch.bfloat16) if case == "dtypes differ" else None
    args = list(joint_args((2, 3), torch.float16, dtypes=dtypes))
    if case == "a weight's column stride differs":
        args[6] = randn(2 * 64, dtype=torch.float16, scale=0.5, mean=1.0)[::2]  # stream 0's q weight
    plan = qk_rmsnorm_cat_module._launch_plan(True, *map(tensor_key, args[:10]), *args[10:])
    assert plan.call.constexprs["ONE_BODY"] is (case == "alike")
    assert_joint_accurate(args, torch.bfloat16 if dtypes else torch.float16)
    assert interpreted.count == 1


def test_repeated_call_signature_reuses_its_launch_plan(interpreted):
    planner = qk_rmsnorm_cat_module._launch_plan
    ops.qk_rmsnorm_cat(*joint_args((3, 4), torch.float16, heads=3))
    misses = planner.cache_info().misses
    assert_joint_accurate(joint_args((3, 4), torch.float16, heads=3), torch.float16)
    assert planner.cache_info().misses == misses
    assert interpreted.count == 2


# --- where the kernel does not apply: the reference, bit for bit ------------------------------

def test_cpu_outside_interpret_on_cpu_is_reference_bit_exact(launches):
    assert_runs_reference(joint_args((2, 3), torch.float16))
    assert launches.count == 0


def q_longer_than_its_v():
    args = list(joint_args((2, 3)))
    args[2], args[5] = (randn(2, 2, length, 64, dtype=torch.float32) for length in (5, 6))
    return args


def three_unmergeable_leading_dims():
    """5-D inputs; q0 cut with gaps from a larger tensor, so no two of its leading dims merge."""
    args = [randn(2, 2, 2, length, 64, dtype=torch.float32) for length in (3, 3, 3, 4, 4, 4)]
    args[0] = randn(2, 3, 2, 5, 2, 3, 64, dtype=torch.float32)[:, 0, :, 0]
    return (*args, *joint_args((3, 4), dim=-2)[6:])


FALLBACKS = {
    "float64": lambda: joint_args((2, 3), torch.float64),
    "cat over heads": lambda: joint_args((3, 3), dim=1),
    "cat over the head width": lambda: joint_args((3, 3), dim=-1),
    "q longer than its v": q_longer_than_its_v,
    "zero tokens": lambda: joint_args((0, 3)),
    "rows wider than MAX_BLOCK": lambda: joint_args((1, 1), batch=1, heads=1, d=MAX_BLOCK + 1),
    "weight over tokens": lambda: with_weights(joint_args((3, 3)), lambda w: randn(3, 64, dtype=w.dtype, mean=1.0)),
    "weight that adds a dim": lambda: with_weights(joint_args((2, 3), dim=-2), lambda w: w.expand(3, 1, 1, 1, 64)),
    "three unmergeable leading dims": three_unmergeable_leading_dims,
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_fallback_runs_reference(interpreted, case):
    assert_runs_reference(FALLBACKS[case]())
    assert interpreted.count == 0


def test_device_mismatch_raises_like_unfused(interpreted):
    args = with_weights(joint_args((2, 3)), lambda w: w.to("meta"))
    with pytest.raises(RuntimeError) as unfused:
        ops.reference_qk_rmsnorm_cat(*args)
    with pytest.raises(RuntimeError, match=str(unfused.value)):
        ops.qk_rmsnorm_cat(*args)


# --- registration ---------------------------------------------------------------------------

def overload() -> torch._ops.OpOverload:
    return torch.ops.fusion_pass.qk_rmsnorm_cat.default


def leaf_args(dtype, requires_grad=False, cast_to_v=True):
    """Small arguments whose tensors are leaves (views of one qkv would share gradients)."""
    args = joint_args((2, 3), dtype, heads=2, d=8, cast_to_v=cast_to_v)
    return [a.detach().clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_on_reference_path(dtype):
    torch.library.opcheck(overload(), leaf_args(dtype, requires_grad=True))


def test_opcheck_on_kernel_path(interpreted):
    torch.library.opcheck(overload(), leaf_args(torch.float32))
    assert interpreted.count > 0


@pytest.mark.parametrize("cast_to_v", [False, True])
def test_gradcheck_in_float64(cast_to_v):
    args = leaf_args(torch.float64, requires_grad=True, cast_to_v=cast_to_v)
    assert torch.autograd.gradcheck(ops.qk_rmsnorm_cat, args)


def test_gradients_equal_autograd_through_reference():
    args = leaf_args(torch.float64, requires_grad=True)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    grad_outputs = [torch.randn_like(out) for out in ops.reference_qk_rmsnorm_cat(*args)]
    fused = torch.autograd.grad(ops.qk_rmsnorm_cat(*args), tensors, grad_outputs)
    for actual, expected in zip(fused, torch.autograd.grad(ops.reference_qk_rmsnorm_cat(*args), tensors, grad_outputs)):
        torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)


def test_torch_compile_fullgraph_runs_the_kernel_behind_the_fake_impl(interpreted):
    torch._dynamo.reset()
    compiled = torch.compile(ops.qk_rmsnorm_cat, fullgraph=True, backend="eager")  # the op stays whole
    args = joint_args((2, 3), torch.float16)
    with ops.interpret_on_cpu():
        expected = ops.qk_rmsnorm_cat(*args)
    for actual, reference in zip(compiled(*args), expected):
        torch.testing.assert_close(actual, reference, rtol=0.0, atol=0.0)
    assert interpreted.count == 2


# --- on the GPU (H200 shapes: B = 2, 16 heads of 64, 1370 condition + 3072 latent tokens) -----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cast_to_v", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lengths", [(1370, 3072), (1, 1)], ids=str)
def test_kernel_on_gpu_matches_float64(launches, poisoned_outputs, lengths, dtype, cast_to_v):
    args = joint_args(lengths, dtype, heads=16, d=64, cast_to_v=cast_to_v, device="cuda")
    assert_joint_accurate(args, dtype, interpreted=False)
    assert launches.count == 1


@pytest.mark.gpu
@needs_cuda
def test_fp32_weights_promote_on_gpu(launches):
    args = joint_args((1370, 3072), torch.float16, heads=16, d=64, cast_to_v=False, device="cuda")
    assert_joint_accurate(with_weights(args, torch.Tensor.float), torch.float16, interpreted=False)
    assert launches.count == 1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_inductor_launches_the_kernel_itself(dynamic):
    args = joint_args((1370, 3072), torch.float16, heads=16, d=64, cast_to_v=True, device="cuda")
    assert_inductor_launches_the_kernel(ops.qk_rmsnorm_cat, args, "_qk_rmsnorm_cat_kernel", dynamic=dynamic)
