import os
import tempfile

import pytest
import torch

#: Per-test limit (seconds) of every ``gpu`` test that sets no ``@pytest.mark.timeout`` of its own
#: (pytest-timeout): a grid barrier that never opens must fail its test, not hang the whole run.
#: The "thread" method is the one that ends a process blocked inside a CUDA call: it prints every
#: thread's stack (naming the test) and exits the run. Override with LSTM_KERNELS_GPU_TEST_TIMEOUT.
GPU_TEST_TIMEOUT_S = float(os.environ.get("LSTM_KERNELS_GPU_TEST_TIMEOUT", "300"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped cleanly without one")
    # The suite tests the kernels themselves: verification before first use would move a failing
    # kernel aside under "auto" (and make a named one's failure read as a skip). Its own tests turn
    # it on; no test touches the user's cache.
    os.environ["LSTM_KERNELS_VERIFY"] = "0"
    os.environ["LSTM_KERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="lstm_kernels_test_cache_")


def gpu_timeout_marker():
    return pytest.mark.timeout(GPU_TEST_TIMEOUT_S, method="thread")


def pytest_collection_modifyitems(config, items):
    have_gpu = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if not have_gpu:
            item.add_marker(skip)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(gpu_timeout_marker())


@pytest.fixture
def set_tf32():
    """A setter of ``torch.backends.cuda.matmul.allow_tf32`` for the test; the flag is restored after.

    Not ``monkeypatch.setattr``: pytest >= 9.2 undoes an instance attribute by deleting it from the
    instance ``__dict__``, which torch's backend module objects refuse (AttributeError at teardown).
    """
    old = torch.backends.cuda.matmul.allow_tf32

    def set_allow_tf32(allow: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = allow

    yield set_allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def no_tf32(set_tf32):
    """fp32 matmuls in full fp32 (torch's GEMMs and the kernels' tl.dot) for the test, then restored."""
    set_tf32(False)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def plan_dump(tmp_path_factory):
    """tests/cuda_host/plan_dump.cpp compiled over csrc/fused/fused_plan.cuh: ``plan_dump(B, H, elem=2, P=None)``
    gives the fused kernels' plan and index arithmetic as a dict (see tests/plan_dump.py)."""
    from plan_dump import compile_plan_dump

    run = compile_plan_dump(tmp_path_factory.mktemp("plan"))
    if run is None:
        pytest.skip("no host C++ compiler")
    return run
