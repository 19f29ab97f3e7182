"""Backward recurrence of the LSTM in Triton: the kernel and its launch helper.

Dimension names (see :mod:`.triton_kernels` for the whole design):
    T steps, B batch rows, H hidden units, P state size (proj_size or H),
    4H the gate axis in PyTorch's order i, f, g, o (gate k of unit j is column k*H + j).

Per phase t = T-1 ... 0, -1: phase A (tiles of B x P) dh = dG_{t+1} @ W_hh + dh_all[t]
(at t = -1 that is dh0); phase B (tiles of B x H) dm = dh @ W_hr (projection) or dh, then
the cell backward writes dG_t and updates dc. Without a projection both phases are one
tile pass (a tile of P == H units is a tile of H units).
With resets (HAS_RESETS; see triton_kernels) a row that resets at t gets dc_{t-1} = 0 and reads
c_{t-1} = 0 for its forget-gate gradient, and the next phase's load of dG_t reads 0 for it, so
dh_{t-1} = 0; per step one load of the tile's flags (_kept_rows) per dh tile (step t + 1) and
per cell tile (step t), an and on the dG row mask and a select on dc.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import barrier_bound, triton_persistent
from .device_rows import step_rows
from .triton_kernels import (
    RESIDENT_WARPS, backward_buffers, backward_resident_bytes, BARRIER_RUNTIME_ARGS, barrier_args,
    choose_variant, co_resident_programs, device_guard, dot_precisions, _dot_tile, launch_config, num_tiles,
    persistent_config, _phase_barrier, projection_weight_grad, record_kernel, resident_budget, resident_weights,
    _kept_rows, reset_rows, run_with_fallback, split_k, _tanh, tile_coords,
)


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
def _bw_load_resident(
    w_ptr,  # [4H, P] input dtype: W_hh
    cols,  # [BLOCK_H] state units of the program's one tile
    live,  # whether the program has a dh tile (a projection's grid may be larger); else nothing is read
    k_off, K_LEN: tl.constexpr,  # the piece's rows of W_hh: [k_off, k_off + K_LEN)
    H: tl.constexpr, P: tl.constexpr,
):
    """One piece of the program's W_hh[:, cols] slice, [K_LEN, BLOCK_H] in fp32 (zeros beyond 4H
    and P), loaded once before the step loop and kept on chip."""
    ks = k_off + tl.arange(0, K_LEN)
    # cols < (P if live else 0), not `(cols < P) & live`: Triton 3.9's interpreter turns a tensor
    # mask combined with a scalar bool into int32, which tl.load refuses.
    in_range = (ks < 4 * H)[:, None] & (cols < tl.where(live, P, 0))[None, :]
    w = tl.load(w_ptr + ks[:, None] * P + cols[None, :], mask=in_range, other=0.0)
    return w.to(tl.float32)


@triton.jit
def _bw_recurrent_resident(
    acc,  # [BLOCK_B, BLOCK_H] fp32: the sum so far
    dg_next_ptr,  # [B, 4H] fp32: dG_{t+1}
    w,  # [K_LEN, BLOCK_H] fp32: one resident piece (_bw_load_resident)
    rows, rows_in,  # [BLOCK_B] rows, and which of them to read (others count as 0)
    k_off, K_LEN: tl.constexpr, H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Adds dG_{t+1}[:, piece] @ W_hh[piece, cols] to ``acc``: one tl.dot."""
    ks = k_off + tl.arange(0, K_LEN)
    dg = tl.load(dg_next_ptr + rows[:, None] * (4 * H) + ks[None, :], mask=rows_in[:, None] & (ks < 4 * H)[None, :],
                 other=0.0, cache_modifier=".cg")
    return tl.dot(dg, w, acc, input_precision=DOT_PRECISION)


