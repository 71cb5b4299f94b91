"""`launch.KernelCall` and `launch_kernel`'s reuse of a compiled kernel: the arguments fixed per call
signature (grid, sizes, strides, constexprs) are built once per launch plan and kept with the
compiled kernel, and only the call's own tensors are spliced in per call. A stale argument (a data
pointer, stride or size of an earlier call) would make a later call compute from the wrong memory:
every call below must equal the same call with nothing cached (planners run afresh, Triton binds
every argument)."""

import os
from contextlib import contextmanager
from importlib import import_module

import pytest
import torch
import triton

from fusion_pass.ops import interpret_on_cpu
from fusion_pass.ops.launch import Launch
from ops_testing import KERNELS, OP_CASES, ROW_OPS, outputs

launch_module = import_module("fusion_pass.ops.launch")


def _copied(args, make):
    """`args` with every tensor replaced by `make(tensor)` (same values)."""
    return tuple(make(a) if isinstance(a, torch.Tensor) else a for a in args)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if not t.is_contiguous() else t.clone()


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` whose data pointer is one element past a 16-byte boundary."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return base[1:].view(t.shape).copy_(t)


def call_sequence(name: str, device="cpu"):
    """(label, args) of calls that revisit one call signature with fresh tensors after others
    that differ in strides, broadcast, dtype and pointer alignment."""
    case = OP_CASES[name]
    shape = case.x_shape
    first = case.make_args(shape, torch.float32, "chunk", device)
    return [
        ("first", first),
        ("same signature, fresh tensors", case.make_args(shape, torch.float32, "chunk", device)),
        ("other strides", _copied(first, _contiguous)),
        ("other broadcast", case.make_args(shape, torch.float32, "shared" if name in ROW_OPS else "chunk", device)),
        ("other dtype", case.make_args(shape, torch.float16, "chunk", device)),
        ("misaligned pointers", _copied(first, _misaligned)),
        ("first signature again, fresh tensors", case.make_args(shape, torch.float32, "chunk", device)),
    ]


REUSING = ("same signature, fresh tensors", "first signature again, fresh tensors")
"""The calls of `call_sequence` whose signature an earlier call had: they reuse its compiled kernel."""


class CompiledDouble:
    """Triton's compile-and-launch on the CPU, for `launch_kernel`'s compiled-kernel path: each op
    kernel becomes a `JITFunction`; its binding (`JITFunction.run`, a key's first launch) runs the
    interpreted kernel and returns a compiled kernel whose launcher (`compiled[grid](*args)`, the
    steady state) runs the interpreted kernel on exactly the arguments it is given, positionally,
    constexprs included, as Triton's launcher takes them."""

    def __init__(self, monkeypatch):
        self.bound = 0  # launches through Triton's binding
        self.reused = 0  # launches through a kept compiled kernel's launcher
        interpreted = {}
        for module, name in KERNELS:
            kernel = getattr(module, name)
            jit = triton.runtime.jit.JITFunction(kernel.fn)
            interpreted[id(jit)] = kernel
            monkeypatch.setattr(module, name, jit)
        double = self

        class Compiled:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def launcher(*args, stream=None):
                    double.reused += 1
                    self.kernel[grid[:1]](*args)

                return launcher

        def run(jit, *args, grid, warmup, num_warps, **constexprs):
            double.bound += 1
            kernel = interpreted[id(jit)]
            kernel[grid](*args, **constexprs)
            return Compiled(kernel)

        monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", run)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(launch_module, "_COMPILED", {})
        monkeypatch.setattr(launch_module, "_compiled_launch_ok", [True])


@contextmanager
def nothing_cached():
    """Planners run afresh on every call (their uncached bodies) and kernels launch through
    Triton's own binding of every argument (the interpreter's)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Launch, "planner", lambda self, planner: planner.__wrapped__)
        yield


@pytest.fixture
def interpreter_on_cpu(poisoned_outputs):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (a GPU is present): see the gpu test below")
    with interpret_on_cpu():
        yield


@pytest.mark.parametrize("name", OP_CASES)
def test_reused_compiled_kernel_gets_each_calls_tensors_and_its_own_signatures_arguments(
        interpreter_on_cpu, monkeypatch, name):
    case = OP_CASES[name]
    calls = call_sequence(name)
    expected = []
    with nothing_cached():
        for _, args in calls:
            expected.append(outputs(case.op(*args)))
    double = CompiledDouble(monkeypatch)
    for (label, args), want in zip(calls, expected):
        for got, wanted in zip(outputs(case.op(*args)), want, strict=True):
            torch.testing.assert_close(got, wanted, rtol=0, atol=0, msg=lambda m, label=label: f"{label}: {m}")
    # The repeated signature (the second and the last call) reused its compiled kernel.
    assert double.reused >= 2 and double.bound + double.reused == len(calls)


@pytest.mark.gpu
@pytest.mark.parametrize("name", OP_CASES)
def test_reused_compiled_kernels_match_uncached_launches_bitwise_on_gpu(cuda, monkeypatch, name):
    """On the GPU: the same call sequence through `launch_kernel`'s compiled-kernel reuse equals,
    bit for bit, each call with nothing cached (planners afresh, plain Triton launches)."""
    case = OP_CASES[name]
    calls = call_sequence(name, device="cuda")
    with nothing_cached():
        monkeypatch.setattr(launch_module, "_compiled_launch_ok", [False])
        expected = [outputs(case.op(*args)) for _, args in calls]
        monkeypatch.setattr(launch_module, "_compiled_launch_ok", [True])
    for (label, args), want in zip(calls, expected):
        entries = len(launch_module._COMPILED)
        for got, wanted in zip(outputs(case.op(*args)), want, strict=True):
            torch.testing.assert_close(got, wanted, rtol=0, atol=0, msg=lambda m, label=label: f"{label}: {m}")
        if label in REUSING:
            assert len(launch_module._COMPILED) == entries, label  # a reuse, not a new entry
    assert launch_module._compiled_launch_ok == [True]
