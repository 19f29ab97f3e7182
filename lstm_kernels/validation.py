"""Argument checks that mirror ``torch.nn.LSTM``: same exception types, same messages.

Kept apart from the module so that every check is in one place and the tests
can hold it against PyTorch's own error cases.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Optional

import torch


def check_constructor_args(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size) -> None:
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
            f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
            stacklevel=3,
        )
    for name, value in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("proj_size", proj_size)):
        if not isinstance(value, int):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if input_size <= 0:
        raise ValueError("input_size must be greater than zero")
    if hidden_size <= 0:
        raise ValueError("hidden_size must be greater than zero")
    if num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")


def check_input(input: torch.Tensor, weight: torch.Tensor, input_size: int, packed: bool) -> None:
    """Rank, feature size, dtype and device of the (time-major or packed) input."""
    if input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
        # nn.LSTM checks this for tensors (ValueError); a packed input reaches its kernel (RuntimeError)
        raise (RuntimeError if packed else ValueError)(
            f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})"
        )
    expected_dim = 2 if packed else 3
    if input.dim() != expected_dim:
        raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
    if input.size(-1) != input_size:
        raise RuntimeError(
            f"input.size(-1) must be equal to input_size. Expected {input_size}, got {input.size(-1)}"
        )
    if input.device != weight.device:
        raise RuntimeError(
            f"Input and parameter tensors are not at the same device, found input tensor at {input.device} "
            f"and parameter tensor at {weight.device}"
        )


def check_sequence_length(time_major: torch.Tensor) -> None:
    """nn.LSTM refuses T = 0 (B = 0 is allowed and gives empty outputs)."""
    if time_major.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")


def check_unbatched_hx(hx, is_batched: bool) -> None:
    want = 3 if is_batched else 2
    if hx[0].dim() != want or hx[1].dim() != want:
        kind = "batched 3-D" if is_batched else "unbatched 2-D"
        raise RuntimeError(
            f"For {kind} input, hx and cx should also be {want}-D but got "
            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
        )


def check_hidden(hx, expected_h: tuple, expected_c: tuple, input: torch.Tensor) -> None:
    """Shapes, dtype and device of (h0, c0) against the input."""
    for k, (state, expected) in enumerate(zip(hx, (expected_h, expected_c))):
        if tuple(state.shape) != expected:
            raise RuntimeError(f"Expected hidden[{k}] size {expected}, got {list(state.shape)}")
    for state in hx:
        if state.device != input.device:
            raise RuntimeError(
                f"Input and hidden tensors are not at the same device, found input tensor at {input.device} "
                f"and hidden tensor at {state.device}"
            )
        if state.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
            raise RuntimeError(f"Expected hidden and input to have the same dtype, got {state.dtype} and {input.dtype}")


def check_gru_hidden(hx, expected: tuple, input: torch.Tensor) -> None:
    """nn.GRU's h_0 check (RuntimeError, nn.GRU's message), then device and dtype against the input."""
    if tuple(hx.shape) != expected:
        raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.shape)}")
    check_hidden((hx,), expected, expected, input)


def split_hx(hx) -> Optional[tuple]:
    """(h_0, c_0) out of ``hx``, as nn.LSTM takes them: by ``hx[0]`` and ``hx[1]``.

    So a container with fewer than two states raises IndexError where nn.LSTM does (a one-layer state
    tensor passed alone, say); what else is wrong with ``hx`` is found later, in nn.LSTM's order
    (the rank and shape checks, then :func:`check_hx_container`).
    """
    if hx is None:
        return None
    return hx[0], hx[1]


def check_packed_state_rank(states) -> None:
    """nn.LSTM hands a packed input's states to its kernel, which indexes their batch axis: a state
    of rank below 3 raises IndexError there."""
    for state in states:
        if isinstance(state, torch.Tensor) and state.dim() < 3:
            raise IndexError(f"Dimension out of range: the states of a packed input must be 3-D "
                             f"[num_layers * num_directions, batch, hidden], got {state.dim()}-D")


def check_hx_container(hx) -> None:
    """What nn.LSTM's kernel call refuses (after the rank and shape checks, except for a sorted packed
    input, whose hx nn.LSTM hands to the kernel unchecked): ``hx`` as one tensor or holding a
    non-tensor (TypeError), or not two states (RuntimeError)."""
    if isinstance(hx, torch.Tensor) or not all(isinstance(state, torch.Tensor) for state in hx):
        got = f"one tensor of shape {list(hx.shape)}" if isinstance(hx, torch.Tensor) else type(hx).__name__
        raise TypeError(f"LSTM hx must be a tuple (h_0, c_0) of two tensors, got {got}")
    if len(hx) != 2:
        raise RuntimeError("lstm expects two hidden states")


def check_resets(resets, input: torch.Tensor, batch_first: bool, is_batched: bool, packed: bool) -> torch.Tensor:
    """FusedLSTM.forward's ``resets`` against its (batched, 3-D) input: a bool tensor [B, T] with
    batch_first, else [T, B] ([T] for an unbatched call), on the input's device. Returns it
    time-major [T, B]. TypeError for a non-bool, RuntimeError for a wrong shape or device (as for
    hx), ValueError with a PackedSequence (whose lengths already end each sequence)."""
    if packed:
        raise ValueError("resets cannot be combined with a PackedSequence input: pass a padded batch, "
                         "where resets mark where each row's state restarts")
    if not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool:
        got = resets.dtype if isinstance(resets, torch.Tensor) else type(resets).__name__
        raise TypeError(f"resets must be a bool tensor, got {got}")
    B, T = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
    expected, layout = ((B, T), "[B, T]") if batch_first else ((T, B), "[T, B]")
    if not is_batched:
        expected, layout = (T,), "[T]"
    if tuple(resets.shape) != expected:
        raise RuntimeError(f"Expected resets of size {layout} = {list(expected)}, got {list(resets.shape)}")
    if resets.device != input.device:
        raise RuntimeError(f"Input and resets must be on the same device; got {input.device} and {resets.device}")
    if not is_batched:
        return resets.unsqueeze(1)
    return resets.t() if batch_first else resets


def check_layer_shapes(xg, w_hh, h0, c0, w_hr, batch_sizes, resets=None, b_hn=None) -> None:
    """The shapes of one layer's recurrence call (``lstm_layer``), each wrong one named with the
    shape it must have: xg [T, B, 4H], w_hh [4H, P], h0 [B, P], c0 [B, H], w_hr [P, H] or None
    (then P = H), batch_sizes [T] or None, resets [T, B] bool on xg's device or None. The GRU's
    (``gru_layer``: c0 and w_hr None): xg [T, B, 3H], w_hh [3H, H], h0 [B, H], b_hn [H] or None.
    RuntimeError, as nn.LSTM raises for wrong state shapes."""
    gru = c0 is None
    gates, names = (3, "3*hidden_size") if gru else (4, "4*hidden_size")
    if xg.dim() != 3 or xg.shape[2] % gates != 0:
        raise RuntimeError(f"xg must be [T, B, {names}] (time-major), got {list(xg.shape)}")
    T, B, gate_rows = xg.shape
    H = gate_rows // gates
    P = w_hh.shape[1] if w_hh.dim() == 2 else (w_hr.shape[0] if w_hr is not None else H)
    expected = {"w_hh": (gate_rows, P), "h0": (B, P)}
    if gru:
        expected["b_hn"] = (H,)
    else:
        expected["c0"] = (B, H)
    if w_hr is not None:
        expected["w_hr"] = (P, H)
    elif P != H:
        raise RuntimeError(f"w_hh must be [{names}, hidden_size] = {[gate_rows, H]}"
                           f"{'' if gru else ' without w_hr'}, got {list(w_hh.shape)}")
    for name, tensor in (("w_hh", w_hh), ("h0", h0), ("c0", c0), ("w_hr", w_hr), ("b_hn", b_hn)):
        if name in expected and tensor is not None and tuple(tensor.shape) != expected[name]:
            raise RuntimeError(f"{name} must be {list(expected[name])} for xg {list(xg.shape)} "
                               f"(T, B, {names}) and w_hh {list(w_hh.shape)}, got {list(tensor.shape)}")
    if resets is not None and (tuple(resets.shape) != (T, B) or resets.dtype != torch.bool
                               or resets.device != xg.device):
        raise RuntimeError(f"resets must be a bool tensor [T, B] = {[T, B]} on {xg.device}, got "
                           f"{resets.dtype} {list(resets.shape)} on {resets.device}")
    if batch_sizes is not None:
        if tuple(batch_sizes.shape) != (T,) or batch_sizes.is_floating_point() or batch_sizes.is_cuda:
            raise RuntimeError(f"batch_sizes must be an integer tensor [T] = {[T]} on the CPU, got "
                               f"{batch_sizes.dtype} {list(batch_sizes.shape)} on {batch_sizes.device}")
        sizes = batch_sizes.tolist()
        if sizes[0] != B or sizes[-1] < 1 or any(a < b for a, b in zip(sizes, sizes[1:])):
            raise RuntimeError(f"batch_sizes must run from B = {B} down, non-increasing and >= 1 "
                               f"(a PackedSequence's), got {sizes}")
