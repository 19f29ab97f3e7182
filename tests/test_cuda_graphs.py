"""CUDA graphs: a whole FusedLSTM training step (forward, backward, optimizer) is
captured once and replayed, with results equal to eager steps. gpu-marked."""
from __future__ import annotations

import pytest
import torch

import lstm_kernels
from lstm_kernels import FusedLSTM
from utils import assert_rel_close


def _model_and_optimizer(backend: str):
    torch.manual_seed(0)
    model = FusedLSTM(32, 64, num_layers=2, backend=backend, device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer


def _step(model, optimizer, x):
    optimizer.zero_grad(set_to_none=False)
    out, (h_n, c_n) = model(x)
    loss = out.square().mean() + c_n.square().mean()
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.gpu
@pytest.mark.parametrize("backend", lstm_kernels.backends.AUTO_ORDER)
def test_training_step_captures_and_replays(backend):
    if backend not in lstm_kernels.available_backends():
        pytest.skip(lstm_kernels.unavailable_backends().get(backend, "unavailable"))
    inputs = [torch.randn(16, 8, 32, device="cuda") for _ in range(3)]

    eager_model, eager_opt = _model_and_optimizer(backend)
    eager_losses = [_step(eager_model, eager_opt, x).item() for x in inputs]

    model, optimizer = _model_and_optimizer(backend)
    static_x = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs asks
        for _ in range(2):
            _step(*_model_and_optimizer(backend), static_x)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = _step(model, optimizer, static_x)
    # Capture recorded the step without running it: replay from the same initial weights.
    fresh, _ = _model_and_optimizer(backend)
    with torch.no_grad():
        for p, q in zip(model.parameters(), fresh.parameters()):
            p.copy_(q)

    graph_losses = []
    for x in inputs:
        static_x.copy_(x)
        graph.replay()
        graph_losses.append(static_loss.item())
    assert_rel_close(torch.tensor(graph_losses), torch.tensor(eager_losses), 1e-5, "losses")
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert_rel_close(p, q, 1e-5, "parameters after three steps")
