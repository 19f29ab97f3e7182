"""Streams and CUDA graphs, for every backend and every kernel variant (cuda: the default fused
kernels, the per-step kernels (step) and the fused kernels' persistent launch only (persistent); triton: step and persistent, the latter running
the step-budget kernels where their plan serves the call): a whole FusedLSTM training step
(forward, backward, optimizer) is captured once and replayed, with results equal to eager steps;
and a forward + backward on a side stream equals the one on the default stream. Each case asserts
the kernels it claims ran. gpu-marked.
"""
from __future__ import annotations

import pytest
import torch

import lstm_kernels
from lstm_kernels import FusedLSTM
from utils import assert_rel_close

#: backend -> the environment variable that picks its kernel variant.
VARIANT_ENVS = {"cuda": "LSTM_KERNELS_CUDA_VARIANT", "triton": "LSTM_KERNELS_TRITON_VARIANT"}
CASES = [("cuda", "fused"), ("cuda", "step"), ("cuda", "persistent"), ("triton", "step"), ("triton", "persistent"),
         ("reference", None)]
IDS = [f"{b}-{v}" if v else b for b, v in CASES]
INPUT, HIDDEN, LAYERS, T, B = 32, 64, 2, 16, 8


def use(backend, variant, monkeypatch):
    """Skip when ``backend`` cannot run here; select ``variant`` (and check it can run)."""
    if backend not in lstm_kernels.available_backends():
        pytest.skip(lstm_kernels.unavailable_backends().get(backend, "unavailable"))
    if variant is None:
        return
    monkeypatch.setenv(VARIANT_ENVS[backend], variant)
    if backend == "cuda" and variant == "persistent":
        from lstm_kernels.backends import cuda as cuda_backend

        for direction in ("forward", "backward"):  # float32 at fp32 accuracy (3xTF32); H = HIDDEN in every layer
            if not cuda_backend.fused_persistent_possible(torch.device("cuda"), direction, torch.float32, B, HIDDEN,
                                                          HIDDEN):
                pytest.skip(f"the fused {direction} grid is not co-resident here")


def check_kernels_ran(backend, variant):
    """The kernels of ``variant`` ran (the last layer's call; every layer has the same sizes)."""
    if backend == "reference":
        return
    impl = lstm_kernels.backends.get_backend(backend)
    ran = (impl.last_forward_kernel, impl.last_backward_kernel)
    if backend == "cuda" and variant in ("fused", "persistent"):  # float32 at fp32 accuracy (3xTF32)
        assert ran == ("fused", "fused"), ran
        assert (impl.last_forward_variant, impl.last_backward_variant) == ("persistent", "persistent")
    elif backend == "cuda":  # the per-step kernels
        assert (impl.last_forward_variant, impl.last_backward_variant) == ("step", "step")
        assert "fused" not in ran, ran
    elif variant == "step":
        assert ran == ("step", "step"), ran
    else:  # float32 without TF32: the step-budget plans refuse it, the earlier persistent kernels run
        assert ran == ("persistent", "persistent"), ran


def _model_and_optimizer(backend: str):
    torch.manual_seed(0)
    model = FusedLSTM(INPUT, HIDDEN, num_layers=LAYERS, backend=backend, device="cuda")
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
@pytest.mark.parametrize("backend,variant", CASES, ids=IDS)
def test_training_step_captures_and_replays(backend, variant, monkeypatch, no_tf32):
    use(backend, variant, monkeypatch)
    inputs = [torch.randn(T, B, INPUT, device="cuda") for _ in range(3)]

    eager_model, eager_opt = _model_and_optimizer(backend)
    eager_losses = [_step(eager_model, eager_opt, x).item() for x in inputs]
    check_kernels_ran(backend, variant)

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
    check_kernels_ran(backend, variant)  # the captured kernels are the variant asked for
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


@pytest.mark.gpu
@pytest.mark.parametrize("backend,variant", CASES, ids=IDS)
def test_side_stream_matches_default_stream(backend, variant, monkeypatch, no_tf32):
    """The kernels run on torch's current stream: on a side stream (ordered after the inputs
    were made, and before the results are read) they give the default stream's bits."""
    use(backend, variant, monkeypatch)
    torch.manual_seed(1)
    model = FusedLSTM(INPUT, HIDDEN, num_layers=LAYERS, backend=backend, device="cuda")
    x = torch.randn(T, B, INPUT, device="cuda")

    def run():
        xi = x.detach().clone().requires_grad_(True)
        out, (h_n, c_n) = model(xi)
        (out.square().sum() + c_n.sum()).backward()
        res = [out.detach(), h_n.detach(), c_n.detach(), xi.grad] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return res

    want = run()
    check_kernels_ran(backend, variant)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
        check_kernels_ran(backend, variant)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"result {i}: side stream differs from the default stream"
