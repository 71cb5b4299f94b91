"""Capture at a call's shapes: trace a forward that reads the metadata of intermediate tensors.

The root forwards of diffusers transformers compute with shapes as Python numbers
(``height = hidden_states.shape[-2] // p``, ``int(hidden_states.shape[1] ** 0.5)``), branch on
ranks and dtypes of tensors they built (``if timestep.ndim == 2:``, ``if encoder_attention_mask
is not None and encoder_attention_mask.ndim == 2:``) and hold the final ``norm_out`` modulation,
a fusion site, in that same forward. Plain FX cannot trace them: a shape is a Proxy there.

When a module is captured for a real call (``capture(..., call=...)``: a forward with optional
parameters is captured on its first call) and plain tracing fails, :class:`ShapedTracer`
traces it again with a *fake* value (``torch._subclasses.FakeTensor``: shape, dtype, device,
no data) beside every node, computed by running each traced operation on the fakes of its
arguments. ``shape``, ``size()``, ``ndim``, ``dim()``, ``dtype``, ``device`` and ``len()`` of a
traced tensor then answer the fake's concrete values, so the forward's own Python computes
and branches on them. Branches on tensor *values* still fail (a fake has none).

What the graph assumes, and how each assumption is checked on every call (else the call
runs as captured for its own pattern, see ``session.py``):

- every intermediate shape, dtype and device follows from the shapes, dtypes and devices of
  the traced arguments, the baked argument values, the global state (autocast, grad mode,
  default dtype), the module's Python state and the metadata of its parameters and buffers. The
  first three are checked by the call signature (exact shape, dtype and device of each traced
  argument, Dynamo's ``GlobalStateGuard``: ``CallSignature.at_shapes``), the fourth by
  ``snapshot.SubtreeGuard``, the last by one
  :class:`~fusion_pass.guards.HeldMetadata` per parameter and buffer of the module (dtype,
  device, shape: a ``.to()`` changes them in place);
- the elements of a ``ModuleList``/``ModuleDict`` (a model's blocks) are called as modules, not
  inlined: their graphs stay free of the root's shapes, captured on their own as before. A
  called module's output metadata comes from running its forward on fakes (no data moves;
  installed fusion_pass forwards are bypassed while doing so, see ``install.original_forwards``).
  A called module with hooks refuses the trace (its hooks would run on fakes).

Fakes are computed with autocast's weight cache off (it would keep its casts of real weights,
made on fakes, as fakes, and hand them to the real ops after). Cost: the fake run of every
called module once per capture (Flux-dev's set-up: see the README).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten

from fusion_pass import explain
from fusion_pass.constants import TensorConstant
from fusion_pass.guards import HeldMetadata, assume
from fusion_pass.snapshot import has_hooks

_UNKNOWN = object()  # a node whose fake value could not be computed (its metadata stays symbolic)


class ShapedMixin:
    """Fake-value propagation for an FX tracer (mixed into ``capture._LeafOnFailureTracer``).

    ``values``: the traced arguments' real values (tensors), in placeholder order."""

    def init_shapes(self, values: tuple, containers: set[int]) -> None:
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.fakes: dict[fx.Node, object] = {}
        self.values = list(values)
        self.containers = containers  # ids of ModuleList/ModuleDict elements: called, never inlined
        self.faking = False  # running a called module on fakes (not tracing it)

    def shaped_leaf(self, m: nn.Module) -> bool:
        return id(m) in self.containers

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if kind == "placeholder":
            value = self.values.pop(0) if self.values else _UNKNOWN
            self.fakes[node] = self.fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else _UNKNOWN
        elif kind != "output":
            self.fakes[node] = self._run_fake(node)
        if self.fakes.get(node, _UNKNOWN) is not _UNKNOWN:
            node.meta["example_value"] = self.fakes[node]  # shapes for the matcher, as in a Dynamo graph
        return proxy

    def _run_fake(self, node: fx.Node):
        if node.op == "get_attr":
            value = _attr(self.root, node.target)
            return self.fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else _UNKNOWN
        args = fx.node.map_aggregate(node.args, lambda a: self._fake_arg(a))
        kwargs = fx.node.map_aggregate(node.kwargs, lambda a: self._fake_arg(a))
        if any(a is _UNKNOWN for a in tree_flatten((args, kwargs))[0]):
            return _UNKNOWN
        if node.target is assume:
            return None
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # autocast would cache its casts of real weights as fakes
        try:
            with self.fake_mode:
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self._run_module(self.root.get_submodule(node.target), args, kwargs)
        except explain.Refused:
            raise
        except Exception:  # noqa: BLE001 - data-dependent output, an op without a fake kernel: stays unknown
            return _UNKNOWN
        finally:
            torch.set_autocast_cache_enabled(cache)
        return _UNKNOWN

    def _fake_arg(self, a):
        if isinstance(a, fx.Node):
            if a not in self.fakes and a.op == "call_function" and isinstance(a.target, TensorConstant):
                self.fakes[a] = self.fake_mode.from_tensor(a.target.value)
            return self.fakes.get(a, _UNKNOWN)
        if isinstance(a, torch.Tensor) and not isinstance(a, torch._subclasses.FakeTensor):
            return self.fake_mode.from_tensor(a)
        return a

    def _run_module(self, module: nn.Module, args, kwargs):
        from fusion_pass.install import original_forwards

        hooked = [name for name, m in module.named_modules() if has_hooks(m)]
        if hooked:
            raise explain.Refused(f"calls {type(module).__name__} whose submodule {hooked[0] or '(itself)'} has hooks, "
                                  "which a shape-specialised capture would have to run on fake tensors")
        self.faking = True  # FX patches Module.__call__ and __getattr__ while tracing: pass those through
        try:
            with original_forwards():
                return module(*args, **kwargs)
        finally:
            self.faking = False

    def call_module(self, m, forward, args, kwargs):
        if self.faking:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self.faking:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def fake(self, proxy: fx.Proxy):
        return self.fakes.get(proxy.node, _UNKNOWN)

    def iter(self, obj: fx.Proxy):
        fake = self.fake(obj)
        if isinstance(fake, (tuple, list)) and self.pieces(obj) is None:
            return iter([obj[i] for i in range(len(fake))])
        return super().iter(obj)

    def parameter_metadata(self, module: nn.Module) -> list[HeldMetadata]:
        """dtype, device and shape of every parameter and buffer of ``module``: what the fake
        values were computed from (checked on every call, see the module docstring)."""
        held = []
        for kind in ("named_parameters", "named_buffers"):
            for path, tensor in getattr(module, kind)(remove_duplicate=False):
                owner, _, name = path.rpartition(".")
                held += [HeldMetadata(owner, name, attr, getattr(tensor, attr)) for attr in ("dtype", "device", "shape")]
        return held


