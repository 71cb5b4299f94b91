"""Time the fused model against eager PyTorch, torch.compile and the fusion backend, side by side.

One process, one GPU, every mode measured on the same seeded random weights and inputs. A
"group" is one config x dtype: the model is built once per config in float32, cast to the dtype,
and each mode runs a deepcopy of that cast model on one denoising step (B=2: the CFG batch).

modes (--modes; all by default)
  eager                        the model as written
  optimize                     fusion_pass.optimize() on a deepcopy
  optimize+cudagraph           fusion_pass.optimize(model, cuda_graphs=True): every optimized module
                               (the whole model, when it is captured as one graph) captured on its
                               first call, replayed after; checked against the optimized model
                               without replay on two input sets
  compile                      torch.compile, default Inductor
  compile-reduce-overhead      torch.compile(mode="reduce-overhead") (Inductor + CUDA graphs)
  backend-inductor             torch.compile(backend=fusion_pass.backend(inner="inductor"))
  backend-eager                torch.compile(backend=fusion_pass.backend(inner="eager"))
  backend-inductor-cudagraphs  fusion_pass.backend(inner="inductor", cudagraphs=True)
The five torch.compile modes run only in the groups --compile-groups selects (by default the
float16 groups: a 1.1B compile takes 60-85 s each), and only while --time-budget allows: a mode
that would not fit is skipped (and says so), the least important first. Compiles are cold (fresh
Inductor/Triton caches per run, shared by the modes of the run) unless --keep-compile-cache.

figures per mode
  step ms       median, p10, p90 of --repeat steps after --warmup (CUDA events around each call;
                for CUDA-graph modes the replay, including the copy into its static inputs)
  setup s       optimize: wall time of optimize(); optimize+cudagraph: optimize() + warm-up +
                capture; compile and backend modes: torch.compile() + the first call (the compile)
  peak MB       torch.cuda.max_memory_allocated() over set-up and steady-state steps, minus what
                was allocated before the mode started: its weight copy, activations, CUDA-graph
                pools (allocated at capture). The JSON also has the steady-state-only peak and
                the growth of reserved memory (which holds CUDA-graph pools in full)
  err           ||out - ref|| / ||ref|| in fp32, ref = eager in the same dtype, and ref = the
                float32 model on the same inputs cast to float32
  kernels       kernels per step (torch.profiler, CUDA activity) and the share of kernel time in
                GEMM + attention; the top-20 kernel tables of eager and optimize are the profiles
end to end (--e2e): the official flow-matching Euler loop (sigmas linspace(0, 1, steps), CFG with a
doubled batch, guidance 5.0) with eager, optimize, optimize+cudagraph and the fastest torch.compile
and fusion-backend modes: total denoise time and final-latent error vs eager (and vs float32).

outputs, all directly in --out: bench.json (every number, the environment, argv), bench.md,
bench.png (step time per mode), profile_eager.txt, profile_optimize.txt.
Without CUDA the command stops with one line unless --allow-cpu is given: then it runs a tiny smoke
version (config tiny, float32, eager/optimize/backend-eager, host timers) writing the same files.

exit status: 0 every selected mode ran; 3 some mode failed (recorded, the run went on);
2 bad arguments or no CUDA GPU; 124 stopped by SIGTERM or the time limit (files still written).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

# --- what is measured -----------------------------------------------------------------------

FILES = ("bench.json", "bench.md", "bench.png", "profile_eager.txt", "profile_optimize.txt")
"""Everything the bench writes, directly in --out (the GPU box returns at most 8 files)."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ModeSpec:
    name: str
    what: str
    compiles: bool  # runs torch.compile: gated by --compile-groups and the time budget
    needs_cuda: bool
    priority: tuple[int, int]  # (largest config, smallest config): 0 always runs; under a short
    #                            time budget higher numbers are dropped first (see Budget)
    estimate_s: float  # H200 wall time for a 48-block model (Hunyuan3D-2), set-up + measurement
    fusion: bool  # our pass is in it (the fidelity target applies)


MODES: dict[str, ModeSpec] = {spec.name: spec for spec in (
    ModeSpec("eager", "the model as written",
             compiles=False, needs_cuda=False, priority=(0, 0), estimate_s=6, fusion=False),
    ModeSpec("optimize", "fusion_pass.optimize() on a deepcopy",
             compiles=False, needs_cuda=False, priority=(0, 0), estimate_s=12, fusion=True),
    ModeSpec("optimize+cudagraph", "optimize(cuda_graphs=True): each optimized module (the whole step) replayed as a CUDA graph",
             compiles=False, needs_cuda=True, priority=(0, 0), estimate_s=14, fusion=True),
    ModeSpec("compile", "torch.compile (default Inductor)",
             compiles=True, needs_cuda=False, priority=(1, 2), estimate_s=95, fusion=False),
    ModeSpec("compile-reduce-overhead", 'torch.compile(mode="reduce-overhead")',
             compiles=True, needs_cuda=True, priority=(3, 1), estimate_s=80, fusion=False),
    ModeSpec("backend-inductor", 'fusion_pass.backend(inner="inductor")',
             compiles=True, needs_cuda=False, priority=(1, 2), estimate_s=95, fusion=True),
    ModeSpec("backend-eager", 'fusion_pass.backend(inner="eager")',
             compiles=True, needs_cuda=False, priority=(3, 3), estimate_s=30, fusion=True),
    ModeSpec("backend-inductor-cudagraphs", 'fusion_pass.backend(inner="inductor", cudagraphs=True)',
             compiles=True, needs_cuda=True, priority=(4, 3), estimate_s=80, fusion=True),
)}
"""Priorities follow the targets: compile and backend-inductor of the large model (optimize and the
backend vs compile), compile-reduce-overhead of the small one (2mini is launch-bound: its target is
optimize+cudagraph vs reduce-overhead), then the rest."""

RUN_ORDER = ("eager", "optimize", "optimize+cudagraph", "backend-eager", "backend-inductor", "compile",
             "compile-reduce-overhead", "backend-inductor-cudagraphs")
"""Order within a group. Compile caches are shared within the process, so a later compile may
reuse kernels of an earlier one: backend-inductor runs before compile, which makes the
"backend compile time <= compile's" comparison conservative for the backend."""

E2E_MODES = ("eager", "optimize", "optimize+cudagraph")
E2E_BEST_OF = (("compile", "compile-reduce-overhead"),
               ("backend-inductor", "backend-inductor-cudagraphs", "backend-eager"))
"""End to end runs these modes plus the fastest (by step median) of each tuple."""

CPU_DEFAULTS = {"configs": "tiny", "dtypes": "float32", "modes": "eager,optimize,backend-eager"}
GPU_DEFAULTS = {"configs": "hunyuan3d-2,hunyuan3d-2mini", "dtypes": "float16,bfloat16", "modes": ",".join(MODES)}
DEFAULT_COMPILE_GROUPS = "*/float16"
QUICK_COMPILE_GROUPS = "hunyuan3d-2mini/float16"
DEFAULT_BUDGET_S = 510.0  # the default GPU run must end inside 9 minutes
GROUP_OPEN_S = 8.0  # build (float32, on the GPU), cast, two reference calls: Hunyuan3D-2 on an H200
REFERENCE_BLOCKS = 48  # Hunyuan3D-2: 16 double + 32 single blocks; MODES' estimates are for it

