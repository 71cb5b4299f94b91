"""Stage 5, run: make a module execute its rewritten graph, in place, without touching its state.

``install`` compiles the rewritten graph to Python with the module itself as ``self``
(FX code generation) and sets it as the module's *instance* ``forward``; fused ops are called
through ``fusion_pass.ops.direct`` (their body without the dispatcher, where nothing needs it). Nothing else
changes: the module tree, parameters (same objects), buffers and ``state_dict()`` keys stay,
and the code reads parameters live, so ``load_state_dict``, ``.to()``, ``.half()`` and
optimizers keep working. ``deepcopy`` copies the installed forward bound to the copy.

The graph was specialised to the module's ``training`` flag at capture; when the flag
differs at call time, or a call breaks an assumption the graph was captured under
(``guards.py``), the original forward runs instead (exact fallback).

Norm modules whose weight parameter is named ``scale`` (and that have no ``weight``) get
a read-only ``weight`` property aliasing it, through a cached subclass of their own class
(``isinstance`` still holds; no state_dict key is added). ``restore`` undoes both.
"""
from __future__ import annotations

from torch import nn

from fusion_pass.capture import CapturedGraph
from fusion_pass.ops.direct import call_directly
from fusion_pass.cuda_graphs import GraphReplay
from fusion_pass.guards import GuardFailed


class FusedForward:
    """The installed forward: runs the rewritten graph code with ``module`` as ``self``,
    through CUDA-graph replay when ``graphs`` is set (see ``cuda_graphs.py``)."""

    def __init__(self, module: nn.Module, code, training: bool, source: str, graphs: GraphReplay | None = None):
        self.module = module
        self.code = code
        self.training = training
        self.source = source  # generated Python, for debugging (FUSION_PASS_DUMP)
        self.graphs = graphs

    def __call__(self, *args, **kwargs):
        module = self.module
        if module.training != self.training:
            return type(module).forward(module, *args, **kwargs)
        try:
            if self.graphs is not None:
                return self.graphs(*args, **kwargs)
            return self.code(module, *args, **kwargs)
        except GuardFailed:
            return type(module).forward(module, *args, **kwargs)


def is_installed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), FusedForward)


def install(captured: CapturedGraph, graph_pool=None) -> FusedForward:
    """Set ``captured.module.forward`` to the code of ``captured.graph``; with a
    ``graph_pool`` (``cuda_graphs.new_pool()``), replayed as CUDA graphs where possible."""
    call_directly(captured.graph)
    code = captured.graph.python_code(root_module="self")
    namespace = dict(code.globals)
    label = captured.path or type(captured.module).__name__
    exec(compile(code.src, f"<fusion_pass {label}>", "exec"), namespace)  # noqa: S102 - FX codegen
    forward = namespace["forward"]
    graphs = GraphReplay(captured.module, forward, graph_pool) if graph_pool is not None else None
    fused = FusedForward(captured.module, forward, captured.training, code.src, graphs)
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


def restore(model: nn.Module) -> int:
    """Undo ``install`` and ``alias_weight`` everywhere in ``model``; returns modules restored."""
    restored = 0
    for module in model.modules():
        if is_installed(module):
            del module.forward
            restored += 1
        base = type(module).__dict__.get("_fusion_pass_base")
        if base is not None:
            module.__class__ = base
    return restored


def graph_of(module: nn.Module) -> str | None:
    """The generated source of an installed module's forward (None when not installed)."""
    fused = module.__dict__.get("forward")
    return fused.source if isinstance(fused, FusedForward) else None

