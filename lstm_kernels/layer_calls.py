"""The calls one layer makes to its backend, shared by the eager autograd Function
(:mod:`lstm_kernels.function`), the torch.library ops (:mod:`lstm_kernels.ops`) and recompute mode
(:mod:`lstm_kernels.recompute`): dispatch, the ``resets`` keyword, the workspace check and the
backward of one layer (the backend's recurrence backward, then dW_hh as one GEMM).

Shapes (time-major): xg [T, B, 4H], w_hh [4H, P], h0 [B, P], h_all [T, B, P], resets [T, B] bool or None.
"""
from __future__ import annotations

import torch

from .backends import Backend, RecurrenceCall, RecurrenceInputs, resolve_backend


def select_backend(xg, w_hh, w_hr, batch_sizes, needs_grad: bool, backend: str, resets=None) -> Backend:
    """Dispatch for one recurrence call (see :func:`lstm_kernels.backends.resolve_backend`)."""
    return resolve_backend(backend, RecurrenceCall.of(xg, w_hh, w_hr, batch_sizes, needs_grad, resets))


def with_resets(resets) -> dict:
    """The keyword arguments that hand ``resets`` to a backend: none where it is None, so that a
    backend without ``serves_resets`` is called exactly as before."""
    return {} if resets is None else {"resets": resets}


def previous_states(h0, h_all, resets):
    """h_{t-1} of every step [T, B, P], as the recurrence used it (zero where a row resets)."""
    h_prev = torch.cat([h0.unsqueeze(0), h_all[:-1]], dim=0)
    return h_prev if resets is None else h_prev.where(~resets.unsqueeze(2), 0)


def check_workspace(impl: Backend, workspace, inputs: RecurrenceInputs, outputs) -> tuple:
    """A backend's workspace must be fresh tensors: LSTMLayer keeps inputs and outputs itself."""
    workspace = tuple(workspace)
    kept = [t for t in (*inputs[:5], *outputs) if t is not None]
    for w in workspace:
        if any(w.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in kept):
            raise RuntimeError(f"the {impl.name!r} backend returned an input or output in its workspace")
    return workspace


def layer_backward(impl: Backend, inputs: RecurrenceInputs, h_all, workspace, dh_all, dh_T, dc_T, need_dw_hh: bool,
                   resets=None):
    """Gradients of one layer: the backend's recurrence backward, then dW_hh as one GEMM.

    Returns (dxg, dw_hh or None, dh0, dc0, dw_hr or None).
    """
    dG, dh0, dc0, dw_hr = impl.backward(inputs, h_all, workspace, dh_all, dh_T, dc_T, **with_resets(resets))
    dw_hh = None
    if need_dw_hh:
        T, B, four_h = dG.shape
        h_prev = previous_states(inputs.h0, h_all, resets)
        dw_hh = dG.reshape(T * B, four_h).t() @ h_prev.reshape(T * B, h_prev.shape[-1])
    return dG, dw_hh, dh0, dc0, dw_hr
