"""Bad arguments raise what nn.LSTM raises: every case is run on both modules.

Cases follow PyTorch's test_nn.py (test_rnn_args_check,
test_projections_lstm_args_check) and test_modules.py's LSTM error inputs.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lstm_kernels import FusedLSTM

CONSTRUCTOR_CASES = {
    "hidden_size_zero": ((10, 0, 1), {}, "hidden_size must be greater than zero"),
    "num_layers_zero": ((10, 10, 0), {}, "num_layers must be greater than zero"),
    "input_size_zero": ((0, 5), {}, "input_size must be greater than zero"),
    "input_size_negative": ((-1, 5), {}, "input_size must be greater than zero"),
    "input_size_float": ((3.0, 5), {}, "input_size should be of type int, got: float"),
    "input_size_str": (("10", 5), {}, "input_size should be of type int, got: str"),
    "hidden_size_float": ((3, 5.0), {}, "hidden_size should be of type int, got: float"),
    "hidden_size_negative": ((3, -5), {}, "hidden_size must be greater than zero"),
    "num_layers_float": ((3, 5), {"num_layers": 1.5}, "num_layers"),
    "bias_int": ((3, 5), {"bias": 0}, "bias should be of type bool, got: int"),
    "bias_str": ((3, 5), {"bias": "True"}, "bias should be of type bool, got: str"),
    "batch_first_int": ((3, 5), {"batch_first": 1}, "batch_first should be of type bool, got: int"),
    "batch_first_str": ((3, 5), {"batch_first": "False"}, "batch_first should be of type bool, got: str"),
    "dropout_negative": ((3, 5), {"dropout": -0.1}, "dropout should be a number in range"),
    "dropout_above_one": ((3, 5), {"dropout": 1.5}, "dropout should be a number in range"),
    "dropout_bool": ((3, 5), {"dropout": True}, "dropout should be a number in range"),
    "dropout_str": ((3, 5), {"dropout": "0.5"}, "dropout should be a number in range"),
    "proj_negative": ((3, 5), {"proj_size": -1}, "proj_size should be a positive integer"),
    "proj_equal_hidden": ((3, 5), {"proj_size": 5}, "proj_size has to be smaller than hidden_size"),
    "proj_above_hidden": ((3, 5), {"proj_size": 6}, "proj_size has to be smaller than hidden_size"),
    "proj_float": ((3, 5), {"proj_size": 1.5}, "proj_size"),
}


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare the type with nn.LSTM's
        return e
    return None


@pytest.mark.parametrize("case", list(CONSTRUCTOR_CASES))
def test_constructor_errors_match_nn_lstm(case):
    args, kwargs, message = CONSTRUCTOR_CASES[case]
    expected = _raised(lambda: nn.LSTM(*args, **kwargs))
    assert expected is not None, "nn.LSTM accepts this case; it does not belong here"
    with pytest.raises(type(expected), match=message):
        FusedLSTM(*args, **kwargs)


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        FusedLSTM(3, 5, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusedLSTM(3, 5, num_layers=2, dropout=0.5)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown LSTM backend 'nope'"):
        FusedLSTM(3, 5, backend="nope")


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# name: (constructor kwargs, input, hx, message). Sizes: input 3, hidden 5, T 4, B 2.
FORWARD_CASES = {
    "input_1d": ({}, lambda: _t(3), None, "Expected input to be 2D or 3D, got 1D"),
    "input_4d": ({}, lambda: _t(4, 2, 3, 1), None, "Expected input to be 2D or 3D, got 4D"),
    "input_size": ({}, lambda: _t(4, 2, 4), None, "input.size\\(-1\\) must be equal to input_size"),
    "input_size_unbatched": ({}, lambda: _t(4, 4), None, "input.size\\(-1\\) must be equal to input_size"),
    "input_dtype": ({}, lambda: _t(4, 2, 3, dtype=torch.float64), None, "does not match weight dtype"),
    "hidden_size": ({}, lambda: _t(4, 2, 3), lambda: (_t(1, 2, 6), _t(1, 2, 5)), "Expected hidden\\[0\\] size"),
    "cell_size": ({}, lambda: _t(4, 2, 3), lambda: (_t(1, 2, 5), _t(1, 2, 6)), "Expected hidden\\[1\\] size"),
    "hidden_batch": ({}, lambda: _t(4, 2, 3), lambda: (_t(1, 3, 5), _t(1, 3, 5)), "Expected hidden\\[0\\] size"),
    "hidden_layers": ({}, lambda: _t(4, 2, 3), lambda: (_t(2, 2, 5), _t(2, 2, 5)), "Expected hidden\\[0\\] size"),
    "hidden_directions": ({"bidirectional": True}, lambda: _t(4, 2, 3), lambda: (_t(1, 2, 5), _t(1, 2, 5)),
                          "Expected hidden\\[0\\] size"),
    "hidden_2d_for_batched": ({}, lambda: _t(4, 2, 3), lambda: (_t(2, 5), _t(2, 5)), "should also be 3-D"),
    "hidden_3d_for_unbatched": ({}, lambda: _t(4, 3), lambda: (_t(1, 1, 5), _t(1, 1, 5)), "should also be 2-D"),
    "hidden_dtype": ({}, lambda: _t(4, 2, 3), lambda: (_t(1, 2, 5, dtype=torch.float64), _t(1, 2, 5)), "dtype"),
    "cell_dtype": ({}, lambda: _t(4, 2, 3), lambda: (_t(1, 2, 5), _t(1, 2, 5, dtype=torch.float64)), "dtype"),
    "proj_hidden_is_hidden_size": ({"proj_size": 2}, lambda: _t(4, 2, 3), lambda: (_t(1, 2, 5), _t(1, 2, 5)),
                                   "Expected hidden\\[0\\] size"),
    "proj_cell_is_proj_size": ({"proj_size": 2}, lambda: _t(4, 2, 3), lambda: (_t(1, 2, 2), _t(1, 2, 2)),
                               "Expected hidden\\[1\\] size"),
    "packed_hidden_batch": ({}, lambda: pack_padded_sequence(_t(4, 3, 3), [4, 2, 1]),
                            lambda: (_t(1, 2, 5), _t(1, 2, 5)), "hidden"),
    "packed_input_size": ({}, lambda: pack_padded_sequence(_t(4, 3, 4), [4, 2, 1]), None, "input_size"),
    "empty_sequence": ({}, lambda: _t(0, 2, 3), None, "sequence length to be larger than 0"),
    "empty_sequence_batch_first": ({"batch_first": True}, lambda: _t(2, 0, 3), None,
                                   "sequence length to be larger than 0"),
    "empty_sequence_unbatched": ({}, lambda: _t(0, 3), None, "sequence length to be larger than 0"),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_errors_match_nn_lstm(case):
    kwargs, make_input, make_hx, message = FORWARD_CASES[case]
    torch.manual_seed(0)
    reference = nn.LSTM(3, 5, **kwargs)
    fused = FusedLSTM.from_torch(reference)
    x = make_input()
    hx = make_hx() if make_hx else None
    expected = _raised(lambda: reference(x, hx))
    assert expected is not None, "nn.LSTM accepts this case; it does not belong here"
    with pytest.raises(type(expected), match=message):
        fused(x, hx)


def test_hx_must_be_a_pair_of_tensors():
    with pytest.raises(TypeError, match="tuple \\(h_0, c_0\\)"):
        FusedLSTM(3, 5)(_t(4, 2, 3), _t(1, 2, 5))
