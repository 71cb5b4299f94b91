"""Stage 2, normalize: rewrite a graph into one canonical spelling, so each pattern is written once.

Every rewrite here is an identity of PyTorch semantics (same values, dtypes and shapes
for every input the original accepts); it only changes how a computation is spelled.

Canonical forms (what ``patterns/`` may assume):

====================================================  ==========================================
spellings accepted                                     canonical node
====================================================  ==========================================
``nn.LayerNorm`` module call (no hooks, exact type)    ``F.layer_norm(x, shape, weight, bias, eps)``
``nn.RMSNorm`` module call (no hooks, exact type)      ``F.rms_norm(x, shape, weight, eps)``
``nn.Linear`` module call (no hooks, exact type)       ``F.linear(x, weight, bias)`` (no module
                                                       call overhead when the graph runs)
``nn.GELU`` / ``nn.SiLU`` (not in place) module call  ``F.gelu(x, approximate=a)`` / ``F.silu(x)``
``F.rms_norm`` / ``torch.rms_norm`` / ``F.layer_norm``  the same, all arguments positional
``a.add(b)``, ``torch.add(a, b)``                      ``operator.add(a, b)``
``a.mul(b)``, ``torch.mul(a, b)``                      ``operator.mul(a, b)``
``torch.addcmul(a, b, c)`` (value 1)                   ``operator.add(a, operator.mul(b, c))``
``s + 1``, ``s * 2`` (one operand a number)            number first: ``1 + s``, ``2 * s``
``x.pow(2)``, ``torch.pow(x, 2)``, ``x.square()``      ``operator.pow(x, 2)``
``x.mean(d, keepdim=k)``                               ``torch.mean(x, d, k)``
``x.rsqrt()``                                          ``torch.rsqrt(x)``
``x.float()/.half()/.bfloat16()/.double()``,           ``x.to(dtype)`` (call_method, dtype
``x.type(dtype)``, ``x.to(dtype=d)``                   positional)
``x[:, None, :]`` (full slices and one ``None``),      ``torch.unsqueeze(x, dim)``
``x.unsqueeze(d)``
``x.view(...)``, ``x.reshape(...)``                    ``torch.reshape(x, shape)``
====================================================  ==========================================

``view`` -> ``reshape`` changes only which inputs raise (reshape copies where view fails).
Node ``meta`` (Dynamo's ``example_value``, the module stack) is carried to the new node.
Finally, repeated casts, reshapes, unsqueezes and attribute reads of one value are merged,
and device moves of tensor constants become cached copies (``constants.py``).
"""
from __future__ import annotations

import numbers
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fusion_pass.constants import fold_device_moves

ADD, MUL, POW = operator.add, operator.mul, operator.pow
MEAN, RSQRT = torch.mean, torch.rsqrt
UNSQUEEZE, RESHAPE = torch.unsqueeze, torch.reshape
LAYER_NORM, RMS_NORM, LINEAR = F.layer_norm, F.rms_norm, F.linear
CAST_METHOD = "to"

_CAST_METHODS = {
    "float": torch.float32,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "double": torch.float64,
}
_BINARY = {
    ("call_method", "add"): ADD,
    ("call_function", torch.add): ADD,
    ("call_function", torch.Tensor.add): ADD,
    ("call_method", "mul"): MUL,
    ("call_function", torch.mul): MUL,
    ("call_function", torch.Tensor.mul): MUL,
    ("call_method", "pow"): POW,
    ("call_function", torch.pow): POW,
}
_UNARY = {
    ("call_method", "rsqrt"): RSQRT,
    ("call_method", "unsqueeze"): UNSQUEEZE,
}


def normalize(graph: fx.Graph, root: nn.Module | None = None) -> int:
    """Rewrite ``graph`` in place into canonical spelling. ``root`` resolves ``call_module``
    targets (FX-captured graphs); Dynamo graphs have no module calls to resolve.
    Returns the number of nodes respelled."""
    changed = 0
    for node in list(graph.nodes):
        replacement = _canonical(node, root)
        if replacement is None:
            continue
        new = _emit(graph, node, *replacement)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed += 1
    changed += _numbers_first(graph)
    changed += _merge_duplicates(graph, root)
    changed += fold_device_moves(graph)
    graph.lint()
    return changed


