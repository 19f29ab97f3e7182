"""FusedLSTM with backend="triton" against nn.LSTM: the module parity tests of
tests/test_module_parity.py (every config x input form x hx), run for the triton backend.

float32 only: the backend declines float64 (test_triton_kernels.py checks that it says so).
These run on the CPU, so only under TRITON_INTERPRET=1; the module on a GPU is tested
in test_triton_gpu.py.
"""
from __future__ import annotations

import os

import pytest
import torch

import test_module_parity as parity  # tests/ is on sys.path (conftest); imported as a module so
                                     # pytest does not collect its reference-backend tests here

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1",
    reason="the CPU module parity of the triton backend needs TRITON_INTERPRET=1",
)

DTYPES = {"fp32": torch.float32}


@pytest.mark.parametrize("variant", ["step", "persistent"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx_none", "hx"])
@pytest.mark.parametrize("input_name", list(parity.INPUTS))
@pytest.mark.parametrize("config_name", list(parity.CONFIGS))
def test_triton_matches_nn_lstm(config_name, input_name, with_hx, dtype, variant, monkeypatch):
    monkeypatch.setenv("LSTM_KERNELS_TRITON_VARIANT", variant)
    parity.test_matches_nn_lstm(config_name, input_name, with_hx, dtype, "triton")


@pytest.mark.parametrize("variant", ["step", "persistent"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True)], ids=["plain", "bidir_2l"])
def test_triton_under_cpu_autocast(config, low, variant, monkeypatch):
    """The 16-bit kernels end to end: FusedLSTM under autocast against a float64 nn.LSTM."""
    import test_autocast

    monkeypatch.setenv("LSTM_KERNELS_TRITON_VARIANT", variant)
    test_autocast._check_autocast("cpu", low, backend="triton", **config)
