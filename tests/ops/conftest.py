"""Fixtures of the fused-op tests. Without a GPU the kernels run under the Triton interpreter,
which `triton.jit` reads when `fusion_pass.ops` defines its kernels: so TRITON_INTERPRET is
set here, before that import (setdefault: harmless if tests/conftest.py set it first)."""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fusion_pass.ops import interpret_on_cpu  # noqa: E402
from ops_testing import KERNELS  # noqa: E402


class LaunchCounter:
    """Stands in for a Triton kernel object: records each `kernel[grid]` launch, then launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


class KernelLaunches:
    def __init__(self, counters):
        self._counters = counters

    @property
    def count(self) -> int:
        return sum(len(c.grids) for c in self._counters)


@pytest.fixture
def launches(monkeypatch) -> KernelLaunches:
    """Counts the launches of every fused-op kernel during the test."""
    counters = []
    for module, name in KERNELS:
        counter = LaunchCounter(getattr(module, name))
        monkeypatch.setattr(module, name, counter)
        counters.append(counter)
    return KernelLaunches(counters)


@pytest.fixture
def poisoned_outputs(monkeypatch) -> None:
    """Fill every floating `torch.empty_like` and `torch.empty` allocation with NaN, so an output
    element a kernel fails to write shows up as NaN."""
    # `with torch.device(...)` recognises factory functions through a set it caches on first use:
    # fill that cache with the real functions before patching, or later models build on the CPU.
    torch.utils._device._device_constructors()
    for name in ("empty_like", "empty"):
        allocate = getattr(torch, name)

        def poisoned(*args, allocate=allocate, **kwargs):
            out = allocate(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        monkeypatch.setattr(torch, name, poisoned)


@pytest.fixture
def interpreted(launches, poisoned_outputs) -> KernelLaunches:
    """Run the test's CPU ops through the Triton kernels (interpreter), outputs poisoned with NaN;
    returns the launch count so the test can prove the kernel ran."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (a GPU is present): see the gpu tests")
    with interpret_on_cpu():
        yield launches
