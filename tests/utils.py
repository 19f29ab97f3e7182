"""Shared test helpers: the package's tolerance table (lstm_kernels/tolerances.py) and a verbose comparison.

Two bounds per comparison against a float64 reference ``b``: the norm-relative error
||a - b|| / ||b|| <= tol (:data:`REL_TOL`), and the largest single error
max |a - b| <= ELEMENT_FACTOR * tol * max |b| (:data:`ELEMENT_TOL` for the table's entries), so
that one wrong element or edge tile cannot hide in the norm of a large tensor. The same bounds
decide verification before first use, so a kernel that passes the tests passes it too.
"""
from __future__ import annotations

import torch

from lstm_kernels.tolerances import (  # noqa: F401  (re-exported for the tests)
    ELEMENT_FACTOR, REL_TOL, SIXTEEN_BIT_TOL_IN_U, UNIT_ROUNDOFF, mismatch, rel_error,
)

#: max |a - b| / max |b| allowed, per dtype: fp64 5e-10, fp32 5e-5, tf32 5e-3, bf16 5e-2, fp16 6.25e-3.
ELEMENT_TOL = {k: ELEMENT_FACTOR * v for k, v in REL_TOL.items()}


def assert_rel_close(actual, expected, tol, name: str = "tensor", element_tol=None) -> None:
    """Fail when the norm-relative error exceeds ``tol`` or one element's error exceeds
    ``element_tol * max|expected|`` (default ``ELEMENT_FACTOR * tol``; an absolute bound when
    ``expected`` is all zeros), with the max and mean error and where the worst one is."""
    what = mismatch(actual, expected, tol, element_tol)
    assert what is None, f"{name}: {what}"


#: The outputs and gradients of long_memory_case's recurrence, in order.
LSTM_RESULT_NAMES = ["h_all", "h_T", "c_T", "dxg", "dw_hh", "dh0", "dc0"]


def long_memory_case(T: int, B: int, H: int, forget_bias: float = 4.0, seed: int = 0):
    """An LSTM layer's inputs (xg, w_hh, h0, c0) and cotangents (of h_all, h_T, c_T), float32 on the CPU,
    with the forget gate's pre-activations shifted by ``forget_bias`` (4: f = σ(4 + ...) ≈ 0.98, a long
    memory, where an error of one sign in f or in c piles up over the steps)."""
    gen = torch.Generator().manual_seed(seed)
    xg = torch.randn(T, B, 4 * H, generator=gen)
    xg[:, :, H:2 * H] += forget_bias
    w_hh = (torch.rand(4 * H, H, generator=gen) * 2 - 1) / H**0.5
    h0, c0 = torch.randn(B, H, generator=gen) / 2, torch.randn(B, H, generator=gen) / 2
    cotangents = [torch.randn(T, B, H, generator=gen), torch.randn(B, H, generator=gen), torch.randn(B, H, generator=gen)]
    return (xg, w_hh, h0, c0), cotangents


def reference_outputs_and_grads(inputs, cotangents, dtype) -> list:
    """The reference backend's (h_all, h_T, c_T) and the gradients of (xg, w_hh, h0, c0) in ``dtype``."""
    from lstm_kernels import lstm_layer

    leaves = [t.to(dtype).detach().requires_grad_(True) for t in inputs]
    outputs = lstm_layer(*leaves, backend="reference")
    torch.autograd.backward(outputs, [c.to(dtype) for c in cotangents])
    return [*outputs, *(leaf.grad for leaf in leaves)]
