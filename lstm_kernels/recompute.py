"""Recompute mode: a layer's recurrence that keeps state checkpoints for its backward, not activations.

(Being written: ``recompute_layer`` raises until it lands.)
"""
from __future__ import annotations


def check_recompute(recompute):
    """``FusedLSTM``'s ``recompute`` argument: False, True, or a segment length (int >= 1)."""
    if isinstance(recompute, bool):
        return recompute
    if not isinstance(recompute, int) or recompute < 1:
        raise ValueError(f"recompute should be False, True or a segment length >= 1, got: {recompute!r}")
    return recompute


def recompute_layer(xg, w_hh, h0, c0, w_hr=None, batch_sizes=None, backend: str = "auto", segment=True):
    raise NotImplementedError("recompute mode is not implemented yet")
