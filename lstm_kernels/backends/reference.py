"""The ``reference`` backend: the LSTM recurrence in plain PyTorch.

It is the oracle the kernels are tested against and the fallback where no
kernel applies: any device, any floating dtype (float64 included). Forward is
an explicit loop over time; backward is hand-written BPTT, not autograd through
the loop. Backward recomputes the forward activations from the saved inputs
(it keeps no workspace) and is made of differentiable torch ops, so double backward works.

Dimension names: T steps, B batch, H hidden, P = proj_size or H.
Gate order along 4H: i, f, g, o (PyTorch's).
Numerics: gates, cell state and accumulation in fp32 (float64 for float64
inputs); h_t is rounded to the input dtype every step, as a kernel stores it.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import Backend, RecurrenceCall, RecurrenceInputs, register


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the cell state and of accumulation for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def active_rows(batch_sizes: Optional[torch.Tensor], seq_len: int, batch: int) -> list[int]:
    """Rows updated at each step: ``batch_sizes`` as a list, or B for every step."""
    if batch_sizes is None:
        return [batch] * seq_len
    return [int(n) for n in batch_sizes.tolist()]


def _keep_rows(new: torch.Tensor, old: torch.Tensor, n: int) -> torch.Tensor:
    """``new`` for rows [0, n) and ``old`` for the rest, without in-place writes."""
    return new if n == old.shape[0] else torch.cat([new, old[n:]], dim=0)


def _pad_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Zero rows appended to ``x`` [n, ...] up to ``batch`` rows."""
    n = x.shape[0]
    return x if n == batch else torch.cat([x, x.new_zeros((batch - n, *x.shape[1:]))], dim=0)


def kept_state(resets: Optional[torch.Tensor], t: int, n: int) -> Optional[torch.Tensor]:
    """[n, 1] mask of the active rows that carry their state into step ``t`` (0 where ``resets[t]``),
    or None where nothing resets."""
    if resets is None:
        return None
    return (~resets[t, :n]).unsqueeze(1)


def _recurrence(xg, w_hh, h0, c0, w_hr, batch_sizes, keep_activations: bool, resets=None):
    """Run the forward recurrence.

    Returns h_all [T, B, P] (input dtype), h_T [B, P], c_T [B, H] (compute
    dtype) and, when ``keep_activations``, per step the tuple
    (i, f, g, o, c_prev, tanh_c, m) for the active rows, in compute dtype.
    ``resets`` [T, B] bool or None: a row where resets[t] starts step t from zero state.
    """
    T, B, _ = xg.shape
    dtype, acc = xg.dtype, compute_dtype(xg.dtype)
    w_hh_t = w_hh.to(acc).t()
    w_hr_t = None if w_hr is None else w_hr.to(acc).t()
    h, c = h0, c0.to(acc)
    outputs, activations = [], []
    for t, n in enumerate(active_rows(batch_sizes, T, B)):
        h_prev, c_prev = h[:n].to(acc), c[:n]
        keep = kept_state(resets, t, n)
        if keep is not None:
            h_prev, c_prev = h_prev.where(keep, 0), c_prev.where(keep, 0)
        gates = xg[t, :n].to(acc) + h_prev @ w_hh_t
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c_prev + i * g
        tanh_c = c_new.tanh()
        m = o * tanh_c
        h_new = (m if w_hr_t is None else m @ w_hr_t).to(dtype)
        if keep_activations:
            activations.append((i, f, g, o, c_prev, tanh_c, m))
        outputs.append(_pad_rows(h_new, B))
        h, c = _keep_rows(h_new, h, n), _keep_rows(c_new, c, n)
    return torch.stack(outputs), h, c, activations


class ReferenceBackend(Backend):
    name = "reference"
    differentiable_backward = True
    serves_resets = True

    def supports(self, call: RecurrenceCall) -> Optional[str]:
        if not call.dtype.is_floating_point:
            return f"dtype {call.dtype} is not a floating-point dtype"
        return None

    def forward(self, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad: bool, resets=None):
        h_all, h_T, c_T, _ = _recurrence(xg, w_hh, h0, c0, w_hr, batch_sizes, keep_activations=False, resets=resets)
        return h_all, h_T, c_T.to(c0.dtype), ()  # no workspace: backward recomputes

    def backward(self, inputs: RecurrenceInputs, h_all, workspace, dh_all, dh_T, dc_T, resets=None):
        xg, w_hh, h0, c0, w_hr, batch_sizes = inputs
        T, B, _ = xg.shape
        acc = compute_dtype(xg.dtype)
        _, _, _, activations = _recurrence(xg, w_hh, h0, c0, w_hr, batch_sizes, keep_activations=True,
                                           resets=resets)
        w_hh_acc = w_hh.to(acc)
        w_hr_acc = None if w_hr is None else w_hr.to(acc)
        dh, dc = dh_T.to(acc), dc_T.to(acc)
        dw_hr = None if w_hr is None else w_hr.new_zeros(w_hr.shape, dtype=acc)
        d_gates = [None] * T
        rows = active_rows(batch_sizes, T, B)
        for t in reversed(range(T)):
            n = rows[t]
            i, f, g, o, c_prev, tanh_c, m = activations[t]
            dh_t = dh[:n] + dh_all[t, :n].to(acc)
            if w_hr_acc is None:
                dm = dh_t
            else:
                dw_hr = dw_hr + dh_t.t() @ m
                dm = dh_t @ w_hr_acc
            dc_t = dc[:n] + dm * o * (1 - tanh_c * tanh_c)
            d_pre = torch.cat(
                [
                    dc_t * g * i * (1 - i),  # input gate
                    dc_t * c_prev * f * (1 - f),  # forget gate
                    dc_t * i * (1 - g * g),  # cell candidate
                    dm * tanh_c * o * (1 - o),  # output gate
                ],
                dim=1,
            )
            d_gates[t] = _pad_rows(d_pre, B)
            dh_prev, dc_prev = d_pre @ w_hh_acc, dc_t * f
            keep = kept_state(resets, t, n)
            if keep is not None:  # nothing flows back across a reset
                dh_prev, dc_prev = dh_prev.where(keep, 0), dc_prev.where(keep, 0)
            dh = _keep_rows(dh_prev, dh, n)
            dc = _keep_rows(dc_prev, dc, n)
        dG = torch.stack(d_gates).to(xg.dtype)
        dw_hr = None if dw_hr is None else dw_hr.to(w_hr.dtype)
        return dG, dh.to(h0.dtype), dc.to(c0.dtype), dw_hr


register(ReferenceBackend())
