"""Optional part of the run stage: replay each optimized module's forward as a CUDA graph.

``optimize(model, cuda_graphs=True)`` wraps every installed forward in a :class:`GraphReplay`.
On a call whose tensors are all on one CUDA device, with autograd off, it captures the
forward once per input signature (shapes, strides, dtypes, device, non-tensor values) and
afterwards replays it: one launch per module instead of dozens, which removes the host
overhead that dominates small models (Hunyuan3D-2mini at 512 latents).

Semantics and invariants:
- Inputs are copied into the graph's static buffers, except when they already are those
  buffers (a block fed by the previous block's output: steady state copies nothing).
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
- Anything else (CPU tensors, autograd on, mixed devices, a capture already in progress)
  runs the forward as is.
All graphs of one model share one memory pool; that is safe because graphs never run
concurrently and every static output is a live tensor the pool cannot hand out again.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

_WARMUP_CALLS = 2  # Triton JIT, cuBLAS workspaces and lazy inits happen outside the capture


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[Any]
    static_outputs: Any
    state: list[torch.Tensor]  # the module's parameters and buffers at capture
    state_ptrs: list[int]
    registrations: int  # _REGISTRATIONS[0] when ``state`` was last taken from the module

    def state_moved(self, module: nn.Module) -> bool:
        if self.registrations != _REGISTRATIONS[0]:
            self.state, self.registrations = _state_of(module), _REGISTRATIONS[0]
        return [t.data_ptr() for t in self.state] != self.state_ptrs


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
    """``code(module, *args)``, captured and replayed per input signature on CUDA."""

    def __init__(self, module: nn.Module, code: Callable, pool):
        self.module = module
        self.code = code
        self.pool = pool
        self.captured: dict[tuple, _Captured] = {}
        _watch_registrations()

    def __deepcopy__(self, memo):
        """A copy replays nothing yet: graphs hold the original's addresses."""
        return GraphReplay(copy.deepcopy(self.module, memo), self.code, self.pool)

    def forward(self, *args, **kwargs):
        return self.code(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        flat, spec = tree_flatten((args, kwargs))
        key = _signature(flat, spec)
        if key is None or torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return self.forward(*args, **kwargs)
        entry = self.captured.get(key)
        if entry is None or entry.state_moved(self.module):
            entry = self.captured[key] = self._capture(flat, spec)
        for static, value in zip(entry.static_inputs, flat):
            if isinstance(value, torch.Tensor) and value.data_ptr() != static.data_ptr():
                static.copy_(value)
        entry.graph.replay()
        return entry.static_outputs

    def _capture(self, flat: list, spec) -> _Captured:
        static_inputs = [_static_copy(v) for v in flat]
        args, kwargs = tree_unflatten(static_inputs, spec)
        side = _capture_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_CALLS):
                self.forward(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            static_outputs = self.forward(*args, **kwargs)
        state = _state_of(self.module)
        return _Captured(graph, static_inputs, static_outputs, state, [t.data_ptr() for t in state], _REGISTRATIONS[0])


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


def _signature(flat: list, spec) -> tuple | None:
    """A hashable description of a call, or None when it cannot be replayed (a CPU tensor,
    tensors on several devices, a non-hashable argument, no tensor at all)."""
    parts, devices = [spec], set()
    for value in flat:
        if isinstance(value, torch.Tensor):
            if not value.is_cuda:
                return None
            devices.add(value.device)
            parts.append((tuple(value.shape), value.stride(), value.dtype, value.device))
        else:
            try:
                hash(value)
            except TypeError:
                return None
            parts.append((type(value), value))
    if len(devices) != 1:
        return None
    return tuple(parts)


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


def new_pool():
    """A memory pool shared by one model's graphs (None where CUDA is unavailable)."""
    return torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
