"""The per-step forward kernel and its launch: one launch per step and phase, the launch boundary
being the barrier between them (the fallback where the persistent kernels' plan does not fit, and
the correctness anchor the persistent kernels are compared with).

Dimension names (see :mod:`.config`): T steps, B batch rows, H hidden units, P state size
(proj_size or H), 4H the gate axis in PyTorch's order i, f, g, o.

Each program owns a tile of BLOCK_B batch rows x BLOCK_H hidden units and computes *all four
gates* of those units, so the cell update is local to it. Step t:
    phase A (cell, tiles of B x H):
        gates = xg[t] + h_{t-1} @ W_hh^T          4 tl.dot, fp32 accumulation, W_hh streamed (L2)
        i, f, g, o = sigma, sigma, tanh, sigma
        c_t = f * c_{t-1} + i * g                 fp32, kept in a [B, H] fp32 state buffer
        m_t = o * tanh(c_t); without a projection h_t = m_t is stored right there
    phase B (projection only, tiles of B x P): h_t = m_t @ W_hr^T (needs all H of m_t)
h_t is rounded to the input dtype as the reference does. h_{t-1} is read for all P units of a
tile's rows, so it lives in a double buffer ``h_buf [2, B, P]``: step t reads slot t % 2 and
writes slot (t + 1) % 2. With resets (HAS_RESETS) a row that resets at t reads h_{t-1} = 0 (the
mask of the h_{t-1} loads) and c_{t-1} = 0; per step and cell tile one load of the tile's flags
(``_kept_rows``).

The GRU (GATES = 3, a constexpr: one kernel, the cell its parameter) runs phase A only (no
projection, P == H), on the gate rows r, z, n:
        r, z = sigma(xg_r + h_{t-1} W_hr^T), sigma(xg_z + h_{t-1} W_hz^T)    3 tl.dot
        hn = h_{t-1} W_hn^T + b_hn;  n = tanh(xg_n + r * hn)
        h_t = (1 - z) * n + z * h_{t-1}                  h_{t-1} read back from the tile's own units
and keeps r, z, n [T, B, 3H] and hn [T, B, H] (in the c_all slot) for its backward.

The step index ``t`` is not specialised (``do_not_specialize``): one compilation per phase, not
one per class of t. H and P are constexprs (static k-loops, which the interpreter needs).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..device_rows import step_rows
from ...cells import LSTM, gates
from .config import (dot_precisions, float32_accuracy, forward_buffers, forward_dot_dtype, num_tiles, recurrent_bias,
                     reset_rows, step_config)
from .device_helpers import _dot_tile, _kept_rows, _sigmoid, _tanh, tile_coords


@triton.jit
def _fw_gates(
    h_prev_ptr,  # [B, P] input dtype: h_{t-1}
    w_ptr,  # [GATES*H, P] input dtype: W_hh
    rows, cols,  # [BLOCK_B] batch rows, [BLOCK_H] hidden units of this tile
    row_in,  # [BLOCK_B] the rows whose h_{t-1} is read (others count as 0: beyond B, or reset)
    H: tl.constexpr, P: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GATES: tl.constexpr,
):
    """h_{t-1} @ W_hh^T for the GATES gates of a tile (4: the LSTM's i, f, g, o; 3: the GRU's
    r, z, n), W_hh streamed from global memory (L2) in BLOCK_K chunks (each chunk of h_{t-1}
    loaded once for all gates). Returns four [BLOCK_B, BLOCK_H] fp32 accumulators in gate order;
    with 3 gates the fourth stays zero (and is never read)."""
    col_in = cols < H
    acc_0 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_1 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_2 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_3 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < P
        h = tl.load(h_prev_ptr + rows[:, None] * P + ks[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0,
                    cache_modifier=".cg").to(DOT_DTYPE)  # [BLOCK_B, BLOCK_K]
        w_mask = k_in[:, None] & col_in[None, :]
        w_t = w_ptr + cols[None, :] * P + ks[:, None]  # W_hh^T tile of gate 0: [BLOCK_K, BLOCK_H]
        acc_0 = tl.dot(h, tl.load(w_t, mask=w_mask, other=0.0).to(DOT_DTYPE), acc_0, input_precision=DOT_PRECISION)
        acc_1 = tl.dot(h, tl.load(w_t + H * P, mask=w_mask, other=0.0).to(DOT_DTYPE), acc_1,
                       input_precision=DOT_PRECISION)
        acc_2 = tl.dot(h, tl.load(w_t + 2 * H * P, mask=w_mask, other=0.0).to(DOT_DTYPE), acc_2,
                       input_precision=DOT_PRECISION)
        if GATES == 4:
            acc_3 = tl.dot(h, tl.load(w_t + 3 * H * P, mask=w_mask, other=0.0).to(DOT_DTYPE), acc_3,
                           input_precision=DOT_PRECISION)
    return acc_0, acc_1, acc_2, acc_3


@triton.jit
def _store_h(t, h_new, state, tile_in, active, h_buf_ptr, h_all_ptr, B, P: tl.constexpr):
    """h_t of a tile of B x P (``state``: its offsets into a [B, P] tensor): into h_all (0 on rows not
    active at t) and into the h_buf slot of step t + 1 (rows not active keep h_{t-1})."""
    h_keep = tl.load(h_buf_ptr + (t % 2) * B * P + state, mask=tile_in, other=0.0, cache_modifier=".cg")
    tl.store(h_all_ptr + t * B * P + state, tl.where(active, h_new, tl.zeros_like(h_new)), mask=tile_in)
    tl.store(h_buf_ptr + ((t + 1) % 2) * B * P + state, tl.where(active, h_new, h_keep), mask=tile_in)


@triton.jit
def _lstm_update(
    t, acc_i, acc_f, acc_g, acc_o, x_ptr, ws_ptr, rows, carried, tile_in, active, cell,
    c_ptr, h_buf_ptr, h_all_ptr, m_buf_ptr, ws_c_ptr, ws_m_ptr,
    B, H: tl.constexpr, P: tl.constexpr, HAS_PROJ: tl.constexpr, STORE_WS: tl.constexpr, HAS_RESETS: tl.constexpr,
    FLOAT32_ACCURACY: tl.constexpr,
):
    """The LSTM's update of a tile: gates, c_t, m_t (and h_t without a projection). A row that resets
    at t starts from c_{t-1} = 0; an inactive row keeps its c."""
    i = _sigmoid(acc_i + tl.load(x_ptr, mask=tile_in, other=0.0).to(tl.float32), FLOAT32_ACCURACY)
    f = _sigmoid(acc_f + tl.load(x_ptr + H, mask=tile_in, other=0.0).to(tl.float32), FLOAT32_ACCURACY)
    g = _tanh(acc_g + tl.load(x_ptr + 2 * H, mask=tile_in, other=0.0).to(tl.float32), FLOAT32_ACCURACY)
    o = _sigmoid(acc_o + tl.load(x_ptr + 3 * H, mask=tile_in, other=0.0).to(tl.float32), FLOAT32_ACCURACY)

    c_prev = tl.load(c_ptr + cell, mask=tile_in, other=0.0)
    if HAS_RESETS:
        c_new = f * tl.where(carried[:, None], c_prev, 0.0) + i * g
    else:
        c_new = f * c_prev + i * g
    m = o * _tanh(c_new, FLOAT32_ACCURACY)
    c_new = tl.where(active, c_new, c_prev)
    tl.store(c_ptr + cell, c_new, mask=tile_in)
    if HAS_PROJ:
        m = tl.where(active, m, tl.zeros_like(m))
        tl.store(m_buf_ptr + cell, m, mask=tile_in)
        if STORE_WS:
            tl.store(ws_m_ptr + t * B * H + cell, m, mask=tile_in)
    else:  # P == H: h_t = m_t
        _store_h(t, m.to(h_all_ptr.dtype.element_ty), cell, tile_in, active, h_buf_ptr, h_all_ptr, B, P)
    if STORE_WS:
        tl.store(ws_ptr, i, mask=tile_in)
        tl.store(ws_ptr + H, f, mask=tile_in)
        tl.store(ws_ptr + 2 * H, g, mask=tile_in)
        tl.store(ws_ptr + 3 * H, o, mask=tile_in)
        tl.store(ws_c_ptr + t * B * H + cell, c_new, mask=tile_in)


@triton.jit
def _gru_update(
    t, acc_r, acc_z, acc_n, x_ptr, ws_ptr, cols, carried, tile_in, active, cell,
    b_hn_ptr, h_buf_ptr, h_all_ptr, ws_hn_ptr,
    B, H: tl.constexpr, STORE_WS: tl.constexpr, FLOAT32_ACCURACY: tl.constexpr,
):
    """The GRU's update of a tile (P == H): r and z from the summed pre-activations, hn = the n rows
    of h_{t-1} W_hh^T plus b_hn, n = tanh(x_n + r * hn), h_t = (1 - z) n + z h_{t-1}, with h_{t-1}
    as the product read it (0 where a row resets). The workspace keeps r, z, n and hn."""
    r = _sigmoid(acc_r + tl.load(x_ptr, mask=tile_in, other=0.0).to(tl.float32), FLOAT32_ACCURACY)
    z = _sigmoid(acc_z + tl.load(x_ptr + H, mask=tile_in, other=0.0).to(tl.float32), FLOAT32_ACCURACY)
    hn = acc_n + tl.load(b_hn_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    n = _tanh(tl.load(x_ptr + 2 * H, mask=tile_in, other=0.0).to(tl.float32) + r * hn, FLOAT32_ACCURACY)
    h_prev = tl.load(h_buf_ptr + (t % 2) * B * H + cell, mask=carried[:, None] & tile_in, other=0.0,
                     cache_modifier=".cg").to(tl.float32)
    h_new = (1.0 - z) * n + z * h_prev
    _store_h(t, h_new.to(h_all_ptr.dtype.element_ty), cell, tile_in, active, h_buf_ptr, h_all_ptr, B, H)
    if STORE_WS:
        tl.store(ws_ptr, r, mask=tile_in)
        tl.store(ws_ptr + H, z, mask=tile_in)
        tl.store(ws_ptr + 2 * H, n, mask=tile_in)
        tl.store(ws_hn_ptr + t * B * H + cell, hn, mask=tile_in)


@triton.jit
def _fw_cell_tile(
    t, tile, n_t,
    xg_ptr, w_ptr, b_hn_ptr, rst_ptr, h_buf_ptr, c_ptr, h_all_ptr, m_buf_ptr, ws_gates_ptr, ws_c_ptr, ws_m_ptr,
    B, H: tl.constexpr, P: tl.constexpr,
    HAS_PROJ: tl.constexpr, STORE_WS: tl.constexpr, HAS_RESETS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GATES: tl.constexpr, FLOAT32_ACCURACY: tl.constexpr,
):
    """Phase A of step t on a tile of B x H: the recurrent product of all gates, then the cell's
    update (GATES 4: the LSTM's, 3: the GRU's). A row that resets at t starts from zero state."""
    rows, cols = tile_coords(tile, tl.cdiv(H, BLOCK_H), BLOCK_B, BLOCK_H)
    row_in = rows < B
    carried = row_in  # the rows whose state enters step t
    if HAS_RESETS:
        carried = carried & _kept_rows(rst_ptr, t, rows, B)
    acc_0, acc_1, acc_2, acc_3 = _fw_gates(h_buf_ptr + (t % 2) * B * P, w_ptr, rows, cols, carried, H, P, BLOCK_B,
                                           BLOCK_H, BLOCK_K, DOT_PRECISION, DOT_DTYPE, GATES)
    col_in = cols < H
    tile_in = row_in[:, None] & col_in[None, :]
    active = (rows < n_t)[:, None] & col_in[None, :]
    cell = rows[:, None] * H + cols[None, :]  # offsets into a [B, H] tensor
    gate = t * B * GATES * H + rows[:, None] * (GATES * H) + cols[None, :]  # gate 0 of the tile in [T, B, GATES*H]
    if GATES == 3:
        _gru_update(t, acc_0, acc_1, acc_2, xg_ptr + gate, ws_gates_ptr + gate, cols, carried, tile_in, active, cell,
                    b_hn_ptr, h_buf_ptr, h_all_ptr, ws_c_ptr, B, H, STORE_WS, FLOAT32_ACCURACY)
    else:
        _lstm_update(t, acc_0, acc_1, acc_2, acc_3, xg_ptr + gate, ws_gates_ptr + gate, rows, carried, tile_in, active,
                     cell, c_ptr, h_buf_ptr, h_all_ptr, m_buf_ptr, ws_c_ptr, ws_m_ptr, B, H, P, HAS_PROJ, STORE_WS,
                     HAS_RESETS, FLOAT32_ACCURACY)


@triton.jit
def _fw_proj_tile(
    t, tile, n_t,
    w_hr_ptr,  # [P, H] input dtype
    h_buf_ptr,  # [2, B, P] input dtype
    h_all_ptr,  # [T, B, P] input dtype
    m_buf_ptr,  # [B, H] fp32
    B, H: tl.constexpr, P: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Phase B of step t on a tile of B x P: h_t = m_t @ W_hr^T."""
    rows, cols = tile_coords(tile, tl.cdiv(P, BLOCK_H), BLOCK_B, BLOCK_H)  # cols: state units
    col_in = cols < P
    tile_in = (rows < B)[:, None] & col_in[None, :]
    active = (rows < n_t)[:, None] & col_in[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    # h_t = m_t @ W_hr^T: M[k, n] = W_hr[n, k]
    acc = _dot_tile(acc, m_buf_ptr, H, rows, rows < n_t, w_hr_ptr, 1, H, cols, col_in, H, BLOCK_K, DOT_PRECISION)
    state = rows[:, None] * P + cols[None, :]  # offsets into a [B, P] tensor
    _store_h(t, acc.to(h_all_ptr.dtype.element_ty), state, tile_in, active, h_buf_ptr, h_all_ptr, B, P)


# t changes from launch to launch: not specialised (Triton would compile each phase again for
# t = 0 and 1, the values divisible by 16 and equal to 1).
@triton.jit(do_not_specialize=["t"])
def _step_fw_kernel(
    xg_ptr,  # [T, B, GATES*H] input dtype
    w_ptr,  # [GATES*H, P] input dtype: W_hh
    w_hr_ptr,  # [P, H] input dtype: W_hr (projection only)
    b_hn_ptr,  # [H] any float dtype: the GRU's b_hn (GATES == 3 only)
    bs_ptr,  # [T + 1] int32: active rows of each step, bs[T] = 0
    rst_ptr,  # [T + 2, cdiv(B, 64)] int64: resets of step t as bits of row t + 1 (HAS_RESETS; reset_rows)
    h_buf_ptr,  # [2, B, P] input dtype: slot t % 2 holds h_{t-1}
    c_ptr,  # [B, H] fp32: c_{t-1} on entry, c_t on exit (LSTM only)
    h_all_ptr,  # [T, B, P] input dtype
    m_buf_ptr,  # [B, H] fp32: m_t between the phases (projection only)
    ws_gates_ptr,  # [T, B, GATES*H] fp32: activated gates (written when STORE_WS)
    ws_c_ptr,  # [T, B, H] fp32: c_t, the GRU's hn (written when STORE_WS)
    ws_m_ptr,  # [T, B, H] fp32: m_t (written when STORE_WS and HAS_PROJ)
    t, B,  # the step
    H: tl.constexpr, P: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    PROJ_PHASE: tl.constexpr,  # False: phase A (cell, grid = tiles of B x H); True: phase B (grid = tiles of B x P)
    STORE_WS: tl.constexpr,
    HAS_RESETS: tl.constexpr,  # resets inside the sequence (rst_ptr); False: the kernel compiles as without
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # of h @ W_hh^T
    DOT_DTYPE: tl.constexpr,  # its operand dtype (see forward_dot_dtype)
    PROJ_PRECISION: tl.constexpr,  # of m @ W_hr^T
    GATES: tl.constexpr,  # the cell: 4 the LSTM, 3 the GRU (lstm_kernels/cells.py)
    FLOAT32_ACCURACY: tl.constexpr,  # float32 without TF32: correctly rounded divisions (_sigmoid)
):
    """One phase of step t; each program one tile."""
    tile = tl.program_id(0)
    n_t = tl.load(bs_ptr + t)
    if PROJ_PHASE:
        _fw_proj_tile(t, tile, n_t, w_hr_ptr, h_buf_ptr, h_all_ptr, m_buf_ptr, B, H, P, BLOCK_B, BLOCK_H, BLOCK_K,
                      PROJ_PRECISION)
    else:
        _fw_cell_tile(t, tile, n_t, xg_ptr, w_ptr, b_hn_ptr, rst_ptr, h_buf_ptr, c_ptr, h_all_ptr, m_buf_ptr,
                      ws_gates_ptr, ws_c_ptr, ws_m_ptr, B, H, P, HAS_PROJ, STORE_WS, HAS_RESETS, BLOCK_B, BLOCK_H,
                      BLOCK_K, DOT_PRECISION, DOT_DTYPE, GATES, FLOAT32_ACCURACY)


def step_forward(xg, w_hh, h0, c0, w_hr=None, batch_sizes=None, store_workspace=True, resets=None, cell=LSTM,
                 b_hn=None):
    """Forward recurrence with one launch per step (two with a projection: one per phase). xg [T, B, 4H],
    w_hh [4H, P], h0 [B, P], c0 [B, H], w_hr [P, H] or None, resets [T, B] bool on xg's device or None
    (a row where True starts that step from zero state). All in one dtype. The GRU (``cell="gru"``):
    xg [T, B, 3H], w_hh [3H, H], c0 and w_hr None, b_hn [H] or None.

    Returns h_all [T, B, P], h_T [B, P], c_T [B, H] fp32 (None for the GRU), and the workspace
    (gates [T, B, 4H], c_all [T, B, H] (+ m_all [T, B, H] with a projection); the GRU's: r, z, n
    [T, B, 3H] and hn [T, B, H]; all fp32) or () when not ``store_workspace``. Launches on the
    current CUDA device and stream (the caller's device guard).
    """
    T, B, gate_rows = xg.shape
    n_gates = gates(cell)
    H, P = gate_rows // n_gates, w_hh.shape[1]
    has_proj = w_hr is not None
    dtype, device = xg.dtype, xg.device
    xg, w_hh = xg.contiguous(), w_hh.contiguous()
    w_hr = w_hr.contiguous() if has_proj else w_hh  # never read without a projection
    cfg = step_config(max(H, P), B, dtype)
    bs = step_rows(batch_sizes, T, B, device)
    h_buf, c, h_all, m_buf, ws, ws_args = forward_buffers(xg, h0, c0, P, has_proj, store_workspace, n_gates)
    fw_prec, other_prec = dot_precisions(dtype)
    consts = dict(H=H, P=P, HAS_PROJ=has_proj, STORE_WS=store_workspace, HAS_RESETS=resets is not None,
                  BLOCK_B=cfg["BLOCK_B"], BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K"], DOT_PRECISION=fw_prec,
                  DOT_DTYPE=forward_dot_dtype(dtype), PROJ_PRECISION=other_prec, GATES=n_gates,
                  FLOAT32_ACCURACY=float32_accuracy(dtype), num_warps=cfg["num_warps"])
    args = (xg, w_hh, w_hr, recurrent_bias(b_hn, cell, H, xg), bs, reset_rows(resets, T, B, bs), h_buf, c, h_all,
            m_buf, *ws_args)
    cell_grid, proj_grid = (num_tiles(H, B, cfg),), (num_tiles(P, B, cfg),)
    for t in range(T):
        _step_fw_kernel[cell_grid](*args, t, B, PROJ_PHASE=False, **consts)
        if has_proj:
            _step_fw_kernel[proj_grid](*args, t, B, PROJ_PHASE=True, **consts)
    return h_all, h_buf[T % 2].clone(), c if c0 is not None else None, ws