# Kernel classes by name: cuBLAS/cuBLASLt (gemm, gemv, nvjet, xmma, cutlass, splitK), SDPA's flash,
# memory-efficient and cuDNN kernels; on the CPU the aten ops. Triton kernels (Inductor's
# triton_poi/red/per_fused_..., whose names list the ops they fused, and ours) count as "other",
# except Inductor's GEMM templates (triton_tem_).
GEMM_RE = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk|wgmma|^triton_tem_|"
                     r"^aten::(linear|mm|bmm|addmm|baddbmm)$", re.I)
ATTENTION_RE = re.compile(r"flash|fmha|attention|sdpa", re.I)

TARGETS = {
    "optimize_vs_eager": 0.60,
    "optimize_vs_compile": 1.00,
    "optimize_setup_s": 5.0,
    "backend_vs_compile": 0.90,
    "backend_compile_time": 1.00,
    "peak_memory": 1.00,
    "cudagraph_vs_reduce_overhead": 1.00,
    "fidelity": 1.10,
}


# --- arguments ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fusion-pass bench`` options."""
    what = parser.add_argument_group("what to run")
    which = what.add_mutually_exclusive_group()
    which.add_argument("--official", dest="model", action="store_const", const="official",
                       help="the official hy3dgen DiT file (default on a GPU; needs hy3dgen installed)")
    which.add_argument("--ours", dest="model", action="store_const", const="ours",
                       help="reference_models' clean-room twin (default on the CPU)")
    what.add_argument("--configs", metavar="A,B",
                      help=f"configs (default GPU: {GPU_DEFAULTS['configs']}; CPU: {CPU_DEFAULTS['configs']})")
    what.add_argument("--dtypes", metavar="A,B",
                      help=f"dtypes (default GPU: {GPU_DEFAULTS['dtypes']}; CPU: {CPU_DEFAULTS['dtypes']})")
    what.add_argument("--modes", metavar="A,B",
                      help=f"modes to measure, any of {', '.join(MODES)} (default GPU: all; CPU: "
                           f"{CPU_DEFAULTS['modes']})")
    what.add_argument("--compile-groups", metavar="PATTERNS",
                      help="config/dtype globs in which the torch.compile modes run, or 'all' (default "
                           f"'{DEFAULT_COMPILE_GROUPS}'; 'all' when --modes is given; --quick: "
                           f"'{QUICK_COMPILE_GROUPS}')")
    what.add_argument("--batch", type=int, default=2, help="batch size (default 2: the CFG batch)")
    what.add_argument("--latent-tokens", type=int, metavar="N", help="override the configs' latent tokens")
    what.add_argument("--cond-tokens", type=int, metavar="N", help="override the configs' condition tokens")
    what.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (default 0)")
    what.add_argument("--allow-cpu", action="store_true",
                      help="without CUDA, run a tiny smoke version on the CPU instead of stopping")

    how = parser.add_argument_group("how long")
    how.add_argument("--warmup", type=int, metavar="N", help="warm-up steps per mode (default 5; CPU 1)")
    how.add_argument("--repeat", type=int, metavar="M", help="timed steps per mode (default 20; CPU 2)")
    how.add_argument("--e2e", metavar="SPEC", default="auto",
                     help="end-to-end denoising in these config/dtype groups: 'auto' (hunyuan3d-2/float16 "
                          "on a GPU, none on the CPU), 'none', 'all', or globs like 'hunyuan3d-2*/float16'")
    how.add_argument("--e2e-steps", type=int, metavar="N", help="denoising steps (default 50; --quick 10)")
    how.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale (default 5.0)")
    how.add_argument("--no-e2e-fp32", action="store_true", help="skip the float32 end-to-end reference run")
    how.add_argument("--no-profile", action="store_true", help="skip the profiler step (no kernel counts)")
    how.add_argument("--time-budget", type=float, metavar="S",
                     help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:g} on a GPU, unlimited on the "
                          "CPU; 0: unlimited): compile modes that would not fit are skipped, most expendable first")
    how.add_argument("--quick", action="store_true",
                     help=f"warm-up 2, repeat 5, 10 e2e steps, compile modes only in {QUICK_COMPILE_GROUPS}, "
                          "no float32 e2e")
    how.add_argument("--keep-compile-cache", action="store_true",
                     help="reuse the Inductor/Triton caches on disk (default: fresh ones, so compile times are cold)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default="fusion_pass_bench", type=Path,
                     help=f"folder for {', '.join(FILES)} (default %(default)s, in the current folder)")


@dataclass
class Settings:
    """The parsed, defaulted arguments."""

    device: torch.device
    official: bool
    configs: list[str]
    dtypes: list[str]
    modes: list[str]
    compile_groups: list[str]
    e2e_groups: list[str]
    batch: int
    latent_tokens: int | None
    cond_tokens: int | None
    seed: int
    warmup: int
    repeat: int
    e2e_steps: int
    guidance_scale: float
    e2e_fp32: bool
    profile: bool
    budget_s: float
    fresh_compile_cache: bool
    out: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class UsageError(Exception):
    """Bad arguments: one line, exit status 2."""


