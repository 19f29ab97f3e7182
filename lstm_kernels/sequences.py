"""Layout helpers for variable-length batches, all differentiable.

PackedSequence data [N, F] lists the active rows of step 0, then of step 1, ...
(``batch_sizes`` [T] non-increasing, on the CPU). The recurrence works on
time-major padded tensors [T, B, F] whose rows are in the packed (sorted) order.
"""
from __future__ import annotations

from typing import Optional

import torch


def _packed_rows(batch_sizes: torch.Tensor, batch: int) -> torch.Tensor:
    """Indices into a flattened [T * B] grid of the rows that a packed sequence holds."""
    active = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)  # [T, B]
    return active.flatten().nonzero().squeeze(1)


def unpack_to_time_major(data: torch.Tensor, batch_sizes: torch.Tensor) -> torch.Tensor:
    """Packed data [N, F] -> zero-padded [T, B, F]."""
    T, B = batch_sizes.numel(), int(batch_sizes[0])
    rows = _packed_rows(batch_sizes, B).to(data.device)
    padded = data.new_zeros((T * B, data.shape[1])).index_copy(0, rows, data)
    return padded.view(T, B, -1)


def pack_time_major(x: torch.Tensor, batch_sizes: torch.Tensor) -> torch.Tensor:
    """Padded [T, B, F] -> packed data [N, F] (the inverse of :func:`unpack_to_time_major`)."""
    T, B, F = x.shape
    rows = _packed_rows(batch_sizes, B).to(x.device)
    return x.reshape(T * B, F).index_select(0, rows)


def reverse_time_major(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Reverse each sequence of ``x`` [T, B, F] within its own length (padding stays put).

    ``lengths`` [B] on the CPU, or None when every sequence has length T.
    """
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    t = torch.arange(T).unsqueeze(1)  # [T, 1]
    source = torch.where(t < lengths.unsqueeze(0), lengths.unsqueeze(0) - 1 - t, t)  # [T, B]
    return x.gather(0, source.to(x.device).unsqueeze(2).expand_as(x))


def reverse_resets(resets: torch.Tensor) -> torch.Tensor:
    """The resets [T, B] of a sequence as its reversed direction meets them.

    A reset at step t cuts the sequence between t - 1 and t. The reversed direction processes
    step T - 1 first and crosses that cut when it moves from step t to step t - 1, which is its
    step T - t: reversed[T - t] = resets[t] for t >= 1, and its first step starts from its own
    initial state (reversed[0] = False; a reset at step 0 only discards the forward direction's).
    """
    return torch.cat([torch.zeros_like(resets[:1]), resets[1:].flip(0)], dim=0)
