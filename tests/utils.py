"""Shared test helpers: the package's tolerance table (lstm_kernels/tolerances.py) and a verbose comparison.

Two bounds per comparison against a float64 reference ``b``: the norm-relative error
||a - b|| / ||b|| <= tol (:data:`REL_TOL`), and the largest single error
max |a - b| <= ELEMENT_FACTOR * tol * max |b| (:data:`ELEMENT_TOL` for the table's entries), so
that one wrong element or edge tile cannot hide in the norm of a large tensor. The same bounds
decide verification before first use, so a kernel that passes the tests passes it too.
"""
from __future__ import annotations

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
