"""The cells' backward arithmetic, shared by the per-step and the persistent backward kernels.

From the gradient of a tile's output at step t and the forward's saved activations to the
gradients of the gate pre-activations and of the state that flows back to step t - 1. Elementwise
on tiles of any shape and layout, fp32; no memory access (each kernel loads and stores in its own
layout). ``active``: the rows step t updated; ``carried``: those of them whose state entered step
t (``active`` less the rows that reset at t).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .device_helpers import _tanh


@triton.jit
def _lstm_grads(dm, dc_in, i, f, g, o, c, c_prev, active, carried, HAS_RESETS: tl.constexpr,
                FLOAT32_ACCURACY: tl.constexpr):
    """The LSTM's: ``dm`` the gradient of m_t, ``dc_in`` that of c_t from step t + 1; i, f, g, o, c_t and
    c_{t-1} (0 where the row reset) as the forward saved them. Returns d_i, d_f, d_g, d_o (0 where not
    active) and dc_{t-1}: dc f where carried, 0 where the row reset at t, dc_in where not active.
    FLOAT32_ACCURACY: tanh c_t with a correctly rounded division (device_helpers._sigmoid)."""
    tanh_c = _tanh(c, FLOAT32_ACCURACY)
    dc = dc_in + dm * o * (1.0 - tanh_c * tanh_c)
    zero = tl.zeros_like(dc)
    d_i = tl.where(active, dc * g * i * (1.0 - i), zero)
    d_f = tl.where(active, dc * c_prev * f * (1.0 - f), zero)
    d_g = tl.where(active, dc * i * (1.0 - g * g), zero)
    d_o = tl.where(active, dm * tanh_c * o * (1.0 - o), zero)
    if HAS_RESETS:
        dc_prev = tl.where(active, tl.where(carried, dc * f, 0.0), dc_in)
    else:  # carried == active
        dc_prev = tl.where(active, dc * f, dc_in)
    return d_i, d_f, d_g, d_o, dc_prev


@triton.jit
def _gru_grads(dh, r, z, n, hn, h_prev, active, carried):
    """The GRU's (the reference's equations): ``dh`` the gradient of h_t; r, z, n, hn = W_hn h_{t-1} + b_hn
    and h_{t-1} (0 where the row reset) as the forward saved them:
        d_n = dh (1 - z)(1 - n^2)      (the gradient of n's pre-activation, x_n + r hn)
        d_r = d_n hn r (1 - r);  d_z = dh (h_{t-1} - n) z (1 - z);  d_hn = d_n r
    Returns d_r, d_z, d_n (0 where not active), d_hn, and the carry dh z (the part of dh_{t-1} that
    skips W_hh; 0 where not carried)."""
    zero = tl.zeros_like(dh)
    d_n = tl.where(active, dh * (1.0 - z) * (1.0 - n * n), zero)
    d_r = d_n * hn * r * (1.0 - r)
    d_z = tl.where(active, dh * (h_prev - n) * z * (1.0 - z), zero)
    return d_r, d_z, d_n, d_n * r, tl.where(carried, dh * z, zero)
