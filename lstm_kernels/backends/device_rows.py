"""Per-step active row counts on a GPU, without a host sync (shared by the triton and cuda backends).

PackedSequence keeps ``batch_sizes`` on the CPU. A blocking copy of a pageable tensor to the
GPU would stall the host on every forward and backward and is not allowed while a CUDA graph
is being captured; so row counts are filled on the device where there are none, and copied
from pinned memory with ``non_blocking=True`` where there are.
"""
from __future__ import annotations

import torch

#: Pinned host buffers of row counts copied to the device while a CUDA graph was being captured:
#: the captured copy reads them again at every replay, so they are kept for the process's life.
_CAPTURED_HOST_ROWS: list = []


def pinned_int32(n: int) -> torch.Tensor:
    """A zeroed [n] int32 host tensor in pinned (page-locked) memory: the source of a copy to a
    GPU that does not block the host."""
    return torch.zeros(n, dtype=torch.int32, pin_memory=True)


def step_rows(batch_sizes, seq_len: int, batch: int, device) -> torch.Tensor:
    """[T + 1] int32 on ``device``: active rows per step, then 0.

    Never a host-synchronising copy (so it works under CUDA-graph capture and does not stall
    the host every call): without ``batch_sizes`` the tensor is filled on the device; with
    them (PackedSequence keeps them on the CPU) they are copied from pinned memory with
    ``non_blocking=True``, ordered on the current stream before the kernels that read them.
    """
    device = torch.device(device)
    if batch_sizes is None:
        rows = torch.full((seq_len + 1,), batch, dtype=torch.int32, device=device)
        rows[seq_len:].fill_(0)  # a fill on the device, not a copy from the host
        return rows
    if device.type != "cuda" or batch_sizes.device == device:  # the CPU under the interpreter; sizes on the GPU
        rows = torch.zeros(seq_len + 1, dtype=torch.int32, device=device)
        rows[:seq_len] = batch_sizes
        return rows
    host = pinned_int32(seq_len + 1)
    host[:seq_len] = batch_sizes  # a host-to-host copy (batch_sizes is a CPU tensor)
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED_HOST_ROWS.append(host)
    return host.to(device, non_blocking=True)
