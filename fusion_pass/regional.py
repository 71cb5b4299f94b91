"""Stage 1b, capture by Dynamo, regionally: blocks our FX tracer cannot follow.

Diffusers blocks branch on plain Python that FX symbolic tracing cannot see through (an
optional argument's truth value, ``kwargs.items()`` loops, ``x.ndim``, dtype and device
tests). Dynamo follows all of these and guards each decision (shapes, dtypes, None-ness,
which kwargs were passed, module attributes it read), so for a repeated block (an element of
a ``ModuleList``/``ModuleDict``/``Sequential``) whose forward FX cannot trace, capture hands
the block to Dynamo instead of descending into its children:

- one ``torch.compile(type(block).forward, fullgraph=True)`` per block *class*, shared by all
  its instances (``inline_inbuilt_nn_modules``: parameters are graph inputs, so one graph
  serves every instance; measured on a tiny Flux: 2 classes, 4 blocks, first call 1.65 s
  including Dynamo's import);
- its backend is :class:`~fusion_pass.dynamo_backend.FusionBackend` with ``inner="eager"``: the
  same normalize/match/rewrite as every other graph, run eagerly with the fused ops called
  directly (``ops/direct.py``);
- compilation happens on a block's first call, so until then the report lists it as pending.

Why not Dynamo for everything: on the whole official Hunyuan3D-2 it takes ~17 s on the 2-core
CPU where our tracer takes 0.75 s, and regional graphs lose the chains across blocks; so the
root is tried with FX first and Dynamo only takes blocks FX cannot trace.

Checked on every call, besides Dynamo's own guards: Dynamo does not guard hooks of modules it
inlines (``torch._dynamo.config.skip_nnmodule_hook_guards`` is True by default), so the block's
subtree is guarded by ``snapshot.SubtreeGuard`` as on the FX path. On a change, while any
module under the block (or globally) has hooks, the original forward runs (counted); any other
change is left to Dynamo's guards (which recompile where the change matters: a swapped
processor, a LoRA wrapper, a new ``eps``) after re-arming the snapshot (counted). A call
Dynamo cannot compile as one graph (or past ``torch._dynamo.config.recompile_limit``) runs the
original forward, with the reason in the report.

With ``optimize(cuda_graphs=True)`` each block's calls are replayed as CUDA graphs (the same
``cuda_graphs.GraphReplay`` as FX-captured forwards, in the model's one pool); a replay bypasses
Dynamo's guard evaluation, so :class:`RegionalForward` says guard by guard how each still holds.
"""
from __future__ import annotations

import builtins
import types
from collections import Counter

import torch
from torch import nn

from fusion_pass.capture import Region
from fusion_pass.cuda_graphs import GraphReplay
from fusion_pass.install import ORIGINAL_FORWARDS, InstalledForward
from fusion_pass.report import Report
from fusion_pass.snapshot import SubtreeGuard, global_hooks, has_hooks


