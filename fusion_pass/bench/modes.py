"""How each mode is set up: one group's model and inputs (``Group``), and per mode a ``Prepared``
step (eager, optimize, optimize+cudagraph, torch.compile, the fusion backend)."""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .settings import Settings
from .spec import DTYPES, MODES
from .timing import rel_err


@dataclass
class StepInputs:
    """One call's arguments: ``model(x, t, contexts, **kwargs)``."""

    x: Tensor
    t: Tensor
    contexts: dict[str, Tensor]
    kwargs: dict[str, Tensor]

    def tensors(self) -> list[Tensor]:
        return [self.x, self.t, *self.contexts.values(), *self.kwargs.values()]

    def map(self, fn: Callable[[Tensor], Tensor]) -> "StepInputs":
        return StepInputs(fn(self.x), fn(self.t), {k: fn(v) for k, v in self.contexts.items()},
                          {k: fn(v) for k, v in self.kwargs.items()})


@dataclass
class Group:
    """One config x dtype: the model cast to the dtype, inputs and the two references."""

    config: str
    dtype: str
    cfg: Any  # reference_models.DiTConfig
    model: nn.Module  # the cast model; every mode runs a deepcopy
    inputs: StepInputs
    ref_eager: Tensor  # eager output, same dtype, as float32
    ref_fp32: Tensor  # float32 model on the inputs cast to float32
    settings: Settings
    fp32_model: nn.Module
    keep: dict[str, "Prepared"] = field(default_factory=dict)  # runners kept for end to end

    @property
    def key(self) -> str:
        return f"{self.config}/{self.dtype}"


@dataclass
class Prepared:
    """A mode ready to run: ``step(inputs)`` is one denoising step (its output may be a reused buffer)."""

    step: Callable[[StepInputs], Tensor]
    setup_s: float
    setup_what: str
    first_call_in_setup: bool = False  # compile modes: the first call is the compile
    extra: dict[str, Any] = field(default_factory=dict)
    after: Callable[[], dict[str, Any]] | None = None  # facts known only after running (fusion report)
    keep: Any = None  # whatever must stay alive with the step


def _call(model: nn.Module, inputs: StepInputs) -> Tensor:
    # no_grad, not inference_mode: inference tensors carry another dispatch key set, and Dynamo
    # recompiles (a 60-85 s compile) when a later call mixes them with the step bench's tensors.
    with torch.no_grad():
        return model(inputs.x, inputs.t, inputs.contexts, **inputs.kwargs)


def _sync(settings: Settings) -> None:
    if settings.cuda:
        torch.cuda.synchronize()


def _prepare_eager(group: Group) -> Prepared:
    model = copy.deepcopy(group.model)
    return Prepared(lambda inputs: _call(model, inputs), 0.0, "none (a deepcopy)", keep=model)


def _patterns(levers: tuple[str, ...]) -> list[str] | None:
    """``optimize``'s ``patterns``: the default families, plus the opt-in ``levers``."""
    if not levers:
        return None
    from patterns import FAMILY_NAMES

    return [*FAMILY_NAMES, *levers]


def _prepare_optimize(group: Group, levers: tuple[str, ...] = ()) -> Prepared:
    import fusion_pass

    model = copy.deepcopy(group.model)
    start = time.perf_counter()
    fusion_pass.optimize(model, patterns=_patterns(levers))
    setup = time.perf_counter() - start
    return Prepared(lambda inputs: _call(model, inputs), setup, "wall time of fusion_pass.optimize()",
                    extra={"fusion": _fusion_facts(fusion_pass.report(model), group.cfg)}, keep=model)


def _prepare_optimize_cudagraph(group: Group, levers: tuple[str, ...] = ()) -> Prepared:
    """``optimize(model, cuda_graphs=True)``: each optimized module is captured on its first
    call and replayed after that; on the official model that is the whole step (its timestep
    embedding's CPU ``arange`` is a cached constant, see ``fusion_pass/constants.py``)."""
    import fusion_pass
    from fusion_pass.cuda_graphs import replay_paused

    model = copy.deepcopy(group.model)
    start = time.perf_counter()
    fusion_pass.optimize(model, cuda_graphs=True, patterns=_patterns(levers))
    first = _call(model, group.inputs).clone()  # captures
    torch.cuda.synchronize()
    setup = time.perf_counter() - start
    checks = []
    for seed in (group.settings.seed + 101, None):  # fresh inputs, then the group's own
        inputs = _make_inputs(group.cfg, group.settings, group.dtype, seed) if seed is not None else group.inputs
        replayed = _call(model, inputs).clone()
        with replay_paused(model):  # the same fused code, run without replay
            fresh = _call(model, inputs)
        checks.append({"bitwise_equal": bool(torch.equal(replayed, fresh)), "rel_err": rel_err(replayed, fresh)})
    ok = all(c["bitwise_equal"] or c["rel_err"] <= 1e-3 for c in checks) and torch.equal(first, _call(model, group.inputs))
    if not ok:
        raise RuntimeError(f"CUDA-graph replay differs from the optimized model run without replay: {checks}")
    extra = {"fusion": _fusion_facts(fusion_pass.report(model), group.cfg),
             "replay_check": {"inputs_sets": len(checks), "bitwise_equal": all(c["bitwise_equal"] for c in checks),
                              "max_rel_err": max(c["rel_err"] for c in checks)}}
    return Prepared(lambda inputs: _call(model, inputs), setup,
                    "optimize(cuda_graphs=True) + the first call (the capture)",
                    extra=extra, keep=model)