def _emit(graph: fx.Graph, old: fx.Node, op: str, target, args, kwargs=None) -> fx.Node:
    """Insert a node before ``old``; nested ``(op, target, args)`` tuples in ``args``
    become nodes too (used for addcmul's inner product)."""
    with graph.inserting_before(old):
        args = tuple(_emit(graph, old, *a) if isinstance(a, _Nested) else a for a in args)
        new = graph.create_node(op, target, args, kwargs or {})
    new.meta = dict(old.meta)
    return new


class _Nested(tuple):
    """An ``(op, target, args)`` triple to be emitted as its own node."""


def _canonical(node: fx.Node, root: nn.Module | None):
    """The canonical ``(op, target, args, kwargs)`` for ``node``, or None if it already is."""
    if node.op == "call_module" and root is not None:
        return _module_call(node, root)
    key = (node.op, node.target)
    args, kwargs = node.args, node.kwargs
    if key in _BINARY and len(args) == 2 and not kwargs:
        return ("call_function", _BINARY[key], args)
    if key in _UNARY and not kwargs:
        return ("call_function", _UNARY[key], args)
    if key in {("call_method", "square"), ("call_function", torch.square)} and len(args) == 1:
        return ("call_function", POW, (args[0], 2))
    if key in {("call_function", torch.addcmul), ("call_method", "addcmul")}:
        return _addcmul(args, kwargs)
    if key == ("call_method", "mean") or (key == ("call_function", MEAN) and kwargs):
        return _mean(args, kwargs)
    if node.op == "call_method" and node.target in _CAST_METHODS and len(args) == 1 and not kwargs:
        return ("call_method", CAST_METHOD, (args[0], _CAST_METHODS[node.target]))
    if key == ("call_method", "type") and len(args) == 2 and (isinstance(args[1], torch.dtype) or _is_dtype_read(args[1])):
        return ("call_method", CAST_METHOD, args)
    if key == ("call_method", CAST_METHOD) and set(kwargs) == {"dtype"} and len(args) == 1:
        return ("call_method", CAST_METHOD, (args[0], kwargs["dtype"]))
    if key in {("call_method", "view"), ("call_method", "reshape"), ("call_function", RESHAPE)}:
        return _reshape(args, kwargs, already_canonical=key == ("call_function", RESHAPE))
    if key == ("call_function", operator.getitem):
        return _index_as_unsqueeze(args)
    if key == ("call_function", LAYER_NORM) and (kwargs or len(args) < 5):
        return _layer_norm_call(args, kwargs)
    if key in {("call_function", RMS_NORM), ("call_function", torch.rms_norm)} and (
        kwargs or len(args) < 4 or node.target is not RMS_NORM
    ):
        return _rms_norm_call(args, kwargs)
    return None


def _module_call(node: fx.Node, root: nn.Module):
    module = root.get_submodule(node.target)
    if module._forward_hooks or module._forward_pre_hooks or len(node.args) != 1 or node.kwargs:
        return None  # hooks must keep firing: leave the module call alone
    if type(module) is nn.LayerNorm:
        return ("call_function", LAYER_NORM, (
            node.args[0], tuple(module.normalized_shape),
            _param(node, "weight", module), _param(node, "bias", module), module.eps,
        ))
    if type(module) is nn.GELU:
        return ("call_function", F.gelu, (node.args[0],), {"approximate": module.approximate})
    if type(module) is nn.SiLU and not module.inplace:
        return ("call_function", F.silu, (node.args[0],))
    if type(module) is nn.Linear:
        return ("call_function", LINEAR, (node.args[0], _param(node, "weight", module), _param(node, "bias", module)))
    if type(module) is getattr(nn, "RMSNorm", None):
        return ("call_function", RMS_NORM, (
            node.args[0], tuple(module.normalized_shape), _param(node, "weight", module), module.eps,
        ))
    return None


def _is_dtype_read(value) -> bool:
    """``x.dtype`` traced as a node (``.type(x.dtype)`` is then a cast, like ``.to``)."""
    return (
        isinstance(value, fx.Node) and value.op == "call_function" and value.target is getattr
        and value.args[1:] == ("dtype",)
    )