class ClassCompile:
    """The compiled ``forward`` of one block class, with its backend's per-graph reports."""

    def __init__(self, cls: type, families):
        from fusion_pass.dynamo_backend import FusionBackend

        self.cls = cls
        self.backend = FusionBackend("eager", patterns=[f.name for f in families])
        self.backend.families = tuple(families)
        self.graph_reports: list[Report] = []
        self.graph_guards: list[str] = []  # per graph: a summary of the guards Dynamo built for it
        self.entry = _entry_point(cls)  # Dynamo's cache of compiled graphs and their guards hangs off its code
        self.compiled = torch.compile(self.entry, backend=self._compile, fullgraph=True,
                                      options={"guard_filter_fn": self._see_guards})
        self.failure: str | None = None

    def __deepcopy__(self, memo):
        return self  # compiled code and per-graph reports, shared by copies of a model (nothing per instance)

    def limit_reached(self) -> bool:
        """Dynamo stops compiling new variants past its recompile limit (they run uncompiled)."""
        config = torch._dynamo.config
        limit = getattr(config, "recompile_limit", None) or config.cache_size_limit  # (older name)
        return len(self.graph_reports) >= limit

    def guards_for(self, frame: dict):
        """The guards of the graph Dynamo runs for a call of the entry point whose locals are
        ``frame`` (``{"self": block, "args": ..., "kwargs": ...}``): the first of its cache
        entries, in the order Dynamo looks them up, whose guards pass; None when none does (the
        call ran uncompiled, past the recompile limit). A ``GuardManagerWrapper`` (owned; never
        the cache entry itself, which Dynamo may free), whose ``check(frame)`` is Dynamo's own check."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        for entry in _debug_get_cache_entry_list(self.entry.__code__):
            if entry.guard_manager.check(frame):
                return entry.guard_manager
        return None

    def _see_guards(self, entries) -> list[bool]:
        """``torch.compile``'s ``guard_filter_fn``: keeps every guard, and records what they are
        (Dynamo builds them once the graph is compiled)."""
        kinds = Counter(entry.guard_type for entry in entries)
        skipped = kinds.pop("EMPTY_NN_MODULE_HOOKS_DICT", 0) if torch._dynamo.config.skip_nnmodule_hook_guards else 0
        top = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common(4))
        self.graph_guards.append(f"{kinds.total()} Dynamo guards ({top}{', ...' if len(kinds) > 4 else ''}); "
                                 f"{skipped} hook guards not installed (skip_nnmodule_hook_guards): hooks are "
                                 "checked by the subtree guard")
        return [True] * len(entries)

    def _compile(self, gm, example_inputs, **_options):
        """The backend: one fused graph and its report. (``_options``: where a PyTorch does not
        take ``guard_filter_fn`` itself it hands the options dict here; the guards then go unreported.)"""
        before = self.backend.report
        self.backend.report = Report("optimize")  # one fresh report per graph
        compiled = self.backend(gm, example_inputs)
        self.graph_reports.append(self.backend.report)
        self.backend.report = before
        return compiled


class RegionalForward(InstalledForward):
    """A block's installed forward: its class's Dynamo compile, with ``module`` as ``self``;
    with ``optimize(cuda_graphs=True)``, replayed as CUDA graphs (``graphs``, a
    :class:`~fusion_pass.cuda_graphs.GraphReplay` in the model's pool).

    A replay skips Dynamo's own guard evaluation for that call, so each guard Dynamo built for
    the captured graph holds by construction or is checked on every replay, in this order:

    - Module attributes, submodules, parameters and buffers (identity), hooks (which Dynamo does
      not guard, see the module docstring): ``guard`` (``snapshot.SubtreeGuard``), first on every
      call. On a change every capture of the block is dropped, so each call key goes through
      Dynamo again before it is captured again.
    - Tensor arguments' shapes, strides, dtypes, devices, requires_grad, which arguments are one
      tensor; non-tensor argument values (``joint_attention_kwargs=None``, a flag); which optional
      arguments were passed and which keys a dict argument holds: the replay's key
      (``cuda_graphs.call_key``), exact, so stricter than Dynamo's dynamic-shape guards.
    - Parameter addresses (read by the graph where they were at capture; not a Dynamo guard):
      ``GraphReplay`` captures again when any moved.
    - Everything else Dynamo guards: global state (grad mode, autocast, deterministic
      algorithms, default dtype and device, torch function state: ``GLOBAL_STATE``,
      ``GRAD_MODE``, ``DETERMINISTIC_ALGORITHMS``, ``TORCH_FUNCTION_STATE``, ``DEFAULT_DEVICE``),
      the values and types of what the forward read (``CONSTANT_MATCH``, ``TYPE_MATCH``,
      ``ID_MATCH``: ``eps``, the processor, globals such as diffusers' attention backend), tensor
      metadata and aliasing (``TENSOR_MATCH``, ``DUPLICATE_INPUT``): all checked on every replay by
      Dynamo's own guard manager of the graph that was captured (``ClassCompile.guards_for``),
      on this call's ``(self, args, kwargs)``. Cost: 13 us per call for Flux's double block
      (550 guards; 2-core CPU, torch 2.13), against ~2 ms of GPU time per block at Flux-dev size.
      When they fail, the call runs through Dynamo (which may recompile) and is captured for that
      state too (up to ``cuda_graphs.MAX_CAPTURES`` per key). Global state is also checked by
      ``GraphReplay`` itself (Dynamo's ``GlobalStateGuard``, as on the FX path). Objects Dynamo
      matched by identity are kept alive with the capture, so their ids cannot be reused.
    - Torch function and dispatch modes (Dynamo guards the mode stack): never replayed while one
      is active (``cuda_graphs.replay_allowed``).

    A new key's first call runs through Dynamo on the caller's arguments (its guards evaluated,
    compiled if needed), and is captured in that call. The capture is refused (the block runs
    through Dynamo from then on for that key, reported) when the call changed an input in place,
    a list or dict argument, or the block's own state (Python side effects Dynamo's code would
    replay after its graph, a CUDA graph not), or when the graph captured does not pass its own
    guards on the caller's arguments.

    Not seen: a tensor the graph reads that is neither an argument nor a parameter or buffer of
    the block (a plain tensor attribute, a global tensor) whose storage is swapped in place
    (``t.data = ...``; rebinding the attribute is seen by the subtree guard), and Python side
    effects on objects outside the block and its arguments (a global counter). Diffusers' blocks
    have neither.
    """

    def __init__(self, module: nn.Module, path: str, compiled: ClassCompile, session):
        self.module, self.path, self.compiled, self.session = module, path, compiled, session
        self.guard: SubtreeGuard | None = None
        self.graph_index: int | None = None  # the class graph this block first ran (reported)
        self.graphs = GraphReplay(module, compiled.compiled, session.pool, self._replay_guard, self.graph_note) \
            if session.pool is not None else None

    def arm(self) -> SubtreeGuard:
        self.guard = SubtreeGuard(self.module, self.path)  # Dynamo inlines every submodule
        return self.guard

    def describe_signature(self) -> str:
        return "Dynamo guards (shapes, dtypes, None-ness, kwargs, module attributes read), built on its first call"

    def describe_replay(self) -> str | None:
        if self.graphs is None:
            return None
        return super().describe_replay() + "; before each replay, Dynamo's guards of the graph captured"

    def __call__(self, *args, **kwargs):
        module = self.module
        if ORIGINAL_FORWARDS[0]:
            return type(module).forward(module, *args, **kwargs)
        if not self.guard.holds():
            reason = self.guard.describe()
            hooks = global_hooks() or _hooked(module)
            if hooks:
                self.session.fell_back(self.path, f"original forward while hooks exist ({reason}): Dynamo does not "
                                                  "guard hooks of inlined modules")
                return type(module).forward(module, *args, **kwargs)
            self.session.fell_back(self.path, f"left to Dynamo's guards after: {reason}")
            self.arm()
            self.graph_index = None  # the graph Dynamo runs from now on (it may recompile) is reported anew
            if self.graphs is not None:
                self.graphs.captured.clear()  # each call key goes through Dynamo again before a capture
        if self.compiled.failure is not None:
            self.session.fell_back(self.path, self.compiled.failure)
            return type(module).forward(module, *args, **kwargs)
        compiled_before = len(self.compiled.graph_reports)
        try:
            if self.graphs is not None:
                out = self.graphs(*args, **kwargs)
            else:
                out = self.compiled.compiled(module, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Dynamo could not capture it: the original forward answers
            self.compiled.failure = f"Dynamo could not capture {type(module).__name__} as one graph: " \
                                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            self.session.fell_back(self.path, self.compiled.failure)
            return type(module).forward(module, *args, **kwargs)
        if self.compiled.graph_reports and (self.graph_index is None
                                            or len(self.compiled.graph_reports) > compiled_before):
            # the graph this call compiled (a new shape, a change), or the latest one of its class, which it reused
            self.graph_index = len(self.compiled.graph_reports) - 1
            self.session.regional_ran(self)
        return out

    def _replay_guard(self, args: tuple, kwargs: dict, static_args: tuple, static_kwargs: dict):
        """``GraphReplay``'s ``capture_guard``: after a capture, Dynamo's guards of the graph it
        captured, as the per-replay check, or why not to replay."""
        if not self.guard.holds():
            return "its forward changes the block's own state, which a replay would not"
        guards = self.compiled.guards_for(self._frame(static_args, static_kwargs))
        if guards is None:
            return "Dynamo ran it without a compiled graph"
        if not guards.check(self._frame(args, kwargs)):
            return "the captured graph's Dynamo guards do not hold for the call's own arguments"
        # Objects Dynamo matched by identity stay alive while the capture does: their ids are never reused.
        matched = [ref() for ref in getattr(guards, "id_matched_objs", {}).values()]

        def check(args: tuple, kwargs: dict, _keep=matched) -> bool:
            return guards.check(self._frame(args, kwargs))

        return check

    def _frame(self, args: tuple, kwargs: dict) -> dict:
        """The locals of the entry point's frame for a call: what Dynamo's guards read."""
        return {"self": self.module, "args": args, "kwargs": kwargs}

    def fragment(self) -> Report:
        """What the graph this block runs fused, with site paths under this block."""
        graph = self.compiled.graph_reports[self.graph_index]
        fragment = Report("optimize")
        fragment.merge(graph)
        for family in fragment.families.values():
            family.sites = [_under(self.path, s) for s in family.sites]
            family.folded = [_under(self.path, s) for s in family.folded]
            family.near_misses = [type(m)(_join(self.path, m.where), m.reason) for m in family.near_misses]
        fragment.graphs = [f"{self.path} (Dynamo, {self.compiled.cls.__name__} graph {self.graph_index})"]
        guards = self.compiled.graph_guards
        fragment.guards = [(self.path, guards[self.graph_index] if self.graph_index < len(guards) else "Dynamo guards")]
        return fragment


def install_regional(region: Region, session) -> RegionalForward:
    """Give ``region.module`` its class's compiled forward (compiled on the first call)."""
    cls = type(region.module)
    compiled = session.class_compiles.get(cls)
    if compiled is None:
        compiled = session.class_compiles[cls] = ClassCompile(cls, session.families)
    forward = RegionalForward(region.module, region.path, compiled, session)
    region.module.forward = forward
    return forward


def _entry_template(self, *args, **kwargs):
    return _fp_forward(self, *args, **kwargs)  # noqa: F821 - bound in each entry point's own globals


def _entry_point(cls: type):
    """A new function calling ``cls.forward``: Dynamo keeps its cache (and counts recompiles)
    per code object, so each compile gets its own, never ``cls.forward.__code__`` itself
    (shared by every model of the class in the process, and by other compiles of it). A copy of
    ``_entry_template``'s code, so that its source file is this one: torch 2.11 wraps a function
    without a source file (an ``exec``'d one) in ``external_utils.inner``, whose one code object
    every such compile in the process then shares (cache, guards, recompile limit; pytorch#124269)."""
    code = _entry_template.__code__.replace(co_name=f"forward_{cls.__name__}")
    return types.FunctionType(code, {"_fp_forward": cls.forward, "__builtins__": builtins}, code.co_name)


def _hooked(module: nn.Module) -> bool:
    """Hooks on a module under ``module`` (its own run in its ``__call__``)."""
    return any(has_hooks(m) for m in module.modules() if m is not module)


def _join(path: str, where: str) -> str:
    return f"{path}.{where}" if where and where != "<root>" else path


def _under(path: str, site):
    return type(site)(_join(path, site.where), site.detail)
