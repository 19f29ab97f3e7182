"""The CUDA kernels' fast activations (csrc/common/cell.cuh) hold the tolerances of the kernels that use them.

The fast activations build sigmoid and tanh from two GPU primitives, ex2.approx (within 2 ulp: the MUFU.EX2
the precise expf ends in too) and rcp.approx (within 1 ulp), where the precise ones use expf, a correctly
rounded division and tanhf. Here a model of the fast formulas in float32, with each primitive's result
moved within its error bound, runs the reference recurrence forward and backward with a long memory
(forget gate near 1, where an error of one sign in f piles up in c): with the errors drawn at random
within the bounds, and with either primitive biased by its whole bound in one direction (every result
moved by 2 ulps, or 1, the same way), the outputs and every gradient stay ten times inside the tightest
tolerance of the kernels that use the fast activations (tf32's; the 16-bit ones are wider). With errors
of random sign they would hold float32's 1e-5 too; a reciprocal biased by its ulp does not, and nothing
promises rcp.approx's errors are unbiased: why the kernels at float32 accuracy keep the precise
activations. The model is tied to cell.cuh by the extension's host entry points, which run the same
formulas with correctly rounded primitives. A CPU proxy for the GPU's numerics; the GPU tests measure the
kernels themselves.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lstm_kernels.backends import reference
from utils import LSTM_RESULT_NAMES, REL_TOL, long_memory_case, reference_outputs_and_grads, rel_error

try:
    from lstm_kernels import _C
except ImportError:
    _C = None

EX2_ULPS, RCP_ULPS = 2, 1  # the bounds: ex2.approx within 2 ulp, rcp.approx within 1
NEG_LOG2E = torch.tensor(-1.4426950408889634, dtype=torch.float32)
#: The tightest tolerance among the kernels that run the fast activations (16-bit and tf32 operands).
FAST_TOL = min(REL_TOL["tf32"], REL_TOL[torch.float16], REL_TOL[torch.bfloat16])
MARGIN = 10


def _perturb(x, error, gen):
    """x moved by ``error``: 0 (exact), ("random", ulps) (relative error uniform within +-ulps * 2^-23, drawn anew
    for every element of every call from ``gen``) or ("bias", ulps) (every element moved by ulps units in
    the last place, up for ulps > 0, down for ulps < 0)."""
    if not error:
        return x
    kind, ulps = error
    if kind == "random":
        bound = abs(ulps) * 2.0**-23
        return x * (1 + (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).float()
    toward = torch.full_like(x, float("inf") if ulps > 0 else float("-inf"))
    for _ in range(abs(ulps)):
        x = torch.where(torch.isfinite(x) & (x != 0), torch.nextafter(x, toward), x)
    return x


def device_activations(ex2_error=0.0, rcp_error=0.0):
    """(sigmoid, tanh) as cell.cuh's FastActivations compute them, in float32, with each exponential and
    each reciprocal moved by ``ex2_error`` and ``rcp_error`` (see _perturb)."""
    gen = torch.Generator().manual_seed(0)

    def logistic2(y):
        return _perturb(1.0 / (1.0 + _perturb(torch.exp2(y), ex2_error, gen)), rcp_error, gen)

    def sigmoid(x):
        return logistic2(x * NEG_LOG2E)

    def tanh(x):
        return torch.addcmul(torch.tensor(-1.0), logistic2(x * (2 * NEG_LOG2E)), torch.tensor(2.0))

    return sigmoid, tanh


def _device_step(sigmoid, tanh):
    """The reference LSTM step (reference._LSTMCell.step) with the device's activations."""

    def step(cell, x_t, h_prev, state_prev):
        (c_prev,) = state_prev
        gates = x_t + h_prev @ cell.w_hh.t()
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
        c_new = f * c_prev + i * g
        tanh_c = tanh(c_new)
        m = o * tanh_c
        return m.to(cell.dtype), (c_new,), (i, f, g, o, c_prev, tanh_c, m)

    return step


