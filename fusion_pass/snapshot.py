"""Change detection: is the module subtree a graph was captured from still exactly as captured?

A captured graph inlines the forwards of the modules it traced through: it skips their hooks
(FX calls ``forward``, not ``__call__``), bakes their plain attributes (``LayerNorm.eps``, a
``training`` flag, an attention processor object) and their submodule structure (which module
is a ``nn.Linear``, which is a peft LoRA wrapper). Users change all of these after
``optimize()``: peft injects or merges LoRA layers, diffusers swaps attention processors or
fuses q/k/v projections, people register hooks, replace parameters, call ``train()``.

:class:`SubtreeGuard` keeps ``live``, a list of the dict objects that hold that state for every
*inlined* module (its ``__dict__``, ``_parameters``, ``_buffers``, ``_modules``, its four hook
dicts, and one level into plain containers and objects its ``__dict__`` holds, such as peft's
``scaling`` dict or a diffusers processor), plus the four global module-hook dicts; and
``snap``, a shallow copy of each. ``live == snap`` is then one C-level list comparison whose
dict comparisons short-circuit on identical values: it sees a hook added or removed, a
submodule, parameter or buffer replaced, added or removed, any plain attribute rebound.
Measured on the official Hunyuan3D-2 (meta device, 2-core CPU, torch 2.13): see README, "What
is checked on every call". Not seen (and not needed): in-place tensor updates (the graph reads
parameters live), ``requires_grad`` flags and ``.to()`` (parameters keep their identity; the
fused ops handle dtype and autograd at call time), except where the trace read a parameter's
or buffer's metadata as a value (``guards.HeldMetadata``: diffusers' ``RMSNorm`` branches on
``self.weight.dtype``): ``metadata`` compares each such read again (``.to()`` and ``.half()``
rebind ``param.data`` in place, so only this sees them), one ``getattr`` per read.

Modules the graph still calls as modules (``call_module`` leaves) are not inlined: their own
``__call__`` runs their hooks and reads their state at run time, so only their identity (the
parent's ``_modules``) is guarded. The root module's own hooks run in its ``__call__`` too.

Why not Dynamo's guards: on the FX path there is no Dynamo frame to guard; and Dynamo itself
does not guard hooks of inlined modules (``torch._dynamo.config.skip_nnmodule_hook_guards`` is
True by default), so the Dynamo path (``regional.py``) uses this guard as well.
"""
from __future__ import annotations

import copy
import operator
from typing import Iterable

import torch
from torch import nn

from fusion_pass.guards import HeldMetadata

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_STATE_DICTS = ("_parameters", "_buffers", "_modules")
_GLOBAL_HOOKS = tuple(
    (name, getattr(torch.nn.modules.module, name))
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
)
_CONTAINERS = (dict, list, set)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # attributes every nn.Module has (dicts we list by name)


