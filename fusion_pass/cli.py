"""``fusion-pass``: run the pass on a model from the command line and show what it fused.

    fusion-pass inspect hunyuan3d-2                  # the 1.1B DiT, structure only (meta): instant
    fusion-pass inspect tiny --device cpu --check    # also run it: max relative error before/after
    fusion-pass inspect my_model.py:make_model --strict
    fusion-pass bench ...                            # fusion_pass.bench, imported only when used

The library never prints: this module builds the model, calls :func:`fusion_pass.optimize`
and renders the :class:`~fusion_pass.report.Report` it leaves behind (rich tables, or JSON
with ``--json``). A failure the user can act on is one line on stderr plus an exit status:
``EXIT_SHORTFALL`` when the pass ran but fused less than required, ``EXIT_USAGE`` when the
model could not be built or the arguments are wrong (argparse's own status for bad options).
Long steps show their progress on stderr when it is a terminal (:class:`Progress`).

torch, the pass and the models are imported inside the commands, never at import time:
``fusion-pass --help`` and ``--version`` start in about a tenth of a second.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:  # torch, the pass and the models load inside the commands: --help stays instant
    import torch
    from torch import nn

    from fusion_pass.report import Report
    from reference_models import DiTConfig

PROG = "fusion-pass"
EXIT_OK = 0
EXIT_SHORTFALL = 1
EXIT_USAGE = 2

DTYPES = ("float32", "float16", "bfloat16")

#: ``--check`` fails above this max |after - before| / max |before|, per dtype.
CHECK_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}

#: The factory-file function ``--check`` calls for inputs (optional; built-ins need none).
FACTORY_INPUTS_FUNCTION = "example_inputs"
#: ``diffusers:NAME`` names a tiny diffusers model of ``reference_models.diffusers_tiny``.
DIFFUSERS_PREFIX = "diffusers:"


class CLIError(Exception):
    """A failure reported as one line on stderr, exiting with ``status``."""

    def __init__(self, message: str, status: int = EXIT_USAGE):
        super().__init__(message)
        self.status = status


# --- the parser ---------------------------------------------------------------------------

def _model_forms(configs: Sequence[str], diffusers: Sequence[str]) -> str:
    return f"""\
MODEL is one of
  a built-in config   {', '.join(configs)}
                      (the Hunyuan3D-2 DiT variants from reference_models; "tiny" has every
                      code path of the full model at a size that runs on a CPU in seconds)
  a diffusers model   diffusers:NAME, NAME one of {', '.join(diffusers) or "(install diffusers to list them)"}
                      (a tiny random config of that diffusers transformer, from
                      reference_models/diffusers_tiny.py, with its example inputs; built on the
                      CPU; use --check: their blocks are captured on the first call)
  a factory           path/to/file.py:make_model
                      (the file is loaded by path, make_model() is called with no arguments
                      and must return a torch.nn.Module; for --check the file may also define
                      {FACTORY_INPUTS_FUNCTION}() returning the tuple of positional arguments: it is
                      called once, and the same inputs feed the runs before and after the pass)
"""


_INSPECT_EPILOG = f"""
Built-in configs are built on the meta device by default: the pass reads the module
structure only, so even the 1.1B-parameter model takes no memory and no time to build.
Factories are built on the CPU by default. For a built-in config the fused counts are
compared with DiTConfig.expected_sites(); a chained residual->norm site counts toward both
layernorm_modulate and residual_gate.

--strict: every selected family that has a candidate in this model fused (a family with no
candidate, e.g. the joint-attention cat in a DiT without one, is fine), every near-miss has a
reason, and something fused at all; the same test as fusion_pass.optimize(model, strict=True).

On a terminal, --check and the build of a large model show their progress on stderr.

exit status
  {EXIT_OK}  the pass ran; for a built-in config every expected count was met; --strict and
     --check, when given, passed
  {EXIT_SHORTFALL}  the pass ran but fused less than that, or --check found too large an error
  {EXIT_USAGE}  bad arguments, or the model could not be built (one line on stderr says why)

examples
  {PROG} inspect hunyuan3d-2
  {PROG} inspect hunyuan3d-2 --official --json > report.json
  {PROG} inspect tiny --device cpu --check
  {PROG} inspect hunyuan3d-2 --device cuda --dtype float16 --check
  {PROG} inspect tiny --patterns layernorm_modulate,qk_rmsnorm
  {PROG} inspect ./my_dit.py:make_model --strict
