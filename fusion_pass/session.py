"""What ``optimize()`` did to one model, kept true while the model changes afterwards.

A :class:`Session` lives on the optimized model (``model._fusion_pass_report``). It runs the
pipeline on a subtree (capture -> fuse -> install -> arm), and it is what an installed
forward calls back when its check fails:

- :meth:`changed`: the captured subtree changed (``snapshot.py``: LoRA injected or merged, a
  processor swapped, a hook added, ``eps`` rebound, ``train()``...). The module's forwards in
  that subtree are removed and the subtree is captured again as it is now, on this very call
  (a LoRA-adapted model is optimized again, its sites fused again). After
  ``MAX_RECAPTURES`` changes of one module it stays uncaptured (original forward; its
  children are captured on their own, so a root's blocks stay fused), said in
  the report. A stale graph never runs.
- :meth:`recapture_for_call` / :meth:`capture_on_call`: a call passes its arguments unlike the
  captured call (``guards.CallSignature``), or a module with optional parameters runs for the
  first time: the module is captured for this call's argument pattern.
- :meth:`reshape`: a graph captured at a call's shapes (``shapes.py``: a root forward that
  computes with shapes) gets tensors of other shapes: that module alone is captured again at
  them (its blocks stay installed); the graphs of its last ``MAX_PATTERNS`` shapes are kept and
  switched between; after ``MAX_RECAPTURES`` captures, a call at yet other shapes runs the
  original forward (the kept graphs and the blocks stay fused).
- :meth:`fell_back`: one call ran the original forward because it broke a metadata assumption
  (``guards.py``) or a Dynamo-compiled block met hooks (``regional.py``); counted per module and
  reason.

Why re-capture rather than only fall back: a model adapted after ``optimize()`` (LoRA, a new
processor) is the model users run from then on; capturing it again costs what ``optimize()``
cost (0.8 s for Hunyuan3D-2 here), once per change, and keeps it fused.

:meth:`report` assembles the current :class:`~fusion_pass.report.Report` from the graphs
installed now, so it always describes what runs.
"""
from __future__ import annotations

import contextlib
import gc
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from fusion_pass.capture import capture
from fusion_pass.guards import GuardFailed, describe_guard, guards_in
from fusion_pass.install import DeferredForward, alias_weight, install, is_installed, uninstall
from fusion_pass.packing import pack_parameters
from fusion_pass.match import PatternFamily
from fusion_pass.pipeline import empty_report, fuse_graph, record
from fusion_pass.report import Report

#: Re-captures of one module after which it keeps its original forward (a model changed on
#: every call would otherwise pay a capture per call).
MAX_RECAPTURES = 8
#: Argument patterns whose graphs are kept per module (a caller alternating optional inputs
#: switches between them without capturing again).
MAX_PATTERNS = 4


