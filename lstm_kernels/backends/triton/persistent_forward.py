"""The persistent forward kernel built to the budget of one step (issue 12).

Dimension names (see :mod:`.persistent` for the design and the launch helpers):
    T steps, B batch rows, H hidden units, P state size (proj_size or H),
    4H the gate axis in PyTorch's order i, f, g, o (gate k of unit j is column k*H + j).
    U   = BLOCK_H units per program; its gate rows are 4U = GR rows of the interleaved W_hh
    BB  = BLOCK_B batch rows per program (the N side of the MMA)
    PB  = BLOCK_P state units per program in the projection phase (the M side there)

A program owns one (unit block u, batch tile) for the whole launch. Operands are swapped
so that W_hh rows are the M side:  gates^T [4U, BB] = W_u [4U, P] @ h_{t-1}^T [P, BB],
where W_u holds, unit-block-major, the rows [i; f; g; o] of the block's U units
(``interleave_gate_rows`` on the host), so ONE tl.dot per K piece yields all four gates of
the tile. K is split over the warps: the dot is a batched (3D) tl.dot of KS slices
[KS, 4U, K/KS] @ [KS, K/KS, BB], which Triton lays out with one slice per warp
(warpsPerCTA = [KS, 1, 1]), so no warp repeats another's MMA and each warp's chain of
dependent MMAs is K/KS deep; one cross-warp sum (tl.sum over the slices) follows. In the
summed layout each thread holds rows r, r + U, r + 2U, r + 3U of the tile, i.e. i, f, g, o
of one (unit, batch row) (the TTGIR at the flagship shape), so the split into gates moves
no data.

The GRU (GATES = 3; the same kernel, the cell its parameter): its 3U gate rows are not a power
of two, so they are two resident operands, not one padded to 4U: W_rz [2U, P] (rows [r; z] of
the block's units, interleaved as the LSTM's) and W_n [U, P], two tl.dots on the same h_{t-1}^T
(loaded once per K piece) and two cross-warp sums; U >= 16 so that neither dot pads MMA rows
(``persistent.GRU_UNIT_BLOCKS``). Then hn = the n sums + b_hn, n = tanh(xg_n + r * hn) and
h_t = (1 - z) n + z h_{t-1}, with h_{t-1} the kept h of the tile (in registers, as rounded).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .config import BARRIER_RUNTIME_ARGS
from .device_helpers import _activate, _reset_word, _step_arrive, _step_wait, _tanh, _word_keeps


@triton.jit
def _load_w_split(w_ptr, row0, ROWS: tl.constexpr, k0, K_LEN: tl.constexpr, KS: tl.constexpr, K: tl.constexpr,
                  OUT_DTYPE: tl.constexpr):
    """Rows [row0, row0 + ROWS) x columns [k0, k0 + K_LEN) of a row-major [*, K] matrix as KS
    K-slices [KS, ROWS, K_LEN / KS] (0 beyond K): a resident A operand, loaded once before the
    step loop (Triton keeps it as MMA register fragments: the load from shared memory is
    hoisted out of the loop)."""
    KW: tl.constexpr = K_LEN // KS
    ks = k0 + tl.arange(0, KS)[:, None, None] * KW + tl.arange(0, KW)[None, None, :]  # [KS, 1, KW]
    rows = row0 + tl.arange(0, ROWS)
    w = tl.load(w_ptr + rows[None, :, None] * K + ks, mask=ks < K, other=0.0)
    return w.to(OUT_DTYPE)


@triton.jit
def _load_t_split(src_ptr, b, b_in, k0, K_LEN: tl.constexpr, KS: tl.constexpr, K: tl.constexpr,
                  OUT_DTYPE: tl.constexpr):
    """src[b, k0:k0 + K_LEN]^T as KS K-slices [KS, K_LEN / KS, BB] (src [B, K] row-major, written by
    other programs in this launch: .cg, made visible by the grid barrier's acquire)."""
    KW: tl.constexpr = K_LEN // KS
    ks = k0 + tl.arange(0, KS)[:, None, None] * KW + tl.arange(0, KW)[None, :, None]  # [KS, KW, 1]
    v = tl.load(src_ptr + b[None, None, :] * K + ks, mask=(ks < K) & b_in[None, None, :], other=0.0,
                cache_modifier=".cg")
    return v.to(OUT_DTYPE)


@triton.jit
def _gate_offsets(j0, b, B, H: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, GATES: tl.constexpr,
                  FIRST: tl.constexpr):
    """Offsets into a [B, GATES*H] tensor of ROWS gate rows of the tile (gates FIRST, FIRST + 1, ... of
    units j0 ... j0 + U - 1, U rows each: the LSTM's i; f; g; o, the GRU's r; z or n) x batch rows
    b [BB], and which of them exist."""
    r = tl.arange(0, ROWS)
    j = j0 + r % BLOCK_H
    off = b[None, :] * (GATES * H) + ((FIRST + r // BLOCK_H) * H + j)[:, None]
    return off, (j < H)[:, None] & (b < B)[None, :]


@triton.jit
def _split_gates(acc, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr):
    """acc [4U, BB] (rows i; f; g; o of U units) -> four [U, BB] tensors i, f, g, o."""
    a = tl.permute(tl.reshape(acc, (4, BLOCK_H, BLOCK_B)), (1, 2, 0))  # [U, BB, gate]
    a = tl.reshape(a, (BLOCK_H, BLOCK_B, 2, 2))  # gate k = 2 * a + c
    ig, fo = tl.split(a)  # c = 0: gates 0, 2 (i, g); c = 1: gates 1, 3 (f, o)
    i, g = tl.split(ig)
    f, o = tl.split(fo)
    return i, f, g, o


@triton.jit
def _split_pair(acc, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr):
    """acc [2U, BB] (rows r; z of U units) -> two [U, BB] tensors r, z."""
    return tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_H, BLOCK_B)), (1, 2, 0)))


