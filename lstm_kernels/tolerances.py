"""How close to float64 a result must be: the package's numerical contract, in numbers.

Used by verification before first use (:mod:`lstm_kernels.verification`) and by the tests
(``tests/utils.py``). Two bounds per comparison against a float64 reference ``b``:

- the norm-relative error ||a - b|| / ||b|| <= :data:`REL_TOL`;
- the largest single error, max |a - b| <= ELEMENT_FACTOR * tol * max |b|, so that one wrong
  element or tile cannot hide in the norm of a large tensor.

16-bit tolerances are a multiple of the type's unit roundoff u: a correct recurrence (16-bit h,
fp32 cell state) is within about 0.8 u of float64 on the same rounded inputs, with no growth over
T; the persistent kernels' 16-bit gate-gradient exchange adds up to about 1 u in bf16; a cell
state wrongly kept in 16 bits measures 4 u and more with long memory (tests/test_tolerances.py).
"""
from __future__ import annotations

from typing import Optional

import torch

#: Unit roundoff of the 16-bit storage types: bf16 keeps 8 significant bits, fp16 11.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

#: The 16-bit tolerance as a multiple of the type's unit roundoff (bf16: 2.56 u = 1e-2).
SIXTEEN_BIT_TOL_IN_U = 2.56

#: Relative tolerance ||a - b|| / ||b|| against a float64 reference; "tf32": float32 on TF32.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 1e-3,
    torch.bfloat16: SIXTEEN_BIT_TOL_IN_U * UNIT_ROUNDOFF[torch.bfloat16],  # 1e-2
    torch.float16: SIXTEEN_BIT_TOL_IN_U * UNIT_ROUNDOFF[torch.float16],  # 1.25e-3
}

#: The per-element bound, as a multiple of the norm-relative tolerance.
ELEMENT_FACTOR = 5.0


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| where b is all zeros)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff if denom == 0 else diff / denom


def mismatch(actual, expected, tol: float, element_tol: Optional[float] = None) -> Optional[str]:
    """None when ``actual`` is within ``tol`` of ``expected`` (norm-relative, and per element within
    ``element_tol`` x max|expected|, default ELEMENT_FACTOR x tol); else what is wrong, with the
    largest error and where it is."""
    if actual is None or expected is None:
        return "one side is None"
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(a).any():
        return "NaN in result"
    if a.numel() == 0:
        return None
    element_tol = ELEMENT_FACTOR * tol if element_tol is None else element_tol
    err = rel_error(a, e)
    diff = (a - e).abs()
    scale = e.abs().max().item()
    bound = element_tol * (scale if scale > 0 else 1.0)
    max_diff = diff.max().item()
    if err <= tol and max_diff <= bound:
        return None
    first = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
    what = (f"relative error {err:.3e} > {tol:.1e}" if err > tol else
            f"largest element error {max_diff:.3e} > {element_tol:.1e} x max|expected| ({scale:.3e}) "
            f"though the relative error {err:.3e} <= {tol:.1e}")
    return (f"{what}; max abs {max_diff:.3e} at {first} ({a[first].item():.6g} vs {e[first].item():.6g}); "
            f"mean abs {diff.mean().item():.3e}; elements over the bound: {int((diff > bound).sum())} of {diff.numel()}")
