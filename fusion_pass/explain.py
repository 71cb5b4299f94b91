"""Say what the pass saw in the user's terms: capture failures and guarded predicates as
sentences about their own code, never graph node names or tracer jargon.

- :func:`capture_failure`: why a module's forward could not be captured, e.g. "its forward
  unpacks a tensor into Python values, as in `a, b = t`, `f(*t)` or a loop over a tensor
  (Modulation.forward, hunyuan3ddit.py:150)"; the exception itself stays available to
  ``--json`` as :func:`exception_line`.
- :func:`source_expression`: a graph value spelled as the forward would spell it, from the
  forward's argument names and module attributes ("1000.0 * t", "self.norm.weight"), or
  "a value computed from t" where the expression is longer than a glance.
"""
from __future__ import annotations

import operator
import os
import traceback
from typing import Any

import torch
from torch import fx, nn

#: Distinctive text of a tracing error -> what the forward does that tracing cannot follow.
_TRACE_FAILURES = (
    ("Proxy object cannot be iterated",
     "its forward unpacks a tensor into Python values, as in `a, b = t`, `f(*t)` or a loop over a tensor"),
    ("cannot be used as inputs to control flow",
     "its forward has control flow on a tensor's value (`if`, `while`, `and`/`or`), which depends on the data"),
    ("'len' is not supported in symbolic tracing",
     "its forward calls len() on a tensor"),
)

#: Binary operators as the forward spells them.
_OPERATORS = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/", operator.floordiv: "//",
    operator.pow: "**", operator.matmul: "@", operator.mod: "%",
}

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class Refused(RuntimeError):
    """Capture declines a forward; the message completes "its forward ..." in the user's terms."""


def exception_line(exc: BaseException) -> str:
    """The exception's class and first sentence, e.g. "TraceError: Proxy object cannot be iterated"."""
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(exc).__name__}: {first}"


def capture_failure(module: nn.Module, exc: BaseException) -> str:
    """Why ``module``'s forward could not be captured, naming its class and, where the failure
    happened in the user's code, the file and line."""
    text = str(exc)
    if isinstance(exc, Refused):
        sentence = f"its forward {text}"
    elif isinstance(module, torch.jit.ScriptModule):
        sentence = "it is a TorchScript module, which FX cannot trace (it runs as compiled by torch.jit)"
    else:
        sentence = next((said for known, said in _TRACE_FAILURES if known in text),
                        f"its forward cannot be traced ({exception_line(exc)})")
    name = module.original_name if isinstance(module, torch.jit.ScriptModule) else type(module).__qualname__
    where = [f"{name}.forward"]
    line = _user_line(exc)
    if line is not None:
        where.append(line)
    return f"{sentence} ({', '.join(where)})"


def _user_line(exc: BaseException) -> str | None:
    """``file.py:LINE`` of the innermost frame outside torch and fusion_pass, if any."""
    found = None
    while exc is not None:
        for frame in traceback.extract_tb(exc.__traceback__):
            path = os.path.abspath(frame.filename)
            if not path.startswith((_TORCH_DIR, _OWN_DIR)) and "<" not in frame.filename:
                found = f"{os.path.basename(path)}:{frame.lineno}"
        exc = exc.__cause__
    return found


def source_expression(value: Any, depth: int = 2) -> str:
    """``value`` (a node or a constant) as source text when it is at most ``depth`` operations
    on the forward's arguments and module attributes, else "a value computed from t, ..."."""
    exact = _spelled(value, depth)
    if exact is not None:
        return exact
    sources = _inputs_of(value)
    return f"a value computed from {', '.join(sources)}" if sources else "a value computed in the forward"


def _spelled(value: Any, depth: int) -> str | None:
    if not isinstance(value, fx.Node):
        return repr(value)
    if value.op == "placeholder":
        return str(value.target).lstrip("*")
    if value.op == "get_attr":
        return f"self.{value.target}"
    if depth == 0:
        return None
    args = value.args
    if value.op == "call_function" and value.target in _OPERATORS and len(args) == 2:
        left, right = (_spelled(a, depth - 1) for a in args)
        if left is None or right is None:
            return None
        return f"{_grouped(left)} {_OPERATORS[value.target]} {_grouped(right)}"
    if value.op == "call_method" and args:
        parts = [_spelled(a, depth - 1) for a in args]
        if None in parts:
            return None
        return f"{_grouped(parts[0])}.{value.target}({', '.join(parts[1:])})"
    return None


def _grouped(text: str) -> str:
    return f"({text})" if " " in text else text


def _inputs_of(node: fx.Node) -> list[str]:
    """The forward arguments and module attributes that ``node`` is computed from, in graph order."""
    seen, stack, found = set(), [node], []
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op in ("placeholder", "get_attr"):
            found.append(current)
        stack.extend(current.all_input_nodes)
    return [_spelled(n, 0) for n in sorted(found)]  # (FX's node order: Node.__lt__)
