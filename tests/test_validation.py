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


BAD_HX = {
    "one_layer_tensor": lambda: _t(1, 2, 5),
    "two_layer_tensor": lambda: _t(2, 2, 5),
    "tensor_of_pairs": lambda: _t(2, 1, 2, 5),
    "one_state": lambda: (_t(1, 2, 5),),
    "three_states": lambda: (_t(1, 2, 5), _t(1, 2, 5), _t(1, 2, 5)),
    "not_a_tensor": lambda: (_t(1, 2, 5), 3),
}
INPUTS = {
    "batched": lambda: _t(4, 2, 3),
    "unbatched": lambda: _t(4, 3),
    "packed": lambda: pack_padded_sequence(_t(4, 2, 3), [4, 2]),
    "packed_unsorted": lambda: pack_padded_sequence(_t(4, 2, 3), [2, 4], enforce_sorted=False),
}


@pytest.mark.parametrize("input_kind", list(INPUTS))
@pytest.mark.parametrize("hx_kind", list(BAD_HX))
def test_malformed_hx_raises_what_nn_lstm_raises(hx_kind, input_kind):
    """hx of the wrong structure: nn.LSTM raises IndexError, RuntimeError, TypeError or AttributeError
    depending on where its checks trip, or accepts it (an unsorted packed input's hx is permuted
    into a pair first); FusedLSTM does the same for each."""
    torch.manual_seed(0)
    reference = nn.LSTM(3, 5)
    fused = FusedLSTM.from_torch(reference)
    x, hx = INPUTS[input_kind](), BAD_HX[hx_kind]()
    expected = _raised(lambda: reference(x, hx))
    if expected is None:
        out, (h_n, c_n) = fused(x, hx)
        ref_out, (ref_h, ref_c) = reference(x, hx)
        assert torch.allclose(out.data, ref_out.data) and torch.allclose(h_n, ref_h) and torch.allclose(c_n, ref_c)
        return
    actual = _raised(lambda: fused(x, hx))
    assert type(actual) is type(expected), (actual, expected)


def test_hx_as_a_list_of_two_tensors_is_accepted_like_nn_lstm():
    torch.manual_seed(0)
    reference = nn.LSTM(3, 5)
    hx = [_t(1, 2, 5), _t(1, 2, 5)]
    x = _t(4, 2, 3)
    assert torch.allclose(FusedLSTM.from_torch(reference)(x, hx)[0], reference(x, hx)[0])


LAYER_SHAPES = dict(xg=(5, 3, 24), w_hh=(24, 6), h0=(3, 6), c0=(3, 6))
WRONG_LAYER_SHAPES = {
    "h0_with_a_layer_axis": ("h0", (1, 3, 6), "h0 must be \\[3, 6\\]"),
    "h0_batch": ("h0", (4, 6), "h0 must be \\[3, 6\\]"),
    "c0_size": ("c0", (3, 5), "c0 must be \\[3, 6\\]"),
    "w_hh_rows": ("w_hh", (20, 6), "w_hh must be \\[24, 6\\]"),
    "xg_rank": ("xg", (5, 24), "xg must be \\[T, B, 4\\*hidden_size\\]"),
}


@pytest.mark.parametrize("case", list(WRONG_LAYER_SHAPES))
def test_lstm_layer_names_the_argument_with_a_wrong_shape(case):
    from lstm_kernels import lstm_layer

    name, shape, message = WRONG_LAYER_SHAPES[case]
    args = {k: torch.randn(*(shape if k == name else s)) for k, s in LAYER_SHAPES.items()}
    with pytest.raises(RuntimeError, match=message):
        lstm_layer(**args, backend="reference")


def test_lstm_layer_with_a_projection_names_its_shapes():
    from lstm_kernels import lstm_layer

    xg, w_hh, h0, c0, w_hr = torch.randn(5, 3, 24), torch.randn(24, 2), torch.randn(3, 2), torch.randn(3, 6), torch.randn(2, 6)
    assert lstm_layer(xg, w_hh, h0, c0, w_hr, backend="reference")[0].shape == (5, 3, 2)
    with pytest.raises(RuntimeError, match="w_hr must be \\[2, 6\\]"):
        lstm_layer(xg, w_hh, h0, c0, torch.randn(6, 2), backend="reference")
    with pytest.raises(RuntimeError, match="without w_hr"):
        lstm_layer(xg, w_hh, h0, c0, None, backend="reference")


UNBATCHED_HX = {
    "three_states": lambda: (_t(1, 5), _t(1, 5), _t(1, 5)),
    "stacked_tensor": lambda: _t(2, 1, 5),
    "list": lambda: [_t(1, 5), _t(1, 5)],
}


@pytest.mark.parametrize("hx_kind", list(UNBATCHED_HX))
def test_unbatched_hx_containers_nn_lstm_accepts(hx_kind):
    """For unbatched input nn.LSTM takes hx[0] and hx[1] and rebuilds the pair, so it accepts these."""
    torch.manual_seed(0)
    reference = nn.LSTM(3, 5)
    fused = FusedLSTM.from_torch(reference)
    x, hx = _t(4, 3), UNBATCHED_HX[hx_kind]()
    expected = reference(x, hx)
    actual = fused(x, hx)
    assert torch.allclose(actual[0], expected[0], atol=1e-6) and torch.allclose(actual[1][1], expected[1][1], atol=1e-6)


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("states", ["2d", "1d", "mixed"])
def test_packed_input_with_low_rank_states_raises_like_nn_lstm(states, sorted_):
    torch.manual_seed(0)
    reference = nn.LSTM(3, 5)
    fused = FusedLSTM.from_torch(reference)
    hx = {"2d": (_t(2, 5), _t(2, 5)), "1d": (_t(5), _t(5)), "mixed": (_t(1, 2, 5), _t(2, 5))}[states]
    x = pack_padded_sequence(_t(4, 2, 3), [4, 2] if sorted_ else [2, 4], enforce_sorted=sorted_)
    expected = _raised(lambda: reference(x, hx))
    assert expected is not None
    assert type(_raised(lambda: fused(x, hx))) is type(expected), expected


def test_packed_input_of_another_dtype_raises_like_nn_lstm():
    reference = nn.LSTM(3, 5)
    fused = FusedLSTM.from_torch(reference)
    x = pack_padded_sequence(_t(4, 2, 3, dtype=torch.float64), [4, 2])
    expected = _raised(lambda: reference(x))
    assert type(_raised(lambda: fused(x))) is type(expected), expected


@pytest.mark.parametrize("sizes, message", [([3, 2, 3, 1, 1], "non-increasing"), ([2, 2, 1, 1, 1], "from B = 3"),
                                            ([3, 2, 1, 1, 0], ">= 1"), ([3, 2, 1], "\\[T\\] = \\[5\\]")])
def test_lstm_layer_checks_the_batch_sizes(sizes, message):
    from lstm_kernels import lstm_layer

    args = {k: torch.randn(*s) for k, s in LAYER_SHAPES.items()}
    with pytest.raises(RuntimeError, match=message):
        lstm_layer(**args, batch_sizes=torch.tensor(sizes), backend="reference")
