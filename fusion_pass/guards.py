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
"""
from __future__ import annotations

import torch
from torch import fx

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
        return ASSUMED_FUNCTIONS[node.target], f"torch.{node.target.__name__}({_name(node.args[0])})"
    if node.op == "call_method" and node.target in ASSUMED_METHODS:
        return ASSUMED_METHODS[node.target], f"{_name(node.args[0])}.{node.target}()"
    return None


def guards_in(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "call_function" and node.target is assume]


def describe_guard(guard: fx.Node) -> str:
    """``"torch.is_floating_point(mul) is True"``: what an ``assume`` node checks."""
    _, expected, what = guard.args
    return f"{what} is {expected}"


def _name(arg) -> str:
    return arg.name if isinstance(arg, fx.Node) else repr(arg)


class ArgumentsDiffer(GuardFailed):
    """A call passed an optional argument the graph was captured without."""


class CallSignature:
    """The arguments a graph was captured with, checked on every call.

    A traced argument is a Proxy, and a Proxy is never None: tracing ``if pe is not None:``
    with ``pe`` as a placeholder would bake the not-None branch. So capture traces only the
    *required* parameters of ``forward`` as placeholders; every parameter with a default runs
    with its default (``pe=None``, ``scale=1.0``), ``*args`` is empty and ``**kwargs`` is ``{}``,
    and Python takes their branches for real. :meth:`required_values` then admits a call only
    when it passes nothing else, or passes a default explicitly (``pe=None``): anything else
    raises :class:`ArgumentsDiffer` and the original forward runs (exact). Cost: ~1 us a call.
    """

    def __init__(self, forward):
        import inspect

        params = list(inspect.signature(forward).parameters.values())[1:]  # without self
        kinds = inspect.Parameter
        self.positional = tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD))
        self.required = tuple(p.name for p in params if p.default is kinds.empty
                              and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD))
        self.keyword_only = frozenset(p.name for p in params if p.kind is kinds.KEYWORD_ONLY)
        self.defaults = {p.name: p.default for p in params if p.default is not kinds.empty}
        self.var_positional = any(p.kind is kinds.VAR_POSITIONAL for p in params)
        self.var_keyword = any(p.kind is kinds.VAR_KEYWORD for p in params)
        self._simple = len(self.required) == len(self.positional) and not self.keyword_only

    def required_values(self, args: tuple, kwargs: dict) -> tuple:
        """The values of the required parameters, in order; raises :class:`ArgumentsDiffer`
        when the call passes any other argument with a value other than its default."""
        if not kwargs and self._simple and len(args) == len(self.required):
            return args  # the common call: exactly the required arguments, positionally
        if len(args) > len(self.positional):
            raise ArgumentsDiffer(f"{len(args) - len(self.positional)} extra positional argument(s) passed "
                                  "(captured without)")
        bound = dict(zip(self.positional, args))
        for name, value in kwargs.items():
            if name in bound:
                raise ArgumentsDiffer(f"argument {name} passed twice")  # the original forward raises the error
            bound[name] = value
        for name, default in self.defaults.items():
            if name in bound and not _is_default(bound.pop(name), default):
                raise ArgumentsDiffer(f"argument {name} passed (captured with its default {default!r})")
        extra = sorted(bound.keys() - set(self.required))
        if extra:
            raise ArgumentsDiffer(f"keyword argument(s) {', '.join(extra)} passed (captured without)")
        if len(bound) != len(self.required):
            raise ArgumentsDiffer("a required argument is missing")  # the original forward raises the error
        return tuple(bound[name] for name in self.required)

    def traced_forward(self, forward):
        """A function of ``(self, *required)`` calling ``forward`` with the defaults of the rest
        (what capture traces; FX makes placeholders of its parameters only)."""
        positional = [n for n in self.required if n not in self.keyword_only]
        call = positional + [f"{n}={n}" for n in self.required if n in self.keyword_only]
        src = (f"def forward(self, {', '.join(self.required)}):\n"
               f"    return _fp_forward(self, {', '.join(call)})\n")
        namespace = {"_fp_forward": forward}
        exec(compile(src, "<fusion_pass traced signature>", "exec"), namespace)  # noqa: S102 - fixed template
        return namespace["forward"]

    def describe(self) -> str:
        optional = [*self.defaults, *(["*args"] if self.var_positional else []), *(["**kwargs"] if self.var_keyword else [])]
        if not optional:
            return f"called with ({', '.join(self.required)})"
        return f"called with ({', '.join(self.required)}) only; {', '.join(optional)} left at their defaults"


def _is_default(value, default) -> bool:
    if value is default:
        return True
    return type(value) is type(default) and type(default) in (bool, int, float, str) and value == default