@triton.jit
def _bw_cell(
    t, n_t, rows, cols, dm,  # dm [BLOCK_B, BLOCK_H]: the gradient of m_t on this tile of B x H
    ws_gates_ptr,  # [T, B, 4H] fp32
    ws_c_ptr,  # [T, B, H] fp32
    c0_ptr,  # [B, H] input dtype
    dc_ptr,  # [B, H] fp32
    dg_buf_ptr,  # [2, B, 4H] fp32
    dg_ptr,  # [T, B, 4H] input dtype
    rst_ptr,  # [T + 2, cdiv(B, 64)] int64: resets (HAS_RESETS)
    B, H: tl.constexpr, HAS_RESETS: tl.constexpr,
):
    """The cell backward of step t on a tile: dG_t into dg_buf and the dG output, dc_{t-1} into dc.
    A row that resets at t used c_{t-1} = 0 and passes no dc_{t-1} back."""
    col_in = cols < H
    tile_in = (rows < B)[:, None] & col_in[None, :]
    active = (rows < n_t)[:, None] & col_in[None, :]
    cell = rows[:, None] * H + cols[None, :]  # offsets into a [B, H] tensor
    g_ptr = ws_gates_ptr + t * B * 4 * H + rows[:, None] * (4 * H) + cols[None, :]
    i = tl.load(g_ptr, mask=active, other=0.0)
    f = tl.load(g_ptr + H, mask=active, other=0.0)
    g = tl.load(g_ptr + 2 * H, mask=active, other=0.0)
    o = tl.load(g_ptr + 3 * H, mask=active, other=0.0)
    tanh_c = _tanh(tl.load(ws_c_ptr + t * B * H + cell, mask=active, other=0.0))
    carried = active  # where c_{t-1} entered step t
    if HAS_RESETS:
        carried = active & _kept_rows(rst_ptr, t, rows, B)[:, None]
    # A branch on the scalar t, not a mask `active & (t > 0)`: Triton 3.9's interpreter refuses a
    # mask built from a scalar bool.
    if t > 0:
        c_prev = tl.load(ws_c_ptr + (t - 1) * B * H + cell, mask=carried, other=0.0)
    else:
        c_prev = tl.load(c0_ptr + cell, mask=carried, other=0.0).to(tl.float32)

    dc_in = tl.load(dc_ptr + cell, mask=tile_in, other=0.0)
    dc = dc_in + dm * o * (1.0 - tanh_c * tanh_c)
    zero = tl.zeros_like(dc)
    d_i = tl.where(active, dc * g * i * (1.0 - i), zero)
    d_f = tl.where(active, dc * c_prev * f * (1.0 - f), zero)
    d_g = tl.where(active, dc * i * (1.0 - g * g), zero)
    d_o = tl.where(active, dm * tanh_c * o * (1.0 - o), zero)

    gate = rows[:, None] * (4 * H) + cols[None, :]  # gate i of [BLOCK_B, BLOCK_H] in a [B, 4H] tensor
    buf = dg_buf_ptr + (t % 2) * B * 4 * H + gate
    tl.store(buf, d_i, mask=tile_in)
    tl.store(buf + H, d_f, mask=tile_in)
    tl.store(buf + 2 * H, d_g, mask=tile_in)
    tl.store(buf + 3 * H, d_o, mask=tile_in)
    out = dg_ptr + t * B * 4 * H + gate
    out_ty = dg_ptr.dtype.element_ty
    tl.store(out, d_i.to(out_ty), mask=tile_in)
    tl.store(out + H, d_f.to(out_ty), mask=tile_in)
    tl.store(out + 2 * H, d_g.to(out_ty), mask=tile_in)
    tl.store(out + 3 * H, d_o.to(out_ty), mask=tile_in)
    if HAS_RESETS:
        tl.store(dc_ptr + cell, tl.where(active, tl.where(carried, dc * f, 0.0), dc_in), mask=tile_in)
    else:
        tl.store(dc_ptr + cell, tl.where(active, dc * f, dc_in), mask=tile_in)


