"""The launch helpers every row-wise kernel shares: dispatch, block settings, row layouts, dtypes,
and the launch plans memoised per call signature."""

import os
from importlib import import_module

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_pass.ops.launch import (
    MAX_BLOCK,
    PLAN_CACHE_SIZE,
    interpret_on_cpu,
    grouped_row_layout,
    promoted_dtype,
    row_layout,
    row_settings,
    tensor_key,
    tensor_meta,
    use_triton,
)
from ops_testing import FLOAT_DTYPES, OP_CASES, ROW_OPS, assert_op_accurate, outputs, qkv_views

# The op modules (the package exports `qk_rmsnorm` the op under its module's name).
layernorm_modulate = import_module("fusion_pass.ops.layernorm_modulate")
qk_rmsnorm = import_module("fusion_pass.ops.qk_rmsnorm")
qk_rmsnorm_rope = import_module("fusion_pass.ops.qk_rmsnorm_rope")
qk_rmsnorm_cat_rope = import_module("fusion_pass.ops.qk_rmsnorm_cat_rope")
qk_layernorm = import_module("fusion_pass.ops.qk_layernorm")


def layout_of(*tensors: torch.Tensor):
    """`row_layout` of tensors broadcasting into the first one's shape."""
    return row_layout(tensors[0].shape, *(tensor_meta(tensor_key(t)) for t in tensors))


def test_block_is_the_next_power_of_two_and_warps_grow_with_it():
    settings = [row_settings(n, 2) for n in (64, 100, 1000, 1024, 3072, MAX_BLOCK)]
    assert [s.block_size for s in settings] == [64, 128, 1024, 1024, 4096, MAX_BLOCK]
    warps = [s.num_warps for s in settings]
    assert warps == sorted(warps) and warps[0] >= 1 and warps[-1] <= 16
    assert row_settings(1024, 4).num_warps == 2 * row_settings(1024, 2).num_warps


def test_rows_past_max_block_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="MAX_BLOCK"):
        row_settings(MAX_BLOCK + 1, 2)