class Session:
    """The installed forwards of one model, what they fused and hold, and what failed since."""

    def __init__(self, families: Sequence[PatternFamily], pool=None):
        self.begin(families, pool)

    def begin(self, families: Sequence[PatternFamily], pool=None) -> None:
        """Start a new ``optimize`` run's record (the installed forwards of earlier runs keep
        reporting here)."""
        self.families, self.pool = tuple(families), pool
        self.graphs: dict[str, Report] = {}  # module path -> what its installed graph fused and holds
        self.uncaptured: list[tuple[str, str]] = []
        self.uncaptured_errors: dict[str, str] = {}  # path -> the exception (``--json``)
        self.already_optimized: list[str] = []
        self.fallbacks: Counter = Counter()  # (path, reason) -> calls
        self.recaptures: Counter = Counter()  # path -> re-captures after a change
        self.regional: dict = {}  # path -> RegionalForward (Dynamo, compiled on first call)
        self.deferred: dict = {}  # path -> DeferredForward (FX, captured on first call)
        self.patterns: dict = {}  # path -> [_Pattern]: what was installed for its other argument patterns
        self.class_compiles: dict = {}  # block class -> its regional.ClassCompile
        self.shapes: dict = {}  # path -> [(FusedForward, Report)]: graphs captured at other shapes, newest first
        self.seconds = 0.0

    def optimize(self, module: nn.Module, path: str = "", call: tuple[tuple, dict] | None = None,
                 in_container: bool = False, refuse: str | None = None) -> None:
        """Capture, fuse and install every capturable module under ``module`` (at ``path``;
        ``module`` for the argument pattern of ``call``; ``module`` itself not when ``refuse``
        says why), then arm their change guards."""
        from fusion_pass.regional import install_regional

        with _gc_paused():
            self._optimize(module, path, call, in_container, refuse, install_regional)

    def _optimize(self, module, path, call, in_container, refuse, install_regional) -> None:
        start = time.perf_counter()
        captured = capture(module, skip=is_installed, path=path, call=call, in_container=in_container, refuse=refuse)
        self.already_optimized.extend(p for p in captured.skipped if p not in self.graphs)  # (not ours)
        self.uncaptured.extend((u.path, u.reason) for u in captured.uncaptured)
        self.uncaptured_errors.update((u.path, u.error) for u in captured.uncaptured)
        installed = []
        for graph in captured.graphs:
            result = fuse_graph(graph.graph, self.families, root=graph.module, path=graph.path)
            fragment = empty_report("optimize", self.families)
            record(fragment, result)
            if not result.matches:  # not installed (the original forward runs); its near-misses are reported
                self.graphs[graph.path] = fragment
                continue
            fragment.graphs.append(graph.path or "<root>")
            fragment.assumptions.extend((graph.path, describe_guard(g)) for g in guards_in(graph.graph))
            if graph.signature.shaped is None:
                fragment.assumptions.extend((graph.path, held.describe()) for held in graph.metadata)
            else:  # one read per parameter/buffer and attribute: said in one line
                tensors = len({(held.owner, held.name) for held in graph.metadata})
                fragment.assumptions.append((graph.path, f"captured at the call's shapes: dtype, device and shape of "
                                                         f"its {tensors} parameters and buffers as then"))
            installed.append((install(graph, self.pool, self), fragment))
            for match in result.matches:
                for owner, attr in match.weight_owners:
                    alias_weight(graph.module.get_submodule(owner), attr)
                for paths in match.pack:
                    pack_parameters(graph.module, paths)
        for region in captured.deferred:
            self.deferred[region.path] = region.module.forward = DeferredForward(region.module, region.path,
                                                                                   region.in_container, self)
        for region in captured.regional:
            forward = install_regional(region, self)
            self.regional[region.path] = forward
            installed.append((forward, empty_report("optimize", self.families)))
        for forward, fragment in installed:  # armed last: installing changes the modules' __dict__
            guard = forward.arm()
            fragment.guards.extend([(forward.path, forward.describe_signature()), (forward.path, guard.summary())])
            replay = forward.describe_replay()
            if replay is not None:
                fragment.guards.append((forward.path, replay))
            self.graphs[forward.path] = fragment
        self.seconds += time.perf_counter() - start

    def changed(self, forward, args, kwargs):
        """``forward``'s subtree changed: capture it again (or give it back its original
        forward), record why, and answer this call."""
        self.patterns = {p: kept for p, kept in self.patterns.items() if not _under(forward.path, p)}
        self.shapes = {p: kept for p, kept in self.shapes.items() if not _under(forward.path, p)}
        return self._recapture(forward, forward.guard.describe(), args, kwargs, call=None)

    def capture_on_call(self, deferred, args, kwargs):
        """First call of a module captured on its first call: capture it for this call's pattern."""
        module, path = deferred.module, deferred.path
        del module.forward
        self.deferred.pop(path, None)
        self.optimize(module, path, (args, kwargs), deferred.in_container)
        return module.forward(*args, **kwargs)

    def recapture_for_call(self, forward, reason: str, args, kwargs):
        """A call passes its arguments unlike the captured one (``pe`` given, ``return_dict``
        changed): put back what was captured for this call's pattern before, if anything (up to
        ``MAX_PATTERNS`` per module are kept), else capture the module for it; answer the call."""
        module, path = forward.module, forward.path
        if forward.signature.shaped is not None and forward.signature.same_pattern(args, kwargs):
            return self.reshape(forward, reason, args, kwargs)
        kept = self.patterns.setdefault(path, [])
        kept.insert(0, _Pattern.take(self, module, path, forward))
        del kept[MAX_PATTERNS:]
        for pattern in kept[1:]:
            if pattern.accepts(args, kwargs):
                kept.remove(pattern)
                uninstall(module)
                self._drop(path)
                pattern.put(self)
                self.fallbacks[(path, "switched to the graph captured for this argument pattern")] += 1
                return module.forward(*args, **kwargs)
        return self._recapture(forward, reason, args, kwargs, call=(args, kwargs))

    def reshape(self, forward, reason: str, args, kwargs):
        """A graph captured at a call's shapes meets other shapes: put back its graph for these
        shapes if one is kept, else capture the module alone again at them (its installed
        submodules stay), up to ``MAX_RECAPTURES`` times; a call whose shapes get no graph runs
        the original forward, and the graph installed before it stays. Answers the call."""
        module, path = forward.module, forward.path
        current = (forward, self.graphs.get(path))
        kept = self.shapes.setdefault(path, [])
        for i, (other, fragment) in enumerate(kept):
            try:
                other.signature.required_values(args, kwargs)
            except GuardFailed:
                continue
            kept[i] = current
            module.forward, self.graphs[path] = other, fragment
            self.fell_back(path, "switched to the graph captured at this call's shapes")
            return module.forward(*args, **kwargs)
        if self.recaptures[path] >= MAX_RECAPTURES:
            self.fell_back(path, f"original forward for calls at new shapes (captured at {MAX_RECAPTURES} shapes "
                                 f"already; the graphs of the last {MAX_PATTERNS} stay): {reason}")
            return type(module).forward(module, *args, **kwargs)
        self.recaptures[path] += 1
        del module.forward
        self.graphs.pop(path, None)
        self.optimize(module, path, (args, kwargs), forward.in_container)
        if not is_installed(module):  # not capturable at these shapes (the original may raise too)
            module.forward, self.graphs[path] = current
            self.uncaptured = [(p, r) for p, r in self.uncaptured if p != path]
            self.uncaptured_errors.pop(path, None)
            self.fell_back(path, f"original forward for this call: no graph at its shapes ({reason})")
            return type(module).forward(module, *args, **kwargs)
        kept.insert(0, current)
        del kept[MAX_PATTERNS - 1:]  # with the one installed now, MAX_PATTERNS shapes
        self.fell_back(path, f"captured again at this call's shapes ({reason})")
        return module.forward(*args, **kwargs)

    def _recapture(self, forward, reason: str, args, kwargs, call):
        module, path = forward.module, forward.path
        uninstall(module)
        self._drop(path)
        if self.recaptures[path] < MAX_RECAPTURES:
            self.recaptures[path] += 1
            self.fallbacks[(path, f"re-captured after: {reason}")] += 1
            self.optimize(module, path, call, forward.in_container)
        else:  # the module keeps its original forward; what it calls is captured again
            self.fallbacks[(path, f"original forward from now on (changed {MAX_RECAPTURES} times); last: {reason}")] += 1
            self.optimize(module, path, None, forward.in_container,
                          refuse=f"changed {MAX_RECAPTURES} times after optimize(): its original forward runs")
        return module.forward(*args, **kwargs)

    def regional_ran(self, forward) -> None:
        """A Dynamo-compiled block ran a graph: its fused sites are now known."""
        fragment = forward.fragment()
        before = self.graphs[forward.path].guards if forward.path in self.graphs else []
        fragment.guards = [g for g in before if not g[1].startswith("Dynamo guards")] + fragment.guards
        self.graphs[forward.path] = fragment

    def fell_back(self, path: str, reason: str) -> None:
        self.fallbacks[(path, reason)] += 1

    def report(self) -> Report:
        report = empty_report("optimize", self.families)
        for fragment in self.graphs.values():
            report.merge(fragment)
        report.uncaptured.extend(self.uncaptured)
        report.uncaptured_errors.update(self.uncaptured_errors)
        report.already_optimized.extend(self.already_optimized)
        report.fallbacks.extend((path, reason, n) for (path, reason), n in self.fallbacks.items())
        for compiled in self.class_compiles.values():
            if compiled.limit_reached():
                report.fallbacks.append((compiled.cls.__name__, f"Dynamo's recompile limit reached ({len(compiled.graph_reports)} "
                                         "graphs): calls needing another variant run the original forward", 0))
        report.pending.extend((path, "compiled by Dynamo on its first call") for path, forward in self.regional.items()
                              if forward.graph_index is None and path in self.graphs)
        report.pending.extend((path, "captured on its first call (its forward has optional parameters)")
                              for path in self.deferred)
        report.seconds = self.seconds
        return report

    def _drop(self, path: str) -> None:
        self.graphs = {p: r for p, r in self.graphs.items() if not _under(path, p)}
        self.uncaptured = [(p, r) for p, r in self.uncaptured if not _under(path, p)]
        self.regional = {p: f for p, f in self.regional.items() if not _under(path, p)}
        self.deferred = {p: f for p, f in self.deferred.items() if not _under(path, p)}


