"""What every row-wise kernel of `fusion_pass.ops` shares: when to launch, how wide, over which rows.

- `use_triton(*tensors)`: whether an op runs its Triton kernel or its PyTorch reference.
  CUDA tensors (all on one device) take the kernel. CPU tensors take it only under the Triton
  interpreter (`TRITON_INTERPRET=1`, which must be set before `fusion_pass.ops` is imported,
  because `triton.jit` reads it when a kernel is defined) and inside `with interpret_on_cpu():`.
- `row_settings(n_cols, elem_bytes)`: the one launch heuristic (Liger's `calculate_settings`):
  a whole row in one block of `next_power_of_2(n_cols)` elements, and as many rows per program
  as make a tile of at least `MIN_TILE` elements (narrow rows, such as 64-wide heads, would
  otherwise leave each program too little work).
- `row_layout(shape, *tensors)`: the row index space and per-tensor strides of tensors (their
  `TensorMeta`s) of (or broadcasting into) one shape, stride 0 on broadcast dims, so kernels
  read operands in place; `grouped_row_layout` allows one more (outermost) row dim, as groups.
- `rows_fit_kernel(cpu_kernels, x, *operands)`: the conditions every kernel shares; else ops use
  the reference. A memoised signature that a planner declines is recorded on that one miss,
  with the reason the planner gives (`plan_cache`, `reference_runs`): `fusion_pass.report(model)`
  lists it.
- `promoted_dtype(dtype, *operands)`: the dtype an elementwise expression over floats yields.
- `launch_mode(x)`: how an op's body runs on its first tensor argument `x`: `Launch.EAGER` on
  real tensors, `Launch.TRACED` inside torch.compile's decomposition of the op (its tensors are
  `FunctionalTensor`s; the kernel goes into the graph through `torch.library.wrap_triton`, so
  Inductor launches it itself); fake impls pass `Launch.NONE`.

Launch plans. An op's host path runs once per call (225 calls per Hunyuan3D-2 step), so what
it decides from its operands' metadata alone (kernel or reference, output dtypes, row layout)
is computed by a pure function of `tensor_key`s, memoised with a bounded `functools.lru_cache`
(`PLAN_CACHE_SIZE` signatures, far more than a model has): the steady state builds the key
(`x.shape`, `x.stride()`, ... ~0.3 us a tensor) and looks it up. The helpers below therefore take
`TensorMeta`s (shape, stride, dtype, device), not tensors. Fake tensors of a dynamic-shape trace
carry SymInts, which do not hash: fake impls and traces call the planners uncached
(`Launch.planner`). A plan ends in a `KernelCall`: the launch's grid, every scalar argument and
constexpr, built once per signature, so a call hands `launch_kernel` only its tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import math
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
import triton

from .reference_runs import Refusal, note_refusal, recording, refuse, register_planner

MAX_BLOCK = 8192
"""Widest row (elements) one program holds in registers. Each row-wise kernel keeps several
fp32 operand rows live; past this they would spill, so ops with wider rows use the reference."""

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Dtypes the kernels load and store; any other dtype makes an op use its reference."""

MIN_TILE = 1024
"""Elements per program below which narrow rows are stacked into one program. Measured on an
H200 (fp16, 2 x 3072 and 8 x 4442 tokens): 16 rows of 64 per program run q/k RMSNorm at
4.1 TB/s, one row per program at 0.4 TB/s; 1024-wide LayerNorm rows run fastest one a program."""

PLAN_CACHE_SIZE = 256
"""Call signatures (operand shapes, strides, dtypes, devices) whose launch plan each planner keeps."""

_BYTES_PER_WARP = 1024
"""Tile bytes per warp (32 threads x two 16-byte vectors): 2 warps for a 1024-wide fp16 row,
within 5 % of the best of 1 to 16 warps on the H200 for every op."""

_MAX_WARPS = 16

_interpret_on_cpu: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fusion_pass_interpret_on_cpu", default=False
)