def test_cpu_tensors_take_kernels_only_inside_interpret_on_cpu_with_the_interpreter(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_triton(x)
    with interpret_on_cpu():
        assert use_triton(x, x)
        assert not use_triton(x, x.to("meta"))
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_triton(x)


def test_permuted_head_view_coalesces_to_batch_times_length_by_heads():
    q, _ = qkv_views((2, 4, 5, 8), torch.float32)  # [B, H, L, D] view of [B, L, 3 * H * D]
    layout = layout_of(q, torch.empty_like(q))
    assert (layout.n_outer, layout.n_inner) == (2 * 5, 4)
    assert layout.strides == ((3 * 4 * 8, 8, 1), (4 * 8, 8, 1))


def test_chunk_operand_keeps_batch_and_length_apart():
    x = torch.randn(2, 5, 8)
    shift = torch.randn(2, 1, 6 * 8)[..., 8:16]
    layout = layout_of(x, shift)
    assert (layout.n_outer, layout.n_inner) == (2, 5)
    assert layout.strides == ((5 * 8, 8, 1), (6 * 8, 0, 1))


def test_shared_operand_lets_all_rows_merge():
    x = torch.randn(2, 5, 8)
    layout = layout_of(x, torch.randn(8))
    assert (layout.n_outer, layout.n_inner) == (1, 10)
    assert layout.strides == ((0, 8, 1), (0, 0, 1))


def test_operand_that_does_not_broadcast_has_no_layout():
    x = torch.randn(2, 5, 8)
    assert layout_of(x, torch.randn(3, 1, 8)) is None
    assert layout_of(x, torch.randn(1, 2, 5, 8)) is None


def test_three_unmergeable_row_dims_have_no_layout():
    x = torch.randn(400).as_strided((2, 3, 4, 1), (200, 50, 10, 1))
    assert layout_of(x) is None


def test_rope_table_over_permuted_heads_makes_batch_a_row_group():
    """cos `[L, D]` over `[B, H, L, D]` views of `[B, L, 3 * H * D]`: memory order (B, L, H), and
    the table varies along L alone, so B becomes the group and (L, H) the rows."""
    q, _ = qkv_views((2, 4, 5, 8), torch.float32)
    cos = torch.randn(5, 8)
    metas = [tensor_meta(tensor_key(t)) for t in (q, cos)]
    assert row_layout(q.shape, *metas) is None
    grouped = grouped_row_layout(q.shape, *metas)
    assert (grouped.n_groups, grouped.group_strides) == (2, (5 * 3 * 4 * 8, 0))
    assert (grouped.rows.n_outer, grouped.rows.n_inner) == (5, 4)
    assert grouped.rows.strides == ((3 * 4 * 8, 8, 1), (8, 0, 1))


def test_grouped_layout_without_a_third_dim_is_one_group():
    x = torch.randn(2, 5, 8)
    grouped = grouped_row_layout(x.shape, tensor_meta(tensor_key(x)))
    assert (grouped.n_groups, grouped.group_strides) == (1, (0,))
    assert grouped.rows == layout_of(x)


def test_four_unmergeable_row_dims_have_no_grouped_layout():
    x = torch.randn(2000).as_strided((2, 3, 4, 5, 1), (1000, 300, 60, 10, 1))
    assert grouped_row_layout(x.shape, tensor_meta(tensor_key(x))) is None


dtype_with_dims = st.tuples(st.sampled_from(FLOAT_DTYPES), st.booleans())


@given(x_dtype=st.sampled_from(FLOAT_DTYPES), scale=dtype_with_dims, shift=dtype_with_dims)
def test_promoted_dtype_is_the_unfused_expression_dtype(x_dtype, scale, shift):
    def operand(dtype, has_dims):
        return torch.ones((4,) if has_dims else (), dtype=dtype)

    x, scale_t, shift_t = torch.ones(3, 4, dtype=x_dtype), operand(*scale), operand(*shift)
    assert promoted_dtype(x_dtype, scale_t, shift_t) == (x * (1 + scale_t) + shift_t).dtype


PLANNERS = (
    layernorm_modulate._output_dtypes,
    layernorm_modulate._launch_plan,
    qk_rmsnorm._output_dtypes,
    qk_rmsnorm._launch_plan,
    qk_rmsnorm_rope._output_dtypes,
    qk_rmsnorm_rope._launch_plan,
    qk_rmsnorm_cat_rope._launch_plan,
    qk_layernorm._fits_kernel,
    qk_layernorm._launch_plan,
)


def test_planners_keep_a_bounded_number_of_signatures():
    assert all(planner.cache_info().maxsize == PLAN_CACHE_SIZE for planner in PLANNERS)


@pytest.mark.parametrize("name", OP_CASES)
def test_repeated_call_signature_reuses_its_launch_plan(interpreted, name):
    case = OP_CASES[name]
    shape = (3, 5, 7, 24) if name.startswith("qk_") else (3, 7, 24)
    case.op(*case.make_args(shape, torch.float32, "chunk"))
    misses = [planner.cache_info().misses for planner in PLANNERS]
    # Fresh tensors of the same shapes, strides, dtypes and device: the planners are not run again.
    assert_op_accurate(case, case.make_args(shape, torch.float32, "chunk"), torch.float32, interpreted=True)
    assert [planner.cache_info().misses for planner in PLANNERS] == misses
    assert interpreted.count == 2


@pytest.mark.parametrize("name", ROW_OPS)
def test_same_shapes_with_other_strides_get_their_own_plan(interpreted, name):
    case = OP_CASES[name]
    for layout in ("chunk", "full", "shared", "chunk"):
        assert_op_accurate(case, case.make_args((2, 6, 40), torch.float16, layout), torch.float16, interpreted=True)
    assert interpreted.count == 4


@pytest.mark.parametrize("name", OP_CASES)
def test_leaving_interpret_on_cpu_runs_the_reference_for_a_planned_signature(launches, name):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (a GPU is present)")
    case = OP_CASES[name]
    args = case.make_args(case.x_shape, torch.float32, "chunk")
    with interpret_on_cpu():
        case.op(*args)
    assert launches.count == 1
    for fused, reference in zip(outputs(case.op(*args)), outputs(case.reference(*args))):
        torch.testing.assert_close(fused, reference, rtol=0.0, atol=0.0)
    assert launches.count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1])  # 1 element: pointers that are not 16-byte aligned
def test_reused_compiled_kernels_match_triton_launches_bitwise(cuda, monkeypatch, offset):
    """`launch_kernel` skips Triton's per-call specialisation after a key's first launch: its
    results must equal a plain Triton launch exactly, aligned or not, and it must be taken."""
    launch = import_module("fusion_pass.ops.launch")
    base = torch.randn(4 * 77 * 1024 + offset, device=cuda, dtype=torch.float16)
    residual = base[offset:].view(4, 77, 1024)  # misaligned when offset = 1
    y = torch.randn(4, 77, 1024, device=cuda, dtype=torch.float16)
    mod = torch.randn(4, 1, 6 * 1024, device=cuda, dtype=torch.float16)
    shift, scale, gate = mod.chunk(6, dim=-1)[:3]
    op = torch.ops.fusion_pass.residual_gate_layernorm_scale_shift.default
    args = (residual, y, gate, shift, scale, 1e-6, None, None)
    op(*args)  # the first launch of this key goes through Triton and is recorded
    entries = len(launch._COMPILED)
    reused = [t.clone() for t in op(*args)]
    assert len(launch._COMPILED) == entries > 0  # a hit, not a new entry
    monkeypatch.setattr(launch, "_compiled_launch_ok", [False])  # plain Triton launches
    plain = op(*args)
    for got, want in zip(reused, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