# t_begin and n_steps change from launch to launch of the step variant: not specialised (Triton
# would compile each phase again for t = 1 and for t divisible by 16).
@triton.jit(do_not_specialize=["t_begin", "n_steps", *BARRIER_RUNTIME_ARGS])
def _lstm_bw_kernel(
    w_ptr,  # [4H, P] input dtype: W_hh
    w_hr_ptr,  # [P, H] input dtype: W_hr (projection only)
    bs_ptr,  # [T + 1] int32: active rows of each step, bs[T] = 0
    rst_ptr,  # [T + 2, cdiv(B, 64)] int64: resets of step t as bits of row t + 1 (HAS_RESETS; reset_rows)
    dh_all_ptr,  # [T, B, P] any float dtype
    dh_last_ptr,  # [B, P] any float dtype: dh_T
    ws_gates_ptr,  # [T, B, 4H] fp32: activated gates from forward
    ws_c_ptr,  # [T, B, H] fp32: c_t from forward
    c0_ptr,  # [B, H] input dtype
    dc_ptr,  # [B, H] fp32: dc_T on entry, dc0 on exit
    dg_buf_ptr,  # [2, B, 4H] fp32: dG_t in slot t % 2
    dg_ptr,  # [T, B, 4H] input dtype: dG output
    dh_buf_ptr,  # [B, P] fp32: dh_t between the phases (projection only)
    dh_hist_ptr,  # [T, B, P] fp32: dh_t for dW_hr (projection only)
    dh0_ptr,  # [B, P] fp32: dh0 output (written in phase t = -1)
    bar_ptr,  # [2] int32, zeroed: grid-barrier counter, gave up (USE_BARRIER; barrier_args)
    rec_ptr,  # [4] int64: the device's barrier record (barrier_bound; USE_BARRIER)
    timeout_ns: tl.int64,  # a grid-barrier wait gives up after this long (0: no bound); runtime, not specialised
    kernel_code,  # this kernel's code in the record (barrier_bound.KERNELS)
    t_begin, n_steps, B,  # runs t = t_begin, t_begin - 1, ..., t_begin - n_steps + 1 (down to -1)
    H: tl.constexpr, P: tl.constexpr,
    HAS_PROJ: tl.constexpr, RUN_DH: tl.constexpr, RUN_CELL: tl.constexpr,  # which phases to run
    USE_BARRIER: tl.constexpr,
    HAS_RESETS: tl.constexpr,  # resets inside the sequence (rst_ptr); False: the kernel compiles as without
    W_RESIDENT: tl.constexpr,  # load W_hh[:, tile] once and keep it on chip (persistent, one dh tile per program)
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    K1: tl.constexpr, K2: tl.constexpr,  # the resident slice's two K pieces (split_k(4H))
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_b_tiles = tl.cdiv(B, BLOCK_B)
    n_p_tiles = tl.cdiv(P, BLOCK_H)
    if W_RESIDENT:  # one dh tile per program (tile = pid): its W_hh slice stays on chip for all steps
        res_rows, res_cols = tile_coords(pid, n_p_tiles, BLOCK_B, BLOCK_H)
        live = pid < n_b_tiles * n_p_tiles
        w_res1 = _bw_load_resident(w_ptr, res_cols, live, 0, K1, H, P)
        w_res2 = _bw_load_resident(w_ptr, res_cols, live, K1, K2, H, P)
    # while loops, not range(): runtime loop bounds break the interpreter with NumPy >= 2.
    s = 0
    arrivals = 0  # grid barriers passed so far
    while s < n_steps:
        t = t_begin - s
        n_next = tl.load(bs_ptr + t + 1)
        n_t = tl.load(bs_ptr + tl.maximum(t, 0))
        dg_next_ptr = dg_buf_ptr + ((t + 1) % 2) * B * 4 * H
        if RUN_DH:
            tile = pid
            while tile < n_b_tiles * n_p_tiles:
                if W_RESIDENT:
                    rows, cols = res_rows, res_cols
                else:
                    rows, cols = tile_coords(tile, n_p_tiles, BLOCK_B, BLOCK_H)
                dg_in = rows < n_next  # rows whose dG_{t+1} flows into dh_t
                if HAS_RESETS:
                    dg_in = dg_in & _kept_rows(rst_ptr, t + 1, rows, B)
                acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                if W_RESIDENT:
                    acc = _bw_recurrent_resident(acc, dg_next_ptr, w_res1, rows, dg_in, 0, K1, H, DOT_PRECISION)
                    acc = _bw_recurrent_resident(acc, dg_next_ptr, w_res2, rows, dg_in, K1, K2, H, DOT_PRECISION)
                else:
                    acc = _dot_tile(acc, dg_next_ptr, 4 * H, rows, dg_in, w_ptr, P, 1, cols, cols < P, 4 * H,
                                    BLOCK_K, DOT_PRECISION)
                dh = _bw_dh_tile(t, rows, cols, n_next, acc, bs_ptr, dh_all_ptr, dh_last_ptr, dh_buf_ptr, dh_hist_ptr,
                                 dh0_ptr, B, P, HAS_PROJ)
                if not HAS_PROJ:  # P == H: this tile of P units is a tile of H units, dm = dh
                    if t >= 0:
                        _bw_cell(t, n_t, rows, cols, dh, ws_gates_ptr, ws_c_ptr, c0_ptr, dc_ptr, dg_buf_ptr, dg_ptr,
                                 rst_ptr, B, H, HAS_RESETS)
                tile += nprog
        if HAS_PROJ and RUN_CELL:
            if RUN_DH:  # dh_t complete before any dm
                arrivals = _phase_barrier(bar_ptr, arrivals, nprog, t, rec_ptr, timeout_ns, kernel_code, USE_BARRIER)
            if t >= 0:
                tile = pid
                n_h_tiles = tl.cdiv(H, BLOCK_H)
                while tile < n_b_tiles * n_h_tiles:
                    rows, cols = tile_coords(tile, n_h_tiles, BLOCK_B, BLOCK_H)
                    dm = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                    dm = _dot_tile(dm, dh_buf_ptr, P, rows, rows < n_t, w_hr_ptr, H, 1, cols, cols < H, P, BLOCK_K,
                                   DOT_PRECISION)  # dm = dh_t @ W_hr
                    _bw_cell(t, n_t, rows, cols, dm, ws_gates_ptr, ws_c_ptr, c0_ptr, dc_ptr, dg_buf_ptr, dg_ptr,
                             rst_ptr, B, H, HAS_RESETS)
                    tile += nprog
        s += 1
        # dG_t complete before phase t - 1
        arrivals = _phase_barrier(bar_ptr, arrivals, nprog, t, rec_ptr, timeout_ns, kernel_code, USE_BARRIER)


def lstm_backward(xg, w_hh, c0, w_hr, workspace, dh_all, dh_T, dc_T, batch_sizes=None, variant="auto", resets=None):
    """Backward recurrence from the forward workspace (see ``triton_forward.lstm_forward``), with the
    forward's ``resets`` [T, B] bool or None.

    Returns dG [T, B, 4H] in xg's dtype, dh0 [B, P] fp32, dc0 [B, H] fp32, and
    dW_hr [P, H] fp32 (one GEMM over the steps) or None without a projection.
    Variants, fallback and device as in ``triton_forward.lstm_forward``.
    """
    T, B, four_h = xg.shape
    H, P = four_h // 4, w_hh.shape[1]
    chosen = choose_variant(variant, max(H, P), B, launch_config(max(H, P), B, xg.dtype), xg.device)
    with device_guard(xg.device):
        barrier_bound.raise_if_gave_up(xg.device)  # an earlier call's persistent launch gave up
        return run_with_fallback(
            variant, chosen,
            lambda v: _backward(xg, w_hh, c0, w_hr, workspace, dh_all, dh_T, dc_T, batch_sizes, v, resets),
        )


def _backward(xg, w_hh, c0, w_hr, workspace, dh_all, dh_T, dc_T, batch_sizes, variant, resets=None):
    """lstm_backward with the variant resolved ("step" or "persistent"), on the current device."""
    T, B, four_h = xg.shape
    H, P = four_h // 4, w_hh.shape[1]
    has_proj = w_hr is not None
    dtype, device = xg.dtype, xg.device
    if variant == "persistent" and device.type == "cuda":  # the kernels at the budget of one step, where they fit
        plan = triton_persistent.backward_plan(B, H, P, dtype, device, has_proj)
        if isinstance(plan, dict):
            record_kernel("backward", "step_budget")
            return triton_persistent.persistent_backward(xg, w_hh, c0, w_hr, workspace, dh_all, dh_T, dc_T,
                                                         batch_sizes, cfg=plan, resets=resets)
    gates, c_all = workspace[:2]
    cfg = launch_config(max(H, P), B, dtype)
    record_kernel("backward", variant)
    if variant == "persistent":
        budget, programs = resident_budget(device), co_resident_programs(device)
        cfg = persistent_config(cfg, P, B, lambda c: backward_resident_bytes(H, c), budget, programs)
    k1, k2 = split_k(4 * H)
    bs = step_rows(batch_sizes, T, B, device)
    dc, dh0, dh_buf, dh_hist = backward_buffers(dc_T, T, P, has_proj)
    dg_buf = torch.empty((2, B, 4 * H), dtype=torch.float32, device=device)
    dG = torch.empty((T, B, 4 * H), dtype=dtype, device=device)
    _, bw_prec = dot_precisions(dtype)
    consts = dict(H=H, P=P, HAS_PROJ=has_proj, HAS_RESETS=resets is not None, BLOCK_B=cfg["BLOCK_B"],
                  BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K"], K1=k1, K2=k2, DOT_PRECISION=bw_prec,
                  num_warps=cfg["num_warps"])
    args = (w_hh.contiguous(), w_hr.contiguous() if has_proj else w_hh, bs, reset_rows(resets, T, B, bs),
            dh_all.contiguous(), dh_T.contiguous(), gates, c_all, c0.contiguous(), dc, dg_buf, dG, dh_buf, dh_hist, dh0)
    dh_tiles, cell_tiles = num_tiles(P, B, cfg), num_tiles(H, B, cfg)
    if variant == "persistent":
        grid = (min(max(dh_tiles, cell_tiles if has_proj else 0), programs),)
        resident = resident_weights(variant, grid[0], dh_tiles, backward_resident_bytes(H, cfg), budget)
        if resident:
            consts["num_warps"] = RESIDENT_WARPS
        barrier = barrier_args(device, "triton backward (persistent)")
        _lstm_bw_kernel[grid](*args, *barrier, T - 1, T + 1, B, RUN_DH=True, RUN_CELL=True,
                              USE_BARRIER=grid[0] > 1, W_RESIDENT=resident,
                              launch_cooperative_grid=grid[0] > 1, **consts)
        if grid[0] > 1:
            barrier_bound.after_launch(device, barrier[1])
    else:
        no_barrier = (bs, bs, 0, 0)  # never read without USE_BARRIER
        for t in range(T - 1, -2, -1):
            _lstm_bw_kernel[(dh_tiles,)](*args, *no_barrier, t, 1, B, RUN_DH=True, RUN_CELL=False, USE_BARRIER=False,
                                         W_RESIDENT=False, **consts)
            if has_proj and t >= 0:
                _lstm_bw_kernel[(cell_tiles,)](*args, *no_barrier, t, 1, B, RUN_DH=False, RUN_CELL=True,
                                               USE_BARRIER=False, W_RESIDENT=False, **consts)
    return dG, dh0, dc, projection_weight_grad(dh_hist, workspace[2]) if has_proj else None
