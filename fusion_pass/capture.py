"""Stage 1, capture: turn the forward of each capturable module of a model into an FX graph.

The model is never edited. For every module, starting at the root, we try
``torch.fx`` symbolic tracing with a tracer that
- treats library tensor functions that FX cannot see through (einops) as leaf calls,
- makes a submodule a leaf when tracing *inside* it fails (for example a forward that
  star-unpacks a proxy), together with every other submodule of its class (one retry per
  failing class, not per instance: a 48-block model is traced 2-3 times, not 50), and retries,
- gives up on a module when its *own* forward cannot be traced (data-dependent control
  flow), and then descends into its children; except a repeated block (an element of a
  ``ModuleList``/``ModuleDict``), which goes to Dynamo instead (:class:`Region`, ``regional.py``);
- waits for the first call of a module whose forward has optional parameters (which of them
  a caller passes is known only then) and traces it for that call's arguments.

What to capture is decided only by what can be captured: no model, class or attribute
names appear here. Each success yields a :class:`CapturedGraph` whose graph refers to
submodules and parameters by their path *relative to that module*, so code generated
from it can run with the module itself as ``self`` (see ``install.py``).

Beyond plain FX, the tracer
- follows a branch on a metadata predicate (``if torch.is_floating_point(t):``) under a
  recorded assumption, checked at run time (``guards.py``);
- reads the metadata of a parameter or buffer the module holds (``self.weight.dtype``,
  ``.device``, ``.shape``, ``.size()``, ``.ndim``, ``.dim()``) as its concrete value (a
  :class:`~fusion_pass.guards.HeldMetadata` specialization, checked on every call by
  ``snapshot.SubtreeGuard``), so diffusers' ``if self.weight.dtype in (torch.float16, ...)``
  traces; buffers are traced as graph reads (``get_attr``) like parameters, never as values;
- keeps tensors a forward builds from Python values alone (``torch.arange(n)``) as
  :class:`~fusion_pass.constants.TensorConstant` nodes held by the graph.

Invariants (relied on by ``install.py`` and the tests):
- tracing leaves every module's attributes exactly as they were: a forward that assigns
  module attributes is refused (the graph would lose that side effect); the global random
  state is left as it was, and a forward that draws random numbers outside the traced
  tensors while building a constant is refused (the draw would be frozen);
- a guard is accepted only where no node before it can modify state, so abandoning a
  call at a failed guard and rerunning the original forward is exact;
- a graph is traced with the module's required arguments only; every optional argument keeps
  its default and a call passing another value runs the original forward
  (:class:`~fusion_pass.guards.CallSignature`);
- a module with hooks is a leaf (its ``__call__`` runs them); global module hooks refuse
  capture. Everything else a graph specialised on in the modules it inlined (plain attributes
  such as ``eps`` and ``training``, submodules, parameters, hooks added later) is checked on
  every call by ``snapshot.SubtreeGuard``, armed at install.
"""
from __future__ import annotations

import bisect
import contextlib
import dis
import functools
import importlib
import math
import operator
import sys
import types
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from fusion_pass import explain, guards
from fusion_pass.guards import CallSignature, HeldMetadata
from fusion_pass.snapshot import global_hooks, has_hooks, same_contents, shallow_copy
from fusion_pass.constants import TensorConstant, constant_node
from fusion_pass.normalize import mutates
from fusion_pass.shapes import ShapedMixin, ShapedProxy, container_elements, traced_values

#: Libraries whose functions FX cannot trace through but which are safe to call as opaque
#: leaf functions (pure tensor-in, tensor-out). Imported lazily: each is optional.
LEAF_FUNCTION_LIBRARIES = ("einops",)


@dataclass
class CapturedGraph:
    """An FX graph of ``module.forward``; targets are relative to ``module``."""

    path: str
    module: nn.Module
    graph: fx.Graph
    signature: CallSignature
    leaf_submodules: tuple[str, ...] = ()
    in_container: bool = False  # an element of a ModuleList/ModuleDict: a block, for Dynamo when FX fails
    metadata: tuple[HeldMetadata, ...] = ()  # parameter/buffer metadata read as values while tracing


@dataclass
class Uncaptured:
    """A module whose own forward could not be traced (its children were tried instead)."""

    path: str
    reason: str  # in the user's terms (``explain.capture_failure``)
    error: str = ""  # the exception, e.g. "TraceError: Proxy object cannot be iterated"


