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
``x.view(...)``, ``x.reshape(...)`` (sizes: ints, or   ``torch.reshape(x, shape)``
a dynamic-shape Dynamo graph's symbolic sizes)
``x.type_as(y)``                                       ``x.to(dtype)`` (y's dtype: a constant
                                                       where the graph knows it, else ``y.dtype``)
``scaled_dot_product_attention(query=q, key=k,         ``F.scaled_dot_product_attention(q, k, v,
value=v, ...)`` (diffusers' ``dispatch_attention_fn``)  **rest)``: q, k, v positional
``view(c + s)``, ``view(c * s)`` (``view`` an           ``c + view(s)``, ``c * view(s)``: views
unsqueeze/reshape, ``c`` a number):                    move to the tensor operand, so
``(1 + scale)[:, None, :]``                            ``1 + scale[:, None, :]`` is the one form
``x * rsqrt(mean(x.to(f32) ** 2, -1, True) + eps)``    ``x.to(f32) * rsqrt(...)`` (diffusers'
(x fp16/bf16/fp32: the product is computed in fp32      ``RMSNorm``: the product names the upcast
by promotion anyway)                                    it computes with)
the same where x's dtype is not known (FX graphs):     ``q = x.to(promote_types(x.dtype, T))``
``x * rsqrt(...)`` then ``* w`` (weight not fp16/bf16)  normalized: ``q * rsqrt(mean(q ** 2))
or ``.to(W) * w`` (W the weight's fp16/bf16 dtype,       * w`` (T = f32), or ``(q.to(f32) *
a constant: capture read and guards ``weight.dtype``)   rsqrt(...)).to(q.dtype) * w`` then
                                                       ``.to(W)`` (T = W); see
                                                       ``_rms_of_unknown_dtype``
``LN(x).device``, ``LN(x).shape`` (LN a layer or RMS  ``x.device``, ``x.shape``
norm; PixArt's ``scale.to(x.device)``)
``x.to(d)`` where x's dtype is known to be ``d``,      ``x`` (``.to`` returns x itself: a no-op
``x.to(device)`` where x is known to be on it           cast of FP32LayerNorm, of ``.float()``
                                                       twice, of ``.type_as(x)`` in fp32 graphs)
====================================================  ==========================================

``view`` -> ``reshape`` changes only which inputs raise (reshape copies where view fails).
Node ``meta`` (Dynamo's ``example_value``, the module stack) is carried to the new node.
Finally, repeated casts, reshapes, unsqueezes, indexing and attribute reads of one value are merged
(unless an in-place write may reach that value: ``aliasing.py``), and device moves of tensor
constants become cached copies (``constants.py``). A dtype or device is *known* from the
graph's shape metadata (Dynamo's ``example_value``), or for a cast from its target dtype.
"""
from __future__ import annotations

import numbers
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fusion_pass.aliasing import mutates, written_aliases  # noqa: F401  (mutates: capture.py)
from fusion_pass.constants import fold_device_moves

ADD, MUL, POW = operator.add, operator.mul, operator.pow
MEAN, RSQRT = torch.mean, torch.rsqrt
UNSQUEEZE, RESHAPE = torch.unsqueeze, torch.reshape
LAYER_NORM, RMS_NORM, LINEAR = F.layer_norm, F.rms_norm, F.linear
ATTENTION = F.scaled_dot_product_attention
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
    changed += _sink_views(graph)
    changed += _rms_of_unknown_dtype(graph)
    changed += _explicit_rms_upcast(graph)
    changed += _drop_noop_moves(graph)
    changed += _metadata_of_norm_inputs(graph)
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
    if key == ("call_method", "type_as") and len(args) == 2 and not kwargs and isinstance(args[1], fx.Node):
        return _type_as(args)
    if key == ("call_function", ATTENTION) and {"query", "key", "value"} & set(kwargs):
        return _attention_call(args, kwargs)
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
    if not all(isinstance(size, int) or _is_symbolic_size(size) for size in shape):
        return None  # view(dtype) reinterprets; a traced size may be a whole torch.Size: leave both
    if already_canonical and isinstance(args[1], tuple):
        return None
    return ("call_function", RESHAPE, (args[0], tuple(shape)))


def _is_symbolic_size(size) -> bool:
    """A node whose recorded value is one size (a dynamic-shape Dynamo graph's ``x.size(1)``)."""
    return isinstance(size, fx.Node) and isinstance(size.meta.get("example_value"), torch.SymInt)


def _index_as_unsqueeze(args):
    source, index = args
    if not isinstance(source, fx.Node) or not isinstance(index, tuple):
        return None
    full = slice(None, None, None)
    nones = [i for i, item in enumerate(index) if item is None]
    if len(nones) != 1 or any(item != full for i, item in enumerate(index) if i != nones[0]):
        return None
    return ("call_function", UNSQUEEZE, (source, nones[0]))


def _type_as(args):
    source, like = args
    meta = _meta(like)
    dtype = meta.dtype if meta is not None else _Nested(("call_function", getattr, (like, "dtype")))
    return ("call_method", CAST_METHOD, (source, dtype))


_ATTENTION_TENSORS = ("query", "key", "value")


def _attention_call(args, kwargs):
    named = dict(zip(_ATTENTION_TENSORS, args))
    if set(named) & set(kwargs):
        return None  # given twice: leave the call to raise as it would
    named.update((name, kwargs[name]) for name in _ATTENTION_TENSORS if name in kwargs)
    if len(named) != 3:
        return None
    rest = {name: value for name, value in kwargs.items() if name not in _ATTENTION_TENSORS}
    return ("call_function", ATTENTION, tuple(named[name] for name in _ATTENTION_TENSORS) + tuple(args[3:]), rest)


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


_VIEWS = (UNSQUEEZE, RESHAPE)


def _sink_views(graph: fx.Graph) -> int:
    """``view(c + s)`` -> ``c + view(s)`` (and ``*``) for a number ``c``: the same values,
    shape and dtype, since an elementwise op with a number commutes with any view. Repeated
    until no view sits on such an op, so a chain of views moves down whole."""
    changed, progress = 0, True
    while progress:
        progress = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _VIEWS or node.kwargs:
                continue
            inner = node.args[0]
            if not (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target in (ADD, MUL)
                    and len(inner.args) == 2 and _is_number(inner.args[0]) and isinstance(inner.args[1], fx.Node)
                    and not inner.kwargs):
                continue
            number, tensor = inner.args
            moved_view = _Nested(("call_function", node.target, (tensor, *node.args[1:])))
            new = _emit(graph, node, "call_function", inner.target, (number, moved_view))
            if known_dtype(tensor) != known_dtype(node):  # ``1.5 + int_tensor``: the view's value differs in dtype
                new.args[1].meta = {k: v for k, v in node.meta.items() if k not in ("example_value", "val")}
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if not inner.users:
                graph.erase_node(inner)
            changed += 1
            progress = True
    return changed


_PROMOTES_TO_FP32 = (torch.float16, torch.bfloat16, torch.float32)


def _explicit_rms_upcast(graph: fx.Graph) -> int:
    """diffusers' ``RMSNorm`` squares the upcast ``x.to(float32)`` but multiplies the original
    ``x`` by the fp32 ``rsqrt``: for x in fp16/bf16/fp32, promotion computes that product in
    fp32 from the exactly upcast x, i.e. ``x.to(float32) * rsqrt(...)``, which is what this
    respells it as (the official spelling). Left alone where x's dtype is not known."""
    changed = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not MUL or len(node.args) != 2 or node.kwargs:
            continue
        for i, (x, rsqrt) in enumerate((node.args, node.args[::-1])):
            upcast = _upcast_under_rsqrt(rsqrt)
            if upcast is None or upcast.args[0] is not x or known_dtype(x) not in _PROMOTES_TO_FP32:
                continue
            node.args = (upcast, rsqrt) if i == 0 else (rsqrt, upcast)
            changed += 1
            break
    return changed


_HALF = (torch.float16, torch.bfloat16)


def _rms_of_unknown_dtype(graph: fx.Graph) -> int:
    """diffusers' ``RMSNorm`` in a graph without shapes (our FX capture), x's dtype unknown:
    ``p = x * rsqrt(eps + mean(x.to(f32) ** 2, -1, True))`` computes in ``promote(x.dtype, f32)``,
    then either ``p * w`` (a weight that is not fp16/bf16) or ``p.to(W) * w`` (W the weight's
    fp16/bf16 dtype, a constant: ``capture.py`` read ``weight.dtype`` and the installed forward
    checks it). Both are respelled over ``q = x.to(promote_types(x.dtype, T))`` (T = f32, or W):

    - ``p * w`` -> ``q * rsqrt(eps + mean(q ** 2, -1, True)) * w``: the same values for
      fp16/bf16/fp32 x (q is ``x.to(f32)``); for fp64 x the variance is then fp64, not fp32;
    - ``p.to(W) * w`` -> ``((u * rsqrt(eps + mean(u ** 2, ...))).to(q.dtype) * w).to(W)``
      with ``u = q.to(f32)``: the same values when x is W (q is x, both casts return their
      input); for another x dtype n is rounded to the wider ``promote(x.dtype, W)`` instead of W.

    Never less precise than the original, and each is a spelling ``patterns/qk_rmsnorm.py``
    matches with q as the norm's input (no cast back, or a cast back to ``q.dtype``). Left alone
    unless p and its cast each have that one user."""
    changed = 0
    for product in list(graph.nodes):
        found = _rms_product(product)
        if found is None:
            continue
        x, square = found
        cast = _only_user(product)
        if _is_cast_to(cast, _HALF):
            weighted, dtype = _only_user(cast), cast.args[1]
        else:
            weighted, dtype, cast = cast, torch.float32, None
        if not (isinstance(weighted, fx.Node) and weighted.op == "call_function" and weighted.target is MUL
                and len(weighted.args) == 2 and not weighted.kwargs):
            continue
        upcast = square.args[0]
        with graph.inserting_before(x.next):  # right after x: a pair's two inputs exist before either norm
            promoted = graph.call_function(torch.promote_types, (graph.call_function(getattr, (x, "dtype")), dtype))
            q = graph.call_method(CAST_METHOD, (x, promoted))
            normed = q if cast is None else graph.call_method(CAST_METHOD, (q, torch.float32))
            if cast is not None:
                cast.args = (product, graph.call_function(getattr, (q, "dtype")))
        square.args = (normed, 2)
        product.args = tuple(normed if a is x else a for a in product.args)
        if cast is not None:
            first_user = next((n for n in _following(weighted) if n in weighted.users), weighted.next)
            with graph.inserting_before(first_user):  # not earlier: the partner norm's weight may be read after
                out = graph.call_method(CAST_METHOD, (weighted, dtype))
            out.meta = dict(weighted.meta)
            weighted.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
        if not upcast.users:
            graph.erase_node(upcast)
        changed += 1
    return changed


def _following(node: fx.Node):
    while node.next.op != "root":
        node = node.next
        yield node


def _rms_product(node: fx.Node):
    """``(x, square)`` when ``node`` is ``x * rsqrt(c + mean(square, ...))`` with ``square =
    x.to(f32) ** 2`` and x's dtype unknown; else None."""
    if node.op != "call_function" or node.target is not MUL or len(node.args) != 2 or node.kwargs:
        return None
    for x, rsqrt in (node.args, node.args[::-1]):
        upcast = _upcast_under_rsqrt(rsqrt)
        if upcast is not None and upcast.args[0] is x and known_dtype(x) is None:
            return x, rsqrt.args[0].args[1].args[0]
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_cast_to(node, dtypes) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target == CAST_METHOD
            and len(node.args) == 2 and not node.kwargs and node.args[1] in dtypes)


def _upcast_under_rsqrt(rsqrt):
    """``u`` of ``rsqrt(c + mean(pow(u, 2), ...))`` when ``u`` is ``x.to(float32)``, else None."""
    chain = [rsqrt]
    for target in (RSQRT, ADD, MEAN, POW):
        node = chain[-1]
        if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is target):
            return None
        chain.append(node.args[1] if target is ADD else node.args[0])
    pow_node = chain[-2]
    upcast = chain[-1]
    if pow_node.args[1:] != (2,) or not _is_number(chain[1].args[0]):
        return None
    is_upcast = (isinstance(upcast, fx.Node) and upcast.op == "call_method" and upcast.target == CAST_METHOD
                 and upcast.args[1:] == (torch.float32,) and not upcast.kwargs)
    return upcast if is_upcast else None


def _drop_noop_moves(graph: fx.Graph) -> int:
    """``x.to(d)`` -> ``x`` where x is known to have dtype (or device) ``d`` already:
    ``Tensor.to`` then returns x itself, so even aliasing is unchanged."""
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_method" or node.target != CAST_METHOD or len(node.args) != 2 or node.kwargs:
            continue
        source, target = node.args
        if not isinstance(source, fx.Node):
            continue
        if isinstance(target, torch.dtype) and known_dtype(source) == target:
            pass
        elif isinstance(target, torch.device) and _known_device(source) == target:
            pass
        else:
            continue
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        dropped += 1
    return dropped


def _metadata_of_norm_inputs(graph: fx.Graph) -> int:
    """``norm(x).device`` / ``.shape`` -> ``x.device`` / ``x.shape`` (a norm's output has its input's
    device and shape): PixArt's ``x * (1 + scale.to(x.device))`` after ``x = norm_out(x)`` then
    leaves the norm output one user, the modulation."""
    moved = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not getattr or len(node.args) != 2:
            continue
        source, attr = node.args
        if attr in ("device", "shape") and isinstance(source, fx.Node) and source.op == "call_function" \
                and source.target in (F.layer_norm, F.rms_norm) and isinstance(source.args[0], fx.Node):
            node.args = (source.args[0], attr)
            moved += 1
    return moved


def _meta(node) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def known_dtype(node) -> torch.dtype | None:
    """The dtype of ``node``'s tensor when the graph says it: shape metadata, or the target of a cast."""
    meta = _meta(node)
    if meta is not None:
        return meta.dtype
    if (isinstance(node, fx.Node) and node.op == "call_method" and node.target == CAST_METHOD
            and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) and not node.kwargs):
        return node.args[1]
    return None


def _known_device(node) -> torch.device | None:
    meta = _meta(node)
    return meta.device if meta is not None else None


_DUPLICABLE = {
    ("call_method", CAST_METHOD), ("call_function", getattr), ("call_function", UNSQUEEZE),
    ("call_function", RESHAPE), ("call_function", operator.getitem),
}


def _merge_duplicates(graph: fx.Graph, root: nn.Module | None) -> int:
    """Merge repeated casts/reshapes/attribute reads of the same value (``x.float()``
    written twice): pure, cheap nodes, so one result serves every user. Not done for reads
    of a value an in-place operation may write (``aliasing.py``), where two equal-looking
    reads may see different values; not at all when a write cannot be bounded."""
    written = written_aliases(graph, root)
    if written is None:
        return 0
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if (node.op, node.target) not in _DUPLICABLE or node in written:
            continue
        if any(arg in written for arg in node.all_input_nodes):
            continue
        key = (node.op, node.target, _hashable(node.args), _hashable(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_hashable(v) for v in value))
    if isinstance(value, slice):  # unhashable before Python 3.12
        return ("slice", value.start, value.stop, value.step)
    return value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)
