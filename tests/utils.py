"""Shared test helpers: the tolerance table of DESIGN.md and a verbose comparison."""
from __future__ import annotations

import torch

#: Relative tolerance ||a - b|| / ||b|| against a float64 reference (DESIGN.md, Numerics).
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 1e-3,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff if denom == 0 else diff / denom


def assert_rel_close(actual, expected, tol, name: str = "tensor") -> None:
    """Fail with max/mean error and the first mismatching index when the relative error exceeds ``tol``."""
    assert actual is not None and expected is not None, f"{name}: one side is None"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{name}: NaN in result"
    err = rel_error(a, e)
    if err > tol:
        diff = (a - e).abs()
        first = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e}; max abs {diff.max().item():.3e} "
            f"at {first} ({a[first].item():.6g} vs {e[first].item():.6g}); mean abs {diff.mean().item():.3e}"
        )
