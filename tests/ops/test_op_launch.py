"""The launch helpers every row-wise kernel shares: dispatch, block settings, row layouts, dtypes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion_pass.ops.launch import (
    MAX_BLOCK,
    interpret_on_cpu,
    promoted_dtype,
    row_layout,
    row_settings,
    use_triton,
)
from ops_testing import FLOAT_DTYPES, qkv_views


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
    layout = row_layout(q.shape, q, torch.empty_like(q))
    assert (layout.n_outer, layout.n_inner) == (2 * 5, 4)
    assert layout.strides == ((3 * 4 * 8, 8, 1), (4 * 8, 8, 1))


def test_chunk_operand_keeps_batch_and_length_apart():
    x = torch.randn(2, 5, 8)
    shift = torch.randn(2, 1, 6 * 8)[..., 8:16]
    layout = row_layout(x.shape, x, shift)
    assert (layout.n_outer, layout.n_inner) == (2, 5)
    assert layout.strides == ((5 * 8, 8, 1), (6 * 8, 0, 1))


def test_shared_operand_lets_all_rows_merge():
    x = torch.randn(2, 5, 8)
    layout = row_layout(x.shape, x, torch.randn(8))
    assert (layout.n_outer, layout.n_inner) == (1, 10)
    assert layout.strides == ((0, 8, 1), (0, 0, 1))


def test_operand_that_does_not_broadcast_has_no_layout():
    x = torch.randn(2, 5, 8)
    assert row_layout(x.shape, x, torch.randn(3, 1, 8)) is None
    assert row_layout(x.shape, x, torch.randn(1, 2, 5, 8)) is None


def test_three_unmergeable_row_dims_have_no_layout():
    x = torch.randn(400).as_strided((2, 3, 4, 1), (200, 50, 10, 1))
    assert row_layout(x.shape, x) is None


dtype_with_dims = st.tuples(st.sampled_from(FLOAT_DTYPES), st.booleans())


@given(x_dtype=st.sampled_from(FLOAT_DTYPES), scale=dtype_with_dims, shift=dtype_with_dims)
def test_promoted_dtype_is_the_unfused_expression_dtype(x_dtype, scale, shift):
    def operand(dtype, has_dims):
        return torch.ones((4,) if has_dims else (), dtype=dtype)

    x, scale_t, shift_t = torch.ones(3, 4, dtype=x_dtype), operand(*scale), operand(*shift)
    assert promoted_dtype(x_dtype, scale_t, shift_t) == (x * (1 + scale_t) + shift_t).dtype