@dataclass
class Region:
    """A module captured on its first call: a block FX could not trace (``reason``), left to
    Dynamo (``regional.py``), or a forward with optional parameters, traced for that call."""

    path: str
    module: nn.Module
    reason: str
    in_container: bool = False


@dataclass
class CaptureResult:
    graphs: list[CapturedGraph] = field(default_factory=list)
    regional: list[Region] = field(default_factory=list)  # blocks FX cannot trace, for Dynamo
    deferred: list[Region] = field(default_factory=list)  # forwards with optional parameters: on their first call
    uncaptured: list[Uncaptured] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _FailedInside(Exception):
    """Tracing failed inside the submodule at ``path`` (relative to the traced root)."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__(f"{path}: {cause}")
        self.path = path
        self.cause = cause


def _leaf_function_modules() -> tuple[ModuleType, ...]:
    modules: list[ModuleType] = [math]
    for name in LEAF_FUNCTION_LIBRARIES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return tuple(modules)


class _LeafOnFailureTracer(fx.Tracer):
    """An FX tracer that reports in which submodule a tracing failure happened."""

    proxy_buffer_attributes = True  # buffers are read by the graph (``get_attr``), not baked as values

    def __init__(self, extra_leaves: set[str], signature: CallSignature):
        super().__init__(autowrap_modules=_leaf_function_modules())
        self.extra_leaves = extra_leaves
        self._counted_chunks: set[fx.Node] = set()  # chunks whose number of pieces is assumed
        self.signature = signature
        self.metadata: dict[tuple[str, str], HeldMetadata] = {}  # (get_attr target, attr) -> value read
        self._parameter_names: tuple = (None, {})  # (root, {id(parameter): qualified name})

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """Trace ``forward`` with placeholders for its required parameters only; the others
        keep their defaults (see :class:`~fusion_pass.guards.CallSignature`)."""
        return super().create_args_for_root(self.signature.traced_forward(root_fn), is_module, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Also a leaf: a module with hooks (its ``__call__`` must run them), one that runs an
        installed fusion_pass forward (a block kept while its root is captured again at new
        shapes, ``session.reshape``) and the modules inside which tracing failed."""
        from fusion_pass.install import InstalledForward

        if module_qualified_name in self.extra_leaves or has_hooks(m) or isinstance(
                vars(m).get("forward"), InstalledForward):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on a guardable metadata predicate follows the assumed value (checked at run
        time by an ``assume`` node); any other branch on a traced value fails as in FX."""
        assumption = guards.assumption_for(obj.node)
        if assumption is None:
            return super().to_bool(obj)
        expected, what = assumption
        self.create_proxy("call_function", guards.assume, (obj, expected, what), {})
        return expected

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op == "get_attr":
            held = _holder(self.root, node.target)
            if held is not None:
                return _HeldTensorProxy(node, self, *held)
        return _PiecesProxy(node, self)

    def read_metadata(self, proxy: _HeldTensorProxy, attr: str):
        """The value of ``attr`` of the parameter/buffer behind ``proxy``, recorded as a
        specialization of the graph (see :class:`~fusion_pass.guards.HeldMetadata`)."""
        value = getattr(proxy.tensors[proxy.name], attr)
        owner, _, name = proxy.node.target.rpartition(".")
        self.metadata.setdefault((proxy.node.target, attr), HeldMetadata(owner, name, attr, value))
        return value

    def pieces(self, obj: fx.Proxy) -> int | None:
        """How many pieces ``obj`` holds when it is a ``chunk(n)`` or a slice of one, under an
        ``assume`` that chunk made ``n`` pieces (recorded once per chunk); None otherwise."""
        found = guards.chunk_count(obj.node)
        if found is None:
            return None
        chunk, n, pieces = found
        if chunk not in self._counted_chunks:
            self._counted_chunks.add(chunk)
            length = self.create_proxy("call_function", len, (self.proxy(chunk),), {})
            equal = self.create_proxy("call_function", operator.eq, (length, n), {})
            stack = list(chunk.meta.get("nn_module_stack", {}).values())
            where = f"{stack[-1][0]}: " if stack and stack[-1][0] else ""
            self.create_proxy("call_function", guards.assume, (equal, True, f"{where}chunk({n}) makes {n} pieces"), {})
        return len(pieces)

    def iter(self, obj: fx.Proxy):
        """Iterating the pieces of a ``chunk(n)`` (or a slice of them) yields one ``getitem``
        proxy per piece (see ``pieces``); iterating anything else fails as in FX."""
        count = self.pieces(obj)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])

    def create_arg(self, a):
        """A tensor that is neither a parameter nor a module attribute (built from Python
        values during the trace) becomes a constant node held by the graph."""
        if (isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter)
                and a not in self.tensor_attrs and not any(a is b for b in self.root.buffers())):
            return constant_node(self.graph, a)
        return super().create_arg(a)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """A parameter read in a forward becomes FX's ``get_attr`` node, found by identity in a
        table made once per trace (FX's own lookup walks ``named_parameters()`` on each read)."""
        if isinstance(attr_val, nn.Parameter):
            if self._parameter_names[0] is not self.root:
                self._parameter_names = (self.root, {id(p): n for n, p in self.root.named_parameters()})
            name = self._parameter_names[1].get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _FailedInside:
            raise
        except Exception as exc:  # noqa: BLE001 - any tracing failure makes `m` a leaf
            raise _FailedInside(path, exc) from exc


class _PiecesProxy(fx.Proxy):
    """A proxy whose ``len()`` is known for the pieces of a ``chunk(n)`` (``f(*pieces)`` asks
    for it before iterating); FX's error for anything else."""

    def __len__(self) -> int:
        count = self.tracer.pieces(self)
        return super().__len__() if count is None else count

    def __iter__(self):
        """FX's ``Proxy.__iter__``: ``a, b = proxy`` (an ``UNPACK_SEQUENCE`` at the caller's
        current instruction) gives one ``proxy[i]`` per name, anything else the tracer's ``iter``.
        The same reading of the caller's bytecode, disassembled once per code object instead of
        on every unpacking (15 % of ``optimize()`` on Hunyuan3D-2, 2-core CPU)."""
        caller = sys._getframe(1)
        offsets, instructions = _instructions(caller.f_code)
        if sys.version_info >= (3, 11):
            index = bisect.bisect_left(offsets, caller.f_lasti)
        else:
            index = caller.f_lasti // 2
        instruction = instructions[index]
        if instruction.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(instruction.argval))
        return self.tracer.iter(self)