def _prepare_compile(group: Group, *, mode: str | None) -> Prepared:
    model = copy.deepcopy(group.model)
    start = time.perf_counter()
    compiled = torch.compile(model, mode=mode) if mode else torch.compile(model)
    setup = time.perf_counter() - start
    return Prepared(_compiled_step(compiled, cudagraphs=mode == "reduce-overhead"), setup,
                    "torch.compile() + the first call (incl. compile)", first_call_in_setup=True,
                    keep=(model, compiled))


def _prepare_backend(group: Group, *, inner: str, cudagraphs: bool = False) -> Prepared:
    import fusion_pass

    model = copy.deepcopy(group.model)
    start = time.perf_counter()
    backend = fusion_pass.backend(inner=inner, cudagraphs=cudagraphs)
    compiled = torch.compile(model, backend=backend)
    setup = time.perf_counter() - start

    def after() -> dict[str, Any]:
        return {"fusion": _fusion_facts(backend.report, group.cfg), "graphs_compiled": backend.graphs_compiled}

    return Prepared(_compiled_step(compiled, cudagraphs=cudagraphs), setup,
                    "torch.compile() + the first call (incl. the pass and compile)", first_call_in_setup=True,
                    after=after, keep=(model, compiled, backend))


def _compiled_step(compiled: nn.Module, *, cudagraphs: bool) -> Callable[[StepInputs], Tensor]:
    if not cudagraphs:
        return lambda inputs: _call(compiled, inputs)
    mark = torch.compiler.cudagraph_mark_step_begin

    def step(inputs: StepInputs) -> Tensor:
        mark()  # a new iteration: earlier outputs may be overwritten (we never hold them)
        return _call(compiled, inputs)

    return step

PREPARE: dict[str, Callable[[Group], Prepared]] = {
    "eager": _prepare_eager,
    "optimize": _prepare_optimize,
    "optimize+cudagraph": _prepare_optimize_cudagraph,
    "compile": lambda g: _prepare_compile(g, mode=None),
    "compile-reduce-overhead": lambda g: _prepare_compile(g, mode="reduce-overhead"),
    "backend-inductor": lambda g: _prepare_backend(g, inner="inductor"),
    "backend-eager": lambda g: _prepare_backend(g, inner="eager"),
    "backend-inductor-cudagraphs": lambda g: _prepare_backend(g, inner="inductor", cudagraphs=True),
}
PREPARE.update((name, functools.partial(PREPARE[spec.base], levers=spec.levers))
               for name, spec in MODES.items() if spec.levers)


def _fusion_facts(report, cfg) -> dict[str, Any]:
    """Sites fused per family, and per family the config predicts: fused / expected (a chained
    residual->norm site counts toward both halves: ``Report.totals()``)."""
    counts = report.counts()
    facts: dict[str, Any] = {"counts": counts, "pass_s": round(report.seconds, 3)}
    expected = getattr(cfg, "expected_sites", None)
    if expected is not None:
        totals = report.totals()
        facts["fused_vs_expected"] = {family: f"{totals.get(family, 0)}/{n}" for family, n in expected().items()}
    if getattr(report, "uncaptured", None):
        facts["uncaptured"] = len(report.uncaptured)
    return facts


def _build(cfg, settings: Settings) -> nn.Module:
    from reference_models import build_model, load_official

    torch.manual_seed(settings.seed)
    builder = load_official if settings.official else build_model
    return builder(cfg, device=settings.device, dtype=torch.float32).eval().requires_grad_(False)


def _make_inputs(cfg, settings: Settings, dtype: str, seed: int) -> StepInputs:
    from reference_models import example_inputs

    made = example_inputs(cfg, settings.batch, dtype=DTYPES[dtype], device=settings.device, seed=seed)
    return StepInputs(made.x, made.t, dict(made.contexts), dict(made.kwargs))
