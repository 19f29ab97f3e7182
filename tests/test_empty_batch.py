"""Zero-sized batches: nn.LSTM accepts B = 0 and returns empty outputs and gradients; so must FusedLSTM.

(Found by running PyTorch's own nn.LSTM tests against FusedLSTM.) Every backend
name dispatches an empty batch to the reference's bookkeeping, so no kernel
sees a zero-sized launch; T = 0 stays an error, as in nn.LSTM.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lstm_kernels import FusedLSTM
from lstm_kernels.backends import RecurrenceCall, known_backends, resolve_backend

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True, proj_size=2), dict(batch_first=True)]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("with_hx", [False, True])
def test_empty_batch_forward_and_backward_like_nn_lstm(backend, config, with_hx):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, **config)
    fused = FusedLSTM.from_torch(lstm, backend=backend)
    x = torch.randn((0, 5, 3) if config.get("batch_first") else (5, 0, 3), requires_grad=True)
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    hx = (torch.zeros(layers, 0, lstm.proj_size or 4, requires_grad=True), torch.zeros(layers, 0, 4, requires_grad=True))
    results = []
    for model in (lstm, fused):
        x.grad = None
        out, (h, c) = model(x, hx if with_hx else None)
        (out.sum() + h.sum() + c.sum()).backward()
        grads = [p.grad for p in model.parameters()]
        results.append((out, h, c, x.grad, grads))
    (out_e, h_e, c_e, dx_e, dw_e), (out, h, c, dx, dw) = results
    assert out.shape == out_e.shape and h.shape == h_e.shape and c.shape == c_e.shape
    assert dx.shape == dx_e.shape
    for a, e in zip(dw, dw_e):
        assert a is not None and a.shape == e.shape and torch.equal(a, torch.zeros_like(a))


@pytest.mark.parametrize("name", ["auto", *known_backends()])
def test_every_backend_name_serves_an_empty_batch(name):
    call = RecurrenceCall(seq_len=4, batch=0, hidden_size=3, state_size=3, dtype=torch.float32,
                          device=torch.device("cpu"), has_projection=False, variable_lengths=False, needs_grad=True)
    assert resolve_backend(name, call).name == "reference"


def test_unknown_backend_name_still_raises_on_an_empty_batch():
    call = RecurrenceCall(seq_len=4, batch=0, hidden_size=3, state_size=3, dtype=torch.float32,
                          device=torch.device("cpu"), has_projection=False, variable_lengths=False, needs_grad=True)
    with pytest.raises(ValueError, match="unknown LSTM backend"):
        resolve_backend("nope", call)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_sequence_still_raises_like_nn_lstm(backend):
    with pytest.raises(RuntimeError, match="sequence length"):
        FusedLSTM(3, 4, backend=backend)(torch.randn(0, 2, 3))