@functools.lru_cache(maxsize=512)
def _instructions(code: types.CodeType) -> tuple[list[int], list[dis.Instruction]]:
    """The instructions of ``code`` and their offsets (``dis.get_instructions``)."""
    instructions = list(dis.get_instructions(code))
    return [i.offset for i in instructions], instructions


class _HeldTensorProxy(_PiecesProxy):
    """A parameter or buffer the traced module holds (``tensors[name]``: its owner's
    ``_parameters`` or ``_buffers``). Its metadata reads return the tensor's own values,
    recorded by the tracer (``read_metadata``): Python can then branch on them."""

    def __init__(self, node: fx.Node, tracer: _LeafOnFailureTracer, tensors: dict, name: str):
        super().__init__(node, tracer)
        self.tensors, self.name = tensors, name

    dtype = property(lambda self: self.tracer.read_metadata(self, "dtype"))
    device = property(lambda self: self.tracer.read_metadata(self, "device"))
    shape = property(lambda self: self.tracer.read_metadata(self, "shape"))
    ndim = property(lambda self: self.tracer.read_metadata(self, "ndim"))

    def size(self, dim: int | None = None):
        shape = self.shape
        return shape if dim is None else shape[dim]

    def dim(self) -> int:
        return self.ndim


class _ShapedPiecesProxy(ShapedProxy, _PiecesProxy):
    """A traced tensor of a shaped trace: its metadata reads answer its fake value."""


class _ShapedTracer(ShapedMixin, _LeafOnFailureTracer):
    """The tracer of a capture at a call's shapes (``shapes.py``); blocks are called, not inlined."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.shaped_leaf(m) or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        proxy = super().proxy(node)
        return proxy if isinstance(proxy, _HeldTensorProxy) else _ShapedPiecesProxy(node, self)


def _holder(root: nn.Module, target: str) -> tuple[dict, str] | None:
    """``(owner._parameters or owner._buffers, name)`` for the ``get_attr`` target ``owner.name``."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = root.get_submodule(owner_path)
    except AttributeError:
        return None
    for tensors in (owner._parameters, owner._buffers):
        if isinstance(tensors.get(name), torch.Tensor):
            return tensors, name
    return None


