"""Resets inside a sequence: ``FusedLSTM.forward(input, hx, resets)`` and ``lstm_layer(..., resets=)``.

A reset at step t of a row cuts that row's sequence between t - 1 and t. The promise checked here:
the outputs and every gradient equal those of running each piece of each row separately through
nn.LSTM (the first piece from hx, the others from zero states), with resets at the first step, the
last step, adjacent steps, and none. Backends that do not serve resets are passed over by ``auto``
and refused when named; the CPU native path does not serve them.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fake_backends
from lstm_kernels import BackendUnsupportedError, FusedLSTM, lstm_layer
from lstm_kernels.sequences import reverse_resets
from utils import assert_rel_close

#: Reset patterns over T = 7 steps and B = 4 rows: (t, b) pairs where resets is True.
PATTERNS = {
    "none": [],
    "first-and-last": [(0, 0), (6, 1), (0, 3), (6, 3)],
    "adjacent": [(2, 0), (3, 0), (4, 0), (1, 2), (2, 2)],
    "mixed": [(0, 1), (3, 1), (5, 2), (6, 2), (1, 3)],
}
T, B, I, H = 7, 4, 3, 5


def _resets(pattern: str) -> torch.Tensor:
    resets = torch.zeros(T, B, dtype=torch.bool)
    for t, b in PATTERNS[pattern]:
        resets[t, b] = True
    return resets


def _pieces(resets_of_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of the pieces a row's resets cut it into."""
    cuts = [0] + [t for t in range(1, T) if resets_of_row[t]] + [T]
    return list(zip(cuts[:-1], cuts[1:]))


def _separately(lstm: nn.LSTM, x, hx, resets):
    """(output [T, B, D*P], h_n, c_n): every piece of every row through ``lstm`` on its own."""
    outputs, h_n, c_n = [], [], []
    for b in range(B):
        # the first piece from hx, unless a reset at the first step discards it; the others from zeros
        state = None if hx is None or resets[0, b] else (hx[0][:, b:b + 1], hx[1][:, b:b + 1])
        pieces = []
        for start, end in _pieces(resets[:, b]):
            out, final = lstm(x[start:end, b:b + 1], state)
            pieces.append(out)
            state = None
        outputs.append(torch.cat(pieces, dim=0))
        h_n.append(final[0])
        c_n.append(final[1])
    return torch.cat(outputs, dim=1), torch.cat(h_n, dim=1), torch.cat(c_n, dim=1)


def _loss_and_grads(run, params, x, hx):
    x = x.detach().requires_grad_(True)
    hx = None if hx is None else tuple(s.detach().requires_grad_(True) for s in hx)
    out, h_n, c_n = run(x, hx)
    (out.square().sum() + h_n.sum() + 2 * c_n.sum()).backward()
    grads = [x.grad, *(s.grad for s in hx or ()), *(p.grad for p in params)]
    for p in params:
        p.grad = None
    return [out, h_n, c_n, *grads]


def _models(dtype=torch.float64, **config):
    torch.manual_seed(0)
    lstm = nn.LSTM(I, H, dtype=dtype, **config)
    return lstm, FusedLSTM.from_torch(lstm, backend="reference")


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("config", [dict(), dict(num_layers=2), dict(proj_size=3), dict(num_layers=2, proj_size=2)],
                         ids=["1", "2layers", "proj", "2layers-proj"])
def test_equal_to_running_each_piece_separately(pattern, config):
    lstm, fused = _models(**config)
    layers, P = config.get("num_layers", 1), config.get("proj_size") or H
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=gen)
    hx = (torch.randn(layers, B, P, dtype=torch.float64, generator=gen),
          torch.randn(layers, B, H, dtype=torch.float64, generator=gen))
    resets = _resets(pattern)

    def fused_run(x, hx):
        out, (h, c) = fused(x, hx, resets=resets)
        return out, h, c

    actual = _loss_and_grads(fused_run, list(fused.parameters()), x, hx)
    expected = _loss_and_grads(lambda x, hx: _separately(lstm, x, hx, resets), list(lstm.parameters()), x, hx)
    for a, e in zip(actual, expected):
        assert_rel_close(a, e, 1e-12)


