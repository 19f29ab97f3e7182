"""Shared test helpers: the tolerance table of DESIGN.md and a verbose comparison.

Two bounds per comparison against a float64 reference ``b``:

- the norm-relative error ||a - b|| / ||b|| <= tol (DESIGN.md, Numerics: :data:`REL_TOL`);
- the largest single error, max |a - b| <= ELEMENT_FACTOR * tol * max |b| (:data:`ELEMENT_TOL`
  for the table's entries), so that one wrong element or edge tile cannot hide in the norm
  of a large tensor. A wrong element is off by about its own size; measured against the
  largest |b| it fails unless it is ELEMENT_FACTOR * tol of the tensor's scale or smaller.
  Honest bounds: rounding, and the errors a recurrence accumulates, are spread over the
  elements, so the largest element error of a correct result is within a small factor of
  the norm-relative error (fp32 ~1e-6 each; bf16 keeps 8 bits: 2^-9 relative per rounding).
"""
from __future__ import annotations

import torch

#: Unit roundoff of the 16-bit storage types: bf16 keeps 8 significant bits, fp16 11.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

#: The 16-bit tolerance as a multiple of the type's unit roundoff u (bf16: 2.56 u = 1e-2).
#: Measured against float64 on the 16-bit inputs (tests/test_tolerances.py): a correct recurrence
#: (16-bit h, fp32 cell state) is within about 0.8 u in outputs and gradients with no growth over T
#: (1.1 u at T = 256 with long memory, forget-gate bias 4); the persistent kernels' 16-bit dG
#: exchange adds up to about 1 u in bf16. A cell state wrongly kept in 16 bits measures 4 u and more
#: from T = 128 with long memory, and fails.
SIXTEEN_BIT_TOL_IN_U = 2.56

#: Relative tolerance ||a - b|| / ||b|| against a float64 reference (docs/design.md, Numerics).
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 1e-3,
    torch.bfloat16: SIXTEEN_BIT_TOL_IN_U * UNIT_ROUNDOFF[torch.bfloat16],  # 1e-2
    torch.float16: SIXTEEN_BIT_TOL_IN_U * UNIT_ROUNDOFF[torch.float16],  # 1.25e-3
}


#: The per-element bound, as a multiple of the norm-relative tolerance (see the module docstring).
ELEMENT_FACTOR = 5.0

#: max |a - b| / max |b| allowed, per dtype: fp64 5e-10, fp32 5e-5, tf32 5e-3, bf16 5e-2, fp16 6.25e-3.
ELEMENT_TOL = {k: ELEMENT_FACTOR * v for k, v in REL_TOL.items()}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff if denom == 0 else diff / denom


def assert_rel_close(actual, expected, tol, name: str = "tensor", element_tol=None) -> None:
    """Fail when the norm-relative error exceeds ``tol`` or one element's error exceeds
    ``element_tol * max|expected|`` (default ``ELEMENT_FACTOR * tol``; an absolute bound when
    ``expected`` is all zeros), with the max and mean error and where the worst one is."""
    assert actual is not None and expected is not None, f"{name}: one side is None"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{name}: NaN in result"
    if a.numel() == 0:
        return
    element_tol = ELEMENT_FACTOR * tol if element_tol is None else element_tol
    err = rel_error(a, e)
    diff = (a - e).abs()
    scale = e.abs().max().item()
    bound = element_tol * (scale if scale > 0 else 1.0)
    max_diff = diff.max().item()
    if err > tol or not max_diff <= bound:
        first = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        what = (f"relative error {err:.3e} > {tol:.1e}" if err > tol else
                f"largest element error {max_diff:.3e} > {element_tol:.1e} x max|expected| ({scale:.3e}) "
                f"though the relative error {err:.3e} <= {tol:.1e}")
        raise AssertionError(
            f"{name}: {what}; max abs {max_diff:.3e} at {first} ({a[first].item():.6g} vs {e[first].item():.6g}); "
            f"mean abs {diff.mean().item():.3e}; elements over the bound: {int((diff > bound).sum())} of {diff.numel()}"
        )
