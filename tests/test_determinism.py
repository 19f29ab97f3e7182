"""Determinism: under torch.use_deterministic_algorithms(True) every backend runs
without error or warning, and two runs give bitwise-equal outputs and gradients."""
from __future__ import annotations

import warnings

import pytest
import torch

import lstm_kernels
from lstm_kernels import FusedLSTM


def _run(backend: str, device: str, dtype):
    torch.manual_seed(0)
    lstm = FusedLSTM(7, 16, num_layers=2, bidirectional=True, backend=backend, device=device, dtype=dtype)
    x = torch.randn(9, 4, 7, device=device, dtype=dtype, requires_grad=True)
    out, (h_n, c_n) = lstm(x)
    (out.square().sum() + h_n.sum() + c_n.sum()).backward()
    return [out, h_n, c_n, x.grad, *(p.grad for p in lstm.parameters())]


def _check_bitwise_deterministic(backend: str, device: str, dtype):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            first = _run(backend, device, dtype)
            second = _run(backend, device, dtype)
    finally:
        torch.use_deterministic_algorithms(previous)
    for k, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {k} differs between two runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_reference_backend_is_deterministic(dtype):
    _check_bitwise_deterministic("reference", "cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", lstm_kernels.backends.AUTO_ORDER)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gpu_backends_are_deterministic(backend, dtype, monkeypatch):
    # torch's own rule for deterministic cuBLAS GEMMs (the input projection and dW GEMMs).
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if backend not in lstm_kernels.available_backends():
        pytest.skip(lstm_kernels.unavailable_backends().get(backend, "unavailable"))
    _check_bitwise_deterministic(backend, "cuda", dtype)
