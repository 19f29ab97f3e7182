"""``LSTMLayer``: the autograd glue for one layer, one direction, of the LSTM or the GRU.

The input projection ``xg = x @ W_ih^T + b`` is done by the caller as one GEMM
over all steps (autograd then turns ``dxg`` into dX, dW_ih and db with GEMMs
of its own). This Function runs only the recurrence, through the backend that
dispatch picks, and in backward computes ``dW_hh = sum_t dG_t^T h_{t-1}`` as a
single GEMM over the saved hidden states.

Shapes (time-major): xg [T, B, 4H], w_hh [4H, P], h0 [B, P], c0 [B, H],
w_hr [P, H] or None, batch_sizes [T] int64 CPU or None, resets [T, B] bool or None.
Returns h_all [T, B, P], h_T [B, P], c_T [B, H].

The GRU runs through the same Function (:func:`gru_layer`): c0 None, w_hr None, and ``b_hn`` [H] or
None, the recurrent bias of the n gate; it returns h_all [T, B, H], h_T [B, H] and None for c_T, and
its backward dW_hh and db_hn (lstm_kernels/layer_calls.py).

Eager calls go through the ``torch.autograd.Function`` below; under
``torch.compile`` :func:`lstm_layer` calls the ``torch.library`` op of
:mod:`lstm_kernels.ops` instead, so the compiled graph holds one op per layer
and direction (the GRU's too: the op's calls without c0). Both run the same backend code and the
same backward GEMMs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import RecurrenceInputs
from .cells import LSTM, cell_args
from .layer_calls import check_workspace, layer_backward, select_backend, with_resets
from .validation import check_layer_shapes


class LSTMLayer(torch.autograd.Function):
    """One layer's recurrence with its backward: the LSTM's, or the GRU's where ``c0`` is None.

    apply(xg, w_hh, h0, c0, w_hr, batch_sizes, backend="auto", resets=None, b_hn=None)
    -> (h_all, h_T, c_T); for the GRU c_T is None and ``b_hn`` [H] (or None) is differentiated.
    """

    @staticmethod
    def forward(ctx, xg, w_hh, h0, c0, w_hr, batch_sizes, backend: str = "auto", resets=None, b_hn=None):
        inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes)
        needs_grad = any(ctx.needs_input_grad[:5]) or any(ctx.needs_input_grad[8:])
        impl = select_backend(xg, w_hh, w_hr, batch_sizes, needs_grad, backend, resets, inputs.cell)
        h_all, h_T, c_T, workspace = impl.forward(*inputs, needs_grad, **with_resets(resets),
                                                  **cell_args(inputs.cell, b_hn))
        workspace = check_workspace(impl, workspace, inputs, (h_all, h_T, c_T))
        ctx.impl = impl
        ctx.batch_sizes = batch_sizes
        ctx.resets = resets
        ctx.save_for_backward(xg, w_hh, h0, c0, w_hr, b_hn, h_all, *workspace)
        return h_all, h_T, c_T

    @staticmethod
    def backward(ctx, dh_all, dh_T, dc_T):
        if torch.is_grad_enabled() and not ctx.impl.differentiable_backward:
            raise RuntimeError(
                f"double backward through FusedLSTM is not supported by the {ctx.impl.name!r} "
                "backend; use backend='reference' for higher-order gradients"
            )
        xg, w_hh, h0, c0, w_hr, b_hn, h_all, *workspace = ctx.saved_tensors
        inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, ctx.batch_sizes)
        grads = layer_backward(ctx.impl, inputs, h_all, tuple(workspace), dh_all, dh_T, dc_T, ctx.needs_input_grad[1],
                               ctx.resets, b_hn)
        dxg, dw_hh, dh0, dc0, extra = grads
        dw_hr, db_hn = (extra, None) if inputs.cell == LSTM else (None, extra)
        grads = (dxg, dw_hh, dh0, dc0, dw_hr if w_hr is not None else None, None, None, None, db_hn)
        return grads[:len(ctx.needs_input_grad)]


def lstm_layer(
    xg: torch.Tensor,
    w_hh: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hr: Optional[torch.Tensor] = None,
    batch_sizes: Optional[torch.Tensor] = None,
    backend: str = "auto",
    resets: Optional[torch.Tensor] = None,
):
    """One layer's recurrence on an already projected input: :class:`LSTMLayer` as a function.

    Args (time-major; H = hidden size, P = proj_size or H):
        xg: [T, B, 4H], the gate pre-activations from the input, ``x @ W_ih^T + b``, gates i, f, g, o.
        w_hh: [4H, P], the recurrent weight. h0: [B, P]. c0: [B, H].
        w_hr: [P, H], the projection weight, or None (then P = H).
        batch_sizes: [T] int64 on the CPU, non-increasing (a PackedSequence's), or None.
        backend: "auto" or a name from :func:`lstm_kernels.available_backends`.
        resets: [T, B] bool on xg's device, or None: where True, that row starts step t from zero
            state; no value or gradient crosses it. Served by the backends with ``serves_resets``.

    Returns (h_all [T, B, P], h_T [B, P], c_T [B, H]). A wrong shape raises RuntimeError naming the
    argument and the shape it must have. Under ``torch.compile`` it calls the custom op
    ``lstm_kernels::recurrence``.
    """
    if torch.compiler.is_compiling():
        # No shape check while tracing: a packed input's batch is data-dependent there.
        from .ops import recurrence_with_grad

        return recurrence_with_grad(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, resets)
    check_layer_shapes(xg, w_hh, h0, c0, w_hr, batch_sizes, resets)
    return _layer(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, resets)


def _layer(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, resets, b_hn=None):
    """(h_all, h_T, c_T) of one checked layer call: through :class:`LSTMLayer`, or where nothing will
    be differentiated straight from the backend (no autograd node, and the backend keeps no
    workspace: inside a Function, ctx.needs_input_grad says True under no_grad when inputs require
    grad)."""
    if torch.is_grad_enabled():
        return LSTMLayer.apply(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, resets, b_hn)
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes)
    impl = select_backend(xg, w_hh, w_hr, batch_sizes, False, backend, resets, inputs.cell)
    h_all, h_T, c_T, _ = impl.forward(*inputs, False, **with_resets(resets), **cell_args(inputs.cell, b_hn))
    return h_all, h_T, c_T


def gru_layer(
    xg: torch.Tensor,
    w_hh: torch.Tensor,
    h0: torch.Tensor,
    b_hn: Optional[torch.Tensor] = None,
    batch_sizes: Optional[torch.Tensor] = None,
    backend: str = "auto",
    resets: Optional[torch.Tensor] = None,
):
    """One GRU layer's recurrence on an already projected input, as :func:`lstm_layer` for the LSTM.

    Args (time-major; H = hidden size):
        xg: [T, B, 3H], ``x @ W_ih^T + b_ih + [b_hr, b_hz, 0]``, gates r, z, n (PyTorch's order).
        w_hh: [3H, H], the recurrent weight. h0: [B, H].
        b_hn: [H], the recurrent bias of the n gate (kept apart: r scales it), or None.
        batch_sizes, backend, resets: as :func:`lstm_layer`.

    Returns (h_all [T, B, H], h_T [B, H]) with nn.GRU's equations: r = σ(xg_r + W_hr h),
    z = σ(xg_z + W_hz h), n = tanh(xg_n + r ⊙ (W_hn h + b_hn)), h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}.
    Served by the backends whose ``cells`` name the GRU. Under ``torch.compile`` it calls the custom
    op ``lstm_kernels::recurrence`` (its GRU form).
    """
    if torch.compiler.is_compiling():
        from .ops import recurrence_with_grad

        h_all, h_T, _ = recurrence_with_grad(xg, w_hh, h0, None, None, batch_sizes, backend, resets, b_hn)
        return h_all, h_T
    check_layer_shapes(xg, w_hh, h0, None, None, batch_sizes, resets, b_hn=b_hn)
    h_all, h_T, _ = _layer(xg, w_hh, h0, None, None, batch_sizes, backend, resets, b_hn)
    return h_all, h_T
