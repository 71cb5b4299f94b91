"""What ``optimize()`` does to keep its set-up short, and that it leaves the process as it found it:
the garbage collector paused only while it captures (``session._gc_paused``), and Triton's first-use
work started in one background thread for CUDA models only (``precompile.warm_triton``)."""
import gc
import threading
import time

import pytest
import torch
from torch import nn

import fusion_pass
import fusion_pass.api
from fusion_pass import precompile


SEEN: list[bool] = []  # (a list held by the module would be a cache filled in place: capture refuses those)


class RecordsTheCollector(nn.Module):
    """Records in SEEN, while its forward is traced, whether the garbage collector is on."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x, shift, scale):
        SEEN.append(gc.isenabled())
        return self.norm(x) * (1 + scale) + shift


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_collector_is_paused_during_capture_and_left_as_it_was(enabled_before):
    SEEN.clear()
    (gc.enable if enabled_before else gc.disable)()
    try:
        model = fusion_pass.optimize(RecordsTheCollector())
        assert gc.isenabled() is enabled_before
    finally:
        gc.enable()
    assert SEEN == [False]  # the forward was traced once, with the collector off
    assert fusion_pass.report(model).totals()["layernorm_modulate"] == 1  # and captured: one modulation


def test_optimize_starts_the_warm_up_and_a_cpu_model_starts_no_thread(monkeypatch):
    given = []
    monkeypatch.setattr(fusion_pass.api, "warm_triton", given.append)
    model = fusion_pass.optimize(RecordsTheCollector())
    assert given == [model]
    threads: list = []
    monkeypatch.setattr(precompile, "_WARM_UP", threads)
    monkeypatch.setattr(precompile, "ENABLED", True)
    precompile.warm_triton(model)  # its parameters are on the CPU
    assert threads == []


def test_the_first_calls_dry_run_waits_for_the_warm_up(monkeypatch):
    order: list[str] = []

    def slow_warm_up():
        time.sleep(0.2)
        order.append("warm-up")

    thread = threading.Thread(target=slow_warm_up)
    monkeypatch.setattr(precompile, "_WARM_UP", [thread])
    monkeypatch.setattr(precompile, "_async_compile", lambda: order.append("dry run"))
    thread.start()
    precompile.precompile(lambda: None, (torch.randn(2),))
    assert order == ["warm-up", "dry run"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_starts_one_warm_up_thread_and_computes_the_same(monkeypatch):
    threads: list = []
    monkeypatch.setattr(precompile, "_WARM_UP", threads)
    for _ in range(2):  # a second optimize() in the process starts no second thread
        model = fusion_pass.optimize(RecordsTheCollector().cuda().half())
    assert len(threads) == 1
    x = torch.randn(2, 5, 8, device="cuda", dtype=torch.float16)
    shift, scale = (torch.randn(2, 1, 8, device="cuda", dtype=torch.float16) for _ in range(2))
    with torch.no_grad():
        out = model(x, shift, scale)
    expected = RecordsTheCollector().cuda().half()
    expected.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out, expected(x, shift, scale), rtol=2e-3, atol=2e-3)
