"""Optional part of the run stage: replay each optimized module's forward as a CUDA graph.

``optimize(model, cuda_graphs=True)`` wraps every installed forward in a :class:`GraphReplay`:
the FX-captured forwards (``install.py``) that call no module (a replay would skip a called
module's own forward, hooks and checks: a diffusers root calling its blocks runs as is, its blocks
replay) and the blocks compiled regionally by Dynamo (``regional.py``, which adds Dynamo's own
guards to each capture). On a call whose tensors are
all on the current CUDA device, with autograd off and no torch function or dispatch mode
active, it captures the forward once per call key (:func:`call_key`) and afterwards replays it: one launch
per module instead of dozens, which removes the host overhead that dominates small models
(Hunyuan3D-2mini at 512 latents) and the launch gaps of Dynamo blocks run eagerly (Flux).

A new key's first call runs the forward itself (for a Dynamo block: through Dynamo, whose guards
are evaluated and which may recompile), then captures it on static copies of the inputs (one more
warm-up there first, on the capture stream), then replays. That first call is also where a
forward that cannot be replayed is found out, once per key, and from then on runs as is
(reported through ``note``): one that changes an input tensor in place (its version counter
moved) or mutates a list/dict argument (the arguments flatten differently afterwards), one whose
capture fails (a host sync), or one its ``capture_guard`` refuses.

Semantics and invariants:
- Inputs are copied into the graph's static buffers, except when they already are those
  buffers. An input that is a static output of another graph of the same model (a block fed
  by the previous block's output) is *borrowed* at capture: the graph reads that output buffer
  directly, and in the steady state nothing is copied. A later call passing another tensor there
  captures again, with copies this time (a borrowed buffer is never written: it belongs to the
  graph that produced it); only a key's first capture borrows, so this happens once per key.
- Outputs are the graph's static buffers, overwritten by the next replay of the same module:
  like ``torch.compile(mode="reduce-overhead")``, a caller must consume (or clone) an output
  before calling the same module again (a denoising loop does; a model that calls one
  module twice per step and keeps both results should not use this option).
- Parameters are read from their addresses at capture: when any parameter or buffer of the
  module has moved (``.to()``, ``.half()``) or been replaced, the graph is captured again.
  In-place updates (``load_state_dict``, optimizer steps) are seen by the next replay. The
  check costs one ``data_ptr()`` per parameter; walking the module tree again (milliseconds
  on a 1B model) happens only after some module anywhere registered a parameter, buffer or
  submodule (counted by torch's global registration hooks, installed once).
- Global state is part of each capture: Dynamo's ``GlobalStateGuard`` (grad mode, autocast,
  deterministic algorithms, default dtype, TF32 and reduced-precision flags; 0.2 us), taken at
  capture and checked before a replay, so a forward run under autocast never replays the graph
  captured without it. Per key, up to ``MAX_CAPTURES`` captures are kept, each with its global
  state and its extra check (a Dynamo block's guards); the first that holds replays, and when none
  does the call captures again as a new key would.
- Anything else (CPU tensors, autograd on, mixed devices or a device other than the current one,
  a tensor subclass, a capture already in progress, an active ``TorchFunctionMode`` or
  ``TorchDispatchMode``) runs the forward as is.
All graphs of one model share one memory pool (:class:`ReplayPool`); that is safe because graphs
never run concurrently and every static output is a live tensor the pool cannot hand out again.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch._C._dynamo.guards import GlobalStateGuard
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

MAX_CAPTURES = 4  # per call key: captures kept for calls that differ in what the extra check sees

#: ``capture_guard(args, kwargs, static_args, static_kwargs)``: after a capture, a per-call check
#: ``check(args, kwargs) -> bool`` the captured graph needs, or a string saying why not to replay.
CaptureGuard = Callable[[tuple, dict, tuple, dict], "Callable[[tuple, dict], bool] | str"]


class ReplayPool:
    """One model's CUDA-graph memory pool, and the static outputs of its graphs (which a graph
    fed by another's output borrows instead of copying)."""

    def __init__(self):
        self.handle = torch.cuda.graph_pool_handle()
        self.outputs = WeakIdKeyDictionary()  # static output tensor -> True


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[Any]
    borrowed: list[bool]  # per input: the static buffer is another graph's output (never copied into)
    static_outputs: Any
    check: Callable[[tuple, dict], bool] | None  # what the capture_guard asked to be checked per call
    global_state: GlobalStateGuard  # grad mode, autocast, deterministic flags, default dtype, TF32... at capture
    inference: bool  # captured under torch.inference_mode (its static inputs are inference tensors)
    state: list[torch.Tensor]  # the module's parameters and buffers at capture
    state_ptrs: list[int]
    registrations: int  # _REGISTRATIONS[0] when ``state`` was last taken from the module

    def state_moved(self, module: nn.Module) -> bool:
        if self.registrations != _REGISTRATIONS[0]:
            self.state, self.registrations = _state_of(module), _REGISTRATIONS[0]
        return [t.data_ptr() for t in self.state] != self.state_ptrs

    def accepts(self, flat: list, args: tuple, kwargs: dict) -> bool:
        """Global state is as at capture, borrowed buffers are this call's very tensors, and the
        extra check holds."""
        if not self.global_state.check() or torch.is_inference_mode_enabled() != self.inference:
            return False
        for static, value, borrowed in zip(self.static_inputs, flat, self.borrowed):
            if borrowed and value.data_ptr() != static.data_ptr():
                return False
        return self.check is None or self.check(args, kwargs)