@triton.jit(do_not_specialize=BARRIER_RUNTIME_ARGS)
def _lstm_pfw_kernel(
    xg_ptr,  # [T, B, GATES*H] input dtype
    w_ptr,  # [NU * GATE_ROWS, P] input dtype: W_hh (the GRU's r, z rows), gate rows interleaved unit-block-major,
            # 0 beyond H
    w_hr_ptr,  # [NPB * PB, H] input dtype: W_hr, 0 beyond P (projection only)
    w_n_ptr,  # [NU * U, P] input dtype: the GRU's n rows of W_hh, 0 beyond H (GATES == 3 only)
    b_hn_ptr,  # [H] input dtype: the GRU's b_hn (GATES == 3 only)
    bs_ptr,  # [T + 1] int32: active rows per step, bs[T] = 0
    rst_ptr,  # [T + 2, cdiv(B, 64)] int64: resets of step t as bits of row t + 1 (HAS_RESETS; reset_rows)
    h_buf_ptr,  # [2, B, P] input dtype: slot t_begin % 2 holds h_{t_begin - 1} on entry
    c_ptr,  # [B, H] fp32: c on entry, c after the launch's last step on exit
    h_all_ptr,  # [T, B, P] input dtype
    m_buf_ptr,  # [B, H] fp32: m_t between the phases (projection only)
    ws_gates_ptr,  # [T, B, GATES*H] fp32: activated gates (STORE_WS)
    ws_c_ptr,  # [T, B, H] fp32: c_t, the GRU's hn (STORE_WS)
    ws_m_ptr,  # [T, B, H] fp32: m_t (STORE_WS and HAS_PROJ)
    bar_ptr,  # [2] int32, zeroed: grid-barrier counter, gave up (USE_BARRIER; barrier_args)
    rec_ptr,  # [4] int64: the device's barrier record (barrier_bound; USE_BARRIER)
    timeout_ns: tl.int64,  # a grid-barrier wait gives up after this long (0: no bound); runtime, not specialised
    kernel_code,  # this kernel's code in the record (barrier_bound.KERNELS)
    t_begin, n_steps, B,  # runs steps t_begin ... t_begin + n_steps - 1
    H: tl.constexpr, P: tl.constexpr,
    HAS_PROJ: tl.constexpr, RUN_CELL: tl.constexpr, RUN_PROJ: tl.constexpr,  # phases to run
    STORE_WS: tl.constexpr, USE_BARRIER: tl.constexpr,
    HAS_RESETS: tl.constexpr,  # resets inside the sequence (rst_ptr); False: the kernel compiles as without
    BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
    K1: tl.constexpr, K2: tl.constexpr,  # K pieces of h @ W_hh^T (k_pieces(P); K2 = 0: none)
    KS: tl.constexpr,  # warps that split K of h @ W_hh^T (each piece in KS slices)
    KSP: tl.constexpr,  # warps that split K of m @ W_hr^T
    KH1: tl.constexpr, KH2: tl.constexpr,  # K pieces of m @ W_hr^T (k_pieces(H))
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,  # of h @ W_hh^T and its operand dtype
    PROJ_PRECISION: tl.constexpr,  # of m @ W_hr^T (fp32 operands)
    GATES: tl.constexpr = 4,  # the cell: 4 the LSTM, 3 the GRU (no projection)
    GATE_ROWS: tl.constexpr = 0,  # rows of w_ptr's tile: 4U (LSTM), 2U (the GRU's r, z)
):
    """Persistent forward, one (unit block, batch tile) per program for all steps.

    Budget of one step (no projection; flagship B = 16, H = 768, fp16/bf16 on an H100: U = 8,
    BB = 16, 96 programs x 8 warps; W_u 32 x 768 16-bit = 48 KiB per program, kept as register
    fragments, 48 registers per thread; 48 KiB of shared memory for the per-step operands):
      * grid barrier: ONE per step, split: arrive (bar.sync + one release add by one thread)
        right after the stores of h_t; then the workspace of step t is stored and xg_{t+1},
        bs[t+1] are loaded (prefetch); then wait (every thread acquire-polls for itself: no
        block barrier in the wait, ``device_helpers._wait``).                         <= 0.7 us
      * h_{t-1}^T [P, BB] read once per step per program (one .cg load per K piece).  <= 0.3 us
      * MMA: 4U x BB x P from the resident W_u (never loaded from global inside the loop), K
        split over KS = 8 warps: 4U*BB*P / (16*8*16) / KS mma.m16n8k16 per warp, 24 at the
        flagship shape (a 2D tl.dot of the tile: 384, every warp the whole tile); then one
        cross-warp sum.                                                               <= 0.5 us
      * cell update on the summed accumulators (one thread holds i, f, g, o of its
        (unit, row)); c_t and the kept h stay in registers for all steps.  The elementwise
        work is repeated by the warps (the summed layout is the same in every warp): 4
        elements per thread; Triton stores each element once. One sigmoid over all the
        gates, the g rows' tanh taken from it as 2 sigmoid(2x) - 1 (``_activate``), and
        tanh c: 5 exponentials and 5 divisions per (unit, row), where a tanh and a sigmoid
        over all the gates, then selected, cost 9 of each. (So Triton 3.9 lays it out; 3.6
        computes the sigmoid a second time in the workspace store's layout, 22 MUFU.EX2 per
        thread and step at the flagship where 3.9 has 6: tests/test_triton_step_budget.py.) <= 0.2 us
    The GRU (GATES = 3) at the flagship shape: U = 16, 48 programs x 8 warps; W_rz [32, 768] and
    W_n [16, 768] resident (72 registers per thread); two dots on the one h_{t-1}^T load, 36
    mma.m16n8k16 per warp (the ideal for its 3U rows: no padded row), two cross-warp sums (one
    more than the LSTM's, the price of 3U rows not being one power-of-two tile), one grid barrier,
    at most six layout conversions (one per sum plus four).
    With a projection a second phase (PB state units per program, m^T [H, BB] read once,
    W_hr's slice resident in fp32, tf32 MMA for 16-bit inputs as in the step kernels)
    adds one grid barrier: two per step.
    The grid waits' time bound (``_wait``, ``barrier_bound``) adds nothing to a wait whose first poll
    finds the barrier open; after a closed poll it reads the abort flag and the GPU clock (one load and
    one clock read per extra poll, under the poll's own round trip).
    Per step, in the compiled loop: one cross-warp sum per product (one; two with a projection),
    one explicit block barrier per grid barrier (its arrive; none in the spin), no scalar atomic, at
    most one layout conversion per cross-warp sum plus four (the gate split and the h / c store
    layouts).
    Resets (HAS_RESETS): the flags of step t + 1 for the tile's BB rows are one scalar int64 load
    per step (their bits), prefetched with xg_{t+1} between arrive and wait. A row that resets
    gets h_{t-1} W_hh^T = 0 (a select on the summed accumulator: the same as reading h_{t-1} = 0)
    and c_{t-1} = 0 (a select on the register c); each select tests the row's bit in its own
    layout, so the step has the same MMAs, sums, barriers and layout conversions as without
    resets (test_triton_step_budget.py), plus a few integer ops per element.
    Guarded on the CPU by tests/test_triton_step_budget.py: MMA instructions per warp equal
    the ideal for the tile, no load of W_hh / W_hr from global memory (nor copy to shared
    memory) inside the step loop, one (two) grid-barrier arrivals per step, the sums, barriers
    and conversions above, the plan's shape, shared memory within the limit, no spills (sm_80
    and sm_90); each check with a mutant it must catch.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_bt = tl.cdiv(B, BLOCK_B)
    GR: tl.constexpr = GATE_ROWS
    # ---- the program's cell tile: unit block u, batch tile bt (programs beyond compute nothing)
    # (a program without a cell tile gets rows >= B: it loads and stores nothing)
    u = tl.minimum(pid // n_bt, tl.cdiv(H, BLOCK_H) - 1)
    b = tl.where(pid < tl.cdiv(H, BLOCK_H) * n_bt, (pid % n_bt) * BLOCK_B, B) + tl.arange(0, BLOCK_B)  # [BB]
    b_in = b < B
    j = u * BLOCK_H + tl.arange(0, BLOCK_H)  # [U] hidden units
    tile_in = (j < H)[:, None] & b_in[None, :]
    cell = b[None, :] * H + j[:, None]  # [U, BB] offsets into a [B, H] tensor
    if RUN_CELL:
        # W_hh slice of the tile, loaded once per launch: [4U, K1] and [4U, K2]
        w1 = _load_w_split(w_ptr, u * GR, GR, 0, K1, KS, P, DOT_DTYPE)
        if K2 > 0:
            w2 = _load_w_split(w_ptr, u * GR, GR, K1, K2, KS, P, DOT_DTYPE)
        g_off, g_in = _gate_offsets(u * BLOCK_H, b, B, H, BLOCK_H, GR, GATES, 0)  # [GR, BB]
        xg_t = tl.load(xg_ptr + t_begin * B * GATES * H + g_off, mask=g_in, other=0.0)  # xg_t, prefetched
        if GATES == 3:  # the GRU: W_n of the tile's units, b_hn, and xg_t's n rows
            wn1 = _load_w_split(w_n_ptr, u * BLOCK_H, BLOCK_H, 0, K1, KS, P, DOT_DTYPE)
            if K2 > 0:
                wn2 = _load_w_split(w_n_ptr, u * BLOCK_H, BLOCK_H, K1, K2, KS, P, DOT_DTYPE)
            b_hn = tl.load(b_hn_ptr + j, mask=j < H, other=0.0).to(tl.float32)  # [U]
            n_off, n_in = _gate_offsets(u * BLOCK_H, b, B, H, BLOCK_H, BLOCK_H, GATES, 2)  # [U, BB]
            xg_n = tl.load(xg_ptr + t_begin * B * GATES * H + n_off, mask=n_in, other=0.0)
        else:
            c_reg = tl.load(c_ptr + cell, mask=tile_in, other=0.0)  # fp32, on chip for all steps
            is_g = ((tl.arange(0, GR) // BLOCK_H) == 2)[:, None]  # the rows of gate g (tanh)
        if HAS_RESETS:
            row0 = (pid % n_bt) * BLOCK_B  # the batch tile's first row (b is >= B for a program without one)
            word = _reset_word(rst_ptr, t_begin, row0, B)  # the flags of step t
        if not HAS_PROJ:  # P == H: the kept h of the tile's rows
            h_keep = tl.load(h_buf_ptr + (t_begin % 2) * B * P + cell, mask=tile_in, other=0.0)
    # ---- the program's projection tile: state units q, same batch tile
    if HAS_PROJ:
        v = tl.minimum(pid // n_bt, tl.cdiv(P, BLOCK_P) - 1)
        bp = tl.where(pid < tl.cdiv(P, BLOCK_P) * n_bt, (pid % n_bt) * BLOCK_B, B) + tl.arange(0, BLOCK_B)  # [BB]
        q = v * BLOCK_P + tl.arange(0, BLOCK_P)  # [PB] state units
        ptile_in = (q < P)[:, None] & (bp < B)[None, :]
        state = bp[None, :] * P + q[:, None]  # [PB, BB] offsets into a [B, P] tensor
        if RUN_PROJ:
            r1 = _load_w_split(w_hr_ptr, v * BLOCK_P, BLOCK_P, 0, KH1, KSP, H, tl.float32)  # once
            if KH2 > 0:
                r2 = _load_w_split(w_hr_ptr, v * BLOCK_P, BLOCK_P, KH1, KH2, KSP, H, tl.float32)
            hp_keep = tl.load(h_buf_ptr + (t_begin % 2) * B * P + state, mask=ptile_in, other=0.0)
    n_t = tl.load(bs_ptr + t_begin)
    # while loops, not range(): runtime loop bounds break the interpreter with NumPy >= 2.
    s = 0
    arrivals = 0
    while s < n_steps:
        t = t_begin + s
        if RUN_CELL:
            h_prev = h_buf_ptr + (t % 2) * B * P
            # K split over KS warps: [KS, GR, BB] partial sums, then one cross-warp sum (the GRU: two dots
            # on the same h_{t-1}^T, [KS, 2U, BB] and [KS, U, BB], two sums)
            h_t1 = _load_t_split(h_prev, b, b_in, 0, K1, KS, P, DOT_DTYPE)
            acc = tl.dot(w1, h_t1, input_precision=DOT_PRECISION)
            if GATES == 3:
                acc_n = tl.dot(wn1, h_t1, input_precision=DOT_PRECISION)
            if K2 > 0:
                h_t2 = _load_t_split(h_prev, b, b_in, K1, K2, KS, P, DOT_DTYPE)
                acc = tl.dot(w2, h_t2, acc, input_precision=DOT_PRECISION)
                if GATES == 3:
                    acc_n = tl.dot(wn2, h_t2, acc_n, input_precision=DOT_PRECISION)
            acc = tl.sum(acc, axis=0)  # [GR, BB] fp32
            if HAS_RESETS:  # h_{t-1} = 0 on the rows that reset: their columns of h_{t-1} W_hh^T are 0
                acc = tl.where(_word_keeps(word, b)[None, :], acc, 0.0)
            pre = acc + xg_t.to(tl.float32)
            active = (j < H)[:, None] & (b < n_t)[None, :]
            if GATES == 3:
                act = tl.sigmoid(pre)  # [2U, BB]: r; z activated
                r, z = _split_pair(act, BLOCK_H, BLOCK_B)
                acc_n = tl.sum(acc_n, axis=0)  # [U, BB]: W_hn h_{t-1}
                h_carried = h_keep.to(tl.float32)
                if HAS_RESETS:
                    acc_n = tl.where(_word_keeps(word, b)[None, :], acc_n, 0.0)
                    h_carried = tl.where(_word_keeps(word, b)[None, :], h_carried, 0.0)
                hn = acc_n + b_hn[:, None]
                n = _tanh(xg_n.to(tl.float32) + r * hn, False)  # fp32 without tf32: only interpreted here
                m = (1.0 - z) * n + z * h_carried  # h_t before rounding
            else:
                act = _activate(pre, is_g)  # [4U, BB]: i; f; g; o activated
                i, f, g, o = _split_gates(act, BLOCK_H, BLOCK_B)
                if HAS_RESETS:
                    c_new = f * tl.where(_word_keeps(word, b)[None, :], c_reg, 0.0) + i * g
                else:
                    c_new = f * c_reg + i * g
                m = o * _tanh(c_new, False)
                c_reg = tl.where(active, c_new, c_reg)
            if HAS_PROJ:
                m = tl.where(active, m, tl.zeros_like(m))
                tl.store(m_buf_ptr + cell, m, mask=tile_in)
            else:  # h_t = m_t
                h_new = m.to(h_all_ptr.dtype.element_ty)
                h_keep = tl.where(active, h_new, h_keep)
                tl.store(h_buf_ptr + ((t + 1) % 2) * B * P + cell, h_keep, mask=tile_in)
        if HAS_PROJ and RUN_PROJ:
            if RUN_CELL:  # m_t complete before any h_t: the step's first barrier
                arrivals = _step_arrive(bar_ptr, arrivals, USE_BARRIER)
                if STORE_WS:
                    tl.store(ws_m_ptr + t * B * H + cell, m, mask=tile_in)
                _step_wait(bar_ptr, arrivals, nprog, t, rec_ptr, timeout_ns, kernel_code, USE_BARRIER)
            acc_p = tl.dot(r1, _load_t_split(m_buf_ptr, bp, bp < n_t, 0, KH1, KSP, H, tl.float32),
                           input_precision=PROJ_PRECISION)
            if KH2 > 0:
                acc_p = tl.dot(r2, _load_t_split(m_buf_ptr, bp, bp < n_t, KH1, KH2, KSP, H, tl.float32), acc_p,
                               input_precision=PROJ_PRECISION)
            acc_p = tl.sum(acc_p, axis=0)  # [PB, BB]
            hp_new = acc_p.to(h_all_ptr.dtype.element_ty)
            p_active = (q < P)[:, None] & (bp < n_t)[None, :]
            hp_keep = tl.where(p_active, hp_new, hp_keep)
            tl.store(h_buf_ptr + ((t + 1) % 2) * B * P + state, hp_keep, mask=ptile_in)
        elif HAS_PROJ and RUN_CELL and STORE_WS:  # the cell phase launched alone (step-by-step mode)
            tl.store(ws_m_ptr + t * B * H + cell, m, mask=tile_in)
        # ---- the step's (last) grid barrier: arrive, independent work, wait
        s += 1
        arrivals = _step_arrive(bar_ptr, arrivals, USE_BARRIER)
        # between arrive and wait: the prefetch of step t + 1's inputs first (their latency runs
        # under the wait), then the outputs of step t that nobody reads in this launch
        if RUN_CELL:
            t_next = t_begin + tl.minimum(s, n_steps - 1)  # xg_{t+1} (clamped at the end)
            xg_t = tl.load(xg_ptr + t_next * B * GATES * H + g_off, mask=g_in, other=0.0)
            if GATES == 3:
                xg_n = tl.load(xg_ptr + t_next * B * GATES * H + n_off, mask=n_in, other=0.0)
            if HAS_RESETS:
                word = _reset_word(rst_ptr, t_next, row0, B)
        n_t = tl.load(bs_ptr + t + 1)
        if HAS_PROJ and RUN_PROJ:
            tl.store(h_all_ptr + t * B * P + state, tl.where(p_active, hp_new, tl.zeros_like(hp_new)), mask=ptile_in)
        if RUN_CELL:
            if not HAS_PROJ:
                tl.store(h_all_ptr + t * B * P + cell, tl.where(active, h_new, tl.zeros_like(h_new)), mask=tile_in)
            if STORE_WS:
                tl.store(ws_gates_ptr + t * B * GATES * H + g_off, act, mask=g_in)
                if GATES == 3:
                    tl.store(ws_gates_ptr + t * B * GATES * H + n_off, n, mask=n_in)
                    tl.store(ws_c_ptr + t * B * H + cell, hn, mask=tile_in)
                else:
                    tl.store(ws_c_ptr + t * B * H + cell, c_reg, mask=tile_in)
        _step_wait(bar_ptr, arrivals, nprog, t, rec_ptr, timeout_ns, kernel_code, USE_BARRIER)
    if RUN_CELL and GATES == 4:
        tl.store(c_ptr + cell, c_reg, mask=tile_in)
