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