class ShapedProxy:
    """Metadata reads of a traced tensor answered from its fake value (a mixin over the
    tracer's proxy class; a node without a fake keeps FX's symbolic answer)."""

    def _meta(self, attr: str):
        fake = self.tracer.fake(self)
        if isinstance(fake, torch.Tensor):
            return getattr(fake, attr)
        return fx.Proxy.__getattr__(self, attr)

    shape = property(lambda self: self._meta("shape"))
    ndim = property(lambda self: self._meta("ndim"))
    dtype = property(lambda self: self._meta("dtype"))
    device = property(lambda self: self._meta("device"))

    def size(self, dim: int | None = None):
        fake = self.tracer.fake(self)
        if not isinstance(fake, torch.Tensor):
            return fx.Proxy.__getattr__(self, "size")(*(() if dim is None else (dim,)))
        return fake.shape if dim is None else fake.shape[dim]

    def dim(self) -> int:
        fake = self.tracer.fake(self)
        return fake.dim() if isinstance(fake, torch.Tensor) else fx.Proxy.__getattr__(self, "dim")()

    def __len__(self) -> int:
        fake = self.tracer.fake(self)
        if isinstance(fake, (torch.Tensor, tuple, list)):
            return len(fake)
        return super().__len__()


def container_elements(module: nn.Module) -> set[int]:
    """ids of the modules held by a ``ModuleList``/``ModuleDict`` under ``module`` (its blocks)."""
    return {id(child) for m in module.modules() if isinstance(m, (nn.ModuleList, nn.ModuleDict))
            for child in m.children()}


def traced_values(signature, call: tuple[tuple, dict]) -> tuple | None:
    """The call's values for the signature's traced parameters when all are tensors (None otherwise)."""
    try:
        values = signature.required_values(*call)
    except Exception:  # noqa: BLE001 - the call does not bind: no shaped trace
        return None
    return tuple(values) if all(isinstance(v, torch.Tensor) for v in values) else None


def _attr(root: nn.Module, target: str):
    """The tensor at ``target`` (``a.b.weight``), read through the modules' own dicts: FX patches
    ``Module.__getattr__`` while tracing."""
    *owners, name = target.split(".")
    module = root
    for part in owners:
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
    if not isinstance(module, nn.Module):
        return _UNKNOWN
    for tensors in (module._parameters, module._buffers, vars(module)):
        if name in tensors:
            return tensors[name]
    return _UNKNOWN

