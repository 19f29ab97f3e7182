"""Every gpu-marked test runs under a per-test timeout (tests/conftest.py, pytest-timeout), so a
grid barrier that never opens fails its test instead of hanging the whole run."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytest.importorskip("pytest_timeout")

CONFTEST = Path(__file__).with_name("conftest.py")


def test_gpu_tests_get_a_default_timeout_and_keep_their_own(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        test_sample="""
import pytest

@pytest.mark.gpu
def test_gpu_default():
    pass

@pytest.mark.gpu
@pytest.mark.timeout(7)
def test_gpu_own():
    pass

def test_cpu():
    pass
"""
    )
    items, _ = pytester.inline_genitems()
    by_name = {item.name: item for item in items}
    assert set(by_name) == {"test_gpu_default", "test_gpu_own", "test_cpu"}
    default = by_name["test_gpu_default"].get_closest_marker("timeout")
    assert default is not None and default.args[0] > 0 and default.kwargs.get("method") == "thread"
    assert by_name["test_gpu_own"].get_closest_marker("timeout").args == (7,)
    assert by_name["test_cpu"].get_closest_marker("timeout") is None


def test_a_hanging_gpu_test_fails(pytester, monkeypatch):
    """The default limit really ends a test that never returns (a stand-in for a GPU hang)."""
    pytester.makeconftest(CONFTEST.read_text().replace("torch.cuda.is_available()", "True"))
    pytester.makepyfile(
        test_hang="""
import time
import pytest

@pytest.mark.gpu
def test_hangs():
    time.sleep(600)
"""
    )
    monkeypatch.setenv("LSTM_KERNELS_GPU_TEST_TIMEOUT", "2")  # read by the copied conftest
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=120)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*Timeout*"])
