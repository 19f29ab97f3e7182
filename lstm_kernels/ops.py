"""The recurrence as ``torch.library`` custom ops, for ``torch.compile``.

Dynamo cannot trace into a Triton launch loop, a pybind11 call or a Python
loop with data-dependent lengths without breaking the graph. These ops make
each layer's recurrence one opaque node with a fake (meta) implementation, so
``torch.compile(model, fullgraph=True)`` compiles a model that holds a
FusedLSTM in one graph, forward and backward.

    lstm_kernels::recurrence(xg, w_hh, h0, c0?, w_hr?, batch_sizes?, backend, needs_grad, resets?, b_hn?)
        -> (h_all [T, B, P], h_T [B, P], c_T [B, H], workspace Tensor[])
    lstm_kernels::recurrence_backward(xg, w_hh, h0, c0?, w_hr?, batch_sizes?, h_all,
                                      workspace, dh_all, dh_T, dc_T?, backend, resets?, b_hn?)
        -> [dG [T, B, 4H], dh0 [B, P], dc0 [B, H]] (+ [dW_hr [P, H]] with a projection)

The GRU's calls are the ones without c0 (as in the backend contract): xg [T, B, 3H], b_hn [H] or
None; c_T is then an empty tensor (an op returns no None) that :func:`recurrence_with_grad` drops,
and the backward returns [dG [T, B, 3H], dh0 [B, H], d_hn [T, B, H]].

``backend`` is a concrete backend name: :func:`recurrence_with_grad` resolves
"auto" while tracing, so the fake and the real implementation agree on the
workspace (``Backend.workspace_spec``). The autograd formula is the one of
:class:`lstm_kernels.function.LSTMLayer` (:func:`lstm_kernels.layer_calls.layer_backward`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import (
    BackendUnsupportedError, RecurrenceCall, RecurrenceInputs, _verification_failure, get_backend, load_builtin_backends,
)
from .cells import GRU, cell_args
from .layer_calls import check_workspace, layer_backward, select_backend, with_resets

# Dispatch runs while dynamo traces; its first call must not import (see load_builtin_backends).
load_builtin_backends()


def _unaliased(t: Tensor, others) -> Tensor:
    """``t``, cloned if it shares storage with any of ``others`` (op outputs may not alias)."""
    ptr = t.untyped_storage().data_ptr()
    return t.clone() if any(o is not None and o.untyped_storage().data_ptr() == ptr for o in others) else t


@torch.library.custom_op("lstm_kernels::recurrence", mutates_args=())
def recurrence(
    xg: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor],
    backend: str,
    needs_grad: bool,
    resets: Optional[Tensor],
    b_hn: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    impl = get_backend(backend)
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes)
    _check_verified(impl, RecurrenceCall.of(xg, w_hh, w_hr, batch_sizes, needs_grad, resets, inputs.cell))
    h_all, h_T, c_T, workspace = impl.forward(*inputs, needs_grad, **with_resets(resets),
                                              **cell_args(inputs.cell, b_hn))
    workspace = check_workspace(impl, workspace, inputs, (h_all, h_T, c_T))
    h_T = _unaliased(h_T, (*inputs[:5], h_all))
    c_T = h_T.new_empty(0) if c_T is None else _unaliased(c_T, (*inputs[:5], h_all, h_T))
    return h_all, h_T, c_T, list(workspace)


def _check_verified(impl, call) -> None:
    """Dispatch chose ``impl`` while torch.compile traced, without verifying it: verify at the first run,
    and raise if the plan fails (a compiled graph cannot switch to another kernel)."""
    why = _verification_failure(impl, call)
    if why is not None:
        raise BackendUnsupportedError(
            f"LSTM backend {impl.name!r} was chosen while torch.compile traced and {why}; a compiled graph cannot "
            "switch kernels: compile with another backend= (the reference serves everything)")


@recurrence.register_fake
def _recurrence_fake(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, needs_grad, resets, b_hn=None):
    T, B, _ = xg.shape
    cell = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes).cell
    call = RecurrenceCall.of(xg, w_hh, w_hr, batch_sizes, needs_grad, resets, cell)
    workspace = [xg.new_empty(shape, dtype=dtype) for shape, dtype in get_backend(backend).workspace_spec(call)]
    c_T = h0.new_empty(0) if c0 is None else torch.empty_like(c0)
    return xg.new_empty((T, B, h0.shape[1])), torch.empty_like(h0), c_T, workspace


@torch.library.custom_op("lstm_kernels::recurrence_backward", mutates_args=())
def recurrence_backward(
    xg: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor],
    h_all: Tensor,
    workspace: list[Tensor],
    dh_all: Tensor,
    dh_T: Tensor,
    dc_T: Optional[Tensor],
    backend: str,
    resets: Optional[Tensor],
    b_hn: Optional[Tensor] = None,
) -> list[Tensor]:
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes)
    dG, dh0, dc0, extra = get_backend(backend).backward(inputs, h_all, tuple(workspace), dh_all, dh_T, dc_T,
                                                         **with_resets(resets), **cell_args(inputs.cell, b_hn))
    grads = [dG, dh0] + ([extra] if inputs.cell == GRU else [dc0]) + ([] if w_hr is None else [extra])
    return [_unaliased(g, (*inputs[:5], h_all, dh_all, dh_T, dc_T, *workspace)) for g in grads]


@recurrence_backward.register_fake
def _recurrence_backward_fake(xg, w_hh, h0, c0, w_hr, batch_sizes, h_all, workspace, dh_all, dh_T, dc_T, backend,
                              resets, b_hn=None):
    third = torch.empty_like(h_all) if c0 is None else torch.empty_like(c0)  # the GRU's d_hn [T, B, H]
    return [torch.empty_like(xg), torch.empty_like(h0), third] + ([] if w_hr is None else [torch.empty_like(w_hr)])


class _OpBackend:
    """Adapts ``recurrence_backward`` to the ``impl.backward`` call of ``layer_backward``."""

    def __init__(self, name: str):
        self.name = name

    def backward(self, inputs, h_all, workspace, dh_all, dh_T, dc_T, resets=None, cell=None, b_hn=None):
        grads = recurrence_backward(*inputs, h_all, list(workspace), dh_all, dh_T, dc_T, self.name, resets, b_hn)
        if inputs.cell == GRU:  # [dG, dh0, d_hn] -> the contract's (dG, dh0, None, d_hn)
            return grads[0], grads[1], None, grads[2]
        return (*grads, None) if inputs.w_hr is None else tuple(grads)


def _setup_context(ctx, inputs, output):
    xg, w_hh, h0, c0, w_hr, batch_sizes, backend, _, resets, b_hn = inputs
    h_all, _, _, workspace = output
    ctx.backend = backend
    ctx.batch_sizes = batch_sizes
    ctx.resets = resets
    ctx.save_for_backward(xg, w_hh, h0, c0, w_hr, b_hn, h_all, *workspace)


def _backward(ctx, dh_all, dh_T, dc_T, _dworkspace):
    xg, w_hh, h0, c0, w_hr, b_hn, h_all, *workspace = ctx.saved_tensors
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, ctx.batch_sizes)
    dxg, dw_hh, dh0, dc0, extra = layer_backward(
        _OpBackend(ctx.backend), inputs, h_all, workspace, dh_all, dh_T, None if c0 is None else dc_T,
        need_dw_hh=True, resets=ctx.resets, b_hn=b_hn,
    )
    dw_hr, db_hn = (None, extra) if inputs.cell == GRU else (extra, None)
    grads = (dxg, dw_hh, dh0, dc0, dw_hr, None, None, None, None, db_hn)
    return grads[:len(ctx.needs_input_grad)]  # as the op was called: a b_hn left at its default is not an input


recurrence.register_autograd(_backward, setup_context=_setup_context)


def recurrence_with_grad(xg, w_hh, h0, c0, w_hr=None, batch_sizes=None, backend: str = "auto", resets=None,
                         b_hn=None):
    """The op form of ``lstm_layer`` (and of ``gru_layer``: c0 None): resolves the backend, then runs
    ``lstm_kernels::recurrence``. Returns (h_all, h_T, c_T), c_T None for the GRU."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xg, w_hh, h0, c0, w_hr, b_hn)
    )
    cell = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes).cell
    impl = select_backend(xg, w_hh, w_hr, batch_sizes, needs_grad, backend, resets, cell)
    h_all, h_T, c_T, _ = recurrence(xg, w_hh, h0, c0, w_hr, batch_sizes, impl.name, needs_grad, resets, b_hn)
    return h_all, h_T, None if cell == GRU else c_T