def _under(path: str, p: str) -> bool:
    """Whether module path ``p`` is ``path`` or below it."""
    return not path or p == path or p.startswith(path + ".")


@dataclass
class _Pattern:
    """What was installed under one module for one argument pattern of its calls."""

    forward: object  # the module's FusedForward: its signature says which calls it takes
    installed: list  # (module, installed forward) under it
    graphs: dict
    uncaptured: list
    regional: dict
    deferred: dict

    @classmethod
    def take(cls, session: Session, module: nn.Module, path: str, forward) -> _Pattern:
        def mine(items: dict) -> dict:
            return {p: v for p, v in items.items() if _under(path, p)}

        return cls(forward, [(m, m.__dict__["forward"]) for m in module.modules() if is_installed(m)],
                   mine(session.graphs), [(p, r) for p, r in session.uncaptured if _under(path, p)],
                   mine(session.regional), mine(session.deferred))

    def accepts(self, args, kwargs) -> bool:
        try:
            self.forward.signature.required_values(args, kwargs)
        except GuardFailed:
            return False
        return True

    def put(self, session: Session) -> None:
        """Install it again (its guards, armed when it was captured, still check the subtree)."""
        for module, forward in self.installed:
            module.forward = forward
        session.graphs.update(self.graphs)
        session.uncaptured.extend(self.uncaptured)
        session.regional.update(self.regional)
        session.deferred.update(self.deferred)


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off for the duration (then back on if it was on): a
    capture makes tens of thousands of FX objects, and the collections they trigger cost 13 % of
    Hunyuan3D-2's ``optimize()``, the collections left for after it included (0.94 -> 0.82 s on the
    2-core CPU, docs/bench/run24-session7). Nested calls leave it to the outermost."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