class Launch(enum.Enum):
    """How an op's body runs its kernel (see `launch_mode`)."""

    EAGER = "eager"  # real tensors: memoised plans, the compiled kernel's launcher
    TRACED = "traced"  # inside a trace: plans uncached (SymInts), the launch recorded by `wrap_triton`
    NONE = "none"  # a fake impl: plans uncached, outputs allocated, nothing launched

    def planner(self, planner):
        """`planner` (a `plan_cache`d function) memoised for real tensors, whose shapes are ints;
        its uncached `__wrapped__` otherwise (trace and fake shapes may be SymInts, which do not hash)."""
        return planner if self is Launch.EAGER else planner.__wrapped__


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
"""Tensor types whose data a kernel reads directly (anything else is a subclass or a trace's stand-in)."""


def launch_mode(x: torch.Tensor) -> Launch:
    """`Launch.EAGER` for a plain tensor (or parameter) `x`; `Launch.TRACED` for anything else
    reaching an op's body: the `FunctionalTensor`s of the decomposition that `torch.library.triton_op`
    registers for torch.compile (AOTAutograd calls the body under `FunctionalTensorMode`)."""
    return Launch.EAGER if type(x) in PLAIN_TENSOR_TYPES else Launch.TRACED


def kernels_on_cpu(x: torch.Tensor, launch: Launch) -> bool:
    """Whether CPU tensor `x` may take a kernel: `cpu_kernels_enabled()`, except in a trace (the
    interpreter runs kernels on real data, and `wrap_triton` cannot record an interpreted one)."""
    return x.is_cpu and launch is not Launch.TRACED and cpu_kernels_enabled()


class RowSettings(NamedTuple):
    block_size: int  # columns per row block: next_power_of_2(n_cols)
    block_rows: int  # rows per program (a power of two)
    num_warps: int

    def programs(self, n_rows: int) -> int:
        """Programs that cover `n_rows` rows (`triton.cdiv`, whose host call costs a few us)."""
        return -(-n_rows // self.block_rows)

    def grouped_programs(self, n_groups: int, n_rows: int) -> tuple[int, int]:
        """(programs per group, programs in all) covering `n_groups` groups of `n_rows` rows
        (`GroupedRowLayout`): program p takes group p // per_group."""
        per_group = self.programs(n_rows)
        return per_group, n_groups * per_group


class RowLayout(NamedTuple):
    """Rows of tensors of one shape `[..., D]` (or broadcast to it) as a 2-level index space.

    Row `r` of the `n_outer * n_inner` rows is `(r // n_inner, r % n_inner)`; tensor `i`'s
    element `(outer, inner, col)` lies at `outer * strides[i][0] + inner * strides[i][1]
    + col * strides[i][2]` elements from its data pointer.
    """

    n_outer: int
    n_inner: int
    strides: tuple[tuple[int, int, int], ...]  # per tensor: (outer, inner, col) strides

    @property
    def n_rows(self) -> int:
        return self.n_outer * self.n_inner


class TensorMeta(NamedTuple):
    """What a launch plan depends on, of one tensor: `TensorMeta(*tensor_key(t))`."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """`t`'s shape, stride, dtype and device as a plain tuple (None for an absent optional
    operand): a planner's argument, cheap to build and to hash."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def tensor_meta(key: tuple | None) -> TensorMeta | None:
    """The named view of a `tensor_key`, for the planners' (uncached) bodies."""
    return None if key is None else TensorMeta(*key)


def plan_cache(planner=None, *, op=None):
    """Memoise a planner (a pure function of hashable metadata) over `PLAN_CACHE_SIZE` signatures;
    `planner.__wrapped__` stays the uncached function (traces, fake impls).

    A memoised signature the planner declines (None, or False) is recorded, once, with the reason
    the planner gave (`reference_runs.refuse`) under the op's name: `op`, or `op(*args)` for a
    planner several ops share; by default the planner's module name. Use as `@plan_cache` or
    `@plan_cache(op=...)`."""
    if planner is None:
        return functools.partial(plan_cache, op=op)
    name = op or planner.__module__.rpartition(".")[2]
    cached = functools.lru_cache(maxsize=PLAN_CACHE_SIZE)(recording(planner, name))
    cached.__wrapped__ = planner
    register_planner(cached)
    return cached


