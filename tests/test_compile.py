"""torch.compile: FusedLSTM compiles with fullgraph=True (no graph break) and matches eager.

The recurrence is the custom op ``lstm_kernels::recurrence`` under compile
(lstm_kernels/ops.py). CPU runs use the reference backend; the gpu-marked test
runs every kernel backend this machine has.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_kernels
from lstm_kernels import FusedLSTM
from utils import assert_rel_close

CONFIGS = {
    "plain": dict(),
    "batch_first_no_bias": dict(batch_first=True, bias=False),
    "proj_bidir_2l": dict(num_layers=2, bidirectional=True, proj_size=3),
}


class _Model(nn.Module):
    """An LSTM between two ordinary layers, as in a real model."""

    def __init__(self, backend: str, **config):
        super().__init__()
        self.embed = nn.Linear(4, 5)
        self.lstm = FusedLSTM(5, 6, backend=backend, **config)
        out_features = (config.get("proj_size") or 6) * (2 if config.get("bidirectional") else 1)
        self.head = nn.Linear(out_features, 2)

    def forward(self, x, hx=None):
        y, (h, c) = self.lstm(self.embed(x), hx)
        return self.head(y).square().mean() + h.sum() + c.sum()


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    loss = model(x)
    loss.backward()
    return loss.detach(), [x.grad, *(p.grad for p in model.parameters())]


def _check_compiled_matches_eager(model, x, compiler: str, tol: float):
    torch._dynamo.reset()
    expected_loss, expected_grads = _loss_and_grads(model, x)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    loss, grads = _loss_and_grads(compiled, x)
    assert_rel_close(loss, expected_loss, tol, "loss")
    for k, (a, e) in enumerate(zip(grads, expected_grads)):
        assert_rel_close(a, e, tol, f"grad {k}")


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_fullgraph_compile_matches_eager(config_name):
    torch.manual_seed(0)
    model = _Model("reference", **CONFIGS[config_name]).double()
    shape = (3, 7, 4) if CONFIGS[config_name].get("batch_first") else (7, 3, 4)
    _check_compiled_matches_eager(model, torch.randn(shape, dtype=torch.float64), "aot_eager", 1e-12)


def test_inductor_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _Model("reference", num_layers=2)
    _check_compiled_matches_eager(model, torch.randn(6, 2, 4), "inductor", 1e-5)


def test_compiled_graph_has_no_break_and_one_op_per_layer_direction():
    torch.manual_seed(0)
    model = _Model("reference", **CONFIGS["proj_bidir_2l"])
    explanation = torch._dynamo.explain(model)(torch.randn(5, 2, 4))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = "\n".join(g.code for g in explanation.graphs)
    assert code.count("lstm_kernels.recurrence") == 4, code


def test_nn_lstm_is_what_we_replace():
    """The reason for all this, and the README's claim: nn.LSTM does not compile to a single graph
    with fullgraph=True (dynamo breaks the graph on RNN modules). Should a torch version compile it,
    this fails, and the claim must change."""
    torch._dynamo.reset()
    lstm = nn.LSTM(4, 6)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(lstm, fullgraph=True, backend="aot_eager")(torch.randn(5, 2, 4))


def test_compile_with_initial_state():
    torch.manual_seed(0)
    lstm = FusedLSTM(4, 6, num_layers=2, backend="reference").double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    hx = (torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64))
    torch._dynamo.reset()
    expected = lstm(x, hx)
    actual = torch.compile(lstm, fullgraph=True, backend="aot_eager")(x, hx)
    assert_rel_close(actual[0], expected[0], 1e-12, "output")
    assert_rel_close(actual[1][1], expected[1][1], 1e-12, "c_n")


def test_fullgraph_compile_of_packed_input():
    torch.manual_seed(0)
    lstm = FusedLSTM(3, 4, bidirectional=True, backend="reference").double()
    packed = pack_padded_sequence(torch.randn(5, 3, 3, dtype=torch.float64), [5, 2, 3], enforce_sorted=False)
    torch._dynamo.reset()
    expected, (expected_h, _) = lstm(packed)
    actual, (actual_h, _) = torch.compile(lstm, fullgraph=True, backend="aot_eager")(packed)
    assert_rel_close(actual.data, expected.data, 1e-12, "output")
    assert_rel_close(actual_h, expected_h, 1e-12, "h_n")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fullgraph_compile_on_gpu_kernels(backend, dtype):
    if backend not in lstm_kernels.available_backends():
        pytest.skip(lstm_kernels.unavailable_backends().get(backend, "unavailable"))
    torch.manual_seed(0)
    model = _Model(backend, num_layers=2).to("cuda", dtype)
    x = torch.randn(64, 16, 4, device="cuda", dtype=dtype)
    _check_compiled_matches_eager(model, x, "inductor", 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("with_resets", [False, True], ids=["", "resets"])
@pytest.mark.parametrize("with_projection", [False, True], ids=["plain", "proj"])
def test_recurrence_ops_pass_torch_library_opcheck(with_projection, with_resets):
    """Schema, fake implementation and autograd registration of both ops (torch.library.opcheck)."""
    from lstm_kernels import ops

    gen = torch.Generator().manual_seed(0)
    T, B, H, P = 4, 3, 5, (2 if with_projection else 5)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(True)

    w_hr = rand(P, H) if with_projection else None
    resets = torch.rand(T, B, generator=gen) < 0.3 if with_resets else None
    args = (rand(T, B, 4 * H), rand(4 * H, P), rand(B, P), rand(B, H), w_hr, None, "reference", True, resets)
    torch.library.opcheck(ops.recurrence, args)
    h_all = ops.recurrence(*args)[0].detach()
    backward_args = (*(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6]), h_all, [],
                     torch.randn(T, B, P, dtype=torch.float64), torch.randn(B, P, dtype=torch.float64),
                     torch.randn(B, H, dtype=torch.float64), "reference", resets)
    torch.library.opcheck(ops.recurrence_backward, backward_args)


def test_op_path_passes_gradcheck():
    from lstm_kernels.ops import recurrence_with_grad

    gen = torch.Generator().manual_seed(0)
    T, B, H, P = 3, 2, 3, 2
    tensors = [torch.randn(*s, dtype=torch.float64, generator=gen).requires_grad_(True)
               for s in ((T, B, 4 * H), (4 * H, P), (B, P), (B, H), (P, H))]
    assert torch.autograd.gradcheck(lambda *t: recurrence_with_grad(*t, None, "reference"), tensors)
