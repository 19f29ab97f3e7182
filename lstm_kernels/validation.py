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
        raise ValueError(
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


def check_hx_structure(hx) -> Optional[tuple]:
    if hx is None:
        return None
    if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(s, torch.Tensor) for s in hx):
        raise TypeError("LSTM hx must be a tuple (h_0, c_0) of two tensors")
    return tuple(hx)