def _trace(module: nn.Module, signature: CallSignature, shaped: tuple | None = None,
           ) -> tuple[fx.Graph, tuple[str, ...], tuple[HeldMetadata, ...]]:
    """Trace ``module``, making failing submodules leaves; returns the graph, the leaves and the
    parameter/buffer metadata the trace read. Raises when the module's own forward is
    untraceable or assigns module attributes (a side effect the graph would lose). With
    ``shaped`` (the traced arguments' tensors of a call), traces at their shapes (``shapes.py``)."""
    leaves: set[str] = set()
    containers = container_elements(module) if shaped is not None else set()
    while True:
        if shaped is None:
            tracer = _LeafOnFailureTracer(leaves, signature)
        else:
            tracer = _ShapedTracer(leaves, signature)
            tracer.init_shapes(shaped, containers)
        before = _attribute_snapshot(module)
        try:
            with _random_state_kept() as drew_random:
                graph = tracer.trace(module)
        except _FailedInside as failure:
            if failure.path in leaves:  # pragma: no cover - defensive: no progress possible
                raise failure.cause
            leaves.update(_same_class(module, failure.path))
            continue
        finally:
            changed = _restore_attributes(module, before)
        if changed:
            raise explain.Refused(f"assigns module attributes ({', '.join(changed)}), which a captured graph would not")
        if drew_random() and any(isinstance(n.target, TensorConstant) for n in graph.nodes):
            raise explain.Refused("draws random numbers into a tensor constant; capturing would freeze them")
        late = _guard_after_side_effects(graph, module)
        if late is not None:
            guard, effect = late
            inside = _innermost_module(guard)
            if inside and inside not in leaves:  # the guard's module called as a leaf: its own forward decides
                leaves.update(_same_class(module, inside))
                continue
            raise explain.Refused(f"has control flow on {guard.args[2]} after {explain.source_expression(effect)}, "
                                  "which may modify state (the original forward could not rerun exactly)")
        metadata = list(tracer.metadata.values())
        if shaped is not None:
            metadata = list(dict.fromkeys(metadata + tracer.parameter_metadata(module)))
        return graph, tuple(sorted(leaves)), tuple(metadata)


def _same_class(module: nn.Module, path: str) -> list[str]:
    """``path`` and the paths of every other submodule of the same class."""
    cls = type(module.get_submodule(path))
    return [path] + [name for name, m in module.named_modules() if type(m) is cls and name != path]


