"""Stage 5, run: make a module execute its rewritten graph, in place, without touching its state.

``install`` compiles the rewritten graph to Python with the module itself as ``self``
(FX code generation) and sets it as the module's *instance* ``forward``; fused ops are called
through ``fusion_pass.ops.direct`` (their body without the dispatcher, where nothing needs it). Nothing else
changes: the module tree, parameters (same objects), buffers and ``state_dict()`` keys stay,
and the code reads parameters live, so ``load_state_dict``, ``.to()``, ``.half()`` and
optimizers keep working. ``deepcopy`` copies the installed forward bound to the copy.

Each call first checks what the graph was specialised on (``snapshot.py``: the captured
subtree is unchanged; ``guards.py``: the arguments and metadata assumptions); see
:class:`FusedForward` for what happens when a check fails.

Norm modules whose weight parameter is named ``scale`` (and that have no ``weight``) get
a read-only ``weight`` property aliasing it, through a cached subclass of their own class
(``isinstance`` still holds; no state_dict key is added). ``restore`` undoes both.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from fusion_pass.capture import CapturedGraph
from fusion_pass.ops.direct import call_directly
from fusion_pass.cuda_graphs import GraphReplay
from fusion_pass.precompile import dry_run_is_safe, precompile
from fusion_pass.guards import ArgumentsDiffer, CallSignature, GuardFailed, HeldMetadata
from fusion_pass.snapshot import SubtreeGuard


ORIGINAL_FORWARDS = [False]  # inside ``original_forwards()``: installed forwards run the module's own forward


@contextlib.contextmanager
def original_forwards():
    """Within the block, every installed forward runs its module's original forward (used to
    run modules on fake tensors while capturing at a call's shapes, ``shapes.py``)."""
    before, ORIGINAL_FORWARDS[0] = ORIGINAL_FORWARDS[0], True
    try:
        yield
    finally:
        ORIGINAL_FORWARDS[0] = before


class InstalledForward:
    """Base of the forwards fusion_pass installs on a module instance (FX graph code here, a
    regional Dynamo compile in ``regional.py``): ``module``, ``path``, ``session``, ``arm()``."""

    in_container = False  # the module is an element of a ModuleList/ModuleDict (a block)

    graphs: GraphReplay | None = None

    def describe_replay(self) -> str | None:
        """What a CUDA-graph replay of this forward is keyed on (None: no replay)."""
        if self.graphs is None:
            return None
        return ("CUDA graph replay on one CUDA device with autograd off, per call key (tensor shapes, strides, "
                "dtypes, aliasing; non-tensor values), captured again when a parameter moved")

    def graph_note(self, reason: str) -> None:
        """A call that could have replayed a CUDA graph ran as is (``GraphReplay``'s ``note``)."""
        if self.session is not None:
            self.session.fell_back(self.path, reason)


class FusedForward(InstalledForward):
    """The installed forward: runs the rewritten graph code with ``module`` as ``self``,
    through CUDA-graph replay when ``graphs`` is set (see ``cuda_graphs.py``).

    Every call checks, in this order: the module subtree is as captured (``guard``, armed by
    :meth:`arm` once the whole model is installed; on a change ``session.changed`` re-captures
    or restores the module and answers the call), the call passes its arguments as the graph
    was traced for (``signature``; else ``session.recapture_for_call`` captures the module for
    this call's pattern), and the graph's ``assume`` nodes hold (else the original forward runs
    for this call, exact, counted by the session)."""

    def __init__(self, module: nn.Module, path: str, code, signature: CallSignature, leaves, source: str,
                 session=None, metadata: tuple[HeldMetadata, ...] = ()):
        self.module = module
        self.path = path
        self.code = code
        self.signature = signature
        self.leaves = tuple(leaves)  # modules the graph calls as modules (not inlined, not guarded inside)
        self.source = source  # generated Python, for debugging (FUSION_PASS_DUMP)
        self.session = session
        self.metadata = metadata  # parameter/buffer metadata the graph was traced with (checked by ``guard``)
        self.guard: SubtreeGuard | None = None
        self.precompile = False  # dry-run the first call to compile its kernels in parallel (precompile.py)

    def arm(self) -> SubtreeGuard:
        """Snapshot the subtree as it is now: from here on, any change is seen by the next call."""
        self.guard = SubtreeGuard(self.module, self.path, self.leaves, self.metadata)
        return self.guard

    def describe_signature(self) -> str:
        return self.signature.describe()

    def __call__(self, *args, **kwargs):
        module = self.module
        if ORIGINAL_FORWARDS[0]:
            return type(module).forward(module, *args, **kwargs)
        if (self.guard is None or not self.guard.holds()) and not torch.compiler.is_compiling():
            if self.session is None or self.guard is None:
                return type(module).forward(module, *args, **kwargs)
            return self.session.changed(self, args, kwargs)  # (under torch.compile: Dynamo's guards instead)
        try:
            values = self.signature.required_values(args, kwargs)
        except ArgumentsDiffer as differ:
            if self.session is None:
                return type(module).forward(module, *args, **kwargs)
            return self.session.recapture_for_call(self, str(differ), args, kwargs)
        try:
            if self.precompile:
                self.precompile = False
                precompile(lambda: self.code(module, *values), values)
            if self.graphs is not None:
                return self.graphs(*values)
            return self.code(module, *values)
        except GuardFailed as failed:
            if self.session is not None:
                self.session.fell_back(self.path, str(failed))
            return type(module).forward(module, *args, **kwargs)


