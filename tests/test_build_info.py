"""What the build says about the CUDA extension (setup.py, lstm_kernels.build_info)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lstm_kernels import build_info

ROOT = Path(__file__).resolve().parents[1]


def test_a_build_without_cuda_removes_an_earlier_extension_and_says_why(tmp_path):
    """A build with LSTM_KERNELS_SKIP_CUDA=1 into a folder that holds an earlier build's _C must not
    ship that stale _C, and records the reason for ``python -m lstm_kernels.build_info``."""
    package = tmp_path / "lstm_kernels"
    package.mkdir()
    stale = package / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    stale.write_bytes(b"an earlier build")
    env = {**os.environ, "LSTM_KERNELS_SKIP_CUDA": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path),
                           "--build-temp", str(tmp_path / "temp")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "building without the CUDA backend: LSTM_KERNELS_SKIP_CUDA=1" in proc.stdout
    assert not stale.exists()
    info = json.loads((package / "_build_info.json").read_text())
    assert info == {"cuda_extension": False, "reason": "LSTM_KERNELS_SKIP_CUDA=1 was set at build time"}


def test_summary_names_the_reason_the_build_recorded(monkeypatch):
    monkeypatch.setitem(sys.modules, "lstm_kernels._C", None)  # the extension does not load
    monkeypatch.setattr(build_info, "build_info", lambda: {"cuda_extension": False, "reason": "nvcc was not found"})
    assert build_info.cuda_build_summary() == "lstm_kernels: built without the CUDA backend: nvcc was not found"
    monkeypatch.setattr(build_info, "build_info", lambda: None)
    assert "does not load" in build_info.cuda_build_summary()


def test_summary_when_the_extension_loads():
    pytest.importorskip("lstm_kernels._C")
    assert "the CUDA backend is built" in build_info.cuda_build_summary()
