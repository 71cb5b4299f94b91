"""Which fused ops declined their kernel and ran their PyTorch reference, and why.

An op runs its reference where its launch planner returns no plan (`launch.plan_cache`): a dtype
the kernels do not load, a row wider than one program holds, an operand that adds dims, rows
that do not coalesce, ... The report counts a matched site as fused (a graph rewrite), so without
this record a site whose kernel never runs would look fused. Recording costs nothing per call:
planners are memoised per call signature, and a signature is recorded on the planner's one miss
(the steady state hits the cache, on the kernel path and on the reference path alike).

Recorded as declines: real tensors (`Launch.EAGER`) on one CUDA device, or on the CPU inside
`interpret_on_cpu()`, whose plan was declined. Recorded apart (`by_design`), because the
reference is the design there and nothing was declined: CPU tensors without the interpreter (the
documented CPU path: no Triton on the CPU) and tensors on a device without kernels (`meta`). Not
recorded: fake tensors and traces (their planners run uncached, `Launch.planner`).

A planner (or a helper it calls: `launch.rows_fit_kernel`, `launch.row_layout`) says why it
declines with `refuse(reason)` just before it returns no plan; a `Refusal(..., by_design=True)`
(`note_refusal`) marks the declines above. A decline without a stated reason is recorded with a generic one.

Each record keeps weak references to the `nn.Module`s on the Python stack of its calls (the
module whose installed forward called the op, its parents), so `fusion_pass.report(model)`
lists the records of calls made inside that model, with the innermost module's path. A signature
is recorded once per process: a second model calling a signature that another caller declined
first finds the record listed apart in its report ("first declined outside this model").
"""
from __future__ import annotations

import contextvars
import functools
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

MAX_RECORDS = 256
"""Records kept (one per op and reason); past this, later declines are counted, not listed."""


class Refusal(NamedTuple):
    reason: str
    by_design: bool = False  # the documented reference path (CPU without interpreter, meta): not a decline


_refusal: contextvars.ContextVar[Refusal | None] = contextvars.ContextVar("fusion_pass_refusal", default=None)


def refuse(reason: str) -> None:
    """Say why the planner running now declines its kernel (`reason`, in the user's terms:
    "rows of 12288 elements exceed MAX_BLOCK=8192"); returns None, a planner's decline."""
    _refusal.set(Refusal(reason))


def note_refusal(refusal: Refusal) -> None:
    """`refuse` with a `Refusal`, which may be `by_design` (the documented reference path: not recorded)."""
    _refusal.set(refusal)


@dataclass
class Decline:
    """Call signatures of one op that ran its PyTorch reference, for one reason."""

    op: str
    reason: str
    example: str  # the first signature's operand shapes and dtypes
    signatures: int = 1
    modules: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)
    # id -> each nn.Module on the stack of its calls (weakly: a module that dies leaves)

    def path_in(self, names: dict[int, str]) -> str | None:
        """The path (in `names`: id(module) -> path, a model's `named_modules()`) of the innermost
        module of its calls that belongs to that model, or None when none does."""
        paths = [names[key] for key in list(self.modules.keys()) if key in names]
        if not paths:
            return None
        return max(paths, key=lambda path: path.count(".") + bool(path)) or "<root>"


_RECORDS: dict[tuple[str, str], Decline] = {}
_BY_DESIGN: dict[tuple[str, str], Decline] = {}  # the documented reference runs (CPU, meta): not declines
_overflow = [0]  # declines not listed once MAX_RECORDS records exist
_PLANNERS: list = []  # every recording planner, cleared by `forget`


def recording(planner: Callable, op: str | Callable[..., str]) -> Callable:
    """`planner` that, when it declines (returns None or False), records the decline with the
    reason it gave (`refuse`) and the op's name (`op`, or `op(*args)` for a planner several ops
    share). Wrapped by `launch.plan_cache`'s cache, so it runs once per signature."""

    @functools.wraps(planner)  # the planner's name and docstring
    def record_declines(*args):
        _refusal.set(None)
        plan = planner(*args)
        if plan is None or plan is False:
            refusal = _refusal.get() or Refusal(_unstated_reason(args))
            _record(op(*args) if callable(op) else op, refusal.reason, args,
                    _BY_DESIGN if refusal.by_design else _RECORDS)
        return plan

    return record_declines


def register_planner(cached) -> None:
    """Note a memoised planner, whose cache `forget` clears."""
    _PLANNERS.append(cached)


def reference_runs() -> list[Decline]:
    """Every record of this process, oldest first."""
    return list(_RECORDS.values())


def by_design() -> list[Decline]:
    """Records of calls that ran the reference by design (CPU tensors outside `interpret_on_cpu()`,
    meta tensors): not declines, kept so a report can say no kernel ran there."""
    return list(_BY_DESIGN.values())


def unlisted() -> int:
    """Declines past MAX_RECORDS, counted but not listed."""
    return _overflow[0]


def forget() -> None:
    """Drop every record and every memoised plan, so each signature is planned (and a decline
    recorded) again: for tests, and for a process that wants a fresh account."""
    _RECORDS.clear()
    _BY_DESIGN.clear()
    _overflow[0] = 0
    for planner in _PLANNERS:
        planner.cache_clear()


def describe(args) -> str:
    """The tensor operands among a planner's arguments (`launch.tensor_key`s, also inside a tuple
    argument) as `[2, 4096, 12288] bfloat16, [1, 1, 3072] bfloat16 strides (18432, 18432, 1), ...`
    (strides where they are not the contiguous ones)."""
    return ", ".join(f"{list(shape)} {str(dtype).removeprefix('torch.')}"
                     + (f" strides {tuple(stride)}" if tuple(stride) != _contiguous(tuple(shape)) else "")
                     for shape, stride, dtype, _ in _tensor_keys(args))


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= max(size, 1)
    return tuple(strides)


def _tensor_keys(args) -> list[tuple]:
    keys = []
    for arg in args:
        if _is_tensor_key(arg):
            keys.append(arg)
        elif isinstance(arg, tuple):
            keys.extend(a for a in arg if _is_tensor_key(a))
    return keys


def _is_tensor_key(arg) -> bool:
    return isinstance(arg, tuple) and len(arg) == 4 and isinstance(arg[2], torch.dtype)


def _unstated_reason(args: tuple) -> str:
    devices = {str(key[3]) for key in _tensor_keys(args)}
    if len(devices) > 1:
        return f"operands on several devices ({', '.join(sorted(devices))})"
    return "its launch plan refused these operands (a layout or operand its kernel does not take)"


def _record(op: str, reason: str, args: tuple, records: dict[tuple[str, str], Decline]) -> None:
    record = records.get((op, reason))
    if record is None:
        if len(records) >= MAX_RECORDS:
            if records is _RECORDS:
                _overflow[0] += 1
            return
        record = records[(op, reason)] = Decline(op, reason, describe(args))
    else:
        record.signatures += 1
    for module in _stack_modules():
        record.modules[id(module)] = module


def _stack_modules() -> list[torch.nn.Module]:
    """The `nn.Module`s that are `self` of a frame on the current stack, innermost first (a
    fused op's caller is an installed forward, whose `self` is its module). Once per signature."""
    modules = []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, torch.nn.Module):
            modules.append(owner)
        frame = frame.f_back
    return modules