def _settings(args: argparse.Namespace, cuda: bool) -> Settings:
    from reference_models import CONFIGS

    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    configs = _split(args.configs or defaults["configs"])
    for name in configs:
        if name not in CONFIGS:
            raise UsageError(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    dtypes = [DTYPE_ALIASES.get(name, name) for name in _split(args.dtypes or defaults["dtypes"])]
    for name in dtypes:
        if name not in DTYPES:
            raise UsageError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    modes = _split(args.modes or defaults["modes"])
    for name in modes:
        if name not in MODES:
            raise UsageError(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
    if args.compile_groups:
        compile_groups = _split(args.compile_groups)
    elif args.modes or not cuda:
        compile_groups = ["all"]
    else:
        compile_groups = [QUICK_COMPILE_GROUPS if args.quick else DEFAULT_COMPILE_GROUPS]
    e2e = args.e2e.strip()
    e2e_groups = (["hunyuan3d-2/float16"] if cuda else []) if e2e == "auto" else [] if e2e == "none" else _split(e2e)
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    official = (args.model or ("official" if cuda else "ours")) == "official"
    if official:
        from reference_models import official_file

        try:
            official_file()
        except ModuleNotFoundError as exc:
            if args.model == "official":
                raise UsageError(str(exc)) from None
            official = False  # the GPU default without hy3dgen: say so in the notes
    budget = args.time_budget if args.time_budget is not None else (DEFAULT_BUDGET_S if cuda else 0.0)
    return Settings(
        device=torch.device("cuda" if cuda else "cpu"),
        official=official,
        configs=configs,
        dtypes=dtypes,
        modes=[m for m in RUN_ORDER if m in modes],
        compile_groups=compile_groups,
        e2e_groups=e2e_groups,
        batch=args.batch,
        latent_tokens=args.latent_tokens,
        cond_tokens=args.cond_tokens,
        seed=args.seed,
        warmup=_pick(args.warmup, quick=2, gpu=5, cpu=1, args=args, cuda=cuda),
        repeat=_pick(args.repeat, quick=5, gpu=20, cpu=2, args=args, cuda=cuda),
        e2e_steps=args.e2e_steps or (10 if args.quick else 50),
        guidance_scale=args.guidance_scale,
        e2e_fp32=not (args.no_e2e_fp32 or args.quick),
        profile=not args.no_profile,
        budget_s=budget if budget and budget > 0 else math.inf,
        fresh_compile_cache=not args.keep_compile_cache,
        out=args.out,
    )


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _pick(value, *, quick, gpu, cpu, args, cuda) -> int:
    if value is not None:
        return max(1, value)
    return quick if args.quick else gpu if cuda else cpu


def _matches(groups: list[str], config: str, dtype: str) -> bool:
    return any(g == "all" or fnmatch.fnmatchcase(f"{config}/{dtype}", g) for g in groups)


# --- one group's shared state ---------------------------------------------------------------

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


# --- modes ----------------------------------------------------------------------------------

def _prepare_eager(group: Group) -> Prepared:
    model = copy.deepcopy(group.model)
    return Prepared(lambda inputs: _call(model, inputs), 0.0, "none (a deepcopy)", keep=model)


def _prepare_optimize(group: Group) -> Prepared:
    import fusion_pass

    model = copy.deepcopy(group.model)
    start = time.perf_counter()
    fusion_pass.optimize(model)
    setup = time.perf_counter() - start
    return Prepared(lambda inputs: _call(model, inputs), setup, "wall time of fusion_pass.optimize()",
                    extra={"fusion": _fusion_facts(fusion_pass.report(model), group.cfg)}, keep=model)


def _prepare_optimize_cudagraph(group: Group) -> Prepared:
    """``optimize(model, cuda_graphs=True)``: each optimized module is captured on its first
    call and replayed after that; on the official model that is the whole step (its timestep
    embedding's CPU ``arange`` is a cached constant, see ``fusion_pass/constants.py``)."""
    import fusion_pass
    from fusion_pass.cuda_graphs import replay_paused

    model = copy.deepcopy(group.model)
    start = time.perf_counter()
    fusion_pass.optimize(model, cuda_graphs=True)
    first = _call(model, group.inputs).clone()  # captures
    torch.cuda.synchronize()
    setup = time.perf_counter() - start
    checks = []
    for seed in (group.settings.seed + 101, None):  # fresh inputs, then the group's own
        inputs = _make_inputs(group.cfg, group.settings, group.dtype, seed) if seed is not None else group.inputs
        replayed = _call(model, inputs).clone()
        with replay_paused(model):  # the same fused code, run without replay
            fresh = _call(model, inputs)
        checks.append({"bitwise_equal": bool(torch.equal(replayed, fresh)), "rel_err": _rel_err(replayed, fresh)})
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


# --- measuring one mode ---------------------------------------------------------------------

def _measure(group: Group, mode: str) -> dict[str, Any]:
    """Prepare ``mode``, time it, take its memory, errors and kernel profile."""
    settings = group.settings
    cuda = settings.cuda
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # so that the growth of reserved memory is this mode's
        base = torch.cuda.memory_allocated()
        reserved_base = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
    dynamo_before = _dynamo_counts()
    wall_start = time.perf_counter()

    prepared = PREPARE[mode](group)
    start = time.perf_counter()
    out = prepared.step(group.inputs)
    _sync(settings)
    first_call_s = time.perf_counter() - start
    del out
    setup_s = prepared.setup_s + (first_call_s if prepared.first_call_in_setup else 0.0)
    for _ in range(settings.warmup - 1):
        prepared.step(group.inputs)
    _sync(settings)
    record: dict[str, Any] = {"status": "ok", "what": MODES[mode].what}
    if cuda:
        setup_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()

    times = _time_steps(prepared.step, group.inputs, settings)

    if cuda:
        steady_peak = torch.cuda.max_memory_allocated() - base
        record["peak_mb"] = _mb(max(setup_peak, steady_peak))
        record["steady_peak_mb"] = _mb(steady_peak)
        # what the mode holds from the device: CUDA-graph pools count here in full (replays reuse
        # memory the allocator sees as free, so they are invisible to max_memory_allocated)
        record["reserved_mb"] = _mb(torch.cuda.memory_reserved() - reserved_base)
    out = prepared.step(group.inputs).to(torch.float32, copy=True)  # CUDA-graph outputs are overwritten
    _sync(settings)
    record["step_ms"] = _summary(times, "cuda-events" if cuda else "host perf_counter")
    record["setup_s"] = round(setup_s, 3)
    record["setup_what"] = prepared.setup_what
    record["first_call_s"] = round(first_call_s, 3)
    record["err_vs_eager"] = _rel_err(out, group.ref_eager)
    record["err_vs_fp32"] = _rel_err(out, group.ref_fp32)
    if settings.profile:
        try:  # a profiler failure costs the kernel figures, not the timings
            record["profile"] = _profile(prepared.step, group.inputs, settings)
        except Exception as exc:  # noqa: BLE001
            record["profile_error"] = _one_line(exc)
    record.update(prepared.extra)
    if prepared.after is not None:
        record.update(prepared.after())
    if MODES[mode].compiles:
        record["dynamo"] = {k: v - dynamo_before.get(k, 0) for k, v in _dynamo_counts().items()}
    record["wall_s"] = round(time.perf_counter() - wall_start, 2)
    if mode in _e2e_candidates(settings) and _matches(settings.e2e_groups, group.config, group.dtype):
        group.keep[mode] = prepared
    return record


def _time_steps(step, inputs: StepInputs, settings: Settings) -> list[float]:
    """Milliseconds per step: CUDA events around each call (no sync between calls), or host time."""
    if not settings.cuda:
        times = []
        for _ in range(settings.repeat):
            start = time.perf_counter()
            step(inputs)
            times.append((time.perf_counter() - start) * 1e3)
        return times
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(settings.repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(settings.repeat)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        start.record()
        step(inputs)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def _summary(times: list[float], timer: str) -> dict[str, Any]:
    return {"median": round(_percentile(times, 0.5), 4), "p10": round(_percentile(times, 0.1), 4),
            "p90": round(_percentile(times, 0.9), 4), "n": len(times), "timer": timer}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref||, in float32."""
    out, ref = out.detach().float(), ref.detach().float()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def _mb(nbytes: int) -> float:
    return round(nbytes / 2**20, 1)


def _dynamo_counts() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


# --- the profile ----------------------------------------------------------------------------

def _profile(step, inputs: StepInputs, settings: Settings) -> dict[str, Any]:
    """One step under torch.profiler: kernels (CUDA) or top-level aten ops (CPU), their time,
    the GEMM + attention share, and the top-20 table by total time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # CUDA activity alone on a GPU: the kernels are what is counted, and skipping the CPU ops
    # keeps the trace's post-processing to a fraction of a second for 2,400 kernels
    activities = [ProfilerActivity.CUDA] if settings.cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step(inputs)
        _sync(settings)
    events = prof.events()
    if settings.cuda:
        kernels = [e for e in events
                   if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
        unit = "kernels"
    else:
        kernels = [e for e in events if e.device_type == DeviceType.CPU and "::" in e.name and not _has_op_parent(e)]
        unit = "top-level ops (CPU)"
    rows: dict[str, list[float]] = {}
    for event in kernels:
        rows.setdefault(event.name, []).append(event.time_range.elapsed_us())
    total_us = sum(sum(v) for v in rows.values())
    gemm_attn_us = sum(sum(v) for name, v in rows.items() if _kernel_class(name) != "other")
    table = sorted(((sum(v), len(v), name) for name, v in rows.items()), reverse=True)[:20]
    return {
        "unit": unit,
        "kernels": len(kernels),
        "kernel_ms": round(total_us / 1e3, 3),
        "gemm_attn_ms": round(gemm_attn_us / 1e3, 3),
        "other_ms": round((total_us - gemm_attn_us) / 1e3, 3),
        "gemm_attn_fraction": round(gemm_attn_us / total_us, 4) if total_us else None,
        "top20": [{"name": name, "calls": calls, "total_us": round(us, 1), "class": _kernel_class(name)}
                  for us, calls, name in table],
    }


def _has_op_parent(event) -> bool:
    """Whether a dispatcher op (aten::, fusion_pass::, ...) encloses this CPU event."""
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if "::" in parent.name:
            return True
        parent = getattr(parent, "cpu_parent", None)
    return False


def _kernel_class(name: str) -> str:
    if name.startswith("triton_") and not name.startswith("triton_tem_"):
        return "other"
    if ATTENTION_RE.search(name):
        return "attention"
    if GEMM_RE.search(name):
        return "gemm"
    return "other"


def _profile_text(group_key: str, mode: str, profile: dict[str, Any]) -> str:
    total = profile["kernel_ms"]
    lines = [f"== {group_key} / {mode}: {profile['kernels']} {profile['unit']} per step, {total:.3f} ms in them; "
             f"GEMM+attention {profile['gemm_attn_ms']:.3f} ms ({100 * (profile['gemm_attn_fraction'] or 0):.1f} %), "
             f"rest {profile['other_ms']:.3f} ms ==",
             f"{'#':>3} {'total ms':>9} {'calls':>6} {'mean us':>9} {'%':>6}  {'class':<9} name"]
    for i, row in enumerate(profile["top20"], 1):
        share = 100 * row["total_us"] / 1e3 / total if total else 0.0
        name = row["name"] if len(row["name"]) <= 110 else row["name"][:107] + "..."
        lines.append(f"{i:>3} {row['total_us'] / 1e3:>9.3f} {row['calls']:>6} {row['total_us'] / row['calls']:>9.1f} "
                     f"{share:>6.1f}  {row['class']:<9} {name}")
    return "\n".join(lines) + "\n\n"


# --- end to end -----------------------------------------------------------------------------

def _e2e_candidates(settings: Settings) -> set[str]:
    return set(E2E_MODES) | {m for family in E2E_BEST_OF for m in family}


def _e2e_modes(group: Group, results: dict[str, Any]) -> list[str]:
    chosen = [m for m in E2E_MODES if m in group.keep]
    for family in E2E_BEST_OF:
        ran = [m for m in family if m in group.keep and results.get(m, {}).get("status") == "ok"]
        if ran:
            chosen.append(min(ran, key=lambda m: results[m]["step_ms"]["median"]))
    return chosen


def _denoise(step, model_dtype: torch.dtype, latents: Tensor, cond: Tensor, settings: Settings,
             guidance_embed: bool) -> Tensor:
    """The official flow-matching Euler loop (hy3dgen's Hunyuan3DDiTFlowMatchingPipeline and
    FlowMatchEulerDiscreteScheduler, shift 1): sigmas = linspace(0, 1, steps), t = sigma passed as
    ``t.expand(B).to(dtype) / 1000`` with t = 1000 sigma, CFG over a doubled batch (cond first),
    and ``x += (sigma_next - sigma) * v`` in float32, cast back to the model's dtype."""
    device = latents.device
    sigmas = torch.linspace(0, 1, settings.e2e_steps, dtype=torch.float64).to(device=device, dtype=torch.float32)
    timesteps = sigmas * 1000
    sigmas = torch.cat([sigmas, torch.ones(1, device=device)])
    kwargs = {}
    if guidance_embed:
        kwargs["guidance"] = torch.full((latents.shape[0],), settings.guidance_scale, device=device, dtype=model_dtype)
    for i, t in enumerate(timesteps):
        x = latents if guidance_embed else torch.cat([latents] * 2)
        timestep = t.expand(x.shape[0]).to(latents.dtype) / 1000
        pred = step(StepInputs(x, timestep, {"main": cond}, kwargs))
        if not guidance_embed:
            pred_cond, pred_uncond = pred.chunk(2)
            pred = pred_uncond + settings.guidance_scale * (pred_cond - pred_uncond)
        latents = (latents.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * pred).to(pred.dtype)
    return latents


def _run_e2e(group: Group, results: dict[str, Any], console,
             may_spend: Callable[[float], str | None]) -> dict[str, Any]:
    settings = group.settings
    cfg = group.cfg
    guidance_embed = bool(getattr(cfg, "guidance_embed", False))
    if not guidance_embed and settings.batch % 2:
        return {"status": "skipped", "reason": "CFG needs an even --batch"}
    dtype = DTYPES[group.dtype]
    generator = torch.Generator().manual_seed(settings.seed + 7)
    n = settings.batch if guidance_embed else settings.batch // 2
    latents0 = torch.randn(n, group.inputs.x.shape[1], group.inputs.x.shape[2], generator=generator)
    cond = torch.randn(settings.batch, *group.inputs.contexts["main"].shape[1:], generator=generator)
    latents0 = latents0.to(settings.device, dtype)
    cond = cond.to(settings.device, dtype)
    record: dict[str, Any] = {"steps": settings.e2e_steps, "guidance_scale": settings.guidance_scale,
                              "timer": "host wall time, synchronized", "modes": {}}
    finals: dict[str, Tensor] = {}
    for mode in _e2e_modes(group, results):
        try:
            graphs_before = _dynamo_counts().get("graphs", 0)
            _sync(settings)
            start = time.perf_counter()
            with torch.no_grad():
                final = _denoise(group.keep[mode].step, dtype, latents0, cond, settings, guidance_embed)
            _sync(settings)
            seconds = time.perf_counter() - start
            finals[mode] = final.float()
            entry = {"status": "ok", "total_s": round(seconds, 3),
                     "per_step_ms": round(1e3 * seconds / settings.e2e_steps, 3)}
            recompiled = _dynamo_counts().get("graphs", 0) - graphs_before
            if recompiled:
                entry["recompiled"] = f"{recompiled} new Dynamo graph(s): the time includes a compile"
            record["modes"][mode] = entry
            console.log(f"[{group.key}] e2e {mode}: {seconds:.2f} s for {settings.e2e_steps} steps"
                        + (f" [yellow]({entry['recompiled']})[/yellow]" if recompiled else ""))
        except Exception as exc:  # noqa: BLE001 - record it and go on
            record["modes"][mode] = {"status": "error", "error": _one_line(exc)}
            console.log(f"[{group.key}] e2e {mode}: [red]{_one_line(exc)}[/red]")
    fp32_refusal = None
    if settings.e2e_fp32 and "eager" in record["modes"] and record["modes"]["eager"]["status"] == "ok":
        # float32 runs ~8x slower than fp16/bf16 eager (no tensor cores without TF32)
        fp32_refusal = may_spend(8 * record["modes"]["eager"]["total_s"])
        if fp32_refusal:
            record["fp32"] = f"skipped: {fp32_refusal}"
    if settings.e2e_fp32 and not fp32_refusal:
        model32 = group.fp32_model
        start = time.perf_counter()
        with torch.no_grad():
            final32 = _denoise(lambda inputs: _call(model32, inputs), torch.float32, latents0.float(), cond.float(),
                               settings, guidance_embed)
        _sync(settings)
        finals["float32"] = final32
        record["fp32_total_s"] = round(time.perf_counter() - start, 3)
    eager = finals.get("eager")
    for mode, final in finals.items():
        if mode == "float32":
            continue
        entry = record["modes"][mode]
        if eager is not None:
            entry["err_vs_eager"] = _rel_err(final, eager)
        if "float32" in finals:
            entry["err_vs_fp32"] = _rel_err(final, finals["float32"])
        if eager is not None and mode != "eager":
            entry["speedup_vs_eager"] = round(record["modes"]["eager"]["total_s"] / entry["total_s"], 3)
    record["status"] = "ok"
    return record


# --- the run --------------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop, but write what was measured. A BaseException, so
    that no ``except Exception`` on the way (ours or a library's) swallows it."""


@dataclass
class Item:
    config: str
    dtype: str
    mode: str  # a mode name or "e2e"
    priority: int
    estimate_s: float


class Budget:
    """Skips compile modes that would not fit: an item runs only if its estimate plus every later
    item of a more important priority (or of priority 0) still fits. Estimates learn from
    measured wall times (one correction factor for compile modes, one for the rest)."""

    def __init__(self, seconds: float, start: float):
        self.seconds = seconds
        self.start = start
        self.ratio = {True: [], False: []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def estimate(self, item: Item) -> float:
        compiles = item.mode != "e2e" and MODES[item.mode].compiles
        seen = self.ratio[compiles]
        factor = min(3.0, max(0.3, sum(seen) / len(seen))) if seen else 1.0
        return item.estimate_s * factor

    def learn(self, item: Item, seconds: float) -> None:
        compiles = item.mode != "e2e" and MODES[item.mode].compiles
        if item.estimate_s > 0:
            self.ratio[compiles].append(seconds / item.estimate_s)

    def may_spend(self, seconds: float, later: list[Item]) -> str | None:
        """None if ``seconds`` of optional work fit beside every later priority-0/1 item."""
        if math.isinf(self.seconds):
            return None
        left = self.seconds - self.elapsed()
        reserve = sum(self.estimate(j) for j in later if j.priority <= 1)
        if seconds + reserve > left:
            return f"time budget: needs ~{seconds:.0f} s (+{reserve:.0f} s kept), {max(left, 0):.0f} s left"
        return None

    def refusal(self, item: Item, later: list[Item]) -> str | None:
        if math.isinf(self.seconds):
            return None
        left = self.seconds - self.elapsed()
        need = self.estimate(item)
        if item.priority == 0:
            return None if left > 0 else f"time budget of {self.seconds:.0f} s spent"
        reserve = sum(self.estimate(j) for j in later if j.priority == 0 or j.priority < item.priority)
        if need + reserve > left:
            return (f"time budget: needs ~{need:.0f} s (+{reserve:.0f} s kept for more important items), "
                    f"{max(left, 0):.0f} s left of {self.seconds:.0f} s")
        return None


def _plan(settings: Settings) -> tuple[list[Item], list[str]]:
    """Every (group, mode) to run, in order, with the notes on what was left out."""
    from reference_models import get_config

    items: list[Item] = []
    notes: list[str] = []
    sizes = {c: get_config(c).depth + get_config(c).depth_single_blocks for c in settings.configs}
    for config in settings.configs:
        cfg = get_config(config)
        scale = sizes[config] / REFERENCE_BLOCKS
        tokens = (settings.latent_tokens or cfg.latent_tokens) + (settings.cond_tokens or cfg.cond_tokens)
        work = scale * max(0.2, tokens / 4442)  # eager step time relative to Hunyuan3D-2's
        small = (len(sizes) > 1 and sizes[config] == min(sizes.values())) or "mini" in config
        for dtype in settings.dtypes:
            first = len(items)
            for mode in settings.modes:
                spec = MODES[mode]
                if spec.compiles and not _matches(settings.compile_groups, config, dtype):
                    continue
                priority = spec.priority[1 if small else 0]
                # compile time grows faster than the block count (26 s for 24 blocks, 84 s for 48)
                cost = spec.estimate_s * (scale ** 1.5 if spec.compiles else work)
                items.append(Item(config, dtype, mode, priority, 3 + cost))
            if _matches(settings.e2e_groups, config, dtype):
                # five modes at ~1x eager each (fp32 e2e is budgeted on its own, at the time)
                items.append(Item(config, dtype, "e2e", 0, 5 + settings.e2e_steps * 0.08 * work * 5))
            if len(items) > first:  # building the model and the two references happens first
                items[first].estimate_s += GROUP_OPEN_S * scale
    compile_modes = [m for m in settings.modes if MODES[m].compiles]
    if compile_modes and settings.compile_groups != ["all"]:
        notes.append(f"torch.compile modes ({', '.join(compile_modes)}) ran only in groups matching "
                     f"--compile-groups {','.join(settings.compile_groups)} (a 1.1B compile takes 60-85 s); "
                     "pass --compile-groups all for every group")
    return items, notes


def run(args: argparse.Namespace) -> int:
    """``fusion-pass bench``: returns the exit status (see the module docstring)."""
    from rich.console import Console

    console = Console(stderr=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=170)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("bench needs a CUDA GPU (or --allow-cpu for a tiny smoke run on the CPU)", file=sys.stderr)
        return 2
    try:
        settings = _settings(args, cuda)
    except UsageError as exc:
        print(f"fusion-pass bench: error: {exc}", file=sys.stderr)
        return 2
    budget = Budget(settings.budget_s, started)

    items, notes = _plan(settings)
    if not settings.official and args.model is None and cuda:
        notes.append("hy3dgen is not installed: measured reference_models' twin, not the official file")
    results: dict[str, Any] = {
        "schema": 1,
        "env": _environment(settings),
        "argv": list(getattr(sys, "orig_argv", sys.argv)),
        "settings": _settings_dict(settings),
        "groups": [],
        "targets": [],
        "notes": notes,
        "status": "running",
    }
    profiles = {"eager": [], "optimize": []}
    settings.out.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    status = 0
    try:
        with _compile_environment(settings):
            status = _run_items(settings, items, results, profiles, console, budget)
        results["status"] = "complete"
    except (Interrupted, KeyboardInterrupt) as exc:
        cause = "SIGTERM" if isinstance(exc, Interrupted) else "Ctrl-C"
        results["status"] = f"interrupted by {cause} during {results.pop('current', 'set-up')}"
        console.print(f"[bold red]{results['status']}: writing what was measured[/bold red]")
        status = 124
    finally:
        signal.signal(signal.SIGTERM, previous)
        results["targets"] = _targets(results)
        _write_outputs(results, profiles, settings, console, chart=True)
        _print_summary(results, console)
    return status


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Interrupted()


@contextlib.contextmanager
def _compile_environment(settings: Settings):
    """For the run only, restored after: fresh Inductor/Triton cache folders (cold compiles), and
    Dynamo recompile limits raised. Each group compiles the same forward up to five times (once
    per backend); past the default limit (8) Dynamo would silently run a later mode eagerly."""
    import torch._dynamo.config as dynamo_config

    saved_env = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    limits = [name for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                                "accumulated_cache_size_limit") if hasattr(dynamo_config, name)]
    saved_limits = {name: getattr(dynamo_config, name) for name in limits}
    cache = None
    try:
        if settings.fresh_compile_cache:
            cache = tempfile.mkdtemp(prefix="fusion_pass_bench_cache_")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
            os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        for name in limits:
            setattr(dynamo_config, name, max(saved_limits[name], 256))
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, value in saved_limits.items():
            setattr(dynamo_config, name, value)
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


def _run_items(settings, items, results, profiles, console, budget: "Budget") -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    failures = 0
    fp32_models: dict[str, nn.Module] = {}
    groups: dict[str, Group] = {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    if settings.cuda and settings.profile:
        _init_cupti()
    with progress:
        task = progress.add_task("bench", total=len(items))
        for index, item in enumerate(items):
            start = time.perf_counter()
            key = f"{item.config}/{item.dtype}"
            progress.update(task, description=f"{key} {item.mode}")
            if key not in groups:
                try:
                    _open_group(item.config, item.dtype, settings, fp32_models, results, groups, console)
                except Exception as exc:  # noqa: BLE001 - record it; the other groups still run
                    groups[key] = None
                    results["groups"].append({"config": item.config, "dtype": item.dtype, "status": "error",
                                              "error": _one_line(exc), "modes": {},
                                              "traceback": traceback.format_exc(limit=-6)[-3000:]})
                    console.log(f"[{key}] [bold red]set-up failed[/bold red]: {_one_line(exc)}")
                    failures += 1
            group = groups[key]
            record = _group_record(results, key)
            refusal = budget.refusal(item, items[index + 1:]) if group is not None else "the group's set-up failed"
            if refusal is not None:
                if item.mode == "e2e":
                    record["e2e"] = {"status": "skipped", "reason": refusal}
                else:
                    record["modes"][item.mode] = {"status": "skipped", "reason": refusal, "what": MODES[item.mode].what}
                console.log(f"[{key}] {item.mode}: [yellow]skipped: {refusal}[/yellow]")
            else:
                results["current"] = f"{key} {item.mode}"
                if item.mode == "e2e":
                    later = items[index + 1:]
                    record["e2e"] = outcome = _safe_e2e(group, record["modes"], console,
                                                        lambda seconds: budget.may_spend(seconds, later))
                else:
                    outcome = _safe_measure(group, item.mode, console)
                    record["modes"][item.mode] = outcome
                    failures += outcome["status"] == "error"
                    if item.mode in profiles and "profile" in outcome:
                        profiles[item.mode].append(_profile_text(key, item.mode, outcome["profile"]))
                results.pop("current", None)
                if outcome["status"] == "ok":  # a quick failure says nothing about the time a success takes
                    budget.learn(item, time.perf_counter() - start)
            results["elapsed_s"] = round(budget.elapsed(), 1)
            progress.advance(task)
            last_of_group = index + 1 == len(items) or f"{items[index + 1].config}/{items[index + 1].dtype}" != key
            if last_of_group:
                closing = groups.pop(key)
                if closing is not None:
                    _close_group(closing, settings)
                if index + 1 == len(items) or items[index + 1].config != item.config:
                    fp32_models.pop(item.config, None)
                    _free(settings)
            _write_outputs(results, profiles, settings, console, chart=False)
    return 3 if failures else 0


def _init_cupti() -> None:
    """Start the CUDA profiler once before any CUDA graph is captured: kernels of graphs captured
    before CUPTI's first initialisation can be missing from later profiles."""
    from torch.profiler import ProfilerActivity, profile

    with contextlib.suppress(Exception), profile(activities=[ProfilerActivity.CUDA]):
        torch.ones(8, device="cuda").add_(1)
        torch.cuda.synchronize()


def _safe_measure(group: Group, mode: str, console) -> dict[str, Any]:
    spec = MODES[mode]
    if spec.needs_cuda and not group.settings.cuda:
        return {"status": "skipped", "reason": "needs CUDA", "what": spec.what}
    try:
        record = _measure(group, mode)
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a failing mode is recorded and the run goes on
        console.log(f"[{group.key}] {mode}: [bold red]ERROR[/bold red] {_one_line(exc)}")
        return {"status": "error", "what": spec.what, "error": _one_line(exc),
                "traceback": traceback.format_exc(limit=-6)[-3000:]}
    console.log(f"[{group.key}] {mode}: {_short_line(record)}")
    return record


def _safe_e2e(group: Group, modes: dict[str, Any], console, may_spend) -> dict[str, Any]:
    try:
        return _run_e2e(group, modes, console, may_spend)
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001
        console.log(f"[{group.key}] e2e: [bold red]ERROR[/bold red] {_one_line(exc)}")
        return {"status": "error", "error": _one_line(exc), "traceback": traceback.format_exc(limit=-6)[-3000:]}


def _open_group(config, dtype, settings, fp32_models, results, groups, console) -> Group:
    from reference_models import get_config

    cfg = get_config(config)
    overrides = {k: v for k, v in (("latent_tokens", settings.latent_tokens), ("cond_tokens", settings.cond_tokens))
                 if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if config not in fp32_models:
        _free(settings)
        fp32_models[config] = _build(cfg, settings)
    fp32 = fp32_models[config]
    model = copy.deepcopy(fp32).to(DTYPES[dtype])
    inputs = _make_inputs(cfg, settings, dtype, settings.seed)
    ref_eager = _call(model, inputs).float()
    ref_fp32 = _call(fp32, inputs.map(lambda t: t.float() if t.is_floating_point() else t)).float()
    group = Group(config, dtype, cfg, model, inputs, ref_eager, ref_fp32, settings, fp32)
    groups[group.key] = group
    params = sum(p.numel() for p in model.parameters())
    results["groups"].append({
        "config": config, "dtype": dtype,
        "model": "official hy3dgen file" if settings.official else "reference_models (ours)",
        "parameters": params,
        "shapes": {"x": list(inputs.x.shape), "t": list(inputs.t.shape),
                   "cond": list(inputs.contexts["main"].shape)},
        "blocks": {"double": cfg.depth, "single": cfg.depth_single_blocks},
        "eager_vs_fp32": _rel_err(ref_eager, ref_fp32),
        "modes": {},
    })
    console.log(f"[{group.key}] {params / 1e9:.2f}B parameters, x {tuple(inputs.x.shape)}, "
                f"cond {tuple(inputs.contexts['main'].shape)}; "
                f"eager err vs fp32 {results['groups'][-1]['eager_vs_fp32']:.2e}")
    return group


def _build(cfg, settings: Settings) -> nn.Module:
    from reference_models import build_model, load_official

    torch.manual_seed(settings.seed)
    builder = load_official if settings.official else build_model
    return builder(cfg, device=settings.device, dtype=torch.float32).eval().requires_grad_(False)


def _make_inputs(cfg, settings: Settings, dtype: str, seed: int) -> StepInputs:
    from reference_models import example_inputs

    made = example_inputs(cfg, settings.batch, dtype=DTYPES[dtype], device=settings.device, seed=seed)
    return StepInputs(made.x, made.t, dict(made.contexts), dict(made.kwargs))


def _close_group(group: Group, settings: Settings) -> None:
    group.keep.clear()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()  # drops this group's compiled code (and its recompile counts)
    _free(settings)


def _free(settings: Settings) -> None:
    gc.collect()
    if settings.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _group_record(results, key: str) -> dict[str, Any]:
    return next(g for g in results["groups"] if f"{g['config']}/{g['dtype']}" == key)


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:300]


def _short_line(record: dict[str, Any]) -> str:
    step = record["step_ms"]
    parts = [f"{step['median']:.2f} ms (p10 {step['p10']:.2f}, p90 {step['p90']:.2f})",
             f"setup {record['setup_s']:.2f} s",
             f"err eager {record['err_vs_eager']:.1e} fp32 {record['err_vs_fp32']:.1e}"]
    if "peak_mb" in record:
        parts.append(f"peak {record['peak_mb']:.0f} MB")
    if "profile" in record:
        parts.append(f"{record['profile']['kernels']} kernels")
    return ", ".join(parts)


# --- environment ----------------------------------------------------------------------------

def _environment(settings: Settings) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": the fp32 reference is fp32
        "platform": platform.platform(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    try:
        from importlib.metadata import version

        env["hy3dgen"] = version("hy3dgen")
    except Exception:  # noqa: BLE001
        env["hy3dgen"] = None
    if settings.cuda:
        props = torch.cuda.get_device_properties(0)
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = f"{props.major}.{props.minor}"
        env["memory_gb"] = round(props.total_memory / 2**30, 1)
        env["driver"] = _nvidia_smi("driver_version")
        env["cuda_driver_api"] = _safe(lambda: torch._C._cuda_getDriverVersion())
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    env["git"] = _safe(lambda: subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or None)
    return env


def _nvidia_smi(query: str) -> str | None:
    return _safe(lambda: subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0])


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def _settings_dict(settings: Settings) -> dict[str, Any]:
    data = dataclasses.asdict(settings)
    data["device"] = str(settings.device)
    data["out"] = str(settings.out)
    data["budget_s"] = None if math.isinf(settings.budget_s) else settings.budget_s
    data["run_order"] = list(settings.modes)
    data["compile_cache"] = ("fresh per run (cold compiles), shared by the modes of the run in run_order"
                             if settings.fresh_compile_cache else "the caches on disk (may be warm)")
    return data


# --- targets --------------------------------------------------------------------------------

def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios the issue targets, per group: PASS / MISS, or n/a with the reason."""
    rows: list[dict[str, Any]] = []
    for group in results["groups"]:
        if group.get("status") == "error":
            continue
        key = f"{group['config']}/{group['dtype']}"
        modes = group["modes"]

        def ok(name):
            return modes.get(name, {}).get("status") == "ok"

        def step(name):
            return modes[name]["step_ms"]["median"]

        def why(*names):
            for name in names:
                if not ok(name):
                    state = modes.get(name, {})
                    reason = state.get("reason") or state.get("error") or "not in --modes"
                    return f"{name}: {state.get('status', 'not run')} ({reason})"[:120]
            return "not measured"

        def add(name, value, limit, why_missing=None, detail=""):
            if value is None:
                rows.append({"group": key, "target": name, "status": "n/a", "value": None, "limit": limit,
                             "detail": why_missing or "not measured"})
            else:
                rows.append({"group": key, "target": name, "status": "PASS" if value <= limit else "MISS",
                             "value": round(value, 4), "limit": limit, "detail": detail})

        both = lambda a, b: ok(a) and ok(b)  # noqa: E731
        add("optimize step / eager", step("optimize") / step("eager") if both("optimize", "eager") else None,
            TARGETS["optimize_vs_eager"], why("optimize", "eager"))
        add("optimize step / compile", step("optimize") / step("compile") if both("optimize", "compile") else None,
            TARGETS["optimize_vs_compile"], why("optimize", "compile"))
        add("optimize set-up s", modes["optimize"]["setup_s"] if ok("optimize") else None, TARGETS["optimize_setup_s"],
            why("optimize"), detail="wall time of optimize()")
        add("backend step / compile", step("backend-inductor") / step("compile")
            if both("backend-inductor", "compile") else None, TARGETS["backend_vs_compile"],
            why("backend-inductor", "compile"))
        add("backend compile s / compile's", modes["backend-inductor"]["setup_s"] / modes["compile"]["setup_s"]
            if both("backend-inductor", "compile") else None, TARGETS["backend_compile_time"],
            why("backend-inductor", "compile"), detail="first call incl. compile; backend-inductor ran first")
        if ok("eager") and "peak_mb" in modes["eager"]:
            eager_peak = modes["eager"]["peak_mb"]
            ratios = {m: r["peak_mb"] / eager_peak for m, r in modes.items()
                      if m != "eager" and r.get("status") == "ok" and "peak_mb" in r}
            worst = max(ratios, key=ratios.get) if ratios else None
            add("peak memory / eager's (worst)", ratios[worst] if worst else None, TARGETS["peak_memory"],
                detail=f"{worst}" if worst else "")
        else:
            add("peak memory / eager's (worst)", None, TARGETS["peak_memory"], "eager not measured on CUDA")
        if "mini" in group["config"]:
            add("optimize+cudagraph step / reduce-overhead",
                step("optimize+cudagraph") / step("compile-reduce-overhead")
                if both("optimize+cudagraph", "compile-reduce-overhead") else None,
                TARGETS["cudagraph_vs_reduce_overhead"], why("optimize+cudagraph", "compile-reduce-overhead"))
        eager_err = group.get("eager_vs_fp32")
        if group["dtype"] == "float32":
            add("fused err fp32 / eager's (worst)", None, TARGETS["fidelity"],
                "float32: eager is the float32 reference")
            continue
        fusion = {m: r["err_vs_fp32"] / max(eager_err, 1e-7) for m, r in modes.items()
                  if MODES[m].fusion and r.get("status") == "ok" and eager_err is not None}
        worst = max(fusion, key=fusion.get) if fusion else None
        add("fused err fp32 / eager's (worst)", fusion[worst] if worst else None, TARGETS["fidelity"],
            detail=worst or "")
    return rows


# --- outputs --------------------------------------------------------------------------------

def _write_outputs(results, profiles, settings: Settings, console, *, chart: bool) -> None:
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    if chart:
        results["targets"] = _targets(results)
    (out / "bench.json").write_text(json.dumps(_finite(results), indent=1, allow_nan=False) + "\n")
    (out / "bench.md").write_text(_markdown(results))
    for mode, texts in profiles.items():
        header = (f"# fusion_pass bench: top-20 kernels by total time per step, mode {mode}\n"
                  f"# {results['env'].get('device')}, torch {results['env'].get('torch')}, "
                  f"triton {results['env'].get('triton')}, {results['env'].get('date')}\n\n")
        (out / f"profile_{mode}.txt").write_text(header + ("".join(texts) or "(not profiled)\n"))
    if chart and not _chart(results, out / "bench.png", console):
        (out / "bench.png").unlink(missing_ok=True)  # no stale chart of an earlier run


def _finite(value):
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _mode_row(group: dict[str, Any], mode: str, record: dict[str, Any], width: int = 200) -> list[str]:
    """One summary row: step, x eager, setup, peak (x eager), errors, kernels, GEMM+attn share."""
    if record.get("status") != "ok":
        text = record.get("error") or record.get("reason") or record.get("status")
        return [mode, f"{record.get('status', '?').upper()}: {text}"[:width], "", "", "", "", "", "", ""]
    eager = group["modes"].get("eager", {})
    step = record["step_ms"]
    vs_eager = step["median"] / eager["step_ms"]["median"] if eager.get("status") == "ok" else None
    peak = record.get("peak_mb")
    peak_ratio = peak / eager["peak_mb"] if peak is not None and eager.get("peak_mb") else None
    profile = record.get("profile") or {}
    return [
        mode,
        f"{step['median']:.2f} ({step['p10']:.2f}-{step['p90']:.2f})",
        _fmt(vs_eager, ".2f"),
        _fmt(record.get("setup_s"), ".1f"),
        f"{_fmt(peak, '.0f')} ({_fmt(peak_ratio, '.2f')})" if peak is not None else "-",
        _fmt(record.get("err_vs_eager"), ".1e"),
        _fmt(record.get("err_vs_fp32"), ".1e"),
        _fmt(profile.get("kernels"), "d"),
        _fmt(100 * profile["gemm_attn_fraction"] if profile.get("gemm_attn_fraction") is not None else None, ".0f"),
    ]


SUMMARY_COLUMNS = ("mode", "step ms (p10-p90)", "x eager", "setup s", "peak MB (x eager)", "err eager",
                   "err fp32", "kernels", "GEMM+attn %")


def _markdown(results: dict[str, Any]) -> str:
    env = results["env"]
    lines = ["# fusion_pass bench", "",
             f"{env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, python {env.get('python')}, "
             f"driver {env.get('driver')}; {env.get('date')}; status: {results.get('status')}", "",
             "`" + " ".join(results.get("argv", [])) + "`", "",
             "Step = one denoiser call at B=2 (CFG batch), median of the timed steps (p10-p90); errors are "
             "||out - ref|| / ||ref|| against eager in the same dtype and against the float32 model; peak memory "
             "is the mode's own (weights copy + activations + CUDA-graph pools), set-up included.", ""]
    for group in results["groups"]:
        if group.get("status") == "error":
            lines += [f"## {group['config']} / {group['dtype']}", "", f"Set-up failed: `{group['error']}`", ""]
            continue
        lines += [f"## {group['config']} / {group['dtype']}", "",
                  f"{group['model']}, {group['parameters'] / 1e9:.2f}B parameters, x {group['shapes']['x']}, "
                  f"cond {group['shapes']['cond']}; "
                  f"eager error vs float32 {_fmt(group.get('eager_vs_fp32'), '.2e')}", "",
                  "| " + " | ".join(SUMMARY_COLUMNS) + " | setup is |", "|" + "---|" * (len(SUMMARY_COLUMNS) + 1)]
        for mode, record in group["modes"].items():
            row = _mode_row(group, mode, record)
            cells = [cell.replace("|", "/") for cell in row] + [record.get("setup_what", "")]
            lines.append("| " + " | ".join(cells) + " |")
        fused = {m: r["fusion"].get("fused_vs_expected") or r["fusion"]["counts"] for m, r in group["modes"].items()
                 if r.get("status") == "ok" and "fusion" in r}
        if fused:
            lines += [""] + [f"- {m} fused (fused/expected): {json.dumps(v)}" for m, v in fused.items()]
        e2e = group.get("e2e")
        if e2e:
            lines += ["", f"End to end ({e2e.get('steps')} steps, CFG {e2e.get('guidance_scale')}): "
                          + (e2e.get("reason") or e2e.get("error") or ""), ""]
            if e2e.get("modes"):
                lines += ["| mode | total s | per step ms | x eager speed-up | err vs eager | err vs fp32 |",
                          "|---|---|---|---|---|---|"]
                for mode, r in e2e["modes"].items():
                    if r.get("status") != "ok":
                        lines.append(f"| {mode} | {r.get('error')} | | | | |")
                        continue
                    lines.append(f"| {mode} | {r['total_s']:.2f} | {r['per_step_ms']:.1f} | "
                                 f"{_fmt(r.get('speedup_vs_eager'), '.2f')} | {_fmt(r.get('err_vs_eager'), '.1e')} | "
                                 f"{_fmt(r.get('err_vs_fp32'), '.1e')} |")
        lines.append("")
    if results.get("targets"):
        lines += ["## Targets", "", "| group | target | value | limit | status | detail |", "|---|---|---|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['group']} | {t['target']} | {_fmt(t['value'], '.3f')} | {t['limit']} | "
                         f"**{t['status']}** | {t['detail']} |")
        lines.append("")
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    return "\n".join(lines)


def _chart(results: dict[str, Any], path: Path, console) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        console.print(f"[yellow]warning: no chart ({_one_line(exc)}); install matplotlib for bench.png[/yellow]")
        return False
    groups = [g for g in results["groups"] if any(r.get("status") == "ok" for r in g["modes"].values())]
    if not groups:
        return False
    cols = min(2, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.2 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        names, medians, lo, hi, colors, notes = [], [], [], [], [], []
        for mode in RUN_ORDER:
            record = group["modes"].get(mode)
            if not record:
                continue
            names.append(mode)
            if record.get("status") != "ok":  # an empty slot that says why
                medians.append(0.0), lo.append(0.0), hi.append(0.0), colors.append("none")
                notes.append(f" {record.get('status')}")
                continue
            step = record["step_ms"]
            medians.append(step["median"])
            lo.append(step["median"] - step["p10"])
            hi.append(step["p90"] - step["median"])
            colors.append("#1f77b4" if MODES[mode].fusion else "#999999")
            notes.append(f" {step['median']:.1f}")
        y = list(range(len(names)))
        ax.barh(y, medians, xerr=[lo, hi], color=colors, capsize=2)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        for i, (value, high, note) in enumerate(zip(medians, hi, notes)):
            ax.text(value + high, i, note, va="center", fontsize=7)
        ax.set_xlim(0, 1.15 * max(m + h for m, h in zip(medians, hi)))
        ax.set_xlabel("ms per step (median, p10-p90)")
        ax.set_title(f"{group['config']} / {group['dtype']}", fontsize=10)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"fusion_pass bench: {results['env'].get('device')} (blue: with fusion_pass)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _print_summary(results: dict[str, Any], console) -> None:
    """The compact tables, printed last (the GPU box returns only the last 12,000 characters):
    one row per mode, the end-to-end line per group, the decided targets, the notes."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1),
                  title="step = one denoiser call (B=2); peak = the mode's own memory (x eager's); "
                        "err = ||out - ref|| / ||ref|| vs eager and vs float32", title_justify="left")
    table.add_column("group", no_wrap=True)
    for column in SUMMARY_COLUMNS:
        table.add_column(column, no_wrap=True)
    for group in results["groups"]:
        if group.get("status") == "error":
            table.add_row(_label(group), "SET-UP FAILED", group["error"][:36], end_section=True)
            continue
        rows = list(group["modes"].items())
        for i, (mode, record) in enumerate(rows):
            table.add_row(_label(group) if i == 0 else "", *_mode_row(group, mode, record, width=36),
                          end_section=i == len(rows) - 1)
    console.print(table)
    for group in results["groups"]:
        e2e = group.get("e2e")
        if not e2e:
            continue
        parts = []
        for mode, r in (e2e.get("modes") or {}).items():
            if r.get("status") == "ok":
                parts.append(f"{mode} {r['total_s']:.2f} s x{_fmt(r.get('speedup_vs_eager'), '.2f', '1')} "
                             f"(err {_fmt(r.get('err_vs_eager'), '.0e')} / fp32 {_fmt(r.get('err_vs_fp32'), '.0e')})")
            else:
                parts.append(f"{mode} ERROR {r.get('error', '')[:60]}")
        detail = "; ".join(parts) or f"{e2e.get('status')}: {e2e.get('reason') or e2e.get('error') or ''}"
        console.print(f"e2e {_label(group)}, {e2e.get('steps')} steps: {detail}")
    decided = [t for t in results["targets"] if t["status"] != "n/a" or "not run" not in t["detail"]]
    if decided:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1),
                      title="targets (n/a rows of modes not run: see bench.md)", title_justify="left")
        for column in ("group", "target", "value", "limit", "status", "detail"):
            table.add_column(column, no_wrap=True)
        style = {"PASS": "green", "MISS": "bold red", "n/a": "yellow"}
        labels = {f"{g['config']}/{g['dtype']}": _label(g) for g in results["groups"]}
        for t in decided:
            table.add_row(labels.get(t["group"], t["group"]), t["target"], _fmt(t["value"], ".3f"), str(t["limit"]),
                          f"[{style[t['status']]}]{t['status']}[/]", t["detail"][:48])
        console.print(table)
    for note in results.get("notes", []):
        console.print(f"note: {note}")
    out = Path(results["settings"]["out"])
    console.print(f"{results.get('status')}; {results.get('elapsed_s', 0):.0f} s; "
                  f"wrote {', '.join(name for name in FILES if (out / name).exists())} to {out}")


_SHORT_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _label(group: dict[str, Any]) -> str:
    """``h3d-2mini fp16``: a group in a dozen characters."""
    return f"{group['config'].replace('hunyuan3d-', 'h3d-')} {_SHORT_DTYPES.get(group['dtype'], group['dtype'])}"


def main(argv: list[str] | None = None) -> int:
    """``python -m fusion_pass.bench ...`` (the same as ``fusion-pass bench ...``)."""
    parser = argparse.ArgumentParser(prog="fusion-pass bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --no-e2e must not mean --no-e2e-fp32
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