@pytest.mark.parametrize("pattern", ["first-and-last", "mixed"])
def test_bidirectional_from_zero_states(pattern):
    """Both directions restart at every cut (with hx None, the pieces' own zero states)."""
    lstm, fused = _models(bidirectional=True, num_layers=2)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    resets = _resets(pattern)

    def fused_run(x, hx):
        out, (h, c) = fused(x, resets=resets)
        return out, h, c

    actual = _loss_and_grads(fused_run, list(fused.parameters()), x, None)
    expected_out = _separately(lstm, x, None, resets)[0]
    assert_rel_close(actual[0], expected_out, 1e-12)
    x = x.detach().requires_grad_(True)
    _separately(lstm, x, None, resets)[0].square().sum().backward()
    x_fused = x.detach().requires_grad_(True)
    fused(x_fused, resets=resets)[0].square().sum().backward()
    assert_rel_close(x_fused.grad, x.grad, 1e-12)


def test_reverse_resets():
    resets = _resets("mixed")
    reversed_ = reverse_resets(resets)
    assert not reversed_[0].any()
    for t in range(1, T):
        assert torch.equal(reversed_[T - t], resets[t])


@pytest.mark.parametrize("batch_first", [False, True])
def test_batch_first_and_unbatched(batch_first):
    lstm, fused = _models(batch_first=batch_first)
    x = torch.randn(T, B, I, dtype=torch.float64)
    resets = _resets("mixed")
    expected = fused(x.transpose(0, 1) if batch_first else x, resets=resets.t() if batch_first else resets)[0]
    expected = expected.transpose(0, 1) if batch_first else expected
    # each row alone, unbatched
    for b in range(B):
        row = fused(x[:, b], resets=resets[:, b])[0]
        assert_rel_close(row, expected[:, b], 1e-12)


def test_no_resets_is_the_call_without_them():
    _, fused = _models()
    x = torch.randn(T, B, I, dtype=torch.float64)
    assert torch.equal(fused(x, resets=_resets("none"))[0], fused(x)[0])


def test_layer_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*s, dtype=torch.float64, generator=gen).requires_grad_(True)
               for s in ((4, 3, 4 * 3), (4 * 3, 3), (3, 3), (3, 3))]
    resets = torch.tensor([[True, False, False], [False, True, False], [False, True, True], [False, False, True]])
    run = lambda *t: lstm_layer(*t, backend="reference", resets=resets)  # noqa: E731
    assert torch.autograd.gradcheck(run, tensors)
    assert torch.autograd.gradgradcheck(lambda *t: run(*t)[0], tensors)


def test_auto_on_the_cpu_leaves_the_native_path():
    _, fused = _models()
    fused.backend = "auto"
    x = torch.randn(T, B, I, dtype=torch.float64)
    choice = fused.path_for(x, explain=True)
    assert choice.path == "native"
    choice = fused._choose_path(x, None, None, _resets("mixed"))
    assert choice.path == "reference" and "resets" in choice.reason


def test_a_backend_without_resets_is_refused_when_named(monkeypatch):
    fake_backends.install()
    try:
        args = (torch.randn(3, 2, 8), torch.randn(8, 2), torch.zeros(2, 2), torch.zeros(2, 2))
        with pytest.raises(BackendUnsupportedError, match="does not serve resets"):
            lstm_layer(*args, backend="right", resets=torch.zeros(3, 2, dtype=torch.bool))
    finally:
        fake_backends.uninstall()


def test_bad_resets_raise():
    _, fused = _models()
    x = torch.randn(T, B, I, dtype=torch.float64)
    with pytest.raises(TypeError, match="bool"):
        fused(x, resets=torch.zeros(T, B))
    with pytest.raises(RuntimeError, match=r"\[T, B\]"):
        fused(x, resets=torch.zeros(B, T, dtype=torch.bool))
    packed = pack_padded_sequence(x, torch.tensor([7, 5, 3, 2]))
    with pytest.raises(ValueError, match="PackedSequence"):
        fused(packed, resets=torch.zeros(T, B, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="resets must be a bool tensor"):
        lstm_layer(torch.randn(3, 2, 8), torch.randn(8, 2), torch.zeros(2, 2), torch.zeros(2, 2),
                   backend="reference", resets=torch.zeros(2, 3, dtype=torch.bool))


def test_compiled_matches_eager():
    _, fused = _models(num_layers=2)
    x = torch.randn(T, B, I, dtype=torch.float64)
    resets = _resets("mixed")
    expected = fused(x, resets=resets)[0]
    torch._dynamo.reset()
    actual = torch.compile(lambda x, r: fused(x, resets=r)[0], fullgraph=True, backend="aot_eager")(x, resets)
    assert_rel_close(actual, expected, 1e-12)
