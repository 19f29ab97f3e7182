"""The reference backend through LSTMLayer and FusedLSTM: gradcheck, double
backward, eval-mode backward, determinism, and a long-lag sequence."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lstm_kernels import FusedLSTM, LSTMLayer
from utils import REL_TOL, assert_rel_close


def _layer_inputs(T=3, B=2, H=3, P=None, varlen=False, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = P or H

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * 0.5).requires_grad_(True)

    xg, w_hh, h0, c0 = rand(T, B, 4 * H), rand(4 * H, P), rand(B, P), rand(B, H)
    w_hr = rand(P, H) if P != H else None
    batch_sizes = torch.tensor([B] + [B - 1] * (T - 1)) if varlen else None
    return xg, w_hh, h0, c0, w_hr, batch_sizes


LAYER_CASES = {
    "plain": dict(),
    "proj": dict(H=4, P=2),
    "varlen": dict(varlen=True),
    "proj_varlen": dict(H=4, P=2, varlen=True),
    "T1": dict(T=1),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_gradcheck(case):
    xg, w_hh, h0, c0, w_hr, bs = _layer_inputs(**LAYER_CASES[case])
    inputs = (xg, w_hh, h0, c0, w_hr)
    assert torch.autograd.gradcheck(lambda *a: LSTMLayer.apply(*a, bs, "reference"), inputs)


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_gradgradcheck(case):
    xg, w_hh, h0, c0, w_hr, bs = _layer_inputs(**LAYER_CASES[case])
    inputs = (xg, w_hh, h0, c0, w_hr)
    assert torch.autograd.gradgradcheck(lambda *a: LSTMLayer.apply(*a, bs, "reference"), inputs)


@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True, proj_size=2)], ids=["plain", "stacked"])
def test_module_gradcheck_and_gradgradcheck(config):
    torch.manual_seed(0)
    lstm = FusedLSTM(3, 4, **config, dtype=torch.float64, backend="reference")
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(lstm.parameters())

    def run(x, *weights):
        state = dict(zip((n for n, _ in lstm.named_parameters()), weights))
        out, (h, c) = torch.func.functional_call(lstm, state, (x,))
        return out, h, c

    assert torch.autograd.gradcheck(run, (x, *params))
    assert torch.autograd.gradgradcheck(run, (x, *params))


def test_backward_in_eval_mode():
    torch.manual_seed(0)
    lstm = FusedLSTM(3, 4, num_layers=2, dropout=0.5).eval()
    x = torch.randn(5, 2, 3, requires_grad=True)
    out, _ = lstm(x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in lstm.parameters())


def _forward_backward(lstm, x):
    x = x.clone().requires_grad_(True)
    out, (h, c) = lstm(x)
    grads = torch.autograd.grad((out.sum() + h.sum() + c.sum()), [x, *lstm.parameters()])
    return (out, h, c, *grads)


def test_two_runs_are_bitwise_identical():
    torch.manual_seed(0)
    lstm = FusedLSTM(7, 9, num_layers=2, bidirectional=True, proj_size=4)
    x = torch.randn(6, 3, 7)
    first, second = _forward_backward(lstm, x), _forward_backward(lstm, x)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_long_lag_sequence_stays_within_tolerance():
    """T = 2048 with the forget gate near 1 and the input gate near 0, so c0 and its
    gradient carry across the whole sequence: fp32 against the float64 nn.LSTM."""
    T, B, I, H = 2048, 2, 3, 8
    torch.manual_seed(0)
    expected = nn.LSTM(I, H, dtype=torch.float64)
    with torch.no_grad():
        expected.bias_ih_l0[:H].fill_(-10.0)  # input gate ~ 5e-5: the cell does not saturate
        expected.bias_ih_l0[H : 2 * H].fill_(10.0)  # forget gate: 0.99995 ** 2048 ~ 0.9
    fused = FusedLSTM.from_torch(expected).float()
    x = torch.randn(T, B, I, dtype=torch.float64) * 0.1
    c0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(1, B, H, dtype=torch.float64, requires_grad=True)
    out_e, (h_e, c_e) = expected(x, (h0, c0))
    (dc0_e,) = torch.autograd.grad(out_e[-1].sum(), [c0])
    c0_f = c0.detach().float().requires_grad_(True)
    out_f, (h_f, c_f) = fused(x.float(), (h0.detach().float(), c0_f))
    (dc0_f,) = torch.autograd.grad(out_f[-1].sum(), [c0_f])
    assert dc0_e.abs().max() > 1e-3, "the test must exercise a long-lag gradient"
    for name, a, e in (("output", out_f, out_e), ("c_n", c_f, c_e), ("dc0", dc0_f, dc0_e)):
        assert_rel_close(a, e, REL_TOL[torch.float32], name)
