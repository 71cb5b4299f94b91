"""The ``fusion-pass bench`` options and the parsed, defaulted ``Settings`` of one run."""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .spec import (CPU_DEFAULTS, DEFAULT_BUDGET_S, DEFAULT_COMPILE_GROUPS, DTYPE_ALIASES, DTYPES, FILES, GPU_DEFAULTS,
                   MODES, QUICK_COMPILE_GROUPS, RUN_ORDER)


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
                      help=f"modes to measure, any of {', '.join(MODES)} (default GPU: all but the lever "
                           f"modes; CPU: {CPU_DEFAULTS['modes']}); MODE@GLOB|GLOB limits a mode to the "
                           "config/dtype groups matching a glob, e.g. compile@hunyuan3d-2/*")
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
    mode_groups: dict[str, list[str]]  # mode -> config/dtype globs it is limited to (--modes MODE@GLOB|GLOB)
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
    modes, mode_groups = [], {}
    for entry in _split(args.modes or defaults["modes"]):
        name, _, globs = entry.partition("@")
        if name not in MODES:
            raise UsageError(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
        modes.append(name)
        if globs:
            mode_groups.setdefault(name, []).extend(g for g in globs.split("|") if g)
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
        mode_groups=mode_groups,
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


def _settings_dict(settings: Settings) -> dict[str, Any]:
    data = dataclasses.asdict(settings)
    data["device"] = str(settings.device)
    data["out"] = str(settings.out)
    data["budget_s"] = None if math.isinf(settings.budget_s) else settings.budget_s
    data["run_order"] = list(settings.modes)
    data["compile_cache"] = ("fresh per run (cold compiles), shared by the modes of the run in run_order"
                             if settings.fresh_compile_cache else "the caches on disk (may be warm)")
    return data
