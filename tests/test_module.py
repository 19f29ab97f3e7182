"""FusedLSTM as an nn.Module: parameters, state dicts, conversion, dropout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lstm_kernels import FusedLSTM

CONFIGS = [
    dict(),
    dict(num_layers=3, bidirectional=True),
    dict(num_layers=2, proj_size=2, bias=False),
    dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True, dropout=0.25),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_parameters_match_nn_lstm_in_name_shape_order_and_init(config):
    torch.manual_seed(0)
    expected = nn.LSTM(4, 5, **config)
    torch.manual_seed(0)
    fused = FusedLSTM(4, 5, **config)
    expected_params, fused_params = list(expected.named_parameters()), list(fused.named_parameters())
    assert [n for n, _ in fused_params] == [n for n, _ in expected_params]
    for (name, a), (_, e) in zip(fused_params, expected_params):
        assert torch.equal(a, e), name
    assert [[p.shape for p in layer] for layer in fused.all_weights] == [
        [p.shape for p in layer] for layer in expected.all_weights
    ]


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_loads_in_both_directions(config):
    expected = nn.LSTM(4, 5, **config)
    fused = FusedLSTM(4, 5, **config)
    fused.load_state_dict(expected.state_dict())
    for (_, a), (_, e) in zip(fused.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, e)
    other = nn.LSTM(4, 5, **config)
    other.load_state_dict(FusedLSTM(4, 5, **config).state_dict())


@pytest.mark.parametrize("config", CONFIGS)
def test_from_torch_and_to_torch_round_trip(config):
    lstm = nn.LSTM(4, 5, **config, dtype=torch.float64).eval()
    fused = FusedLSTM.from_torch(lstm, backend="reference")
    assert fused.backend == "reference" and not fused.training
    assert fused.weight_ih_l0.dtype == torch.float64
    back = fused.to_torch()
    assert isinstance(back, nn.LSTM)
    for k, v in lstm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    if lstm.batch_first:
        x = x.transpose(0, 1)
    assert torch.allclose(fused(x)[0], lstm(x)[0], atol=1e-12)


def test_repr_names_the_configuration_like_nn_lstm():
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=2, batch_first=True, dropout=0.5, bias=False)
    assert repr(FusedLSTM(4, 5, **kwargs)).replace("FusedLSTM", "LSTM") == repr(nn.LSTM(4, 5, **kwargs))
    assert "backend='reference'" in repr(FusedLSTM(4, 5, backend="reference"))


def test_dropout_applies_between_layers_in_training_only():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=1.0)
    fused = FusedLSTM.from_torch(lstm)
    x = torch.randn(5, 2, 3)
    # p = 1 drops every element between the layers: deterministic in both.
    lstm.train(), fused.train()
    assert torch.allclose(fused(x)[0], lstm(x)[0], atol=1e-6)
    lstm.eval(), fused.eval()
    assert torch.allclose(fused(x)[0], lstm(x)[0], atol=1e-6)
    fused.train()
    assert not torch.allclose(fused(x)[0], lstm(x)[0], atol=1e-3)


def test_dropout_is_not_applied_after_the_last_layer():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.9)
    fused = FusedLSTM.from_torch(lstm).train()
    out, _ = fused(torch.randn(50, 4, 3))
    assert (out == 0).float().mean() < 0.05  # dropout on the output would zero ~90%


def test_flatten_parameters_is_a_no_op_on_the_cpu(monkeypatch):
    """Code written against nn.LSTM calls flatten_parameters(); on the CPU it changes nothing (on CUDA
    it builds cuDNN's flat buffer, tests/test_native_gpu.py). Moving the module calls it, as nn.LSTM."""
    calls = []
    monkeypatch.setattr(FusedLSTM, "flatten_parameters",
                        lambda self, original=FusedLSTM.flatten_parameters: calls.append(1) or original(self))
    FusedLSTM(3, 4).to(torch.float64)
    assert calls
    torch.manual_seed(0)
    fused = FusedLSTM(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in fused.named_parameters()}
    expected = fused(x)[0]
    assert fused.flatten_parameters() is None
    for name, p in fused.named_parameters():
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]), name
    assert torch.equal(fused(x)[0], expected)