def _param(node: fx.Node, name: str, module: nn.Module):
    """A ``get_attr`` node reading ``module.<name>`` live, or None when the module has none.
    Placed after the placeholders, where FX places parameter reads it is given no position for,
    so that a fused op pairing two norms never has to wait for one norm's weight read."""
    if getattr(module, name, None) is None:
        return None
    first_body_node = next(n for n in node.graph.nodes if n.op != "placeholder")
    with node.graph.inserting_before(first_body_node):
        return node.graph.get_attr(f"{node.target}.{name}")


def _addcmul(args, kwargs):
    value = kwargs.get("value", args[3] if len(args) > 3 else 1)
    if value != 1 or "out" in kwargs or len(args) < 3:
        return None
    product = _Nested(("call_function", MUL, (args[1], args[2])))
    return ("call_function", ADD, (args[0], product))


def _mean(args, kwargs):
    if set(kwargs) - {"dim", "keepdim"} or len(args) > 3:
        return None  # dtype= or out= change the computation: leave it
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if dim is None:
        return None
    return ("call_function", MEAN, (args[0], dim, keepdim))


def _reshape(args, kwargs, already_canonical: bool):
    if kwargs:
        return None
    shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else tuple(args[1:])
    if not all(isinstance(size, int) for size in shape):
        return None  # view(dtype) reinterprets; a traced size may be a whole torch.Size: leave both
    if already_canonical and isinstance(args[1], tuple):
        return None
    return ("call_function", RESHAPE, (args[0], tuple(shape)))


def _index_as_unsqueeze(args):
    source, index = args
    if not isinstance(source, fx.Node) or not isinstance(index, tuple):
        return None
    full = slice(None, None, None)
    nones = [i for i, item in enumerate(index) if item is None]
    if len(nones) != 1 or any(item != full for i, item in enumerate(index) if i != nones[0]):
        return None
    return ("call_function", UNSQUEEZE, (source, nones[0]))


_LAYER_NORM_PARAMS = ("input", "normalized_shape", "weight", "bias", "eps")
_RMS_NORM_PARAMS = ("input", "normalized_shape", "weight", "eps")


def _positional(params, defaults, args, kwargs):
    values = dict(zip(params, args))
    for name, value in kwargs.items():
        if name not in params:
            return None
        values[name] = value
    return tuple(values.get(name, defaults.get(name)) for name in params)


def _layer_norm_call(args, kwargs):
    full = _positional(_LAYER_NORM_PARAMS, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    return None if full is None else ("call_function", LAYER_NORM, full)


def _rms_norm_call(args, kwargs):
    full = _positional(_RMS_NORM_PARAMS, {"weight": None, "eps": None}, args, kwargs)
    return None if full is None else ("call_function", RMS_NORM, full)


def _numbers_first(graph: fx.Graph) -> int:
    """``s + 1`` -> ``1 + s`` and ``s * 2`` -> ``2 * s`` (exact: IEEE add and mul commute)."""
    changed = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (ADD, MUL) and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, fx.Node) and _is_number(b):
                node.args = (b, a)
                changed += 1
    return changed


_DUPLICABLE = {
    ("call_method", CAST_METHOD), ("call_function", getattr), ("call_function", UNSQUEEZE),
    ("call_function", RESHAPE),
}


def _merge_duplicates(graph: fx.Graph, root: nn.Module | None) -> int:
    """Merge repeated casts/reshapes/attribute reads of the same value (``x.float()``
    written twice): pure, cheap nodes, so one result serves every user. Not done in a graph
    with in-place operations, where two equal-looking reads may see different values."""
    if any(mutates(node, root) for node in graph.nodes):
        return 0
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if (node.op, node.target) not in _DUPLICABLE:
            continue
        key = (node.op, node.target, _hashable(node.args), _hashable(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def mutates(node: fx.Node, root: nn.Module | None) -> bool:
    """Whether ``node`` may modify a tensor in place (conservatively: user modules may)."""
    if node.op == "call_module":
        return root is None or not type(root.get_submodule(node.target)).__module__.startswith("torch.nn")
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        schema_mutates = getattr(getattr(node.target, "_schema", None), "is_mutable", False)
        return node.target in _IN_PLACE_OPERATORS or schema_mutates or getattr(node.target, "__name__", "").endswith("_")
    return False


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_hashable(v) for v in value))
    return value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)
