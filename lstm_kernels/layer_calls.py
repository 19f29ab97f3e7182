"""The calls one layer makes to its backend, shared by the eager autograd Function
(:mod:`lstm_kernels.function`), the torch.library ops (:mod:`lstm_kernels.ops`) and recompute mode
(:mod:`lstm_kernels.recompute`): dispatch, the ``resets`` keyword, the workspace check and the
backward of one layer (the backend's recurrence backward, then dW_hh as one GEMM).

Shapes (time-major): xg [T, B, 4H] (GRU: 3H), w_hh [4H, P] (GRU: [3H, H]), h0 [B, P], h_all [T, B, P],
resets [T, B] bool or None, b_hn [H] or None (GRU only).
"""
from __future__ import annotations

import torch

from .backends import Backend, RecurrenceCall, RecurrenceInputs, resolve_backend
from .cells import GRU, LSTM, cell_args


def select_backend(xg, w_hh, w_hr, batch_sizes, needs_grad: bool, backend: str, resets=None,
                   cell: str = LSTM) -> Backend:
    """Dispatch for one recurrence call (see :func:`lstm_kernels.backends.resolve_backend`)."""
    return resolve_backend(backend, RecurrenceCall.of(xg, w_hh, w_hr, batch_sizes, needs_grad, resets, cell))


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
                   resets=None, b_hn=None):
    """Gradients of one layer: the backend's recurrence backward, then dW_hh as one GEMM.

    Returns (dxg, dw_hh or None, dh0, dc0, dw_hr or None) for the LSTM; for the GRU (``inputs.c0``
    None) (dxg, dw_hh or None, dh0, None, db_hn or None), dW_hh from the gradient of the recurrent
    product: dG with its n rows replaced by the backend's d_hn.
    """
    cell = inputs.cell
    dG, dh0, dc0, extra = impl.backward(inputs, h_all, workspace, dh_all, dh_T, dc_T, **with_resets(resets),
                                        **cell_args(cell, b_hn))
    d_recurrent = dG
    if cell == GRU:
        hidden = dG.shape[2] // 3
        d_recurrent = torch.cat([dG[..., :2 * hidden], extra], dim=2)
        extra = None if b_hn is None else extra.sum((0, 1))
    dw_hh = None
    if need_dw_hh:
        T, B, gate_rows = d_recurrent.shape
        h_prev = previous_states(inputs.h0, h_all, resets)
        dw_hh = d_recurrent.reshape(T * B, gate_rows).t() @ h_prev.reshape(T * B, h_prev.shape[-1])
    return dG, dw_hh, dh0, dc0, extra
