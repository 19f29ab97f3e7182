"""The ``reference`` backend: the recurrence of the LSTM and of the GRU in plain PyTorch.

It is the oracle the kernels are tested against and the fallback where no
kernel applies: any device, any floating dtype (float64 included). Forward is
an explicit loop over time; backward is hand-written BPTT, not autograd through
the loop. Backward recomputes the forward activations from the saved inputs
(it keeps no workspace) and is made of differentiable torch ops, so double backward works.

One loop serves both cells (:func:`_recurrence`, :func:`_bptt`): it walks the steps, keeps the
rows a packed batch leaves out of a step and masks the state where a row resets. The cell is
its parameter, one object per call with a ``step`` and a ``step_backward``
(:class:`_LSTMCell`, :class:`_GRUCell`).

Dimension names: T steps, B batch, H hidden, P = proj_size or H.
Gate order: i, f, g, o along 4H (LSTM); r, z, n along 3H (GRU), PyTorch's.
Numerics: gates, cell state and accumulation in fp32 (float64 for float64
inputs); h_t is rounded to the input dtype every step, as a kernel stores it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..cells import GRU, LSTM
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


class _LSTMCell:
    """One LSTM step and its gradient. The carried state besides h is (c,); with a projection,
    h_t = m_t @ W_hr^T and ``step_backward`` sums dW_hr into ``self.dw_hr``."""

    def __init__(self, w_hh, w_hr, dtype: torch.dtype, acc: torch.dtype):
        self.dtype = dtype
        self.w_hh = w_hh.to(acc)
        self.w_hr = None if w_hr is None else w_hr.to(acc)
        self.dw_hr = None if w_hr is None else w_hr.new_zeros(w_hr.shape, dtype=acc)

    def step(self, x_t, h_prev, state_prev):
        """x_t [n, 4H], h_prev [n, P], state_prev (c_prev [n, H],), all in the compute dtype ->
        (h_t [n, P] in the input dtype, (c_t,), what step_backward needs)."""
        (c_prev,) = state_prev
        gates = x_t + h_prev @ self.w_hh.t()
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c_prev + i * g
        tanh_c = c_new.tanh()
        m = o * tanh_c
        h_new = (m if self.w_hr is None else m @ self.w_hr.t()).to(self.dtype)
        return h_new, (c_new,), (i, f, g, o, c_prev, tanh_c, m)

    def step_backward(self, saved, dh_t, dstate):
        """-> (the gradient of the step's gate pre-activations [n, 4H], dh_prev [n, P], (dc_prev,), None):
        the recurrent product's gradient is the pre-activations' own."""
        i, f, g, o, c_prev, tanh_c, m = saved
        (dc,) = dstate
        if self.w_hr is None:
            dm = dh_t
        else:
            self.dw_hr = self.dw_hr + dh_t.t() @ m
            dm = dh_t @ self.w_hr
        dc_t = dc + dm * o * (1 - tanh_c * tanh_c)
        d_pre = torch.cat(
            [
                dc_t * g * i * (1 - i),  # input gate
                dc_t * c_prev * f * (1 - f),  # forget gate
                dc_t * i * (1 - g * g),  # cell candidate
                dm * tanh_c * o * (1 - o),  # output gate
            ],
            dim=1,
        )
        return d_pre, d_pre @ self.w_hh, (dc_t * f,), None


class _GRUCell:
    """One GRU step and its gradient, nn.GRU's equations: r = σ(x_r + W_hr h), z = σ(x_z + W_hz h),
    n = tanh(x_n + r * (W_hn h + b_hn)), h_t = (1 - z) * n + z * h (x_r and x_z hold both biases).
    No state besides h."""

    def __init__(self, w_hh, b_hn, dtype: torch.dtype, acc: torch.dtype):
        self.dtype = dtype
        self.w_hh = w_hh.to(acc)
        self.b_hn = None if b_hn is None else b_hn.to(acc)

    def step(self, x_t, h_prev, state_prev):
        """x_t [n, 3H], h_prev [n, H] in the compute dtype -> (h_t [n, H] in the input dtype, (), saved)."""
        x_r, x_z, x_n = x_t.chunk(3, dim=1)
        g_r, g_z, g_n = (h_prev @ self.w_hh.t()).chunk(3, dim=1)
        if self.b_hn is not None:
            g_n = g_n + self.b_hn
        r, z = (x_r + g_r).sigmoid(), (x_z + g_z).sigmoid()
        n = (x_n + r * g_n).tanh()
        h_new = ((1 - z) * n + z * h_prev).to(self.dtype)
        return h_new, (), (r, z, n, g_n, h_prev)

    def step_backward(self, saved, dh_t, dstate):
        """-> (the gradient of the step's gate pre-activations [n, 3H], dh_prev [n, H], (), d_hn [n, H]):
        d_hn is the gradient of the n rows of the recurrent product, W_hn h + b_hn, which r scales."""
        r, z, n, g_n, h_prev = saved
        d_n = dh_t * (1 - z) * (1 - n * n)  # of n's pre-activation, x_n + r * g_n
        d_r = d_n * g_n * r * (1 - r)
        d_z = dh_t * (h_prev - n) * z * (1 - z)
        d_hn = d_n * r
        d_recurrent = torch.cat([d_r, d_z, d_hn], dim=1)  # of h_prev @ W_hh^T (+ b_hn)
        return torch.cat([d_r, d_z, d_n], dim=1), dh_t * z + d_recurrent @ self.w_hh, (), d_hn


def _cell_of(inputs: RecurrenceInputs, b_hn, acc: torch.dtype):
    if inputs.cell == GRU:
        return _GRUCell(inputs.w_hh, b_hn, inputs.xg.dtype, acc)
    return _LSTMCell(inputs.w_hh, inputs.w_hr, inputs.xg.dtype, acc)


def _recurrence(cell, xg, h0, state0: tuple, batch_sizes, keep_activations: bool, resets=None):
    """Run the forward recurrence of ``cell`` (a :class:`_LSTMCell` or :class:`_GRUCell`).

    Returns h_all [T, B, P] (input dtype), h_T [B, P], the final carried state (a tuple in the
    compute dtype: (c_T,) for the LSTM, () for the GRU) and, when ``keep_activations``, per step
    what the cell's ``step_backward`` needs, for the active rows.
    ``resets`` [T, B] bool or None: a row where resets[t] starts step t from zero state.
    """
    T, B, _ = xg.shape
    acc = compute_dtype(xg.dtype)
    h, state = h0, state0
    outputs, activations = [], []
    for t, n in enumerate(active_rows(batch_sizes, T, B)):
        h_prev, state_prev = h[:n].to(acc), tuple(s[:n] for s in state)
        keep = kept_state(resets, t, n)
        if keep is not None:
            h_prev, state_prev = h_prev.where(keep, 0), tuple(s.where(keep, 0) for s in state_prev)
        h_new, state_new, saved = cell.step(xg[t, :n].to(acc), h_prev, state_prev)
        if keep_activations:
            activations.append(saved)
        outputs.append(_pad_rows(h_new, B))
        h, state = _keep_rows(h_new, h, n), tuple(_keep_rows(a, b, n) for a, b in zip(state_new, state))
    return torch.stack(outputs), h, state, activations


def _bptt(cell, activations, xg, batch_sizes, dh_all, dh_T, dstate_T: tuple, resets=None):
    """Backpropagation through time over ``activations`` of :func:`_recurrence`. Returns the
    gradient of the gate pre-activations dG [T, B, gates*H] (input dtype), dh0 and the carried
    state's gradient (both in the compute dtype), and the GRU's d_hn [T, B, H] (input dtype; None
    for the LSTM)."""
    T, B, _ = xg.shape
    acc = compute_dtype(xg.dtype)
    dh, dstate = dh_T.to(acc), tuple(d.to(acc) for d in dstate_T)
    d_gates, d_hn = [None] * T, [None] * T
    rows = active_rows(batch_sizes, T, B)
    for t in reversed(range(T)):
        n = rows[t]
        dh_t = dh[:n] + dh_all[t, :n].to(acc)
        d_pre, dh_prev, dstate_prev, d_hn_t = cell.step_backward(activations[t], dh_t,
                                                                 tuple(d[:n] for d in dstate))
        d_gates[t] = _pad_rows(d_pre, B)
        d_hn[t] = None if d_hn_t is None else _pad_rows(d_hn_t, B)
        keep = kept_state(resets, t, n)
        if keep is not None:  # nothing flows back across a reset
            dh_prev, dstate_prev = dh_prev.where(keep, 0), tuple(d.where(keep, 0) for d in dstate_prev)
        dh = _keep_rows(dh_prev, dh, n)
        dstate = tuple(_keep_rows(a, b, n) for a, b in zip(dstate_prev, dstate))
    d_hn = None if d_hn[0] is None else torch.stack(d_hn).to(xg.dtype)
    return torch.stack(d_gates).to(xg.dtype), dh, dstate, d_hn


class ReferenceBackend(Backend):
    name = "reference"
    differentiable_backward = True
    serves_resets = True
    cells = (LSTM, GRU)

    def supports(self, call: RecurrenceCall) -> Optional[str]:
        if not call.dtype.is_floating_point:
            return f"dtype {call.dtype} is not a floating-point dtype"
        return None

    def forward(self, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad: bool, resets=None, cell=LSTM, b_hn=None):
        inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes)
        acc = compute_dtype(xg.dtype)
        state0 = () if c0 is None else (c0.to(acc),)
        h_all, h_T, state_T, _ = _recurrence(_cell_of(inputs, b_hn, acc), xg, h0, state0, batch_sizes,
                                             keep_activations=False, resets=resets)
        c_T = state_T[0].to(c0.dtype) if state_T else None
        return h_all, h_T, c_T, ()  # no workspace: backward recomputes

    def backward(self, inputs: RecurrenceInputs, h_all, workspace, dh_all, dh_T, dc_T, resets=None, cell=LSTM,
                 b_hn=None):
        xg, w_hh, h0, c0, w_hr, batch_sizes = inputs
        acc = compute_dtype(xg.dtype)
        step = _cell_of(inputs, b_hn, acc)
        state0, dstate_T = ((), ()) if c0 is None else ((c0.to(acc),), (dc_T,))
        _, _, _, activations = _recurrence(step, xg, h0, state0, batch_sizes, keep_activations=True, resets=resets)
        dG, dh, dstate, d_hn = _bptt(step, activations, xg, batch_sizes, dh_all, dh_T, dstate_T, resets)
        if inputs.cell == GRU:
            return dG, dh.to(h0.dtype), None, d_hn
        dw_hr = None if w_hr is None else step.dw_hr.to(w_hr.dtype)
        return dG, dh.to(h0.dtype), dstate[0].to(c0.dtype), dw_hr


register(ReferenceBackend())