T, B, H = 512, 8, 32
NAMES = LSTM_RESULT_NAMES


def _case():
    return long_memory_case(T, B, H)


_outputs_and_grads = reference_outputs_and_grads


@pytest.fixture(scope="module")
def expected():
    inputs, cotangents = _case()
    return _outputs_and_grads(inputs, cotangents, torch.float64)


#: (the exponential's error, the reciprocal's): exact primitives; errors at random within the bounds; one
#: primitive biased by its whole bound either way (the other at random); both biased against each other.
RANDOM_EX2, RANDOM_RCP = ("random", EX2_ULPS), ("random", RCP_ULPS)
CASES = {"exact": (0, 0), "random": (RANDOM_EX2, RANDOM_RCP),
         "ex2 biased up": (("bias", EX2_ULPS), RANDOM_RCP), "ex2 biased down": (("bias", -EX2_ULPS), RANDOM_RCP),
         "rcp biased up": (RANDOM_EX2, ("bias", RCP_ULPS)), "rcp biased down": (RANDOM_EX2, ("bias", -RCP_ULPS)),
         "ex2 up, rcp down": (("bias", EX2_ULPS), ("bias", -RCP_ULPS)),
         "ex2 down, rcp up": (("bias", -EX2_ULPS), ("bias", RCP_ULPS))}


def _errors_with(monkeypatch, expected, ex2_error, rcp_error) -> dict:
    inputs, cotangents = _case()
    monkeypatch.setattr(reference._LSTMCell, "step", _device_step(*device_activations(ex2_error, rcp_error)))
    actual = _outputs_and_grads(inputs, cotangents, torch.float32)
    monkeypatch.undo()
    return {name: rel_error(a, e) for name, a, e in zip(NAMES, actual, expected)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_activations_keep_a_margin_to_the_tolerances_they_serve(expected, monkeypatch, case):
    errors = _errors_with(monkeypatch, expected, *CASES[case])
    print(f"{case}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= FAST_TOL / MARGIN, errors


def test_random_errors_would_hold_float32_but_a_biased_reciprocal_does_not(expected, monkeypatch):
    """Why float32 accuracy keeps the precise activations: errors of random sign would keep float32's
    tolerance in this model; a reciprocal biased by its ulp does not (and the model tells that apart)."""
    assert max(_errors_with(monkeypatch, expected, *CASES["random"]).values()) <= REL_TOL[torch.float32]
    errors = _errors_with(monkeypatch, expected, *CASES["rcp biased up"])
    assert max(errors.values()) > REL_TOL[torch.float32], errors


@pytest.mark.skipif(_C is None, reason="lstm_kernels._C is not built (no nvcc)")
def test_the_model_is_the_cells_formula():
    """With exact primitives the model computes what cell.cuh's host build of FastActivations computes (exp2f and 1/x
    correctly rounded there, torch's exp2 within an ulp here): sigmoid to 2 ulps of its value, tanh to
    2 ulps of sigmoid's (its error is absolute: 2 sigmoid(2x) - 1 cancels near 0)."""
    x = np.concatenate([np.linspace(-20, 20, 4001), [-100, -88, -87, 0, 1e-6, 17, 100]]).astype(np.float32)
    pre = np.stack([x, x, x, x], axis=1)
    act, _, _ = _C.cell_forward_host(pre, np.zeros_like(x), True)
    sigmoid, tanh = (f(torch.from_numpy(x)).numpy() for f in device_activations())
    ulps = np.abs(act[:, 0] - sigmoid) / np.spacing(np.maximum(sigmoid, np.float32(2.0**-126)))  # normal or 0
    assert ulps.max() <= 2, f"sigmoid: {ulps.max()} ulps at x = {x[ulps.argmax()]}"
    ulps = np.abs(act[:, 2] - tanh) / np.spacing(np.float32(1.0))
    assert ulps.max() <= 4, f"tanh: {ulps.max()} ulps of 1 at x = {x[ulps.argmax()]}"
