import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. Triton reads this
# when a kernel is decorated, so it is set before any test imports cckernels' Triton modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tests use tiny tensors, where a second thread costs more than it gives (10-20x slower
    # on a busy 2-core machine).
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def torch_kernels(monkeypatch):
    """Plain torch ops for tests of the model and trainer: the kernels have their own tests, and
    without a GPU the default backend would be Triton's interpreter (seconds per UNet layer)."""
    monkeypatch.setenv("CCKERNELS_BACKEND", "torch")
