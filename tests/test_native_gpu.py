"""torch's own kernel on CUDA (cuDNN) as a path of ``auto``, and the measured choice, on a real GPU.

Marked ``gpu`` (skipped without CUDA). What the CPU tests prove with torch's CPU kernel standing in
(tests/test_native_path.py, tests/test_autotune.py) is checked here with cuDNN itself: the path
agrees with nn.LSTM, backward works in eval mode (cuDNN alone refuses it), double backward works
(cuDNN alone has none), the parameters sit in cuDNN's flat buffer, and ``auto`` measures the
candidates once per bucket and serves the fastest.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lstm_kernels import FusedLSTM, autotune, verification
from lstm_kernels.backends import native
from utils import REL_TOL, assert_rel_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def fresh_choices(monkeypatch, tmp_path):
    monkeypatch.setenv(verification.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(autotune.AUTOTUNE_ENV, raising=False)
    autotune.clear()
    yield
    autotune.clear()


def _model(dtype=torch.float32, **config):
    torch.manual_seed(0)
    lstm = nn.LSTM(32, 48, **config).to("cuda", dtype)
    return lstm, FusedLSTM.from_torch(lstm)


@pytest.mark.parametrize("training", [True, False])
def test_native_cuda_path_matches_nn_lstm_in_train_and_eval(monkeypatch, training):
    monkeypatch.setattr(native, "taken_outright", lambda x: True)  # torch's kernel, no measurement
    lstm, fused = _model(num_layers=2, bidirectional=True)
    lstm.train(training)
    fused.train(training)
    assert fused.path_for(torch.randn(9, 4, 32, device="cuda")) == "native"
    x = torch.randn(9, 4, 32, device="cuda", requires_grad=True)
    out = fused(x)[0]
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    with torch.backends.cudnn.flags(enabled=False):  # nn.LSTM's own CUDA fallback takes eval backward
        expected = lstm(x)[0]
        (expected_gx,) = torch.autograd.grad(expected.square().sum(), x)
    assert_rel_close(out, expected, REL_TOL[torch.float32], "output")
    assert_rel_close(gx, expected_gx, REL_TOL[torch.float32], "dx")


def test_native_cuda_double_backward(monkeypatch):
    monkeypatch.setattr(native, "taken_outright", lambda x: True)
    _, fused = _model(torch.float64)
    reference = FusedLSTM.from_torch(fused.to_torch(), backend="reference")
    x = torch.randn(6, 3, 32, device="cuda", dtype=torch.float64)

    def second_order(model):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[0].square().sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), xi)
        return g, gg

    for actual, expected in zip(second_order(fused), second_order(reference)):
        assert_rel_close(actual, expected, 1e-10)


def test_parameters_sit_in_cudnns_flat_buffer():
    _, fused = _model(num_layers=2)
    storages = {p.untyped_storage().data_ptr() for p in fused.parameters()}
    assert len(storages) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuDNN warns when it must compact the weights on a call
        native.run_native(fused, torch.randn(5, 2, 32, device="cuda"),
                          (torch.zeros(2, 2, 48, device="cuda"), torch.zeros(2, 2, 48, device="cuda")), None)


def test_auto_measures_once_per_bucket_and_serves_the_fastest(fresh_choices):
    _, fused = _model(torch.float16)
    x = torch.randn(64, 16, 32, device="cuda", dtype=torch.float16)
    choice = fused.path_for(x, explain=True)
    measured = autotune.known(next(iter(autotune._CHOICES)))
    assert choice.path == measured.path == min(measured.times_ms, key=measured.times_ms.get)
    assert "native" in measured.times_ms, measured
    assert fused.path_for(x[:, :9], explain=True) == choice  # the same bucket (B 9..16): no new timing
