"""The per-step backward kernel and its launch: one launch per step and phase (see
:mod:`.step_forward` for why the step kernels exist).

Dimension names (see :mod:`.config`): T steps, B batch rows, H hidden units, P state size
(proj_size or H), 4H the gate axis in PyTorch's order i, f, g, o.

Per step t = T-1 ... 0, then t = -1:
    phase A (tiles of B x P): dh_t = dG_{t+1} @ W_hh + dh_all[t]   (needs all 4H of dG_{t+1});
                              at t = -1 that is dh0 = dG_0 @ W_hh
    phase B (tiles of B x H): dm = dh_t @ W_hr (projection: needs all P of dh_t) or dh_t, then
        dc   = dc + dm * o * (1 - tanh(c_t)^2)
        dG_t = [dc*g*i(1-i), dc*c_{t-1}*f(1-f), dc*i*(1-g^2), dm*tanh(c_t)*o(1-o)]
        dc   = dc * f
Without a projection both phases are one launch (a tile of P == H units is a tile of H units).
dG_t is kept in fp32 in a double buffer ``dg_buf [2, B, 4H]`` for the next step's tl.dot and
written to the dG output in the input dtype. With a projection dW_hr = sum_t dh_t^T m_t is one
GEMM afterwards. With resets (HAS_RESETS) a row that resets at t gets dc_{t-1} = 0 and reads
c_{t-1} = 0 for its forget-gate gradient, and the next phase's load of dG_t reads 0 for it, so
dh_{t-1} = 0; per step one load of the tile's flags (``_kept_rows``) per dh tile (step t + 1)
and per cell tile (step t).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_rows import step_rows
from ...cells import LSTM, gates
from .config import (backward_buffers, dot_precisions, float32_accuracy, num_tiles, projection_weight_grad,
                     reset_rows, step_config)
from .cell_grads import _gru_grads, _lstm_grads
from .device_helpers import _dot_tile, _kept_rows, tile_coords


@triton.jit
def _bw_dh_tile(
    t, rows, cols, n_next,
    acc,  # [BLOCK_B, BLOCK_H] fp32: dG_{t+1} @ W_hh on this tile (rows active at t+1; 0 elsewhere)
    bs_ptr,  # [T + 1] int32
    dh_all_ptr,  # [T, B, P] any float dtype
    dh_last_ptr,  # [B, P] any float dtype: dh_T
    dh_buf_ptr,  # [B, P] fp32: dh_t for phase B (projection only)
    dh_hist_ptr,  # [T, B, P] fp32: dh_t on active rows, 0 elsewhere (projection only)
    dh0_ptr,  # [B, P] fp32
    B, P: tl.constexpr, HAS_PROJ: tl.constexpr,
):
    """Phase A: dh_t [tile of B x P] = dG_{t+1} @ W_hh on rows active at t+1 (dh_T on the
    others) + dh_all[t] on rows active at t. Returns dh for the fused cell pass."""
    col_in = cols < P
    tile_in = (rows < B)[:, None] & col_in[None, :]
    state = rows[:, None] * P + cols[None, :]  # offsets into a [B, P] tensor
    dh_last = tl.load(dh_last_ptr + state, mask=tile_in, other=0.0).to(tl.float32)
    dh = tl.where((rows >= n_next)[:, None], dh_last, acc)
    if t < 0:
        tl.store(dh0_ptr + state, dh, mask=tile_in)
    else:
        active = (rows < tl.load(bs_ptr + t))[:, None] & col_in[None, :]
        dh += tl.load(dh_all_ptr + t * B * P + state, mask=active, other=0.0).to(tl.float32)
        if HAS_PROJ:
            tl.store(dh_buf_ptr + state, dh, mask=tile_in)
            tl.store(dh_hist_ptr + t * B * P + state, tl.where(active, dh, tl.zeros_like(dh)), mask=tile_in)
    return dh


@triton.jit
def _store_gates(dst, d_0, d_1, d_2, d_3, mask, H: tl.constexpr, GATES: tl.constexpr):
    """The gates' values of a tile at ``dst`` (gate 0; the others H, 2H (, 3H) further), in ``dst``'s
    dtype; ``d_3`` only with 4 gates."""
    ty = dst.dtype.element_ty
    tl.store(dst, d_0.to(ty), mask=mask)
    tl.store(dst + H, d_1.to(ty), mask=mask)
    tl.store(dst + 2 * H, d_2.to(ty), mask=mask)
    if GATES == 4:
        tl.store(dst + 3 * H, d_3.to(ty), mask=mask)


@triton.jit
def _previous_state(t, cell, carried, hist_ptr, state0_ptr, B, H: tl.constexpr):
    """The state [tile] that entered step t where ``carried`` (0 elsewhere), fp32: hist[t - 1] ([T, B, H])
    or, at t = 0, state0 ([B, H])."""
    # A branch on the scalar t, not a mask `carried & (t > 0)`: Triton 3.9's interpreter refuses a
    # mask built from a scalar bool.
    if t > 0:
        prev = tl.load(hist_ptr + (t - 1) * B * H + cell, mask=carried, other=0.0).to(tl.float32)
    else:
        prev = tl.load(state0_ptr + cell, mask=carried, other=0.0).to(tl.float32)
    return prev


@triton.jit
def _lstm_bw_cell(
    t, tile_in, active, carried, cell, gate, dm,  # dm [BLOCK_B, BLOCK_H]: the gradient of m_t on this tile of B x H
    ws_gates_ptr,  # [T, B, 4H] fp32
    ws_c_ptr,  # [T, B, H] fp32
    c0_ptr,  # [B, H] input dtype
    dc_ptr,  # [B, H] fp32
    dg_buf_ptr,  # [2, B, 4H] fp32
    dg_ptr,  # [T, B, 4H] input dtype
    B, H: tl.constexpr, HAS_RESETS: tl.constexpr, FLOAT32_ACCURACY: tl.constexpr,
):
    """The LSTM cell's backward of step t on a tile: dG_t into dg_buf and the dG output, dc_{t-1} into dc.
    A row that resets at t used c_{t-1} = 0 and passes no dc_{t-1} back."""
    g_ptr = ws_gates_ptr + t * B * 4 * H + gate
    i = tl.load(g_ptr, mask=active, other=0.0)
    f = tl.load(g_ptr + H, mask=active, other=0.0)
    g = tl.load(g_ptr + 2 * H, mask=active, other=0.0)
    o = tl.load(g_ptr + 3 * H, mask=active, other=0.0)
    c_prev = _previous_state(t, cell, carried, ws_c_ptr, c0_ptr, B, H)

    dc_in = tl.load(dc_ptr + cell, mask=tile_in, other=0.0)
    c = tl.load(ws_c_ptr + t * B * H + cell, mask=active, other=0.0)
    d_i, d_f, d_g, d_o, dc_prev = _lstm_grads(dm, dc_in, i, f, g, o, c, c_prev, active, carried, HAS_RESETS,
                                              FLOAT32_ACCURACY)
    _store_gates(dg_buf_ptr + (t % 2) * B * 4 * H + gate, d_i, d_f, d_g, d_o, tile_in, H, 4)
    _store_gates(dg_ptr + t * B * 4 * H + gate, d_i, d_f, d_g, d_o, tile_in, H, 4)
    tl.store(dc_ptr + cell, dc_prev, mask=tile_in)


@triton.jit
def _gru_bw_cell(
    t, tile_in, active, carried, cell, gate, dh,  # dh [BLOCK_B, BLOCK_H]: the gradient of h_t on this tile
    ws_gates_ptr,  # [T, B, 3H] fp32: r, z, n
    ws_hn_ptr,  # [T, B, H] fp32: hn = h_{t-1} W_hn^T + b_hn
    h0_ptr,  # [B, H] input dtype
    h_all_ptr,  # [T, B, H] input dtype: the forward's h_t
    carry_ptr,  # [2, B, H] fp32: dh_t * z_t (the part of dh_{t-1} that skips W_hh) in slot t % 2
    dg_buf_ptr,  # [2, B, 3H] fp32: the gradient of the recurrent product (d_r, d_z, d_hn)
    dg_ptr,  # [T, B, 3H] input dtype: dG output (d_r, d_z, d_n)
    d_hn_ptr,  # [T, B, H] input dtype: d_hn output
    B, H: tl.constexpr,
):
    """The GRU cell's backward of step t on a tile (``_gru_grads``) into dg_buf ([d_r, d_z, d_hn]: the
    next phase's dh_{t-1} = that @ W_hh + dh_t z), the dG output ([d_r, d_z, d_n]), the d_hn output
    and the carry (dh_t z). A row that resets at t used
    h_{t-1} = 0 and passes no gradient back."""
    g_ptr = ws_gates_ptr + t * B * 3 * H + gate
    r = tl.load(g_ptr, mask=active, other=0.0)
    z = tl.load(g_ptr + H, mask=active, other=0.0)
    n = tl.load(g_ptr + 2 * H, mask=active, other=0.0)
    hn = tl.load(ws_hn_ptr + t * B * H + cell, mask=active, other=0.0)
    h_prev = _previous_state(t, cell, carried, h_all_ptr, h0_ptr, B, H)
    d_r, d_z, d_n, d_hn, carry = _gru_grads(dh, r, z, n, hn, h_prev, active, carried)
    _store_gates(dg_buf_ptr + (t % 2) * B * 3 * H + gate, d_r, d_z, d_hn, d_hn, tile_in, H, 3)
    _store_gates(dg_ptr + t * B * 3 * H + gate, d_r, d_z, d_n, d_n, tile_in, H, 3)
    tl.store(d_hn_ptr + t * B * H + cell, d_hn.to(d_hn_ptr.dtype.element_ty), mask=tile_in)
    tl.store(carry_ptr + (t % 2) * B * H + cell, carry, mask=tile_in)


@triton.jit
def _bw_cell(
    t, n_t, rows, cols, dm, ws_gates_ptr, ws_c_ptr, c0_ptr, dc_ptr, dg_buf_ptr, dg_ptr, h_all_ptr, d_hn_ptr, rst_ptr,
    B, H: tl.constexpr, HAS_RESETS: tl.constexpr, GATES: tl.constexpr, FLOAT32_ACCURACY: tl.constexpr,
):
    """The cell backward of step t on a tile of B x H (``dm``: the gradient of m_t, the GRU's h_t):
    the LSTM's (GATES 4) or the GRU's (3; ``c0_ptr`` is h0, ``dc_ptr`` its carry, ``ws_c_ptr`` hn)."""
    col_in = cols < H
    tile_in = (rows < B)[:, None] & col_in[None, :]
    active = (rows < n_t)[:, None] & col_in[None, :]
    carried = active  # where the state entered step t
    if HAS_RESETS:
        carried = active & _kept_rows(rst_ptr, t, rows, B)[:, None]
    cell = rows[:, None] * H + cols[None, :]  # offsets into a [B, H] tensor
    gate = rows[:, None] * (GATES * H) + cols[None, :]  # gate 0 of [BLOCK_B, BLOCK_H] in a [B, GATES*H] tensor
    if GATES == 3:
        _gru_bw_cell(t, tile_in, active, carried, cell, gate, dm, ws_gates_ptr, ws_c_ptr, c0_ptr, h_all_ptr, dc_ptr,
                     dg_buf_ptr, dg_ptr, d_hn_ptr, B, H)
    else:
        _lstm_bw_cell(t, tile_in, active, carried, cell, gate, dm, ws_gates_ptr, ws_c_ptr, c0_ptr, dc_ptr, dg_buf_ptr,
                      dg_ptr, B, H, HAS_RESETS, FLOAT32_ACCURACY)


# t changes from launch to launch: not specialised (Triton would compile each phase again for
# t = 1 and for t divisible by 16).
@triton.jit(do_not_specialize=["t"])
def _step_bw_kernel(
    w_ptr,  # [GATES*H, P] input dtype: W_hh
    w_hr_ptr,  # [P, H] input dtype: W_hr (projection only)
    bs_ptr,  # [T + 1] int32: active rows of each step, bs[T] = 0
    rst_ptr,  # [T + 2, cdiv(B, 64)] int64: resets of step t as bits of row t + 1 (HAS_RESETS; reset_rows)
    dh_all_ptr,  # [T, B, P] any float dtype
    dh_last_ptr,  # [B, P] any float dtype: dh_T
    ws_gates_ptr,  # [T, B, GATES*H] fp32: activated gates from forward
    ws_c_ptr,  # [T, B, H] fp32: c_t from forward (the GRU's hn)
    c0_ptr,  # [B, H] input dtype (the GRU's h0)
    dc_ptr,  # [B, H] fp32: dc_T on entry, dc0 on exit (the GRU's [2, B, H] carry dh_t * z_t in slot t % 2)
    dg_buf_ptr,  # [2, B, GATES*H] fp32: dG_t (the GRU's gradient of the recurrent product) in slot t % 2
    dg_ptr,  # [T, B, GATES*H] input dtype: dG output
    dh_buf_ptr,  # [B, P] fp32: dh_t between the phases (projection only)
    dh_hist_ptr,  # [T, B, P] fp32: dh_t for dW_hr (projection only)
    dh0_ptr,  # [B, P] fp32: dh0 output (written in phase t = -1)
    h_all_ptr,  # [T, B, H] input dtype: the forward's h_t (GRU only)
    d_hn_ptr,  # [T, B, H] input dtype: d_hn output (GRU only)
    t, B,  # the step, T-1 ... 0, -1
    H: tl.constexpr, P: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    CELL_PHASE: tl.constexpr,  # False: phase A (dh, and the cell without a projection; grid = tiles of B x P);
                               # True: phase B (projection only; grid = tiles of B x H)
    HAS_RESETS: tl.constexpr,  # resets inside the sequence (rst_ptr); False: the kernel compiles as without
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GATES: tl.constexpr,  # the cell: 4 the LSTM, 3 the GRU (lstm_kernels/cells.py)
    FLOAT32_ACCURACY: tl.constexpr,  # float32 without TF32: correctly rounded divisions (device_helpers._sigmoid)
):
    """One phase of step t; each program one tile."""
    tile = tl.program_id(0)
    n_t = tl.load(bs_ptr + tl.maximum(t, 0))
    if CELL_PHASE:
        rows, cols = tile_coords(tile, tl.cdiv(H, BLOCK_H), BLOCK_B, BLOCK_H)
        dm = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        dm = _dot_tile(dm, dh_buf_ptr, P, rows, rows < n_t, w_hr_ptr, H, 1, cols, cols < H, P, BLOCK_K,
                       DOT_PRECISION)  # dm = dh_t @ W_hr
        _bw_cell(t, n_t, rows, cols, dm, ws_gates_ptr, ws_c_ptr, c0_ptr, dc_ptr, dg_buf_ptr, dg_ptr, h_all_ptr,
                 d_hn_ptr, rst_ptr, B, H, HAS_RESETS, GATES, FLOAT32_ACCURACY)
    else:
        rows, cols = tile_coords(tile, tl.cdiv(P, BLOCK_H), BLOCK_B, BLOCK_H)
        n_next = tl.load(bs_ptr + t + 1)
        dg_in = rows < n_next  # rows whose dG_{t+1} flows into dh_t
        if HAS_RESETS:
            dg_in = dg_in & _kept_rows(rst_ptr, t + 1, rows, B)
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        acc = _dot_tile(acc, dg_buf_ptr + ((t + 1) % 2) * B * GATES * H, GATES * H, rows, dg_in, w_ptr, P, 1, cols,
                        cols < P, GATES * H, BLOCK_K, DOT_PRECISION)
        if GATES == 3:  # the GRU's dh_t also takes dh_{t+1} z_{t+1} directly (0 where step t+1 reset the row)
            acc += tl.load(dc_ptr + ((t + 1) % 2) * B * H + rows[:, None] * H + cols[None, :],
                           mask=dg_in[:, None] & (cols < H)[None, :], other=0.0)
        dh = _bw_dh_tile(t, rows, cols, n_next, acc, bs_ptr, dh_all_ptr, dh_last_ptr, dh_buf_ptr, dh_hist_ptr, dh0_ptr,
                         B, P, HAS_PROJ)
        if not HAS_PROJ:  # P == H: this tile of P units is a tile of H units, dm = dh
            if t >= 0:
                _bw_cell(t, n_t, rows, cols, dh, ws_gates_ptr, ws_c_ptr, c0_ptr, dc_ptr, dg_buf_ptr, dg_ptr, h_all_ptr,
                         d_hn_ptr, rst_ptr, B, H, HAS_RESETS, GATES, FLOAT32_ACCURACY)


def step_backward(xg, w_hh, c0, w_hr, workspace, dh_all, dh_T, dc_T, batch_sizes=None, resets=None, cell=LSTM,
                  h0=None, h_all=None):
    """Backward recurrence with one launch per step and phase, from the forward workspace (gates
    [T, B, 4H], c_all [T, B, H] (+ m_all) fp32) and the forward's ``resets`` [T, B] bool or None.
    The GRU (``cell="gru"``; c0, w_hr and dc_T None) also takes the forward's h0 [B, H] and h_all
    [T, B, H], and its workspace is r, z, n [T, B, 3H] and hn [T, B, H].

    Returns dG [T, B, 4H] in xg's dtype, dh0 [B, P] fp32, dc0 [B, H] fp32, and dW_hr [P, H] fp32
    (one GEMM over the steps) or None without a projection; the GRU's: dG [T, B, 3H], dh0, None,
    and d_hn [T, B, H] in xg's dtype. Launches on the current CUDA device and stream (the caller's
    device guard).
    """
    T, B, gate_rows = xg.shape
    n_gates = gates(cell)
    H, P = gate_rows // n_gates, w_hh.shape[1]
    has_proj = w_hr is not None
    dtype, device = xg.dtype, xg.device
    gates_ws, c_all = workspace[:2]
    cfg = step_config(max(H, P), B, dtype)
    bs = step_rows(batch_sizes, T, B, device)
    is_gru = cell != LSTM
    c0 = h0 if is_gru else c0  # the state that entered step 0
    dc, dh0, dh_buf, dh_hist = backward_buffers(dc_T, dh_T, T, P, has_proj)
    dg_buf = torch.empty((2, B, gate_rows), dtype=torch.float32, device=device)
    dG = torch.empty((T, B, gate_rows), dtype=dtype, device=device)
    d_hn = torch.empty((T, B, H), dtype=dtype, device=device) if is_gru else dG
    consts = dict(H=H, P=P, HAS_PROJ=has_proj, HAS_RESETS=resets is not None, BLOCK_B=cfg["BLOCK_B"],
                  BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K"], DOT_PRECISION=dot_precisions(dtype)[1],
                  GATES=n_gates, FLOAT32_ACCURACY=float32_accuracy(dtype), num_warps=cfg["num_warps"])
    args = (w_hh.contiguous(), w_hr.contiguous() if has_proj else w_hh, bs, reset_rows(resets, T, B, bs),
            dh_all.contiguous(), dh_T.contiguous(), gates_ws, c_all, c0.contiguous(), dc, dg_buf, dG, dh_buf, dh_hist,
            dh0, h_all.contiguous() if is_gru else dG, d_hn)
    dh_grid, cell_grid = (num_tiles(P, B, cfg),), (num_tiles(H, B, cfg),)
    for t in range(T - 1, -2, -1):
        _step_bw_kernel[dh_grid](*args, t, B, CELL_PHASE=False, **consts)
        if has_proj and t >= 0:
            _step_bw_kernel[cell_grid](*args, t, B, CELL_PHASE=True, **consts)
    if is_gru:
        return dG, dh0, None, d_hn
    return dG, dh0, dc, projection_weight_grad(dh_hist, workspace[2]) if has_proj else None