def has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward or backward (pre-)hooks of its own."""
    return any(getattr(m, hooks) for hooks in _HOOK_DICTS)


def global_hooks() -> list[str]:
    """Names of the global module-hook registries that are not empty (``register_module_forward_hook``)."""
    return [name.lstrip("_") for name, hooks in _GLOBAL_HOOKS if hooks]


class SubtreeGuard:
    """Holds while the inlined modules under ``module`` (all but ``leaves``) are as captured."""

    def __init__(self, module: nn.Module, path: str, leaves: Iterable[str] = (),
                 metadata: Iterable[HeldMetadata] = ()):
        self.module, self.path, self.leaves = module, path, frozenset(leaves)
        self.metadata = tuple(metadata)  # parameter/buffer metadata the graph was traced with
        groups: dict[tuple[str, str], list[HeldMetadata]] = {}  # one check per tensor: its reads together
        for held in self.metadata:
            groups.setdefault((held.owner, held.name), []).append(held)
        self.groups = list(groups.values())
        # what ``attrgetter`` returns: the value for one attribute, a tuple of them for several
        self.expected = [group[0].value if len(group) == 1 else tuple(held.value for held in group)
                         for group in self.groups]
        self._build()
        self.snap = [shallow_copy(d) for d in self.live]

    def _build(self) -> None:
        self.labels: list[tuple[str, str, str]] = []  # (module path, kind, class name) per live dict
        self.live: list = []
        self.modules = 0
        self._collect(self.module, "", root=True)
        for name, hooks in _GLOBAL_HOOKS:
            self._add(hooks, ("", name.strip("_").replace("_", " "), ""))
        self.reads = [(_tensors_of(self.module, group[0]), group[0].name, operator.attrgetter(*(h.attr for h in group)))
                      for group in self.groups]  # (its owner's _parameters or _buffers, name, getter of its attrs)

    def holds(self) -> bool:
        if self.live is None:  # a deep copy: the copied module is complete by its first call
            self._build()
        try:
            return self.live == self.snap and (
                not self.reads or [get(d.get(n)) for d, n, get in self.reads] == self.expected)
        except Exception:  # noqa: BLE001 - a value replaced by one whose == raises (tensors of other devices)
            return False

    def __deepcopy__(self, memo):
        """A copy guards the copied module against the copied snapshot (the copy's live dicts
        are collected on its first check: during ``deepcopy`` the module is still half-built)."""
        clone = SubtreeGuard.__new__(SubtreeGuard)
        clone.module, clone.path, clone.leaves = copy.deepcopy(self.module, memo), self.path, self.leaves
        clone.snap = copy.deepcopy(self.snap, memo)
        clone.metadata, clone.groups, clone.expected = self.metadata, self.groups, self.expected
        clone.live = None
        return clone

    def describe(self) -> str:
        """One sentence per change found, e.g. ``"forward hook added on blocks.0.mlp"``."""
        changes = [_describe(label, old, new) for label, new, old in zip(self.labels, self.live, self.snap)
                   if not same_contents(new, old)]
        parts = [part for change in changes for part in change.split("; ")]
        for held in self.metadata:
            now = getattr(_tensors_of(self.module, held).get(held.name), held.attr, None)
            if now != held.value:
                parts.append(f"{_join(self.path, held.owner, held.name)}.{held.attr} changed {held.value} -> {now}")
        more = f" (+{len(parts) - 3} more)" if len(parts) > 3 else ""
        return "; ".join(parts[:3]) + more if parts else "no change"

    def summary(self) -> str:
        reads = f"; {len(self.metadata)} parameter/buffer metadata read at capture" if self.metadata else ""
        return (f"subtree unchanged: {self.modules} inlined modules ({len(self.live)} dicts: attributes, parameters, "
                f"buffers, submodules, hooks, containers) and no global module hooks{reads}")

    def _collect(self, module: nn.Module, rel: str, root: bool = False) -> None:
        self.modules += 1
        where = self._full(rel)
        cls = type(module).__name__
        state = vars(module)
        self._add(state, (where, "attribute", cls))
        for name in _STATE_DICTS + (() if root else _HOOK_DICTS):
            self._add(state[name], (where, name.strip("_").replace("_", " "), cls))
        for name, value in state.items():
            if name in _MODULE_INTERNALS or name == "forward" or name.startswith("_fusion_pass"):
                continue  # nn.Module's own dicts (listed above); ours (the installed forward, the session)
            if type(value) in _CONTAINERS or isinstance(value, dict):
                self._add(value, (where, f"contents of {name}", cls))
            elif _is_plain_object(value):
                self._add(vars(value), (where, f"attribute of {name}", cls))
        for name, child in module._modules.items():
            child_rel = f"{rel}.{name}" if rel else name
            if child is None:
                continue
            if child_rel not in self.leaves:
                self._collect(child, child_rel)
            else:  # called as a module: its __call__ runs its hooks, but a hook removed may let it be inlined again
                for hooks in _HOOK_DICTS:
                    self._add(getattr(child, hooks), (self._full(child_rel), hooks.strip("_").replace("_", " "),
                                                      type(child).__name__))

    def _add(self, live, label) -> None:
        self.live.append(live)
        self.labels.append(label)

    def _full(self, rel: str) -> str:
        return ".".join(p for p in (self.path, rel) if p) or "<root>"


def _tensors_of(module: nn.Module, held: HeldMetadata) -> dict:
    """The ``_parameters`` or ``_buffers`` dict that held ``held.name`` at capture (empty when
    its owner is gone: the check then fails)."""
    try:
        owner = module.get_submodule(held.owner)
    except AttributeError:
        return {}
    return owner._buffers if held.name in owner._buffers else owner._parameters


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def same_contents(live, snap) -> bool:
    """Same keys (or elements) and identical values: a comparison that never calls ``__eq__``."""
    if isinstance(live, dict):
        return live.keys() == snap.keys() and all(live[k] is snap[k] for k in live)
    if isinstance(live, list):
        return len(live) == len(snap) and all(a is b for a, b in zip(live, snap))
    return {id(x) for x in live} == {id(x) for x in snap}


def shallow_copy(container):
    if isinstance(container, dict):
        return dict(container)  # compares equal to the live dict (OrderedDict, FrozenDict) by content
    return list(container) if isinstance(container, list) else set(container)


def _is_plain_object(value) -> bool:
    """A Python object whose attributes a forward may read (a diffusers attention processor)."""
    return (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type))
            and not callable(getattr(value, "__func__", None)) and type(value).__module__ != "builtins"
            and not hasattr(value, "__code__"))


def _describe(label: tuple[str, str, str], old, new) -> str:
    where, kind, cls = label
    if kind.startswith("global"):
        what = kind.replace("global ", "global module ").removesuffix("s")
        return f"{what} registered" if len(new) > len(old) else f"{what} removed" if len(new) < len(old) else f"{kind} changed"
    if kind.endswith("hooks"):
        what = kind[:-1]
        verb = "added on" if len(new) > len(old) else "removed from" if len(new) < len(old) else "replaced on"
        return f"{what} {verb} {where}"
    if kind.startswith("contents of"):
        return f"{kind} of {where} changed (in place)"
    parts = []
    for key in sorted(set(old) | set(new), key=str):
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if before is after:
            continue
        thing = {"attribute": f"{cls}.{key} of {where}", "parameters": f"parameter {where}.{key}",
                 "buffers": f"buffer {where}.{key}", "modules": f"submodule {where}.{key}"}.get(
            kind, f"{kind} {key} of {where}")
        if before is _MISSING:
            parts.append(f"{thing} added")
        elif after is _MISSING:
            parts.append(f"{thing} removed")
        elif kind == "modules":
            parts.append(f"{thing} replaced ({type(before).__name__} -> {type(after).__name__})")
        elif kind in ("parameters", "buffers"):
            parts.append(f"{thing} replaced")
        else:
            parts.append(f"{thing} changed {_short(before)} -> {_short(after)}")
    return "; ".join(parts)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_MISSING = object()
