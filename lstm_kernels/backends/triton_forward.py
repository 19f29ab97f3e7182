"""Forward recurrence of the LSTM in Triton: the kernel and its launch helper.

Dimension names (see :mod:`.triton_kernels` for the whole design):
    T steps, B batch rows, H hidden units, P state size (proj_size or H),
    4H the gate axis in PyTorch's order i, f, g, o (gate k of unit j is column k*H + j).

Per step t: phase A (tiles of B x H): gates, cell update, m_t = o * tanh(c_t); without a
projection h_t = m_t is stored right there. Phase B (tiles of B x P, projection only):
h_t = m_t @ W_hr^T. See ``lstm_forward`` for the two variants.
With resets (HAS_RESETS; see triton_kernels) a row that resets at t reads h_{t-1} = 0 (the mask
of the h_{t-1} loads) and c_{t-1} = 0 in phase A; per step and cell tile one load of the
tile's flags (_kept_rows), an and on the h row mask and a select on c_{t-1}.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import barrier_bound, triton_persistent
from .device_rows import step_rows
from .triton_kernels import (
    RESIDENT_WARPS, BARRIER_RUNTIME_ARGS, barrier_args, choose_variant, co_resident_programs,
    device_guard, dot_precisions, _dot_tile, forward_buffers, forward_dot_dtype, forward_resident_bytes,
    launch_config, num_tiles, persistent_config, _phase_barrier, record_kernel, resident_budget,
    _kept_rows, reset_rows, resident_weights, run_with_fallback, split_k, _tanh, tile_coords,
)


@triton.jit
def _fw_gates_streamed(
    h_prev_ptr,  # [B, P] input dtype: h_{t-1}
    w_ptr,  # [4H, P] input dtype: W_hh
    rows, cols,  # [BLOCK_B] batch rows, [BLOCK_H] hidden units of this tile
    row_in,  # [BLOCK_B] the rows whose h_{t-1} is read (others count as 0: beyond B, or reset)
    H: tl.constexpr, P: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """h_{t-1} @ W_hh^T for the four gates of a tile, W_hh streamed from global memory (L2)
    in BLOCK_K chunks. Returns four [BLOCK_B, BLOCK_H] fp32 accumulators (i, f, g, o)."""
    col_in = cols < H
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < P
        # h_{t-1} was written by other programs (visible after the barrier; see triton_kernels).
        h = tl.load(h_prev_ptr + rows[:, None] * P + ks[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0,
                    cache_modifier=".cg").to(DOT_DTYPE)  # [BLOCK_B, BLOCK_K]
        w_mask = k_in[:, None] & col_in[None, :]
        w_t = w_ptr + cols[None, :] * P + ks[:, None]  # W_hh^T tile of gate i: [BLOCK_K, BLOCK_H]
        acc_i = tl.dot(h, tl.load(w_t, mask=w_mask, other=0.0).to(DOT_DTYPE), acc_i, input_precision=DOT_PRECISION)
        acc_f = tl.dot(h, tl.load(w_t + H * P, mask=w_mask, other=0.0).to(DOT_DTYPE), acc_f,
                       input_precision=DOT_PRECISION)
        acc_g = tl.dot(h, tl.load(w_t + 2 * H * P, mask=w_mask, other=0.0).to(DOT_DTYPE), acc_g,
                       input_precision=DOT_PRECISION)
        acc_o = tl.dot(h, tl.load(w_t + 3 * H * P, mask=w_mask, other=0.0).to(DOT_DTYPE), acc_o,
                       input_precision=DOT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _fw_load_resident(
    w_ptr,  # [4H, P] input dtype: W_hh
    cols,  # [BLOCK_H] hidden units of the program's one tile
    k_off, K_LEN: tl.constexpr,  # the piece's rows of W_hh^T: [k_off, k_off + K_LEN)
    H: tl.constexpr, P: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """One piece of the program's W_hh^T slice, four [K_LEN, BLOCK_H] tiles (i, f, g, o), loaded
    once before the step loop and kept on chip (zeros beyond P and H)."""
    ks = k_off + tl.arange(0, K_LEN)
    w_mask = (ks < P)[:, None] & (cols < H)[None, :]
    w_t = w_ptr + cols[None, :] * P + ks[:, None]
    w_i = tl.load(w_t, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_f = tl.load(w_t + H * P, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_g = tl.load(w_t + 2 * H * P, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_o = tl.load(w_t + 3 * H * P, mask=w_mask, other=0.0).to(DOT_DTYPE)
    return w_i, w_f, w_g, w_o


@triton.jit
def _fw_gates_resident(
    acc_i, acc_f, acc_g, acc_o,  # [BLOCK_B, BLOCK_H] fp32 each: the sums so far
    h_prev_ptr,  # [B, P] input dtype: h_{t-1}
    w_i, w_f, w_g, w_o,  # [K_LEN, BLOCK_H] each: one resident piece (_fw_load_resident)
    rows, row_in,  # [BLOCK_B] rows, and those whose h_{t-1} is read (others count as 0)
    k_off, K_LEN: tl.constexpr,  # the piece's rows
    P: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Adds h_{t-1}[:, piece] @ W_hh^T[piece] to the four gates' accumulators: one tl.dot per gate."""
    ks = k_off + tl.arange(0, K_LEN)
    h = tl.load(h_prev_ptr + rows[:, None] * P + ks[None, :], mask=row_in[:, None] & (ks < P)[None, :],
                other=0.0, cache_modifier=".cg").to(DOT_DTYPE)  # [BLOCK_B, K_LEN]
    acc_i = tl.dot(h, w_i, acc_i, input_precision=DOT_PRECISION)
    acc_f = tl.dot(h, w_f, acc_f, input_precision=DOT_PRECISION)
    acc_g = tl.dot(h, w_g, acc_g, input_precision=DOT_PRECISION)
    acc_o = tl.dot(h, w_o, acc_o, input_precision=DOT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _fw_cell_tile(
    t, rows, cols, n_t,
    carried,  # [BLOCK_B] the rows that carry c_{t-1} into step t (HAS_RESETS: not reset at t)
    acc_i, acc_f, acc_g, acc_o,  # [BLOCK_B, BLOCK_H] fp32 each: h_{t-1} @ W_hh^T of the four gates
    xg_ptr,  # [T, B, 4H] input dtype
    h_buf_ptr,  # [2, B, P] input dtype
    c_ptr,  # [B, H] fp32
    h_all_ptr,  # [T, B, P] input dtype
    m_buf_ptr,  # [B, H] fp32 (projection only)
    ws_gates_ptr,  # [T, B, 4H] fp32
    ws_c_ptr,  # [T, B, H] fp32
    ws_m_ptr,  # [T, B, H] fp32 (projection only)
    B, H: tl.constexpr, P: tl.constexpr,
    HAS_PROJ: tl.constexpr, STORE_WS: tl.constexpr, HAS_RESETS: tl.constexpr,
):
    """The pointwise part of step t on a tile: gates, cell update, m_t (and h_t without a projection).
    A row that resets at t starts from c_{t-1} = 0; an inactive row keeps its c either way."""
    row_in = rows < B
    col_in = cols < H
    tile_in = row_in[:, None] & col_in[None, :]
    h_prev_ptr = h_buf_ptr + (t % 2) * B * P  # [B, P]
    x_ptr = xg_ptr + t * B * 4 * H + rows[:, None] * (4 * H) + cols[None, :]  # gate i of [BLOCK_B, BLOCK_H]
    i = tl.sigmoid(acc_i + tl.load(x_ptr, mask=tile_in, other=0.0).to(tl.float32))
    f = tl.sigmoid(acc_f + tl.load(x_ptr + H, mask=tile_in, other=0.0).to(tl.float32))
    g = _tanh(acc_g + tl.load(x_ptr + 2 * H, mask=tile_in, other=0.0).to(tl.float32))
    o = tl.sigmoid(acc_o + tl.load(x_ptr + 3 * H, mask=tile_in, other=0.0).to(tl.float32))

    cell = rows[:, None] * H + cols[None, :]  # offsets into a [B, H] tensor
    c_prev = tl.load(c_ptr + cell, mask=tile_in, other=0.0)
    if HAS_RESETS:
        c_new = f * tl.where(carried[:, None], c_prev, 0.0) + i * g
    else:
        c_new = f * c_prev + i * g
    m = o * _tanh(c_new)
    active = (rows < n_t)[:, None] & col_in[None, :]
    c_new = tl.where(active, c_new, c_prev)
    tl.store(c_ptr + cell, c_new, mask=tile_in)
    if HAS_PROJ:
        m = tl.where(active, m, tl.zeros_like(m))
        tl.store(m_buf_ptr + cell, m, mask=tile_in)
        if STORE_WS:
            tl.store(ws_m_ptr + t * B * H + cell, m, mask=tile_in)
    else:  # P == H: h_t = m_t
        h_new = m.to(h_all_ptr.dtype.element_ty)
        h_keep = tl.load(h_prev_ptr + cell, mask=tile_in, other=0.0, cache_modifier=".cg")
        tl.store(h_all_ptr + t * B * H + cell, tl.where(active, h_new, tl.zeros_like(h_new)), mask=tile_in)
        tl.store(h_buf_ptr + ((t + 1) % 2) * B * H + cell, tl.where(active, h_new, h_keep), mask=tile_in)
    if STORE_WS:
        ws_ptr = ws_gates_ptr + t * B * 4 * H + rows[:, None] * (4 * H) + cols[None, :]
        tl.store(ws_ptr, i, mask=tile_in)
        tl.store(ws_ptr + H, f, mask=tile_in)
        tl.store(ws_ptr + 2 * H, g, mask=tile_in)
        tl.store(ws_ptr + 3 * H, o, mask=tile_in)
        tl.store(ws_c_ptr + t * B * H + cell, c_new, mask=tile_in)


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
    rows, cols = tile_coords(tile, tl.cdiv(P, BLOCK_H), BLOCK_B, BLOCK_H)  # cols: state units
    col_in = cols < P
    tile_in = (rows < B)[:, None] & col_in[None, :]
    active = (rows < n_t)[:, None] & col_in[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    # h_t = m_t @ W_hr^T: M[k, n] = W_hr[n, k]
    acc = _dot_tile(acc, m_buf_ptr, H, rows, rows < n_t, w_hr_ptr, 1, H, cols, col_in, H, BLOCK_K, DOT_PRECISION)
    h_new = acc.to(h_all_ptr.dtype.element_ty)
    state = rows[:, None] * P + cols[None, :]  # offsets into a [B, P] tensor
    h_keep = tl.load(h_buf_ptr + (t % 2) * B * P + state, mask=tile_in, other=0.0, cache_modifier=".cg")
    tl.store(h_all_ptr + t * B * P + state, tl.where(active, h_new, tl.zeros_like(h_new)), mask=tile_in)
    tl.store(h_buf_ptr + ((t + 1) % 2) * B * P + state, tl.where(active, h_new, h_keep), mask=tile_in)


# t_begin and n_steps change from launch to launch of the step variant: not specialised (Triton
# would compile each phase again for t = 0 and 1, the values divisible by 16 and equal to 1).
@triton.jit(do_not_specialize=["t_begin", "n_steps", *BARRIER_RUNTIME_ARGS])
def _lstm_fw_kernel(
    xg_ptr,  # [T, B, 4H] input dtype
    w_ptr,  # [4H, P] input dtype: W_hh
    w_hr_ptr,  # [P, H] input dtype: W_hr (projection only)
    bs_ptr,  # [T + 1] int32: active rows of each step, bs[T] = 0
    rst_ptr,  # [T + 2, cdiv(B, 64)] int64: resets of step t as bits of row t + 1 (HAS_RESETS; reset_rows)
    h_buf_ptr,  # [2, B, P] input dtype: slot 0 holds h0 on entry
    c_ptr,  # [B, H] fp32: c0 on entry, c_T on exit
    h_all_ptr,  # [T, B, P] input dtype
    m_buf_ptr,  # [B, H] fp32: m_t between the phases (projection only)
    ws_gates_ptr,  # [T, B, 4H] fp32: activated gates (written when STORE_WS)
    ws_c_ptr,  # [T, B, H] fp32: c_t (written when STORE_WS)
    ws_m_ptr,  # [T, B, H] fp32: m_t (written when STORE_WS and HAS_PROJ)
    bar_ptr,  # [2] int32, zeroed: grid-barrier counter, gave up (USE_BARRIER; barrier_args)
    rec_ptr,  # [4] int64: the device's barrier record (barrier_bound; USE_BARRIER)
    timeout_ns: tl.int64,  # a grid-barrier wait gives up after this long (0: no bound); runtime, not specialised
    kernel_code,  # this kernel's code in the record (barrier_bound.KERNELS)
    t_begin, n_steps, B,  # runs steps t_begin ... t_begin + n_steps - 1
    H: tl.constexpr, P: tl.constexpr,
    HAS_PROJ: tl.constexpr, RUN_CELL: tl.constexpr, RUN_PROJ: tl.constexpr,  # which phases to run
    STORE_WS: tl.constexpr, USE_BARRIER: tl.constexpr,
    HAS_RESETS: tl.constexpr,  # resets inside the sequence (rst_ptr); False: the kernel compiles as without
    W_RESIDENT: tl.constexpr,  # load W_hh once and keep it on chip (persistent, one cell tile per program)
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    K1: tl.constexpr, K2: tl.constexpr,  # the resident slice's two K pieces (split_k(P))
    DOT_PRECISION: tl.constexpr,  # of h @ W_hh^T
    DOT_DTYPE: tl.constexpr,  # its operand dtype (see forward_dot_dtype)
    PROJ_PRECISION: tl.constexpr,  # of m @ W_hr^T
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_h_tiles = tl.cdiv(H, BLOCK_H)
    n_cell_tiles = tl.cdiv(B, BLOCK_B) * n_h_tiles
    if W_RESIDENT:  # one cell tile per program (tile = pid): its W_hh slice stays on chip for all steps
        rows, cols = tile_coords(pid, n_h_tiles, BLOCK_B, BLOCK_H)
        w_i1, w_f1, w_g1, w_o1 = _fw_load_resident(w_ptr, cols, 0, K1, H, P, DOT_DTYPE)
        w_i2, w_f2, w_g2, w_o2 = _fw_load_resident(w_ptr, cols, K1, K2, H, P, DOT_DTYPE)
    # while loops, not range(): runtime loop bounds break the interpreter with NumPy >= 2.
    s = 0
    arrivals = 0  # grid barriers passed so far
    while s < n_steps:
        t = t_begin + s
        n_t = tl.load(bs_ptr + t)
        h_prev_ptr = h_buf_ptr + (t % 2) * B * P
        if RUN_CELL:
            if W_RESIDENT:
                if pid < n_cell_tiles:
                    h_in = rows < B  # the rows whose h_{t-1}, c_{t-1} enter step t
                    if HAS_RESETS:
                        h_in = h_in & _kept_rows(rst_ptr, t, rows, B)
                    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                    acc_f, acc_g, acc_o = acc_i, acc_i, acc_i
                    acc_i, acc_f, acc_g, acc_o = _fw_gates_resident(acc_i, acc_f, acc_g, acc_o, h_prev_ptr, w_i1, w_f1,
                                                                    w_g1, w_o1, rows, h_in, 0, K1, P, DOT_PRECISION,
                                                                    DOT_DTYPE)
                    acc_i, acc_f, acc_g, acc_o = _fw_gates_resident(acc_i, acc_f, acc_g, acc_o, h_prev_ptr, w_i2, w_f2,
                                                                    w_g2, w_o2, rows, h_in, K1, K2, P, DOT_PRECISION,
                                                                    DOT_DTYPE)
                    _fw_cell_tile(t, rows, cols, n_t, h_in, acc_i, acc_f, acc_g, acc_o, xg_ptr, h_buf_ptr, c_ptr,
                                  h_all_ptr, m_buf_ptr, ws_gates_ptr, ws_c_ptr, ws_m_ptr, B, H, P, HAS_PROJ, STORE_WS,
                                  HAS_RESETS)
            else:
                tile = pid
                while tile < n_cell_tiles:
                    rows, cols = tile_coords(tile, n_h_tiles, BLOCK_B, BLOCK_H)
                    h_in = rows < B
                    if HAS_RESETS:
                        h_in = h_in & _kept_rows(rst_ptr, t, rows, B)
                    acc_i, acc_f, acc_g, acc_o = _fw_gates_streamed(h_prev_ptr, w_ptr, rows, cols, h_in, H, P, BLOCK_B,
                                                                    BLOCK_H, BLOCK_K, DOT_PRECISION, DOT_DTYPE)
                    _fw_cell_tile(t, rows, cols, n_t, h_in, acc_i, acc_f, acc_g, acc_o, xg_ptr, h_buf_ptr, c_ptr,
                                  h_all_ptr, m_buf_ptr, ws_gates_ptr, ws_c_ptr, ws_m_ptr, B, H, P, HAS_PROJ, STORE_WS,
                                  HAS_RESETS)
                    tile += nprog
        if HAS_PROJ and RUN_PROJ:
            if RUN_CELL:  # m_t complete before any h_t
                arrivals = _phase_barrier(bar_ptr, arrivals, nprog, t, rec_ptr, timeout_ns, kernel_code, USE_BARRIER)
            tile = pid
            while tile < tl.cdiv(B, BLOCK_B) * tl.cdiv(P, BLOCK_H):
                _fw_proj_tile(t, tile, n_t, w_hr_ptr, h_buf_ptr, h_all_ptr, m_buf_ptr, B, H, P,
                              BLOCK_B, BLOCK_H, BLOCK_K, PROJ_PRECISION)
                tile += nprog
        s += 1
        # h_t complete before step t + 1
        arrivals = _phase_barrier(bar_ptr, arrivals, nprog, t, rec_ptr, timeout_ns, kernel_code, USE_BARRIER)


def lstm_forward(xg, w_hh, h0, c0, w_hr=None, batch_sizes=None, store_workspace=True, variant="auto", resets=None):
    """Forward recurrence. xg [T, B, 4H], w_hh [4H, P], h0 [B, P], c0 [B, H], w_hr [P, H] or None,
    resets [T, B] bool on xg's device or None (a row where True starts that step from zero state).

    All in one dtype. Returns h_all [T, B, P], h_T [B, P], c_T [B, H] fp32, and the
    workspace (gates [T, B, 4H], c_all [T, B, H] (+ m_all [T, B, H] with a projection),
    all fp32) or () when not ``store_workspace``.

    step: one launch per step and phase (grid = that phase's tiles). persistent: one
    launch (grid = min(tiles, SMs)) with a grid barrier after each phase; when ``auto``
    chose it and the driver refuses the cooperative launch, step runs instead.
    The kernels run on xg's device, on its current stream.
    """
    T, B, four_h = xg.shape
    H, P = four_h // 4, w_hh.shape[1]
    chosen = choose_variant(variant, max(H, P), B, launch_config(max(H, P), B, xg.dtype), xg.device)
    with device_guard(xg.device):
        barrier_bound.raise_if_gave_up(xg.device)  # an earlier call's persistent launch gave up
        return run_with_fallback(
            variant, chosen, lambda v: _forward(xg, w_hh, h0, c0, w_hr, batch_sizes, store_workspace, v, resets)
        )


def _forward(xg, w_hh, h0, c0, w_hr, batch_sizes, store_workspace, variant, resets=None):
    """lstm_forward with the variant resolved ("step" or "persistent"), on the current device."""
    T, B, four_h = xg.shape
    H, P = four_h // 4, w_hh.shape[1]
    has_proj = w_hr is not None
    dtype, device = xg.dtype, xg.device
    if variant == "persistent" and device.type == "cuda":  # the kernels at the budget of one step, where they fit
        plan = triton_persistent.forward_plan(B, H, P, dtype, device, has_proj)
        if isinstance(plan, dict):
            record_kernel("forward", "step_budget")
            return triton_persistent.persistent_forward(xg, w_hh, h0, c0, w_hr, batch_sizes, store_workspace,
                                                        cfg=plan, resets=resets)
    xg, w_hh = xg.contiguous(), w_hh.contiguous()
    w_hr = w_hr.contiguous() if has_proj else w_hh  # never read without a projection
    cfg = launch_config(max(H, P), B, dtype)
    record_kernel("forward", variant)
    if variant == "persistent":
        budget, programs = resident_budget(device), co_resident_programs(device)
        cfg = persistent_config(cfg, H, B, lambda c: forward_resident_bytes(P, c, dtype), budget, programs)
    k1, k2 = split_k(P)
    bs = step_rows(batch_sizes, T, B, device)
    h_buf, c, h_all, m_buf, ws, ws_args = forward_buffers(xg, h0, c0, P, has_proj, store_workspace)
    fw_prec, other_prec = dot_precisions(dtype)
    consts = dict(H=H, P=P, HAS_PROJ=has_proj, STORE_WS=store_workspace, HAS_RESETS=resets is not None,
                  BLOCK_B=cfg["BLOCK_B"], BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K"], K1=k1, K2=k2,
                  DOT_PRECISION=fw_prec, DOT_DTYPE=forward_dot_dtype(dtype), PROJ_PRECISION=other_prec, num_warps=cfg["num_warps"])
    args = (xg, w_hh, w_hr, bs, reset_rows(resets, T, B, bs), h_buf, c, h_all, m_buf, *ws_args)
    cell_tiles, proj_tiles = num_tiles(H, B, cfg), num_tiles(P, B, cfg)
    if variant == "persistent":
        grid = (min(max(cell_tiles, proj_tiles if has_proj else 0), programs),)
        resident = resident_weights(variant, grid[0], cell_tiles, forward_resident_bytes(P, cfg, dtype), budget)
        if resident:
            consts["num_warps"] = RESIDENT_WARPS
        barrier = barrier_args(device, "triton forward (persistent)")
        _lstm_fw_kernel[grid](*args, *barrier, 0, T, B, RUN_CELL=True, RUN_PROJ=True, USE_BARRIER=grid[0] > 1,
                              W_RESIDENT=resident, launch_cooperative_grid=grid[0] > 1, **consts)
        if grid[0] > 1:
            barrier_bound.after_launch(device, barrier[1])
    else:
        no_barrier = (bs, bs, 0, 0)  # never read without USE_BARRIER
        for t in range(T):
            _lstm_fw_kernel[(cell_tiles,)](*args, *no_barrier, t, 1, B, RUN_CELL=True, RUN_PROJ=False,
                                           USE_BARRIER=False, W_RESIDENT=False, **consts)
            if has_proj:
                _lstm_fw_kernel[(proj_tiles,)](*args, *no_barrier, t, 1, B, RUN_CELL=False, RUN_PROJ=True,
                                               USE_BARRIER=False, W_RESIDENT=False, **consts)
    h_T = h_buf[T % 2].clone()
    return h_all, h_T, c, ws
