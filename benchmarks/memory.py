"""Memory of one call: the activations autograd keeps for the backward, measured on any device.

:func:`saved_tensor_bytes` counts, with ``torch.autograd.graph.saved_tensors_hooks``, the bytes of
the distinct storages that a forward saves for its backward, leaving out the storages of tensors
that exist anyway (the module's parameters, the input): what the forward adds to memory until the
backward runs. A storage saved twice (xg by two ops, a view of h_all) counts once, and a view
counts its whole storage, since that is what stays alive. On a GPU the benchmark also reports the
peak of ``torch.cuda.max_memory_allocated`` (timing.PeakMemory), which adds outputs, workspaces
while they live, and the backward's own temporaries.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr())


def saved_tensor_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """(bytes of the distinct storages saved for backward while ``forward()`` runs, its result).

    Storages of ``exclude`` (parameters, inputs) are not counted; nor are empty ones. The result is
    returned so that the caller keeps the graph (and the saved tensors) alive as long as it likes.
    """
    skip = {_storage_key(t) for t in exclude if t is not None}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in skip and key[2] != 0:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(seen.values()), result


def module_saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes ``module(x)`` saves for its backward in training mode, beyond its parameters and ``x``
    (see :func:`saved_tensor_bytes`). ``x`` should require grad, as in a training step."""
    was_training = module.training
    module.train()
    try:
        with torch.enable_grad():
            saved, _ = saved_tensor_bytes(lambda: module(x), exclude=[*module.parameters(), x])
    finally:
        module.train(was_training)
    return saved