"""

_MAIN_EPILOG = f"""\
examples
  {PROG} inspect hunyuan3d-2                fused sites of the 1.1B Hunyuan3D-2 DiT (instant)
  {PROG} inspect tiny --device cpu --check  also run it and compare outputs
  {PROG} inspect ./my_dit.py:make_model     your own model, from a factory function
  {PROG} inspect --help                     every option and the MODEL forms

In Python the same is one call: fusion_pass.optimize(model); print(fusion_pass.report(model))
"""


def build_parser(details: bool = True) -> argparse.ArgumentParser:
    """The ``fusion-pass`` parser. ``details=False`` leaves out what only ``inspect --help``
    shows and needs torch to know (the built-in configs, the pattern families), so that
    ``fusion-pass --help`` and ``--version`` import neither."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fuse the adaLN modulation, gated residuals and q/k RMSNorm of diffusion\n"
                    "transformers into Triton kernels, without editing the model.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    if details:
        from patterns import FAMILY_NAMES
        from reference_models import CONFIGS, INSTALL_HINT

        model_forms, families, needs = (_model_forms(tuple(CONFIGS), _diffusers_names()), f": {', '.join(FAMILY_NAMES)}",
                                        f"; needs `{INSTALL_HINT}`")
    else:
        model_forms = families = needs = ""
    inspect = commands.add_parser(
        "inspect",
        help="build a model, run the pass on it and show what fused (and what did not, and why)",
        description="Build MODEL, run fusion_pass.optimize on it and print the report: per pattern\n"
                    "family the sites fused (with the module they came from), the near-misses with\n"
                    "a reason each, and the modules that could not be captured.",
        epilog=model_forms + _INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("model", metavar="MODEL", help="a built-in config name or path/to/file.py:FUNCTION (see below)")
    inspect.add_argument("--official", action="store_true",
                         help="build the official Hunyuan3D DiT file from the installed hy3dgen package "
                              f"instead of our clean-room copy (built-in configs only{needs})")
    inspect.add_argument("--json", action="store_true",
                         help="print the report as JSON on stdout (and nothing else); for a built-in config "
                              'it has an "expected" block')
    inspect.add_argument("--device", metavar="DEV",
                         help="where to build the model: meta, cpu, cuda, cuda:1, ... (default: meta for "
                              "built-in configs, which needs no memory and is instant; cpu for factories)")
    inspect.add_argument("--dtype", choices=DTYPES, default="float32",
                         help="parameter dtype (default: %(default)s)")
    inspect.add_argument("--patterns", metavar="A,B",
                         help=f"comma-separated pattern families to apply (default: all){families}; "
                              "the chained family comes along when both of its halves are selected")
    inspect.add_argument("--strict", action="store_true",
                         help=f"exit {EXIT_SHORTFALL} unless every family with a candidate in the model fused "
                              "(see below)")
    inspect.add_argument("--check", action="store_true",
                         help="run the model on example inputs before and after the pass and print the max "
                              "relative error, max|after - before| / max|before| (needs a real device, not meta)")
    inspect.add_argument("--tolerance", type=float, metavar="TOL",
                         help=f"--check fails above this (default per dtype: "
                              f"{', '.join(f'{k} {v:g}' for k, v in CHECK_TOLERANCE.items())})")
    inspect.set_defaults(handler=_inspect)

    # Listed for --help only: `main` hands `bench ...` to fusion_pass.bench's own parser, so
    # that the module (and whatever it imports) loads only when benchmarking.
    commands.add_parser(
        "bench", add_help=False,
        help="time the optimized model against eager and torch.compile (options: fusion-pass bench --help)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fusion-pass`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        args = build_parser(details=argv[:1] == ["inspect"]).parse_args(argv)
        return args.handler(args)
    except CLIError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.status


# --- inspect ------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model to inspect and what the CLI knows about it."""

    model: nn.Module
    label: str
    device: torch.device
    config: DiTConfig | None = None  # set for built-in configs: expected counts
    inputs: Callable[[], tuple[tuple, dict]] | None = None  # (args, kwargs) of one forward, for --check


def _inspect(args: argparse.Namespace) -> int:
    import fusion_pass

    progress = Progress(enabled=not args.json)
    patterns = _parse_patterns(args.patterns)
    with progress.step(f"building {args.model}"):
        loaded = _load_model(args.model, official=args.official, device=args.device, dtype=args.dtype)
    if args.check:
        _require_runnable(loaded, args.model)
    model = loaded.model.eval()

    failures: list[str] = []
    if args.check:
        with progress.step("making example inputs"):
            inputs = loaded.inputs()  # once: the runs before and after the pass see the same values
        with progress.step("running the model before the pass"):
            before = _forward(model, inputs, loaded.device)
    with progress.step("fusion_pass.optimize"):
        try:
            fusion_pass.optimize(model, patterns=patterns, strict=args.strict)
        except fusion_pass.NothingFused as exc:
            failures.append(str(exc))

    check = None
    if args.check:
        with progress.step("running the model after the pass"):
            error = _relative_error(_forward(model, inputs, loaded.device), before)
        tolerance = CHECK_TOLERANCE[args.dtype] if args.tolerance is None else args.tolerance
        check = {"max_rel_error": error, "tolerance": tolerance, "ok": error <= tolerance}
        if not check["ok"]:
            failures.append(f"--check: max relative error {error:.3g} is above the tolerance {tolerance:g}")
    report = fusion_pass.report(model)  # after --check's call: what was captured on the first call is in it

    expected = _expected_rows(loaded.config, report) if loaded.config is not None else None
    if expected is not None:
        short = [f"{row['family']} {row['fused']}/{row['expected']}" for row in expected if row["fused"] < row["expected"]]
        if short:
            failures.append(f"fused fewer sites than {args.model} has: {', '.join(short)}")

    if args.json:
        print(_to_json(report, loaded, args, expected, check))
    else:
        _render(_console(), report, loaded, args, expected, check)
    if failures:
        raise CLIError("; ".join(failures), EXIT_SHORTFALL)
    return EXIT_OK


def progress_console() -> Console:
    """Where progress goes: stderr (stdout carries the report, or the JSON)."""
    return Console(stderr=True)


class Progress:
    """A spinner with the elapsed time for each step of a long command, then one line with its
    time, on stderr; silent when stderr is not a terminal (a pipe, a log, CI) or when disabled
    (``--json``)."""

    def __init__(self, enabled: bool = True):
        console = progress_console()
        self.console = console if enabled and console.is_terminal else None

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        if self.console is None:
            yield
            return
        from rich import progress as bar

        start = time.perf_counter()
        with bar.Progress(bar.SpinnerColumn(), bar.TextColumn("{task.description}"), bar.TimeElapsedColumn(),
                          console=self.console, transient=True) as spinner:
            spinner.add_task(f"{what} ...", total=None)
            yield
        self.console.print(Text(f"{what}: {time.perf_counter() - start:.1f} s", style="dim"))


def _parse_patterns(text: str | None) -> list[str] | None:
    from patterns import FAMILY_NAMES, select as select_families

    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CLIError(f"--patterns needs at least one family name: {', '.join(FAMILY_NAMES)}")
    try:
        select_families(names)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return names


def _load_model(spec: str, *, official: bool, device: str | None, dtype: str) -> LoadedModel:
    import torch
    from reference_models import CONFIGS

    dtype = getattr(torch, dtype)
    if spec in CONFIGS:
        return _load_builtin(spec, official=official, device=_device(device or "meta"), dtype=dtype)
    if spec.startswith(DIFFUSERS_PREFIX):
        if official:
            raise CLIError(f"--official applies to the built-in configs ({', '.join(CONFIGS)}), not to {spec}")
        return _load_diffusers(spec[len(DIFFUSERS_PREFIX):], device=_device(device or "cpu"), dtype=dtype)
    if ":" in spec or spec.endswith(".py"):
        if official:
            raise CLIError(f"--official applies to the built-in configs ({', '.join(CONFIGS)}), not to {spec}")
        return _load_factory(spec, device=_device(device or "cpu"), dtype=dtype)
    raise CLIError(f"unknown model {spec!r}: use a built-in config ({', '.join(CONFIGS)}), "
                   f"{DIFFUSERS_PREFIX}NAME or a factory path/to/file.py:FUNCTION")


def _device(text: str) -> torch.device:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {text!r} is not a torch device (e.g. meta, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: no CUDA device is available here")
    return device


def _load_builtin(name: str, *, official: bool, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    import torch
    from reference_models import CONFIGS, build_model, example_inputs, load_official

    torch.manual_seed(0)  # --check compares a model with itself, but keep runs reproducible
    if official:
        try:
            model = load_official(name, device=device, dtype=dtype)
        except ModuleNotFoundError as exc:
            raise CLIError(str(exc)) from None
        label = f"{name} (official hy3dgen file)"
    else:
        model = build_model(name, device=device, dtype=dtype)
        label = f"{name} (reference_models)"
    config = CONFIGS[name]

    def inputs():
        made = example_inputs(config, dtype=dtype, device=device, seed=0)
        return made.args, made.kwargs

    return LoadedModel(model, label, device, config=config, inputs=inputs)


def _diffusers_names() -> tuple[str, ...]:
    """The tiny diffusers models ``diffusers:NAME`` builds; none where diffusers is not installed."""
    try:
        from reference_models.diffusers_tiny import MODELS
    except ImportError:
        return ()
    return tuple(sorted(MODELS))


def _load_diffusers(name: str, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """``diffusers:NAME``: the tiny random config of ``reference_models.diffusers_tiny`` (seeded)
    on ``device`` in ``dtype``, with its keyword inputs (``diffusers_tiny.cast_inputs``)."""
    try:
        from reference_models.diffusers_tiny import MODELS, cast_inputs
    except ImportError as exc:
        raise CLIError(f"{DIFFUSERS_PREFIX}{name} needs diffusers (pip install 'diffusers==0.42.1'): "
                       f"{_one_line(exc)}") from None
    if name not in MODELS:
        raise CLIError(f"unknown diffusers model {name!r}: {', '.join(sorted(MODELS))}")
    if device.type == "meta":
        raise CLIError(f"{DIFFUSERS_PREFIX}{name} is built on a real device (its blocks are captured on the first "
                       "call): use --device cpu or cuda")
    tiny = MODELS[name]
    model = tiny.build().to(device=device, dtype=dtype)

    def inputs():
        return (), cast_inputs(tiny.inputs(), dtype, device)

    return LoadedModel(model, f"{type(model).__name__} (diffusers, tiny random config {name!r})", device,
                       inputs=inputs)


def _load_factory(spec: str, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    import torch
    from torch import nn

    path_text, sep, function = spec.rpartition(":")
    if not sep or not function.isidentifier():  # "file.py", "file.py:", a Windows path "C:\dir\file.py"
        raise CLIError(f"name the factory function: {spec.rstrip(':')}:make_model (path/to/file.py:FUNCTION)")
    path = Path(path_text)
    if not path.is_file():
        raise CLIError(f"factory file {path_text} does not exist")
    module = _import_file(path)
    factory = getattr(module, function, None)
    if not callable(factory):
        found = sorted(name for name, value in vars(module).items()
                       if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == module.__name__)
        raise CLIError(f"{path_text} defines no function {function!r}"
                       + (f" (it defines: {', '.join(found)})" if found else ""))
    with _importable_from(path.parent):
        try:
            model = factory()
        except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line
            raise CLIError(f"{spec}() raised {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    try:
        model = model.to(device=device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"cannot move the model to {device} {dtype}: {_one_line(exc)}") from None

    inputs = None
    make_inputs = getattr(module, FACTORY_INPUTS_FUNCTION, None)
    if callable(make_inputs):
        def inputs():
            with _importable_from(path.parent):
                try:
                    made = make_inputs()
                except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line
                    raise CLIError(f"{path_text}:{FACTORY_INPUTS_FUNCTION}() raised {_one_line(exc)}") from None
            made = made if isinstance(made, tuple) else (made,)
            return tuple(x.to(device=device, dtype=dtype) if torch.is_tensor(x) and x.is_floating_point()
                         else x.to(device) if torch.is_tensor(x) else x for x in made), {}

    return LoadedModel(model, spec, device, inputs=inputs)


def _import_file(path: Path):
    name = "_fusion_pass_factory_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up here
    with _importable_from(path.parent):
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line
            del sys.modules[name]
            raise CLIError(f"cannot import {path}: {_one_line(exc)}") from None
    return module


class _importable_from:
    """Put a factory file's folder first on ``sys.path`` while it runs (sibling imports)."""

    def __init__(self, folder: Path):
        self.folder = str(folder.resolve())

    def __enter__(self):
        sys.path.insert(0, self.folder)

    def __exit__(self, *exc):
        sys.path.remove(self.folder)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _require_runnable(loaded: LoadedModel, spec: str) -> None:
    if loaded.device.type == "meta":
        raise CLIError("--check runs the model, which the meta device cannot: add --device cpu (or cuda)")
    if loaded.inputs is None:
        raise CLIError(f"--check needs inputs: define {FACTORY_INPUTS_FUNCTION}() in the factory file of {spec}, "
                       "returning the tuple of positional arguments")


def _forward(model: nn.Module, inputs: tuple[tuple, dict], device: torch.device) -> list[torch.Tensor]:
    """The output tensors of ``model(*args, **kwargs)`` on a copy of ``inputs`` (a forward that
    modifies its inputs in place cannot change what the next run sees), with the random state
    seeded the same for every run and restored after."""
    import torch
    from torch.utils._pytree import tree_leaves, tree_map

    args, kwargs = tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, inputs)
    with torch.no_grad(), torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(0)
        return [leaf for leaf in tree_leaves(model(*args, **kwargs)) if torch.is_tensor(leaf)]


def _relative_error(after: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """max |after - before| / max |before| over every output tensor (a norm-wise relative
    error: elements near zero do not blow it up)."""
    diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(after, before)), default=0.0)
    scale = max((float(b.double().abs().max()) for b in before), default=0.0)
    return diff / scale if scale > 0 else diff


def _expected_rows(config: DiTConfig, report) -> list[dict[str, Any]]:
    """Per family that the config predicts and this run selected: fused (alone + chained +
    folded into a later family's calls) against expected."""
    counts, totals = report.counts(), report.totals()
    rows = []
    for family, expected in config.expected_sites().items():
        if family not in counts:
            continue  # not selected with --patterns
        alone, folded = counts[family], len(report.families[family].folded)
        chained = totals[family] - alone - folded
        rows.append({"family": family, "expected": expected, "fused": totals[family], "alone": alone,
                     "chained": chained, "folded": folded, "ok": totals[family] >= expected})
    return rows


def _to_json(report, loaded: LoadedModel, args, expected, check) -> str:
    data = report.to_dict()
    data["model"] = {"model": args.model, "label": loaded.label, "device": str(loaded.device), "dtype": args.dtype,
                     "parameters": sum(p.numel() for p in loaded.model.parameters())}
    if expected is not None:
        data["expected"] = {row["family"]: {k: v for k, v in row.items() if k != "family"} for row in expected}
    if check is not None:
        data["check"] = check
    return json.dumps(data, indent=2)


def _console() -> Console:
    """A console on stdout. Piped into a file or a pager there is no width to fit, and rich's
    fallback (80 columns) folds the report's six columns into a ribbon: use 160 then."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def _render(console: Console, report, loaded: LoadedModel, args, expected, check) -> None:
    parameters = sum(p.numel() for p in loaded.model.parameters())
    size = f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"
    console.print(Text.assemble((loaded.label, "bold"), f": {size} parameters, {args.dtype} on {loaded.device}"))
    console.print(report)
    if expected:
        console.print(Text(f"expected sites for {args.model} (DiTConfig.expected_sites):", style="bold"))
        width = max(len(row["family"]) for row in expected)
        for row in expected:
            parts = [f"{row['alone']} alone"] + [f"{row[kind]} {kind}" for kind in ("chained", "folded") if row[kind]]
            split = f"  ({' + '.join(parts)})" if len(parts) > 1 else ""
            verdict = ("ok", "green") if row["fused"] == row["expected"] else \
                ("above expected", "yellow") if row["ok"] else ("BELOW EXPECTED", "bold red")
            console.print(Text.assemble(f"  {row['family']:<{width}}  {row['fused']:>4} / {row['expected']:<4} ",
                                        verdict, split))
    if check is not None:
        console.print(Text.assemble(
            "check: max relative error ", (f"{check['max_rel_error']:.3g}", "bold"),
            f" (max|after - before| / max|before|, tolerance {check['tolerance']:g}) ",
            ("ok", "green") if check["ok"] else ("TOO LARGE", "bold red")))


# --- bench --------------------------------------------------------------------------------

#: Kineto (the torch profiler's back end, used by ``bench`` for its kernel figures) logs
#: "USDT: ... profiler_start/stop" lines straight to stderr at every profile; above its highest
#: level (5) it logs nothing. Read when the profiler first starts; a value the user set is kept.
KINETO_QUIET = {"KINETO_LOG_LEVEL": "6"}


def _bench(argv: list[str]) -> int:
    for name, value in KINETO_QUIET.items():
        os.environ.setdefault(name, value)
    try:
        bench = importlib.import_module("fusion_pass.bench")
    except ModuleNotFoundError as exc:
        if exc.name == "fusion_pass.bench":
            raise CLIError("`bench` is not available: this installation has no fusion_pass/bench package") from None
        raise CLIError(f"`bench` needs a module that is not installed: {_one_line(exc)}") from None
    parser = argparse.ArgumentParser(prog=f"{PROG} bench", description=(bench.__doc__ or "").strip() or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    bench.add_arguments(parser)
    return int(bench.run(parser.parse_args(argv)) or 0)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fusion-pass")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "(source tree)"


if __name__ == "__main__":
    sys.exit(main())
