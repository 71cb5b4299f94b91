"""Test set-up: run Triton kernels under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton is imported anywhere, hence here, at collection.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture
def cuda():
    """The CUDA device, skipping (with the reason) where there is none."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the H200: make test-gpu)")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny models: threads cost them 2-5x on 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_reference_runs():
    """No kernel declines recorded and no launch plan memoised when the test starts
    (`fusion_pass.ops.reference_runs.forget`), so each signature the test calls is planned, and a
    decline recorded, anew."""
    from fusion_pass.ops import reference_runs

    reference_runs.forget()
    yield reference_runs
    reference_runs.forget()