@dataclass(frozen=True)
class _NotReplayed:
    reason: str


_REGISTRATIONS = [0]  # parameters, buffers and submodules registered anywhere since import


def _count_registration(*_args) -> None:
    _REGISTRATIONS[0] += 1


def _state_of(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@functools.cache
def _watch_registrations() -> None:
    for register in (
        torch.nn.modules.module.register_module_parameter_registration_hook,
        torch.nn.modules.module.register_module_buffer_registration_hook,
        torch.nn.modules.module.register_module_module_registration_hook,
    ):
        register(_count_registration)


class GraphReplay:
    """``code(module, *args, **kwargs)``, captured and replayed per call key on CUDA.

    ``capture_guard`` (see :data:`CaptureGuard`) adds a check per capture (``regional.py``:
    Dynamo's guards); ``note(reason)`` is told of every call that could have replayed but ran
    as is (a forward that cannot be replayed, a failed capture). ``replays`` counts replays."""

    def __init__(self, module: nn.Module, code: Callable, pool: ReplayPool | None,
                 capture_guard: CaptureGuard | None = None, note: Callable[[str], None] | None = None):
        self.module = module
        self.code = code
        self.pool = pool
        self.capture_guard = capture_guard
        self.note = note
        self.captured: dict[tuple, list[_Captured] | _NotReplayed] = {}
        self.replays = 0
        _watch_registrations()

    def __deepcopy__(self, memo):
        """A copy replays nothing yet: graphs hold the original's addresses."""
        return GraphReplay(copy.deepcopy(self.module, memo), self.code, self.pool,
                           copy.deepcopy(self.capture_guard, memo), copy.deepcopy(self.note, memo))

    def forward(self, *args, **kwargs):
        return self.code(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced by an outer torch.compile: its graph, not ours
            return self.forward(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        key = call_key(flat, spec)
        if key is None or not replay_allowed(flat):
            return self.forward(*args, **kwargs)
        kept = self.captured.get(key)
        if isinstance(kept, _NotReplayed):
            self._note(kept.reason)
            return self.forward(*args, **kwargs)
        for entry in kept or ():
            if entry.state_moved(self.module):
                kept = None  # parameters moved: this key's graphs read them where they were
                break
            if entry.accepts(flat, args, kwargs):
                return self._replay(entry, flat)
        return self._first_call(key, kept or [], flat, spec, args, kwargs)  # (borrows only when kept is empty)

    def _replay(self, entry: _Captured, flat: list):
        for static, value in zip(entry.static_inputs, flat):
            if isinstance(value, torch.Tensor) and value.data_ptr() != static.data_ptr():
                static.copy_(value)
        entry.graph.replay()
        self.replays += 1
        return entry.static_outputs

    def _first_call(self, key: tuple, kept: list, flat: list, spec, args: tuple, kwargs: dict):
        """The call itself runs the forward (for a Dynamo block: Dynamo's guards, maybe a compile);
        then, if nothing says otherwise, the forward is captured for this key and replayed."""
        versions = _versions(flat)
        out = self.forward(*args, **kwargs)
        reason = changed_by_call(flat, spec, versions, args, kwargs)
        if reason is None:
            try:
                entry = self._capture(flat, spec, args, kwargs, borrow=not kept)
            except Exception as exc:  # noqa: BLE001 - not capturable (a host sync, ...): runs as is from now on
                entry = f"its capture failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
            if isinstance(entry, _Captured):
                self.captured[key] = [entry, *kept][:MAX_CAPTURES]
                return self._replay(entry, flat)
            reason = entry
        self.captured[key] = _NotReplayed(f"not replayed as a CUDA graph ({reason}): runs as is")
        self._note(self.captured[key].reason)
        return out

    def _capture(self, flat: list, spec, args: tuple, kwargs: dict, borrow: bool) -> _Captured | str:
        """Capture the forward on static inputs (``borrow``: reading other graphs' outputs in place)."""
        pool = self.pool
        borrowed = [borrow and isinstance(v, torch.Tensor) and pool is not None and v in pool.outputs for v in flat]
        statics: dict[int, Any] = {}  # id -> static copy: one tensor passed twice stays one buffer
        for value, borrowed_here in zip(flat, borrowed):
            if id(value) not in statics:
                statics[id(value)] = value if borrowed_here else _static_copy(value)
        static_inputs = [statics[id(value)] for value in flat]
        static_args, static_kwargs = tree_unflatten(static_inputs, spec)
        side = _capture_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(*static_args, **static_kwargs)  # cuBLAS keeps a workspace per stream: made here
        torch.cuda.current_stream().wait_stream(side)
        graph, caller = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=pool.handle if pool is not None else None, stream=side):
                static_outputs = self.forward(*static_args, **static_kwargs)
        finally:
            torch.cuda.set_stream(caller)  # a failed capture_end leaves torch.cuda.graph's stream entered
        check = None
        if self.capture_guard is not None:
            check = self.capture_guard(args, kwargs, static_args, static_kwargs)
            if isinstance(check, str):
                return check
        if pool is not None:
            for value in tree_flatten(static_outputs)[0]:
                if isinstance(value, torch.Tensor):
                    pool.outputs[value] = True
        state = _state_of(self.module)
        return _Captured(graph, static_inputs, borrowed, static_outputs, check, GlobalStateGuard(),
                         torch.is_inference_mode_enabled(), state,
                         [t.data_ptr() for t in state], _REGISTRATIONS[0])

    def _note(self, reason: str) -> None:
        if self.note is not None:
            self.note(reason)


@functools.cache
def _capture_stream(device: int) -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture: cuBLAS keeps a workspace
    (32 MiB on Hopper) per stream it ran on, so a new stream per capture would add one each."""
    return torch.cuda.Stream(device)


def _static_copy(value):
    if not isinstance(value, torch.Tensor):
        return value
    static = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    static.copy_(value)
    return static


def call_key(flat: list, spec) -> tuple | None:
    """What a capture is specialised on, as a hashable key, for the leaves ``flat`` of a call's
    ``(args, kwargs)`` and their structure ``spec`` (which keys a dict argument holds, None where
    an optional input was left out): per tensor its shape, strides, dtype, device, requires_grad
    and which earlier argument it is the same tensor as; per other value its type and value.
    None (no replay) for a tensor subclass, an unhashable value or a NaN. Pure: needs no CUDA."""
    parts, first = [spec], {}
    for index, value in enumerate(flat):
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor:
                return None  # a subclass (a Parameter, a wrapper tensor) may dispatch differently
            parts.append((tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad,
                          first.setdefault(id(value), index)))
        else:
            try:
                hash(value)
            except TypeError:
                return None
            if isinstance(value, float) and math.isnan(value):
                return None  # never equal to itself: every call would capture again
            parts.append((type(value), value))
    return tuple(parts)


def replay_allowed(flat: list) -> bool:
    """Whether a call with these leaves may replay: its tensors are all on the current CUDA device
    (graphs are captured and replayed on its streams), :func:`state_allows_replay`, and no stream
    is capturing (this call is part of a larger capture)."""
    devices = {v.device for v in flat if isinstance(v, torch.Tensor)}
    if len(devices) != 1:
        return False
    device = next(iter(devices))
    return (device.type == "cuda" and device.index == torch.cuda.current_device() and state_allows_replay()
            and not torch.cuda.is_current_stream_capturing())


def state_allows_replay() -> bool:
    """Autograd is off and no torch function or dispatch mode is active (a mode would see the
    ops of a forward run as is, never those of a replay)."""
    return (not torch.is_grad_enabled() and not torch._C._len_torch_function_stack()
            and not torch._C._len_torch_dispatch_stack())


def changed_by_call(flat: list, spec, versions: list[int], args: tuple, kwargs: dict) -> str | None:
    """Why a call whose arguments flattened to ``flat``/``spec`` (tensor versions ``versions``)
    before it ran cannot be replayed, judging by its arguments after it ran: it changed an input
    tensor in place, or a list or dict argument (a replay would do neither). None if neither."""
    after, after_spec = tree_flatten((args, kwargs))
    if after_spec != spec or any(a is not b for a, b in zip(after, flat)):
        return "its forward changes a list or dict argument"
    if _versions(after) != versions:
        return "its forward changes an input tensor in place"
    return None


def _versions(flat: list) -> list[int]:
    return [v._version for v in flat if isinstance(v, torch.Tensor)]


@contextlib.contextmanager
def replay_paused(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s optimized modules without graph replay inside this context (to compare
    replay against plain execution without a second copy of the model)."""
    forwards = [m.__dict__["forward"] for m in model.modules() if getattr(m.__dict__.get("forward"), "graphs", None)]
    saved = [f.graphs for f in forwards]
    for f in forwards:
        f.graphs = None
    try:
        yield
    finally:
        for f, graphs in zip(forwards, saved):
            f.graphs = graphs


def new_pool() -> ReplayPool | None:
    """A memory pool shared by one model's graphs (None where CUDA is unavailable)."""
    return ReplayPool() if torch.cuda.is_available() else None
