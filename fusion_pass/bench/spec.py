"""What is measured: the modes, their order and priorities, dtypes, the defaults of a run."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
    levers: tuple[str, ...] = ()  # opt-in pattern families (patterns.OPT_IN) added to the defaults
    base: str | None = None  # for a lever mode: the mode it adds its levers to

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


def _lever_modes() -> list[ModeSpec]:
    """``optimize+levers`` and ``optimize+cudagraph+levers`` (every opt-in family on), and
    ``optimize+cudagraph+<family>`` per opt-in family: each lever's gain, measured in the same run
    as its base mode. Never in the default --modes: name them."""
    from patterns import OPT_IN_NAMES

    def spec(name, base, levers, what):
        return ModeSpec(name, what, compiles=False, needs_cuda=MODES[base].needs_cuda, priority=(0, 0),
                        estimate_s=MODES[base].estimate_s, fusion=True, levers=tuple(levers), base=base)

    levers = ", ".join(OPT_IN_NAMES)
    modes = [spec("optimize+levers", "optimize", OPT_IN_NAMES, f"optimize() with the opt-in families too ({levers})"),
             spec("optimize+cudagraph+levers", "optimize+cudagraph", OPT_IN_NAMES,
                  f"optimize(cuda_graphs=True) with the opt-in families too ({levers})")]
    modes += [spec(f"optimize+cudagraph+{name}", "optimize+cudagraph", (name,),
                   f"optimize(cuda_graphs=True) with the opt-in family {name}") for name in OPT_IN_NAMES]
    return modes


DEFAULT_MODES = tuple(MODES)
"""What --modes means when not given: every mode but the lever modes."""

MODES.update((spec.name, spec) for spec in _lever_modes())

RUN_ORDER = ("eager", "optimize", "optimize+levers", "optimize+cudagraph",
             *(name for name, spec in MODES.items() if spec.base == "optimize+cudagraph"),
             "backend-eager", "backend-inductor", "compile", "compile-reduce-overhead", "backend-inductor-cudagraphs")
"""Order within a group. Compile caches are shared within the process, so a later compile may
reuse kernels of an earlier one: backend-inductor runs before compile, which makes the
"backend compile time <= compile's" comparison conservative for the backend."""

E2E_MODES = ("eager", "optimize", "optimize+cudagraph")

E2E_BEST_OF = (("compile", "compile-reduce-overhead"),
               ("backend-inductor", "backend-inductor-cudagraphs", "backend-eager"))
"""End to end runs these modes plus the fastest (by step median) of each tuple."""

CPU_DEFAULTS = {"configs": "tiny", "dtypes": "float32", "modes": "eager,optimize,backend-eager"}

GPU_DEFAULTS = {"configs": "hunyuan3d-2,hunyuan3d-2mini", "dtypes": "float16,bfloat16", "modes": ",".join(DEFAULT_MODES)}

DEFAULT_COMPILE_GROUPS = "*/float16"

QUICK_COMPILE_GROUPS = "hunyuan3d-2mini/float16"

DEFAULT_BUDGET_S = 510.0  # the default GPU run must end inside 9 minutes

GROUP_OPEN_S = 8.0  # build (float32, on the GPU), cast, two reference calls: Hunyuan3D-2 on an H200

REFERENCE_BLOCKS = 48  # Hunyuan3D-2: 16 double + 32 single blocks; MODES' estimates are for it
