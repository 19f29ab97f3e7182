"""The 16-bit tolerances of tests/utils.py separate a correct recurrence from a wrong one.

A correct 16-bit recurrence stores h in the input dtype and keeps the cell state in fp32. The
mutant here keeps the cell state in the input dtype (rounded every step): with long memory (forget
gate near 1) its rounding errors pile up in c, and REL_TOL must catch that in fp16 and bf16 alike.
The oracle is float64 run on the same 16-bit inputs, so only the computation's error is measured.
"""
from __future__ import annotations

import pytest
import torch

from lstm_kernels.backends import reference
from utils import (LSTM_RESULT_NAMES, REL_TOL, UNIT_ROUNDOFF, assert_rel_close, long_memory_case, rel_error,
                   reference_outputs_and_grads)

T, B, H = 128, 16, 64
FORGET_BIAS = 4.0  # f = σ(4 + ...) ≈ 0.98: a long memory


_correct_lstm_step = reference._LSTMCell.step


def _step_rounding_c(cell, x_t, h_prev, state_prev):
    """The reference LSTM step with one mistake: the carried c_t rounded to the input dtype."""
    h_new, (c_new,), saved = _correct_lstm_step(cell, x_t, h_prev, state_prev)
    return h_new, (c_new.to(cell.dtype).to(c_new.dtype),), saved


def _case(dtype, seed=0):
    inputs, cotangents = long_memory_case(T, B, H, FORGET_BIAS, seed)
    return [t.to(dtype) for t in inputs], [t.to(dtype) for t in cotangents]


_outputs_and_grads = reference_outputs_and_grads
NAMES = LSTM_RESULT_NAMES


def _errors(dtype, monkeypatch, mutant: bool):
    inputs, cotangents = _case(dtype)
    expected = _outputs_and_grads(inputs, cotangents, torch.float64)
    if mutant:
        monkeypatch.setattr(reference._LSTMCell, "step", _step_rounding_c)
    actual = _outputs_and_grads(inputs, cotangents, dtype)
    monkeypatch.undo()
    return actual, expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_correct_16_bit_recurrence_passes(dtype, monkeypatch):
    actual, expected = _errors(dtype, monkeypatch, mutant=False)
    for name, a, e in zip(NAMES, actual, expected):
        assert_rel_close(a, e, REL_TOL[dtype], name)
    worst = max(rel_error(a, e) for a, e in zip(actual, expected)) / UNIT_ROUNDOFF[dtype]
    assert worst < 1.5, f"a correct recurrence measured {worst:.2f} u (about 0.8 u expected)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cell_state_kept_in_16_bits_fails(dtype, monkeypatch):
    actual, expected = _errors(dtype, monkeypatch, mutant=True)
    failures = []
    for name, a, e in zip(NAMES, actual, expected):
        try:
            assert_rel_close(a, e, REL_TOL[dtype], name)
        except AssertionError as error:
            failures.append(str(error))
    assert failures, "a cell state rounded to 16 bits every step passed the tolerance"
