"""Autocast: FusedLSTM computes in the autocast dtype, as nn.LSTM does, with an fp32 cell state.

nn.LSTM under autocast returns output, h_n and c_n in the autocast dtype; so
does FusedLSTM, and its parameters' gradients stay in their own dtype (fp32).
Values are checked against a float64 nn.LSTM with the bf16/fp16 tolerance.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lstm_kernels
from lstm_kernels import FusedLSTM
from utils import REL_TOL, assert_rel_close

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _pair(device, **config):
    torch.manual_seed(0)
    reference = nn.LSTM(5, 8, **config, dtype=torch.float64, device=device)
    fused = FusedLSTM.from_torch(reference).float()
    return reference, fused


def _check_autocast(device: str, low: torch.dtype, backend: str = "auto", **config):
    reference, fused = _pair(device, **config)
    fused.backend = backend
    x = torch.randn(6, 3, 5, device=device)
    with torch.autocast(device, dtype=low):
        out, (h_n, c_n) = fused(x.requires_grad_(True))
        assert (out.dtype, h_n.dtype, c_n.dtype) == (low, low, low)
        (out.float().sum() + c_n.float().sum()).backward()
    expected, (_, expected_c) = reference(x.detach().double())
    assert_rel_close(out, expected, REL_TOL[low], "output")
    assert_rel_close(c_n, expected_c, REL_TOL[low], "c_n")
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())
    return out


@pytest.mark.parametrize("low", list(LOW.values()), ids=list(LOW))
@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True, proj_size=4)], ids=["plain", "proj_bidir_2l"])
def test_cpu_autocast(low, config):
    _check_autocast("cpu", low, **config)


def test_cpu_autocast_dtypes_match_nn_lstm():
    reference, fused = _pair("cpu")
    x = torch.randn(4, 2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            expected = reference.float()(x)
        except RuntimeError as err:  # nn.LSTM's CPU autocast path is oneDNN's bf16 LSTM
            pytest.skip(f"nn.LSTM itself cannot run under CPU bf16 autocast on this CPU: {err}")
        actual = fused(x)
    assert actual[0].dtype == expected[0].dtype
    assert [t.dtype for t in actual[1]] == [t.dtype for t in expected[1]]


def test_float64_input_is_left_alone_by_autocast():
    _, fused = _pair("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = fused.double()(torch.randn(3, 2, 5, dtype=torch.float64))
    assert out.dtype == h_n.dtype == c_n.dtype == torch.float64


def test_autocast_off_inside_disabled_region():
    _, fused = _pair("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            out, _ = fused(torch.randn(3, 2, 5))
    assert out.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("backend", lstm_kernels.backends.AUTO_ORDER)
@pytest.mark.parametrize("low", list(LOW.values()), ids=list(LOW))
def test_cuda_autocast_matches_nn_lstm_dtypes(backend, low):
    if backend not in lstm_kernels.available_backends():
        pytest.skip(lstm_kernels.unavailable_backends().get(backend, "unavailable"))
    out = _check_autocast("cuda", low, backend=backend)
    torch.manual_seed(0)
    cudnn = nn.LSTM(5, 8, device="cuda")
    with torch.autocast("cuda", dtype=low):
        expected, _ = cudnn(torch.randn(6, 3, 5, device="cuda"))
    assert out.dtype == expected.dtype