def row_settings(n_cols: int | torch.SymInt, elem_bytes: int) -> RowSettings:
    """Block size, rows per program and warps for rows of `n_cols` elements of `elem_bytes` each.

    A symbolic width (a dynamic-shape trace) is specialised to its value: the block is a
    constexpr of the kernel. Raises ValueError past `MAX_BLOCK`: ops check `fits_one_block`
    first and use their reference.
    """
    return _row_settings(int(n_cols), elem_bytes)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _row_settings(n_cols: int, elem_bytes: int) -> RowSettings:
    if not fits_one_block(n_cols):
        raise ValueError(f"a row of {n_cols} elements exceeds MAX_BLOCK={MAX_BLOCK}")
    block_size = 1 << (n_cols - 1).bit_length()
    block_rows = max(MIN_TILE // block_size, 1)
    tile_bytes = block_rows * block_size * elem_bytes
    num_warps = min(max(tile_bytes // _BYTES_PER_WARP, 1), _MAX_WARPS)
    return RowSettings(block_size, block_rows, num_warps)


def fits_one_block(n_cols: int) -> bool:
    return 0 < n_cols <= MAX_BLOCK


COLUMN_CHUNK = 4096
"""Columns a program of an elementwise row kernel takes at most: wider rows (Flux's 12288-wide
MLP half) are cut into chunks of this many columns, one program each, since nothing is
reduced over the row."""


def chunked_row_settings(n_cols: int, elem_bytes: int) -> tuple[RowSettings, int]:
    """`row_settings` for one chunk of rows of `n_cols` elements, and the chunks per row
    (`cdiv(n_cols, COLUMN_CHUNK)`; 1 for rows of at most COLUMN_CHUNK columns)."""
    chunk = min(int(n_cols), COLUMN_CHUNK)
    return row_settings(chunk, elem_bytes), -(-int(n_cols) // chunk)


@contextlib.contextmanager
def interpret_on_cpu() -> Iterator[None]:
    """Let CPU tensors take the Triton kernels (under `TRITON_INTERPRET=1`) in this context."""
    token = _interpret_on_cpu.set(True)
    try:
        yield
    finally:
        _interpret_on_cpu.reset(token)


def cpu_kernels_enabled() -> bool:
    """Whether CPU tensors may take the kernels here: inside `interpret_on_cpu()`, with the
    interpreter on. Not metadata of a tensor, so ops pass it to their planners as an argument
    (computed only for CPU tensors: `kernels_on_cpu`)."""
    return _interpret_on_cpu.get() and os.environ.get("TRITON_INTERPRET") == "1"


def devices_take_kernel(devices: set[torch.device], cpu_kernels: bool) -> bool:
    """All of `devices` one CUDA device, or the CPU where `cpu_kernels`. Triton is a declared
    dependency and the kernel modules import it, so it is importable whenever this is called."""
    if len(devices) != 1:
        return False
    device_type = next(iter(devices)).type
    return device_type == "cuda" or (device_type == "cpu" and cpu_kernels)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a kernel may run on `tensors`: all on one CUDA device, or all on the CPU
    with the interpreter on and inside `interpret_on_cpu()`."""
    return devices_take_kernel({t.device for t in tensors}, cpu_kernels_enabled())


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make `t`'s CUDA device current around a launch: Triton launches on the current device,
    which need not be the tensors' (a model moved to `cuda:1`). A no-op in the common case."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def rows_fit_kernel(cpu_kernels: bool, x: TensorMeta, *operands: TensorMeta, chunked: bool = False) -> bool:
    """Whether a row-wise kernel may take rows of `x` (`[..., D]`) with `operands`: one device
    that `devices_take_kernel` accepts, kernel dtypes only, x non-empty with D <= MAX_BLOCK (any
    D for a kernel that cuts rows into chunks: `chunked_row_settings`); where not, says why
    (`reference_runs.refuse`: recorded when the planner declines).
    That the operands broadcast into x's shape (one that adds dims makes the reference run) is
    left to `row_layout`, which the launch needs anyway."""
    refusal = _rows_refusal(cpu_kernels, (x, *operands), chunked)
    if refusal is not None:
        note_refusal(refusal)
        return False
    return True


def _rows_refusal(cpu_kernels: bool, tensors: tuple[TensorMeta, ...], chunked: bool) -> Refusal | None:
    """Why `rows_fit_kernel` refuses rows of `tensors[0]` with the others, or None where it takes them."""
    x, devices = tensors[0], {t.device for t in tensors}
    if not devices_take_kernel(devices, cpu_kernels):
        if len(devices) > 1 and any(d.type == "cuda" for d in devices):
            return Refusal(f"operands on several devices ({', '.join(sorted(map(str, devices)))})")
        device = next(iter(devices)).type if len(devices) == 1 else "mixed"
        if device == "cpu":  # the documented CPU path
            return Refusal("CPU tensors outside interpret_on_cpu(): no Triton kernels on the CPU", by_design=True)
        return Refusal(f"{device} tensors: no kernels there", by_design=True)  # meta: nothing to compute
    odd = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.dtype not in KERNEL_DTYPES})
    if odd:
        return Refusal(f"dtype {', '.join(odd)} (the kernels load float16, bfloat16, float32)")
    if len(x.shape) < 1 or math.prod(x.shape) == 0:
        return Refusal("an input without elements")
    if not (chunked or fits_one_block(x.shape[-1])):
        return Refusal(f"rows of {x.shape[-1]} elements exceed one program's block (MAX_BLOCK={MAX_BLOCK})")
    return None


def broadcast_strides(t: TensorMeta, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Strides of `t` expanded to `shape` (0 on broadcast dims), or None where `t` does not
    broadcast into `shape`."""
    if t.shape == shape:
        return t.stride
    pad = len(shape) - len(t.shape)
    if pad < 0:
        return None
    strides = [0] * pad
    for size, stride, target in zip(t.shape, t.stride, shape[pad:]):
        if size == target:
            strides.append(stride)
        elif size == 1:
            strides.append(0)
        else:
            return None
    return tuple(strides)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a contiguous tensor of `shape` (what `torch.empty(shape)` has)."""
    strides = [1]
    for size in reversed(shape[1:]):
        strides.insert(0, strides[0] * size)
    return tuple(strides)


def promoted_dtype(dtype_with_dims: torch.dtype, *operands: TensorMeta | torch.Tensor) -> torch.dtype:
    """dtype of an elementwise expression over a tensor with dims of `dtype_with_dims` (x, r, q)
    and floating `operands` (tensors or their `TensorMeta`), by PyTorch promotion: 0-d operands
    do not promote a tensor with dims (`torch.result_type`'s categories), otherwise the widest
    float wins. Exact for floating operands, the only ones the kernels take; other dtypes go to
    the references."""
    with_dims = [t.dtype for t in operands if len(t.shape) > 0]
    return functools.reduce(torch.promote_types, with_dims, dtype_with_dims)


def row_layout(shape: tuple[int, ...], *tensors: TensorMeta) -> RowLayout | None:
    """Coalesce the leading dims of `shape` (`[..., D]`) into at most two row dims for
    `tensors`, each of `shape` or broadcasting into it (stride 0 on broadcast dims).

    Rows are independent, so leading dims may be reordered: they are sorted by the first
    tensor's strides (largest first) and neighbours merge where every tensor allows it
    (`stride[outer] == stride[inner] * size[inner]`). A permuted `[B, H, L, D]` view of a qkv
    projection thus becomes rows `(B * L, H)`, and `[B, L, D]` with a `[B, 1, D]` operand
    becomes `(B, L)`. Returns None when more than two row dims remain (callers fall back) or
    a tensor does not broadcast into `shape`.
    """
    merged = _merged_row_dims(shape, tensors)
    if merged is None or len(merged[0]) > 2:
        return _refuse_layout(merged, 2)
    return _as_row_layout(*merged, len(tensors))


class GroupedRowLayout(NamedTuple):
    """`row_layout` with one more, outermost, row dim: group `g` of `n_groups` holds the rows of
    `rows` at `g * group_strides[i]` elements from tensor `i`'s data pointer."""

    n_groups: int
    group_strides: tuple[int, ...]  # per tensor
    rows: RowLayout


def grouped_row_layout(shape: tuple[int, ...], *tensors: TensorMeta) -> GroupedRowLayout | None:
    """`row_layout` allowing three row dims, the outermost as groups of rows (a kernel offsets
    its pointers per group). Needed where an operand varies along a middle dim: RoPE tables
    `[L, D]` over `[B, H, L, D]` views of a qkv projection, whose rows are `(B, L, H)` in memory.
    None when more than three row dims remain or a tensor does not broadcast into `shape`."""
    merged = _merged_row_dims(shape, tensors)
    if merged is None or len(merged[0]) > 3:
        return _refuse_layout(merged, 3)
    dims, cols = merged
    n_groups, group_strides = dims.pop(0) if len(dims) == 3 else (1, [0] * len(tensors))
    return GroupedRowLayout(n_groups, tuple(group_strides), _as_row_layout(dims, cols, len(tensors)))


def _refuse_layout(merged, max_dims: int) -> None:
    """`refuse` with why there is no layout of at most `max_dims` row dims (`merged`: `_merged_row_dims`)."""
    if merged is None:
        return refuse("an operand adds dims to the input's, or does not broadcast into it")
    return refuse(f"the operands' strides leave more than {max_dims} row dims (leading dims that do not merge)")


def _merged_row_dims(shape: tuple[int, ...], tensors: tuple[TensorMeta, ...]):
    """`(dims, col_strides)`: the leading dims of `shape` merged as far as every tensor allows,
    outermost first, each `(size, per-tensor strides)`; None where a tensor does not broadcast."""
    all_strides = [broadcast_strides(t, shape) for t in tensors]
    if None in all_strides:
        return None
    first = all_strides[0]
    lead = sorted((d for d in range(len(shape) - 1) if shape[d] != 1), key=lambda d: -first[d])
    merged: list[tuple[int, list[int]]] = []  # (size, per-tensor strides), outermost first
    for dim in lead:
        size, strides = shape[dim], [s[dim] for s in all_strides]
        if merged and all(o == i * size for o, i in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * size, strides)
        else:
            merged.append((size, strides))
    return merged, [s[-1] for s in all_strides]


def _as_row_layout(dims: list[tuple[int, list[int]]], cols: list[int], n_tensors: int) -> RowLayout:
    """Up to two merged row dims (outermost first) as a `RowLayout`, padded with unit dims."""
    dims = [(1, [0] * n_tensors)] * (2 - len(dims)) + dims
    (n_outer, outer), (n_inner, inner) = dims
    return RowLayout(n_outer, n_inner, tuple(zip(outer, inner, cols)))


_dry_run: contextvars.ContextVar[bool] = contextvars.ContextVar("fusion_pass_dry_run", default=False)


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """In this context ``launch_kernel`` compiles (``JITFunction.warmup``) instead of launching:
    ops allocate their outputs and leave them unwritten (``fusion_pass.precompile``)."""
    token = _dry_run.set(True)
    try:
        yield
    finally:
        _dry_run.reset(token)


class KernelCall:
    """A kernel launch as a launch plan fixes it: the grid (`programs`), every argument after the
    call's own (`tail`: sizes, strides, offsets, eps of the plan), the constexprs (block sizes,
    column strides, switches) and the warps. Ops build it inside their memoised planners, once per
    call signature, and give `launch_kernel` only what changes from call to call: the tensors (and
    a scalar outside the plan's key, such as layernorm_modulate's eps), which come first in each
    kernel's argument list. Those tensors have the dtypes (and None the places) that the plan was
    made for: inputs are in its key, outputs are allocated from it. Compared by identity:
    `launch_kernel` keys its compiled kernels on it."""

    __slots__ = ("programs", "tail", "constexprs", "num_warps")

    def __init__(self, programs: int, tail: tuple, constexprs: Mapping[str, object], num_warps: int):
        self.programs = programs
        self.tail = tail
        self.constexprs = MappingProxyType(dict(constexprs))
        self.num_warps = num_warps

    def __repr__(self) -> str:
        return (f"KernelCall(programs={self.programs}, tail={self.tail}, constexprs={dict(self.constexprs)}, "
                f"num_warps={self.num_warps})")


def launch_kernel(kernel, call: KernelCall, args: tuple, *, traced: bool = False) -> None:
    """`kernel[(call.programs,)](*args, *call.tail, **call.constexprs, num_warps=call.num_warps)`,
    on the current stream; `args` are the call's own arguments (its tensors, see `KernelCall`).
    `traced` (`Launch.TRACED`): through `torch.library.wrap_triton`, which records the launch in
    the graph being traced (Inductor then compiles and launches the kernel itself).

    `JITFunction.run` binds and specialises every argument on every call (~40 us for our
    30-argument kernels on the H200 box's CPU, as much as the rest of an op). A compiled kernel
    depends only on the arguments' types and specialisations (dtype and 16-byte alignment of
    each pointer, value of each int, constexprs, warps). All of them but the call's own `args`
    are `call`'s, fixed per call signature, and so are the dtypes of `args`' tensors (see
    `KernelCall`): the key of a compiled kernel is `call` (by identity), the current device and,
    of `args`, each tensor's alignment and each other value. The steady state keys a handful of
    arguments, not the ~30-110 a kernel takes, and calls the compiled kernel's launcher (kept
    per key, with the constant tail in declaration order) with the call's arguments spliced in
    front of that tail. Under the interpreter (kernels are not `JITFunction`s there), and for a
    key not seen yet, Triton launches as usual.
    """
    grid = (call.programs,)
    if traced:
        torch.library.wrap_triton(kernel)[grid](*args, *call.tail, **call.constexprs, num_warps=call.num_warps)
        return
    if _dry_run.get():
        if isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel.warmup(*args, *call.tail, grid=grid, **call.constexprs, num_warps=call.num_warps)
        return
    if not (_compiled_launch_ok[0] and isinstance(kernel, triton.runtime.jit.JITFunction)):
        kernel[grid](*args, *call.tail, **call.constexprs, num_warps=call.num_warps)  # interpreter, or a test double
        return
    key = (call, torch.cuda.current_device(),
           *[a.data_ptr() % 16 == 0 if isinstance(a, torch.Tensor) else a for a in args])
    entry = _COMPILED.get(key)
    if entry is not None and entry[0] is kernel:
        _, launcher, tail = entry
        try:
            launcher(*args, *tail)
            return
        except (AttributeError, TypeError, IndexError):  # pragma: no cover - a Triton whose launcher API differs
            _compiled_launch_ok[0] = False
    compiled = kernel[grid](*args, *call.tail, **call.constexprs, num_warps=call.num_warps)
    if not _compiled_launch_ok[0]:
        return
    try:
        launcher = compiled[(call.programs, 1, 1)]
    except (AttributeError, TypeError, IndexError):  # pragma: no cover - a Triton whose CompiledKernel differs
        _compiled_launch_ok[0] = False
        return
    n_given = len(args) + len(call.tail)
    tail = (*call.tail, *(call.constexprs[name] for name in kernel.arg_names[n_given:]))  # declaration order
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()
    _COMPILED[key] = (kernel, launcher, tail)


_COMPILED: dict[tuple, tuple] = {}  # launch key -> (kernel, its compiled launcher for the call's grid, tail)
_COMPILED_MAX = 4 * PLAN_CACHE_SIZE
_compiled_launch_ok = [True]  # cleared if this Triton's CompiledKernel[grid] launcher rejects a call
