"""Guards: assumptions a captured graph was specialised on, checked every time it runs.

FX tracing cannot take a Python branch on a traced tensor (``if torch.is_floating_point(t):``).
For a small set of *metadata* predicates, whose value follows from the dtypes of the
inputs and parameters alone (never from tensor values, so checking one never syncs the
GPU), capture assumes the usual answer, follows that branch, and records an
:func:`assume` node in the graph at the branch point. When a call disagrees, the node
raises :class:`GuardFailed` and the installed forward reruns the module's original
forward: an exact fallback, because capture accepts a guard only where nothing before it
in the graph modifies state (see ``capture.py``).

Data-dependent branches (``if x.sum() > 0``) are not guardable: the module stays uncaptured.

The metadata of a parameter or buffer the traced module holds (``self.weight.dtype``,
``.device``, ``.shape``, ``.size()``, ``.ndim``, ``.dim()``: diffusers' ``RMSNorm`` branches on
``self.weight.dtype in (torch.float16, torch.bfloat16)``) is read at capture as the concrete
value, a specialization recorded as a :class:`HeldMetadata` and compared on every call, with
the rest of the module's state, by ``snapshot.SubtreeGuard`` (``.to()``/``.half()`` rebind
``param.data`` in place, so the parameter keeps its identity and only this check sees it).

Iterating the pieces of ``x.chunk(n)`` (or a slice of them: Hunyuan3D's ``Modulation`` does
``ModulationOut(*out[:3])``) follows the assumption that chunk made ``n`` pieces (it makes fewer
when the dim is too short), checked by an ``assume`` on ``len(pieces) == n``: the number follows
from shapes alone, like the predicates above.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import operator
from dataclasses import dataclass

import torch
from torch import fx

from fusion_pass.explain import source_expression

#: predicate -> the value assumed at capture (the common case in inference code)
ASSUMED_FUNCTIONS = {torch.is_floating_point: True, torch.is_complex: False}
ASSUMED_METHODS = {"is_floating_point": True, "is_complex": False}


class GuardFailed(Exception):
    """A call broke an assumption its graph was captured under."""


@fx.node.has_side_effect
def assume(value, expected: bool, what: str) -> None:
    """Raise :class:`GuardFailed` unless ``bool(value) == expected`` (``what``: the predicate)."""
    if bool(value) != expected:
        raise GuardFailed(f"{what} is {not expected}; the graph was captured assuming {expected}")


def assumption_for(node: fx.Node) -> tuple[bool, str] | None:
    """``(assumed value, description)`` when ``node`` computes a guardable predicate."""
    if node.op == "call_function" and node.target in ASSUMED_FUNCTIONS:
        return ASSUMED_FUNCTIONS[node.target], f"torch.{node.target.__name__}({source_expression(node.args[0])})"
    if node.op == "call_method" and node.target in ASSUMED_METHODS:
        return ASSUMED_METHODS[node.target], f"{source_expression(node.args[0])}.{node.target}()"
    return None


def chunk_count(node: fx.Node) -> tuple[fx.Node, int, range] | None:
    """``(chunk node, n, which pieces)`` when ``node`` is ``x.chunk(n, ...)`` / ``torch.chunk(x, n, ...)``
    with a constant ``n``, or a constant slice of one; None otherwise."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
        inner = chunk_count(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if inner is None:
            return None
        chunk, n, pieces = inner
        return chunk, n, pieces[node.args[1]]
    is_chunk = (node.op == "call_method" and node.target == "chunk") or (
        node.op == "call_function" and node.target is torch.chunk)
    if not is_chunk:
        return None
    n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    return node, n, range(n)


def guards_in(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "call_function" and node.target is assume]


def describe_guard(guard: fx.Node) -> str:
    """``"torch.is_floating_point(1000.0 * t) is True"``: what an ``assume`` node checks, in
    the forward's own terms (see ``explain.source_expression``)."""
    _, expected, what = guard.args
    return f"{what} is {expected}"


@dataclass(frozen=True)
class HeldMetadata:
    """``<owner>.<name>.<attr>`` was ``value`` at capture: ``attr`` (dtype, device, shape, ndim)
    of the parameter or buffer ``name`` of the submodule at ``owner`` (relative to the graph's
    module), read as a Python value while tracing."""

    owner: str
    name: str
    attr: str
    value: object

    def describe(self) -> str:
        """``"attn.norm_q: weight.dtype is torch.float32"`` (the report groups by the module path)."""
        what = f"{self.name}.{self.attr} is {self.value}"
        return f"{self.owner}: {what}" if self.owner else what


class ArgumentsDiffer(GuardFailed):
    """A call passed its arguments differently from the call the graph was captured for."""


_TENSOR = object()  # marks a parameter traced as a placeholder (a tensor in the captured call)


class CallSignature:
    """Which arguments a graph was captured with, checked on every call.

    A traced argument is a Proxy, and a Proxy is never None: tracing ``if pe is not None:``
    with ``pe`` as a placeholder would bake the not-None branch. So capture traces a *pattern*
    of call: the required parameters and the optional ones the capturing call passed as
    tensors are placeholders; optional ones it passed as other values (``return_dict=False``,
    ``attention_kwargs={}``) are baked, compared by ``==`` for numbers, strings, None and empty
    containers; every other parameter keeps its default, ``*args`` is empty and ``**kwargs``
    holds only the captured keys, so Python takes their branches for real. ``optimize()``
    captures the pattern "required arguments only"; the installed forward re-captures for the
    pattern of a call that differs (``session.py``).

    :meth:`required_values` admits a call only when it matches the pattern (a tensor where a
    tensor was traced, an equal value where one was baked, the default or nothing elsewhere),
    else raises :class:`ArgumentsDiffer`. Cost: ~0.2 us for a positional call of the required
    arguments only, a few us otherwise.
    """

    def __init__(self, forward, call: tuple[tuple, dict] | None = None):
        params = list(inspect.signature(forward).parameters.values())[1:]  # without self
        kinds = inspect.Parameter
        self.positional = tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD))
        self.keyword_only = frozenset(p.name for p in params if p.kind is kinds.KEYWORD_ONLY)
        self.defaults = {p.name: p.default for p in params if p.default is not kinds.empty}
        self.var_positional = any(p.kind is kinds.VAR_POSITIONAL for p in params)
        self.var_keyword = any(p.kind is kinds.VAR_KEYWORD for p in params)
        required = [p.name for p in params if p.default is kinds.empty
                    and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
        self.passed: dict[str, object] = {name: _TENSOR for name in required}  # name -> _TENSOR or baked value
        if call is not None:
            for name, value in self._bind(*call).items():
                if name in self.passed and not _bakeable(value):
                    continue  # a required parameter given a tensor or a structure of them: traced
                if isinstance(value, torch.Tensor):
                    self.passed[name] = _TENSOR
                elif not _bakeable(value):
                    raise ValueError(f"argument {name} of type {type(value).__name__} cannot be captured")
                elif name in self.passed or name not in self.defaults or not _is_default(value, self.defaults[name]):
                    self.passed[name] = copy.deepcopy(value)  # (a copy: the caller may mutate a dict it passed)
                    # a required parameter passed a non-tensor (``pe=None``) is baked too
        self.traced = tuple(name for name, value in self.passed.items() if value is _TENSOR)
        self.shaped: tuple | None = None  # (shape, dtype, device) per traced argument, when captured at them
        self._fast = (list(self.traced) == required == list(self.positional[:len(required)])
                      and len(self.passed) == len(required))

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self.positional):
            raise ArgumentsDiffer(f"{len(args) - len(self.positional)} extra positional argument(s) passed "
                                  "(captured without)")
        bound = dict(zip(self.positional, args))
        for name, value in kwargs.items():
            if name in bound:
                raise ArgumentsDiffer(f"argument {name} passed twice")  # the original forward raises the error
            if name not in self.defaults and name not in self.keyword_only and name not in self.positional \
                    and not self.var_keyword:
                raise ArgumentsDiffer(f"unexpected argument {name}")  # the original forward raises the error
            bound[name] = value
        return bound

    def at_shapes(self, values: tuple) -> None:
        """From now on a call also has to pass tensors of exactly these shapes, dtypes and devices
        (a graph captured at a call's shapes, ``shapes.py``)."""
        self.shaped = tuple((v.shape, v.dtype, v.device) for v in values)

    def required_values(self, args: tuple, kwargs: dict) -> tuple:
        """The values of the traced parameters, in order; raises :class:`ArgumentsDiffer` when
        the call does not match the captured pattern."""
        values = self._values(args, kwargs)
        if self.shaped is not None:
            for name, value, (shape, dtype, device) in zip(self.traced, values, self.shaped):
                if not isinstance(value, torch.Tensor) or value.shape != shape or value.dtype != dtype \
                        or value.device != device:
                    got = (f"{list(value.shape)} {value.dtype} on {value.device}" if isinstance(value, torch.Tensor)
                           else type(value).__name__)
                    raise ArgumentsDiffer(f"argument {name} is {got} (captured at {list(shape)} {dtype} on {device})")
        return values

    def same_pattern(self, args: tuple, kwargs: dict) -> bool:
        """Whether the call passes its arguments as captured, shapes aside."""
        try:
            self._values(args, kwargs)
        except ArgumentsDiffer:
            return False
        return True

    def _values(self, args: tuple, kwargs: dict) -> tuple:
        if self._fast and not kwargs and len(args) == len(self.traced) and not any(map(_bakeable, args)):
            return args  # the common call: exactly the required arguments, positionally, none a baked kind
        bound = self._bind(args, kwargs)
        values = []
        for name, captured in self.passed.items():
            if name not in bound:
                if name in self.defaults:
                    raise ArgumentsDiffer(f"argument {name} left out (captured with it passed)")
                raise ArgumentsDiffer(f"required argument {name} missing")  # the original forward raises the error
            value = bound.pop(name)
            if captured is _TENSOR:
                if _bakeable(value):  # None, a number, ...: captured traced, so a branch on it may differ
                    raise ArgumentsDiffer(f"argument {name} is {type(value).__name__} (captured with a tensor)")
                values.append(value)
            elif not _is_default(value, captured):
                raise ArgumentsDiffer(f"argument {name} is {_short(value)} (captured with {_short(captured)})")
        for name, value in bound.items():
            if name not in self.defaults or not _is_default(value, self.defaults[name]):
                raise ArgumentsDiffer(f"argument {name} passed (captured without it)")
        return tuple(values)

    def traced_forward(self, forward):
        """A function of ``(self, *traced)`` calling ``forward`` with the baked values and the
        defaults of the rest (what capture traces: FX makes placeholders of its parameters)."""
        namespace = {"_fp_forward": forward}
        refs = {}
        for name, value in self.passed.items():
            refs[name] = name if value is _TENSOR else f"_fp_baked_{name}"
            if value is not _TENSOR:
                namespace[refs[name]] = value
        positional = list(itertools.takewhile(self.passed.__contains__, self.positional))
        call = [refs[n] for n in positional] + [f"{n}={refs[n]}" for n in self.passed if n not in positional]
        src = (f"def forward(self, {', '.join(self.traced)}):\n"
               f"    return _fp_forward(self, {', '.join(call)})\n")
        exec(compile(src, "<fusion_pass traced signature>", "exec"), namespace)  # noqa: S102 - fixed template
        return namespace["forward"]

    def describe(self) -> str:
        baked = [f"{n}={_short(v)}" for n, v in self.passed.items() if v is not _TENSOR]
        rest = [n for n in (*self.defaults, *(["*args"] if self.var_positional else []),
                            *(["**kwargs"] if self.var_keyword else [])) if n not in self.passed]
        text = f"called with tensors ({', '.join(self.traced)})"
        if baked:
            text += f", {', '.join(baked)}"
        if rest:
            text += f"; nothing passed for {', '.join(rest)}"
        if self.shaped is not None:
            text += "; at shapes " + ", ".join(f"{name} {list(shape)} {str(dtype).removeprefix('torch.')} on {device}"
                                               for name, (shape, dtype, device) in zip(self.traced, self.shaped))
        return text


def _bakeable(value) -> bool:
    """None, a number, a string, a tuple or list of those, a dict of those by string keys
    (PixArt's ``added_cond_kwargs={"resolution": None, ...}``): compared by ``==``."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is dict:
        return all(type(k) is str and _bakeable(v) for k, v in value.items())
    return type(value) in (tuple, list) and all(map(_bakeable, value))


def _is_default(value, default) -> bool:
    if value is default:
        return True
    return type(value) is type(default) and _bakeable(default) and value == default


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 30 else text[:27] + "..."
