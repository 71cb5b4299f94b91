"""Run stage, first call: compile a graph's Triton kernels in parallel before it runs them.

On an empty Triton cache (a freshly started machine), each fused kernel specialisation compiles
when the first call reaches it, one after the other. :func:`precompile` runs the graph once
first as a *dry run*: every fused op allocates its output and, instead of launching its kernel,
hands the launch to ``JITFunction.warmup`` inside Triton's ``AsyncCompileMode`` with a thread
pool, so the compiles of all the call's kernels are submitted together and awaited once; each
kernel loads (binary and launcher, which Triton otherwise does at its first launch) in the job
that compiled it, as soon as it is compiled; the real call finds them ready. Everything else in
the graph (GEMMs, attention) runs as usual on values the dry run leaves unwritten, whose results
are discarded.

Exactness: the dry run must leave no trace. It runs only for graphs that write in place into
nothing but tensors they made themselves (``aliasing.written_aliases``: no input, parameter or
buffer can change), on CUDA, with autograd off and the random state restored afterwards; an
exception inside it is dropped (the real call then compiles what is left as before). Where
Triton has no ``AsyncCompileMode`` (before 3.5) it does nothing. The blocks Dynamo compiles with
the eager inner compiler (``regional.py``) take the same dry run on their graph's first call
(:func:`precompiling`).

Before that, while ``optimize()`` captures (pure Python), :func:`warm_triton` does Triton's own
first-use work in a background thread: its CUDA driver object, whose utility module Triton builds
with the host C compiler on an empty cache, and the hash of Triton's sources that keys every
compile (``triton_key``). ``precompile`` waits for it before compiling. A first kernel launch made
without a dry run can meet the thread still working: Triton then makes a second driver object,
the same as the first (its ``DriverConfig`` keeps one), at worst repeating that work.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import fx, nn

from fusion_pass.aliasing import written_aliases
from fusion_pass.ops.launch import dry_run

ENABLED = os.environ.get("FUSION_PASS_PRECOMPILE", "1") != "0"
"""Off with ``FUSION_PASS_PRECOMPILE=0`` (or by setting this to False)."""

THREADS = min(16, os.cpu_count() or 1)


#: Ops that read tensor *values* as indices, sizes or Python numbers: on the dry run's unwritten
#: values they could index out of bounds (a device-side assert) or ask for absurd sizes, so a graph
#: holding any of them gets no dry run.
VALUE_READING = frozenset({
    "item", "tolist", "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount",
    "histc", "multinomial", "repeat_interleave", "searchsorted", "bucketize", "gather", "scatter", "scatter_add",
    "scatter_reduce", "index_select", "index_add", "index_copy", "index_fill", "index_put", "take",
    "take_along_dim", "embedding", "embedding_bag", "one_hot", "__index__", "__int__", "__float__", "__bool__",
    # Dynamo spells a tensor `assert` as these (a failed device-side assert breaks the CUDA context)
    "_assert", "_assert_async", "_assert_scalar", "nll_loss", "nll_loss_nd", "cross_entropy", "ctc_loss",
    "multi_margin_loss", "multilabel_margin_loss",
})

#: Names of calls that change process state a Dynamo graph can hold (grad mode, autocast, streams,
#: devices, random seeds): a dry run stopped by an exception between such a call and its undoing
#: would leave that state changed for the real call, so a graph holding any gets no dry run.
_STATE_CHANGING = ("set_", "_enter", "_exit", "autocast", "seed", "rng_state")


def dry_run_is_safe(graph: fx.Graph, root: nn.Module) -> bool:
    """Whether running ``graph`` with garbage in its fused ops' outputs can change nothing
    outside it and cannot fail on values: every in-place write lands in a tensor the graph made
    itself, no op reads values as indices or sizes (``VALUE_READING``, tensor subscripts), none
    changes grad mode, autocast or other process state (``_STATE_CHANGING``: Dynamo graphs)."""
    aliases = written_aliases(graph, root)
    if aliases is None or any(node.op in ("placeholder", "get_attr") for node in aliases):
        return False
    return not any(_reads_values(node) or _changes_state(node) for node in graph.nodes)


def _changes_state(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    return any(part in name for part in _STATE_CHANGING)


def _reads_values(node: fx.Node) -> bool:
    if node.op == "call_module":
        return True  # a module the graph calls whole: its forward is not seen here
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.split(".")[-1].rstrip("_") in VALUE_READING:
        return True
    if name == "getitem" and len(node.args) > 1:  # x[t] with a tensor index
        index = node.args[1]
        return any(isinstance(i, fx.Node) for i in (index if isinstance(index, (tuple, list)) else (index,)))
    return False


_WARM_UP: list[threading.Thread] = []  # the process's one warm-up thread, once started


def warm_triton(module: nn.Module) -> None:
    """Start Triton's first-use work in a background thread, once per process, when ``module``
    holds a CUDA parameter or buffer (see the module docstring)."""
    if _WARM_UP or not ENABLED:
        return
    tensors = (t for part in (module.parameters(), module.buffers()) for t in part)
    if not any(t.is_cuda for t in tensors):
        return
    thread = threading.Thread(target=_warm_triton, name="fusion_pass triton warm-up", daemon=True)
    _WARM_UP.append(thread)
    thread.start()


def _warm_triton() -> None:
    with contextlib.suppress(Exception):
        from triton.runtime.driver import driver

        driver.active  # noqa: B018 - the property creates the driver (and builds its utility module)
    with contextlib.suppress(Exception):
        try:
            from triton.runtime.cache import triton_key
        except ImportError:  # (older Triton)
            from triton.compiler.compiler import triton_key
        triton_key()  # functools.lru_cache'd: every later compile reads it


def wait_for_warm_up() -> None:
    for thread in _WARM_UP:
        thread.join()


def precompile(run: Callable[[], Any], values: tuple) -> None:
    """Dry-run ``run()`` (the graph on the call's ``values``) with its Triton compiles in
    parallel; see the module docstring for when it does nothing."""
    wait_for_warm_up()
    triton_async = _async_compile()
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not (ENABLED and triton_async is not None and tensors and all(t.is_cuda for t in tensors)
            and not torch.is_grad_enabled() and not torch.cuda.is_current_stream_capturing()):
        return  # (inside a CUDA-graph capture the dry run's launches would join the graph)
    if triton_async.active_mode.get() is not None:
        return  # (someone else's: compiles already go where they chose)
    devices = sorted({t.device.index or 0 for t in tensors})
    try:
        with contextlib.suppress(Exception), torch.random.fork_rng(devices=devices):
            with ThreadPoolExecutor(THREADS) as pool:  # (its exit waits for every compile and load)
                loading = _CompileThenLoad(pool, torch.cuda.current_device())
                with _compile_mode(triton_async.AsyncCompileMode, loading), dry_run():
                    run()
    finally:
        # no mode left active (none was before: one whose exit raised, in a Triton that resets it
        # last, would send every later compile of this thread to the closed pool)
        triton_async.active_mode.set(None)


def precompiling(forward: Callable) -> Callable:
    """``forward`` (a Dynamo graph's, run eagerly) whose first call is preceded by a dry run of
    itself (:func:`precompile`); later calls go straight to it."""
    pending = [True]

    def first_call_precompiles(*args):
        if pending:
            pending.clear()
            precompile(lambda: forward(*args), args)
        return forward(*args)

    return first_call_precompiles


class _CompileThenLoad:
    """The executor handed to ``AsyncCompileMode`` (which only calls ``submit``): each job compiles
    a kernel, then, in the same worker, loads its binary and builds its launcher
    (``CompiledKernel._init_handles``, which Triton otherwise does at the kernel's first launch), while
    the other kernels still compile. A failed load is left to the first launch, as without a dry run."""

    def __init__(self, pool: ThreadPoolExecutor, device: int):
        self.pool = pool
        self.device = device

    def submit(self, compile_kernel: Callable[[], Any]):
        return self.pool.submit(self._compile_then_load, compile_kernel)

    def _compile_then_load(self, compile_kernel: Callable[[], Any]):
        kernel = compile_kernel()
        with contextlib.suppress(Exception):
            torch.cuda.set_device(self.device)
            kernel._init_handles()
        return kernel


def _compile_mode(mode, executor):
    """``AsyncCompileMode(executor, ignore_errors=True)``: a kernel that fails to compile leaves the
    mode (and the other kernels) as they are, and the real call meets its error."""
    try:
        return mode(executor, ignore_errors=True)
    except TypeError:  # (a Triton without the option)
        return mode(executor)


def _async_compile():
    """Triton's ``runtime._async_compile`` module (``AsyncCompileMode``, ``active_mode``; Triton 3.5
    and later), or None."""
    try:
        from triton.runtime import _async_compile
    except ImportError:
        return None
    return _async_compile
