"""``torch.compile(model, backend="fusion_pass")``: rewrite each Dynamo graph with the same
pattern families, then hand it to an inner compiler.

Dynamo graphs are whole-model graphs (parameters arrive as placeholders, functions and
methods as Dynamo spells them, shapes in ``example_value``), so residual gates chain into
the *next* block's LayerNorm -> scale-shift across block boundaries, and shape guards apply.

The fused ops are ``torch.library.triton_op``s. With ``inductor_launches`` AOTAutograd traces
their bodies, so Inductor allocates their outputs and launches their Triton kernels with its own
launcher (a step no longer pays ~40 us of dispatcher per fused call); the price is compile time,
as Inductor analyses and compiles every call site's kernel. Off, the ops stay opaque calls
through the dispatcher. The default is on without CUDA graphs and off with them, where
replaying the graph already removes all host overhead.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
from torch import fx

from fusion_pass.ops.direct import call_directly
from fusion_pass.pipeline import empty_report, fuse_graph, record
from fusion_pass.precompile import dry_run_is_safe, precompiling
from fusion_pass.report import Report

INNER_COMPILERS = ("inductor", "eager", "aot_eager")


class FusionBackend:
    """A ``torch.compile`` backend. ``report`` accumulates what was fused in every graph it
    compiled (Dynamo may hand over several graphs, and more on recompiles)."""

    def __init__(
        self,
        inner: str = "inductor",
        *,
        patterns: Iterable[str] | None = None,
        cudagraphs: bool = False,
        inductor_launches: bool | None = None,
    ):
        if inner not in INNER_COMPILERS:
            raise ValueError(f"inner compiler must be one of {INNER_COMPILERS}, got {inner!r}")
        if cudagraphs and inner != "inductor":
            raise ValueError("cudagraphs=True needs inner='inductor' (it captures Inductor's output)")
        if inductor_launches and inner != "inductor":
            raise ValueError("inductor_launches=True needs inner='inductor'")
        self.inner = inner
        self.cudagraphs = cudagraphs
        self.inductor_launches = inner == "inductor" and (not cudagraphs if inductor_launches is None else inductor_launches)
        from patterns import select  # not at import time: `patterns` imports fusion_pass itself

        self.families = select(patterns)
        self.report: Report = empty_report("backend", self.families)
        self.graphs_compiled = 0

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Callable:
        start = time.perf_counter()
        result = fuse_graph(gm.graph, self.families, path="")
        gm.recompile()
        graph_report = empty_report("backend", self.families)
        record(graph_report, result)
        graph_report.graphs.append(f"dynamo graph {self.graphs_compiled}")
        graph_report.seconds = time.perf_counter() - start
        self.report.merge(graph_report)
        self.graphs_compiled += 1
        return self._compile_inner(gm, example_inputs)

    def _compile_inner(self, gm, example_inputs):
        if self.inner == "eager":
            call_directly(gm.graph)  # the graph runs eagerly: fused ops skip the dispatcher where they can
            gm.recompile()
            if dry_run_is_safe(gm.graph, gm):  # its first call compiles its kernels in parallel first
                return precompiling(gm.forward)
            return gm.forward
        if self.inner == "aot_eager":
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend("aot_eager")(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        patches = {"triton.cudagraphs": True} if self.cudagraphs else {}
        with _decompose_triton_ops(self.inductor_launches):  # AOTAutograd traces inside compile_fx
            return compile_fx(gm, example_inputs, config_patches=patches)


def _decompose_triton_ops(enabled: bool) -> contextlib.AbstractContextManager:
    """Whether AOTAutograd traces into ``triton_op`` bodies (PyTorch's default: it does), as
    ``torch._functorch.config.decompose_custom_triton_ops``; where this PyTorch lacks the
    switch, its default holds."""
    config = torch._functorch.config
    if not hasattr(config, "decompose_custom_triton_ops"):
        return contextlib.nullcontext()
    return config.patch(decompose_custom_triton_ops=enabled)


def make_backend(
    inner: str = "inductor",
    *,
    patterns: Iterable[str] | None = None,
    cudagraphs: bool = False,
    inductor_launches: bool | None = None,
) -> FusionBackend:
    """``torch.compile(model, backend=fusion_pass.backend(inner="eager"))``; keep the object
    to read ``.report`` after the first call. ``inductor_launches``: see the module docstring
    (default: ``not cudagraphs``)."""
    return FusionBackend(inner, patterns=patterns, cudagraphs=cudagraphs, inductor_launches=inductor_launches)


NAME = "fusion_pass"
_registered = None


def fusion_pass_backend(gm: fx.GraphModule, example_inputs):
    """The backend registered as ``"fusion_pass"``: the default inner compiler; its report is
    :func:`last_report`."""
    global _registered
    if _registered is None:
        _registered = make_backend()
    return _registered(gm, example_inputs)


def last_report() -> Report | None:
    """What the registered ``"fusion_pass"`` backend fused so far in this process."""
    return None if _registered is None else _registered.report


def _register_by_name() -> None:
    """Make ``backend="fusion_pass"`` resolve to :func:`fusion_pass_backend`, exactly once.

    An installed package declares the name as an entry point (``torch_dynamo_backends`` in
    pyproject.toml): Dynamo imports this module on the first lookup of the name and registers
    the function itself, so registering here too would be a duplicate (Dynamo asserts). Only
    where no entry point declares the name (a source tree on ``sys.path``, not pip-installed)
    does importing this module register it.
    """
    from torch._dynamo import list_backends, register_backend

    if NAME not in list_backends(exclude_tags=()):  # entry points and names registered so far
        register_backend(fusion_pass_backend, name=NAME)


_register_by_name()
