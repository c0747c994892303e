import importlib
import importlib.util
import os
import pkgutil

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. Triton reads this
# when a kernel is decorated, so it is set before any test imports cckernels' Triton modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tests use tiny tensors, where a second thread costs more than it gives (10-20x slower
    # on a busy 2-core machine).
    torch.set_num_threads(1)
    # The interpreter computing as a GPU does (tests/triton_interpreter.py), then every
    # kernel decorated now, under the interpreter: a test that unsets TRITON_INTERPRET
    # (bench_train's tiny run times the torch backend) and first imports one of these modules
    # would leave compiled-mode kernels that later tests cannot run ("0 active drivers").
    if os.environ["TRITON_INTERPRET"] == "1" and importlib.util.find_spec("triton") is not None:
        import triton_interpreter

        triton_interpreter.compute_as_a_gpu()
        import cckernels.triton

        for module in pkgutil.iter_modules(cckernels.triton.__path__):
            importlib.import_module(f"cckernels.triton.{module.name}")


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


@pytest.fixture(autouse=True)
def _threads():
    """Each test starts with the session's thread count: train.main sets its own (the cores over
    the local ranks), and a later test in the same worker comparing bits against a one-thread
    subprocess (test_precompute's two ranks) failed after one had run there."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_kernels(monkeypatch):
    """Plain torch ops for tests of the model and trainer: the kernels have their own tests, and
    without a GPU the default backend would be Triton's interpreter (seconds per UNet layer)."""
    monkeypatch.setenv("CCKERNELS_BACKEND", "torch")


@pytest.fixture
def tma_reductions_on_cpu(monkeypatch):
    """The atomic dQ by TMA reductions (sm90) on the CPU: Triton's interpreter has the descriptor
    reductions tests/triton_interpreter.py adds, and attention._tma_reductions says yes to every
    dQ (recording the row lengths it was asked about), so CPU tests run the TMA path's indexing."""
    from cckernels.triton import attention

    taken = []
    monkeypatch.setattr(attention, "_tma_reductions", lambda device, row_elements: taken.append(row_elements) or True)
    monkeypatch.setenv("CCKERNELS_DETERMINISTIC", "0")
    return taken
