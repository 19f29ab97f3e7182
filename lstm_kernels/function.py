"""``LSTMLayer``: the autograd glue for one layer, one direction.

The input projection ``xg = x @ W_ih^T + b`` is done by the caller as one GEMM
over all steps (autograd then turns ``dxg`` into dX, dW_ih and db with GEMMs
of its own). This Function runs only the recurrence, through the backend that
dispatch picks, and in backward computes ``dW_hh = sum_t dG_t^T h_{t-1}`` as a
single GEMM over the saved hidden states.

Shapes (time-major): xg [T, B, 4H], w_hh [4H, P], h0 [B, P], c0 [B, H],
w_hr [P, H] or None, batch_sizes [T] int64 CPU or None.
Returns h_all [T, B, P], h_T [B, P], c_T [B, H].
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import RecurrenceCall, Saved, resolve_backend


class LSTMLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, w_hh, h0, c0, w_hr, batch_sizes, backend: str = "auto"):
        needs_grad = any(ctx.needs_input_grad[:5])
        call = RecurrenceCall.of(xg, w_hh, w_hr, batch_sizes, needs_grad)
        impl = resolve_backend(backend, call)
        h_all, h_T, c_T, saved = impl.forward(xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad)
        ctx.impl = impl
        ctx.meta = saved.meta
        ctx.num_saved = len(saved.tensors)
        ctx.has_projection = w_hr is not None
        ctx.save_for_backward(*saved.tensors, h0, h_all)
        return h_all, h_T, c_T

    @staticmethod
    def backward(ctx, dh_all, dh_T, dc_T):
        if torch.is_grad_enabled() and not ctx.impl.differentiable_backward:
            raise RuntimeError(
                f"double backward through FusedLSTM is not supported by the {ctx.impl.name!r} "
                "backend; use backend='reference' for higher-order gradients"
            )
        *backend_tensors, h0, h_all = ctx.saved_tensors
        saved = Saved(tensors=tuple(backend_tensors), meta=ctx.meta)
        dG, dh0, dc0, dw_hr = ctx.impl.backward(saved, dh_all, dh_T, dc_T)
        dw_hh = None
        if ctx.needs_input_grad[1]:
            T, B, four_h = dG.shape
            h_prev = torch.cat([h0.unsqueeze(0), h_all[:-1]], dim=0)
            dw_hh = dG.reshape(T * B, four_h).t() @ h_prev.reshape(T * B, -1)
        return dG, dw_hh, dh0, dc0, dw_hr if ctx.has_projection else None, None, None


def lstm_layer(
    xg: torch.Tensor,
    w_hh: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hr: Optional[torch.Tensor] = None,
    batch_sizes: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """Functional form of :class:`LSTMLayer` (same arguments and results)."""
    return LSTMLayer.apply(xg, w_hh, h0, c0, w_hr, batch_sizes, backend)