class DeferredForward(InstalledForward):
    """Captures its module on the first call, for that call's argument pattern (a forward
    with optional parameters: which ones a caller passes is known only then), then answers
    the call through whatever got installed."""

    def __init__(self, module: nn.Module, path: str, in_container: bool, session):
        self.module, self.path, self.in_container, self.session = module, path, in_container, session

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or ORIGINAL_FORWARDS[0]:  # inside an outer torch.compile: Dynamo traces the original
            return type(self.module).forward(self.module, *args, **kwargs)
        return self.session.capture_on_call(self, args, kwargs)


def is_installed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), InstalledForward)


def install(captured: CapturedGraph, graph_pool=None, session=None) -> FusedForward:
    """Set ``captured.module.forward`` to the code of ``captured.graph``; with a
    ``graph_pool`` (``cuda_graphs.new_pool()``, a ``ReplayPool``), replayed as CUDA graphs where possible:
    only a graph that calls no module (a replay would run a called module's kernels as captured,
    past its own forward, hooks and guards; a diffusers root calls its blocks, which replay themselves).
    The caller arms it (:meth:`FusedForward.arm`) once every module is installed."""
    call_directly(captured.graph)
    code = captured.graph.python_code(root_module="self")
    namespace = dict(code.globals)
    label = captured.path or type(captured.module).__name__
    exec(compile(code.src, f"<fusion_pass {label}>", "exec"), namespace)  # noqa: S102 - FX codegen
    forward = namespace["forward"]
    called = sorted({n.target for n in captured.graph.nodes if n.op == "call_module"})
    fused = FusedForward(captured.module, captured.path, forward, captured.signature, called, code.src, session,
                         captured.metadata)
    if graph_pool is not None and not called:  # a replay would skip the called modules' own checks
        fused.graphs = GraphReplay(captured.module, forward, graph_pool, note=fused.graph_note)
    fused.in_container = captured.in_container
    fused.precompile = dry_run_is_safe(captured.graph, captured.module)
    captured.module.forward = fused
    return fused


def alias_weight(owner: nn.Module, attr: str) -> bool:
    """Give ``owner`` a ``weight`` property aliasing its parameter ``attr`` (e.g. ``scale``).
    Returns whether an alias was added."""
    if attr == "weight" or hasattr(owner, "weight") or not isinstance(getattr(owner, attr, None), nn.Parameter):
        return False
    owner.__class__ = _aliased_class(type(owner), attr)
    return True


_ALIASED_CLASSES: dict[tuple[type, str], type] = {}  # a cache of generated classes, never mutated by callers


def _aliased_class(cls: type, attr: str) -> type:
    key = (cls, attr)
    if key not in _ALIASED_CLASSES:
        _ALIASED_CLASSES[key] = type(cls.__name__, (cls,), {
            "weight": property(lambda self: getattr(self, attr), doc=f"Alias of the parameter `{attr}`."),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "_fusion_pass_base": cls,
        })
    return _ALIASED_CLASSES[key]


def uninstall(model: nn.Module) -> int:
    """Remove every installed forward in ``model`` (weight aliases stay); returns how many."""
    restored = 0
    for module in model.modules():
        if is_installed(module):
            del module.forward
            restored += 1
    return restored


def restore(model: nn.Module) -> int:
    """Undo ``install`` and ``alias_weight`` everywhere in ``model``; returns modules restored."""
    restored = uninstall(model)
    for module in model.modules():
        base = type(module).__dict__.get("_fusion_pass_base")
        if base is not None:
            module.__class__ = base
    return restored


def graph_of(module: nn.Module) -> str | None:
    """The generated source of an installed module's forward (None when not installed)."""
    fused = module.__dict__.get("forward")
    return fused.source if isinstance(fused, FusedForward) else None