@contextlib.contextmanager
def _random_state_kept():
    """Restore the CPU (and initialised CUDA) random state after the block; yields a function
    telling whether the block drew random numbers."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        start = torch.get_rng_state()
        cuda_start = [torch.cuda.get_rng_state(d) for d in devices]
        changed: list[bool] = []
        try:
            yield lambda: changed[0]
        finally:
            changed.append(not torch.equal(start, torch.get_rng_state()) or any(
                not torch.equal(s, torch.cuda.get_rng_state(d)) for s, d in zip(cuda_start, devices)))


def _guard_after_side_effects(graph: fx.Graph, module: nn.Module) -> tuple[fx.Node, fx.Node] | None:
    """The first ``(guard, node)`` where ``node``, before ``guard``, may modify state (a failed
    guard there could not fall back to the original forward exactly); None when there is none."""
    first_write = None  # one pass: the first guard after the first node that may write
    for node in graph.nodes:
        if first_write is None and mutates(node, module):
            first_write = node
        elif first_write is not None and node.op == "call_function" and node.target is guards.assume:
            return node, first_write
    return None


def _innermost_module(node: fx.Node) -> str:
    """The path of the submodule whose forward created ``node`` ("" for the traced module's own)."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return stack[-1][0] if stack else ""


def _attribute_snapshot(module: nn.Module) -> dict[nn.Module, dict]:
    """Each module's ``__dict__``, and the contents of the plain dicts and lists it holds (a
    cache a forward fills in place: it would keep a proxy or a fake tensor of the trace)."""
    return {m: (dict(vars(m)), {name: (value, shallow_copy(value)) for name, value in vars(m).items()
                                 if type(value) in (dict, list)}) for m in module.modules()}


def _restore_attributes(module: nn.Module, before: dict[nn.Module, tuple[dict, dict]]) -> list[str]:
    """Put every module's ``__dict__`` (and the contents of its dicts and lists) back as it was;
    return the attributes that had changed (tensor constants never become attributes: the
    tracer keeps them in the graph)."""
    changed = []
    for m, (attrs, containers) in before.items():
        current = vars(m)
        for name in set(current) | set(attrs):
            if current.get(name, _MISSING) is not attrs.get(name, _MISSING):
                changed.append(name)
        current.clear()
        current.update(attrs)
        for name, (container, contents) in containers.items():
            if not same_contents(container, contents):
                changed.append(f"{name} (in place)")
                container.clear()
                if isinstance(container, dict):
                    container.update(contents)
                else:
                    container.extend(contents)
    return changed


_MISSING = object()


def capture(model: nn.Module, skip: Callable[[nn.Module], bool] = lambda m: False, path: str = "",
            call: tuple[tuple, dict] | None = None, in_container: bool = False,
            refuse: str | None = None) -> CaptureResult:
    """Capture graphs for ``model``: the whole module when possible, else its children,
    recursively; ``model`` for the argument pattern of ``call`` (``(args, kwargs)``; default:
    its required arguments only, see :class:`~fusion_pass.guards.CallSignature`). Leaf submodules made during a successful trace are captured on their own
    too (their insides may still hold patterns). Modules for which ``skip`` is true (and
    their subtrees) are listed in ``result.skipped`` and not traced."""
    result = CaptureResult()
    if global_hooks():
        result.uncaptured.append(Uncaptured(path, "global module hooks are registered "
                                            f"({', '.join(global_hooks())}); a graph would not call them"))
        return result
    if refuse is not None:  # ``model`` keeps its original forward (``refuse`` says why): its children are tried
        result.uncaptured.append(Uncaptured(path, refuse))
        _capture_children(model, path, result, skip)
        return result
    _capture_into(model, path, result, skip, in_container, call)
    return result


def _capture_into(module: nn.Module, path: str, result: CaptureResult, skip, in_container: bool = False,
                  call: tuple[tuple, dict] | None = None) -> None:
    if skip(module):
        result.skipped.append(path)
        return
    if _is_plain_container(module):
        for name, child in module.named_children():
            _capture_into(child, _join(path, name), result, skip, in_container=True)
        return
    if _is_torch_builtin(module):
        return  # e.g. nn.Linear: its forward is a single library call, nothing inside to fuse
    if call is None and _has_optional_parameters(module):
        result.deferred.append(Region(path, module, "its forward has optional parameters", in_container))
        return
    try:
        signature = CallSignature(type(module).forward, call)
        try:
            graph, leaves, metadata = _trace(module, signature)
        except Exception as exc:  # noqa: BLE001 - with a call's tensors, at their shapes (not a block: Dynamo's)
            values = None if call is None or in_container else traced_values(signature, call)
            if values is None:
                raise
            try:
                graph, leaves, metadata = _trace(module, signature, values)
            except Exception:  # noqa: BLE001 - report why plain tracing failed
                raise exc from None
            signature.at_shapes(values)
    except Exception as exc:  # noqa: BLE001 - any failure: a block goes to Dynamo, anything else descends
        if in_container:
            result.regional.append(Region(path, module, explain.capture_failure(module, exc), True))
            return
        result.uncaptured.append(Uncaptured(path, explain.capture_failure(module, exc), explain.exception_line(exc)))
        _capture_children(module, path, result, skip)
        return
    result.graphs.append(CapturedGraph(path, module, graph, signature, leaves, in_container, metadata))
    called = sorted({node.target for node in graph.nodes if node.op == "call_module"})  # failed, hooked, blocks
    elements = container_elements(module)
    for leaf in called:
        child = module.get_submodule(leaf)
        _capture_into(child, _join(path, leaf), result, skip, in_container=id(child) in elements)


def _capture_children(module: nn.Module, path: str, result: CaptureResult, skip) -> None:
    for name, child in module.named_children():
        _capture_into(child, _join(path, name), result, skip)


def _has_optional_parameters(module: nn.Module) -> bool:
    """Whether ``forward`` has parameters with defaults: which of them a call passes is known
    only at a call, so capture waits for the first one (see ``CallSignature``)."""
    try:
        return bool(CallSignature(type(module).forward).defaults)
    except Exception:  # noqa: BLE001 - no inspectable signature (TorchScript): the trace tries and refuses it
        return False  # no inspectable signature (TorchScript): tried, and refused, by the trace


def _is_plain_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))  # (Sequential: its forward is traced)


def _is_torch_builtin(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("torch.nn") and not isinstance(module, nn.Sequential)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
