"""The machine and versions a run was measured on."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .settings import Settings


def _environment(settings: Settings) -> dict[str, Any]:
    return environment(settings.cuda)


def environment(cuda: bool) -> dict[str, Any]:
    """Date, versions, device (and driver on CUDA), git revision: recorded with every result file
    (the bench's, and the model scripts' in ``benchmarks/``)."""
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
    if cuda:
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


def environment_line(env: dict[str, Any]) -> str:
    """One line of :func:`environment`'s record, for a markdown result file."""
    return (f"{env['device']}, torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
            f"{env['date']}, git {env['git']}")


def _nvidia_smi(query: str) -> str | None:
    return _safe(lambda: subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0])


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None
