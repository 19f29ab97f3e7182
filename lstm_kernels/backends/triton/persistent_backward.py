"""The persistent backward kernel built to the budget of one step (issue 12).

Dimension names (see :mod:`.persistent` for the design and the launch helpers):
    T steps, B batch rows, H hidden units, P state size (proj_size or H),
    4H the gate axis in PyTorch's order i, f, g, o (gate k of unit j is column k*H + j).
    U   = UNITS real units per program, BLOCK_H >= max(16, U) rows of its MMA (rows >= U masked)
    BB  = BLOCK_B batch rows per program (the N side of the MMA)

A program owns one (unit block, batch tile) for the whole launch. Per step t = T-1 ... 0, -1:
    phase A (state units q):  dh^T [U, BB] = W_hh[:, q]^T [U, 4H] @ dG_{t+1}^T [4H, BB]
                              (rows not active at t+1: dh_T), + dh_all[t]; at t = -1 it is dh0
    phase B (cell units j):   dm = dh (no projection) or dm^T = W_hr[:, j]^T [U, P] @ dh^T [P, BB]
                              dc = dc + dm * o * (1 - tanh(c_t)^2)
                              dG_t = [dc*g*i(1-i), dc*c_{t-1}*f(1-f), dc*i*(1-g^2), dm*tanh(c_t)*o(1-o)]
                              dc = dc * f
Without a projection q == j: one tile, one grid barrier per step.

The GRU (GATES = 3, no projection): K = 3H, the exchange buffer holds [d_r, d_z, d_hn] (the
gradient of h_{t-1} W_hh^T's rows), and phase A adds the carry dh_{t+1} z_{t+1}, kept in
registers like the LSTM's dc:
    dh = [d_r, d_z, d_hn]_{t+1} W_hh + carry (+ dh_all[t]);  cell_grads._gru_grads gives
    d_r, d_z, d_n, d_hn = d_n r and the next carry dh z; the dG output takes [d_r, d_z, d_n].
"""
from __future__ import annotations

import triton
import triton.language as tl

from .config import BARRIER_RUNTIME_ARGS
from .cell_grads import _gru_grads, _lstm_grads
from .device_helpers import _reset_word, _step_arrive, _step_wait, _word_keeps
from .persistent_forward import _load_t_split
from .step_backward import _store_gates


@triton.jit
def _load_rows_split(w_ptr, row0, ROWS: tl.constexpr, n_rows, k0, K_LEN: tl.constexpr, KS: tl.constexpr,
                     K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Rows row0 + [0, ROWS) (those < row0 + n_rows exist) x columns [k0, k0 + K_LEN) of a row-major
    [*, K] matrix as KS K-slices [KS, ROWS, K_LEN / KS], 0 elsewhere: a resident A operand,
    loaded once before the step loop."""
    KW: tl.constexpr = K_LEN // KS
    ks = k0 + tl.arange(0, KS)[:, None, None] * KW + tl.arange(0, KW)[None, None, :]  # [KS, 1, KW]
    r = tl.arange(0, ROWS)
    w = tl.load(w_ptr + (row0 + r)[None, :, None] * K + ks, mask=(ks < K) & (r < n_rows)[None, :, None], other=0.0)
    return w.to(OUT_DTYPE)


@triton.jit
def _load_saved(ws_gates_ptr, ws_c_ptr, state0_ptr, hist_ptr, t, cell, gate, c_in, cp_in, B, H: tl.constexpr,
                GATES: tl.constexpr):
    """The forward's saved values of step t (clamped to 0) on the tile, fp32: the LSTM's i, f, g, o, c_t
    and c_{t-1}; the GRU's r, z, n, n (again: it has three gates), hn and h_{t-1}. The state that
    entered step t (c_{t-1} from ``hist_ptr`` = c_all, the GRU's h_{t-1} from h_all; ``state0_ptr`` at
    t = 0) is read where ``cp_in`` (c_in less the rows that reset at t), else 0."""
    tc = tl.maximum(t, 0)
    g_ptr = ws_gates_ptr + tc * B * GATES * H + gate
    s_0 = tl.load(g_ptr, mask=c_in, other=0.0)
    s_1 = tl.load(g_ptr + H, mask=c_in, other=0.0)
    s_2 = tl.load(g_ptr + 2 * H, mask=c_in, other=0.0)
    if GATES == 4:
        s_3 = tl.load(g_ptr + 3 * H, mask=c_in, other=0.0)
    else:
        s_3 = s_2
    s_c = tl.load(ws_c_ptr + tc * B * H + cell, mask=c_in, other=0.0)
    first = (tl.zeros_like(cell) + tc) == 0  # a tensor condition (scalar-and-tensor masks break Triton 3.9)
    hist = tl.load(hist_ptr + tl.maximum(tc - 1, 0) * B * H + cell, mask=cp_in & (first == 0), other=0.0)
    prev = hist.to(tl.float32) + tl.load(state0_ptr + cell, mask=cp_in & first, other=0.0).to(tl.float32)
    return s_0, s_1, s_2, s_3, s_c, prev


@triton.jit(do_not_specialize=BARRIER_RUNTIME_ARGS)
def _lstm_pbw_kernel(
    w_ptr,  # [P, GATES*H] input dtype: W_hh^T (row q: the gate weights of state unit q)
    w_hr_ptr,  # [H, P] input dtype: W_hr^T (projection only)
    bs_ptr,  # [T + 2] int32: active rows of step t at bs[t + 1]; bs[0] = bs[T + 1] = 0 (steps -1 and T)
    rst_ptr,  # [T + 2, cdiv(B, 64)] int64: resets of step t as bits of row t + 1 (HAS_RESETS; reset_rows)
    dh_all_ptr,  # [T, B, P] any float dtype
    dh_last_ptr,  # [B, P] any float dtype: dh_T
    ws_gates_ptr,  # [T, B, GATES*H] fp32: activated gates from forward
    ws_c_ptr,  # [T, B, H] fp32: c_t from forward (the GRU's hn)
    c0_ptr,  # [B, H] input dtype (the GRU's h0)
    dc_ptr,  # [B, H] fp32: dc on entry, dc after the launch's last step on exit (the GRU's carry dh_t z_t)
    dg_buf_ptr,  # [2, B, GATES*H] DOT_DTYPE storage (input dtype): dG_t in slot t % 2, the exchange buffer
                 # (the GRU's: d_r, d_z, d_hn, the gradient of the recurrent product)
    dg_ptr,  # [T, B, GATES*H] input dtype: dG output
    dh_buf_ptr,  # [B, P] fp32: dh_t between the phases (projection only)
    dh_hist_ptr,  # [T, B, P] fp32: dh_t on active rows, 0 elsewhere (projection only)
    dh0_ptr,  # [B, P] fp32: written at t = -1
    h_all_ptr,  # [T, B, H] input dtype: the forward's h_t (GRU only)
    d_hn_ptr,  # [T, B, H] input dtype: d_hn output (GRU only)
    bar_ptr,  # [2] int32, zeroed: grid-barrier counter, gave up (USE_BARRIER; barrier_args)
    rec_ptr,  # [4] int64: the device's barrier record (barrier_bound; USE_BARRIER)
    timeout_ns: tl.int64,  # a grid-barrier wait gives up after this long (0: no bound); runtime, not specialised
    kernel_code,  # this kernel's code in the record (barrier_bound.KERNELS)
    t_begin, n_steps, B,  # runs t = t_begin, t_begin - 1, ..., t_begin - n_steps + 1 (down to -1)
    H: tl.constexpr, P: tl.constexpr,
    HAS_PROJ: tl.constexpr, RUN_DH: tl.constexpr, RUN_CELL: tl.constexpr,  # phases to run
    USE_BARRIER: tl.constexpr,
    HAS_RESETS: tl.constexpr,  # resets inside the sequence (rst_ptr); False: the kernel compiles as without
    UNITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr,
    K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, K4: tl.constexpr,  # K = GATES*H in pieces (0: none;
    KS: tl.constexpr,  # backward_pieces), each split over KS warps
    KP1: tl.constexpr, KP2: tl.constexpr, KSP: tl.constexpr,  # of dh @ W_hr (k_pieces(P))
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,  # of dG @ W_hh, and its operand dtype
    PROJ_PRECISION: tl.constexpr,  # of dh @ W_hr (fp32 operands)
    GATES: tl.constexpr,  # the cell: 4 the LSTM, 3 the GRU (lstm_kernels/cells.py; the GRU has no projection)
):
    """Persistent backward, one (unit block, batch tile) per program for all steps.

    Budget of one step (no projection; flagship B = 16, H = 768, fp16/bf16 on an H100: U = 16
    units in 16 MMA rows (tl.dot needs M >= 16 on Triton 3.2, so fewer units would pad rows with
    zeros), BB = 16, 48 programs x 8 warps; W_hh[:, units]^T 16 x 3072 in 16 bits
    kept as register fragments, 96 registers per thread, loaded from global once; the GRU's
    16 x 2304, 72 registers):
      * grid barrier: ONE per step, split: arrive right after the stores of dG_t into the
        exchange buffer; then the dG output of step t is stored and the saved activations of
        step t-1 (gates, c_{t-1}, c_{t-2} or c0) and dh_all[t-1] are loaded (prefetch); then
        wait.                                                                         <= 0.7 us
      * dG_{t+1}^T [4H, BB] read once per step per program (48 x 96 KiB = 4.7 MB of L2 reads per
        step grid-wide), in 16 bits (.cg), in 3 pieces of
        1024 (fewer operand registers live at once; the GRU's 3H = 2304 in 1024 + 1024 + 256:
        ``backward_pieces`` pads no MMA where powers of two cover K).                 <= 0.3 us
      * MMA: 16 x BB x 4H from the resident slice, K split over KS = 8 warps:
        16*BB*4H / (16*8*16) / KS mma.m16n8k16 per warp, 48 at the flagship shape (the GRU's
        36; the step kernel streams W_hh from L2 every step: 384 tf32 MMAs per warp in a chain
        of 48 k-loop trips, 24 programs), then one cross-warp sum.                    <= 0.5 us
      * cell backward on the summed accumulators (cell_grads); dc (the GRU's carry dh z) in
        registers for all steps.                                                      <= 0.2 us
    16-bit dG_{t+1} operands (the exchange buffer holds dG_t rounded to the input dtype, the
    value the dG output has anyway) with fp32 accumulation: see ``persistent_backward``.
    With a projection a second phase (dm = dh @ W_hr, W_hr^T slice resident in fp32, tf32) adds
    one grid barrier: two per step.
    The grid waits' time bound (``_wait``, ``barrier_bound``) adds nothing to a wait whose first poll
    finds the barrier open; after a closed poll it reads the abort flag and the GPU clock (one load and
    one clock read per extra poll, under the poll's own round trip).
    Per step, in the compiled loop: one cross-warp sum per product (dG W_hh; and dh W_hr with a
    projection), one explicit block barrier per grid barrier (its arrive; none in the spin), no
    scalar atomic, at most one layout conversion per sum.
    Resets (HAS_RESETS): the flags of step t - 1 for the tile's BB rows are one scalar int64 load
    per step (their bits), prefetched with the saved activations between arrive and wait; those of
    steps t + 1 and t are carried in two registers. A row that resets at t reads c_{t-1} = 0 for
    its forget-gate gradient (the mask of the saved c_{t-1} load), passes dc_{t-1} = 0 (a select
    on the register dc) and, in the next step, dh_{t-1} = 0 (a select on the summed dG_t W_hh: the
    same as reading dG_t = 0); the GRU's carry is 0 there too. Each tests the row's bit in its own layout: the same MMAs, sums,
    barriers and layout conversions as without resets (test_triton_step_budget.py).
    Guarded on the CPU by tests/test_triton_step_budget.py (as the forward).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_bt = tl.cdiv(B, BLOCK_B)
    r = tl.arange(0, BLOCK_H)
    GH: tl.constexpr = GATES * H  # the gate axis, K of the recurrent product
    # ---- phase A tile: state units q (a program without one gets rows >= B: nothing loaded or stored)
    va = tl.minimum(pid // n_bt, tl.cdiv(P, UNITS) - 1)
    ba = tl.where(pid < tl.cdiv(P, UNITS) * n_bt, (pid % n_bt) * BLOCK_B, B) + tl.arange(0, BLOCK_B)
    q = va * UNITS + r
    q_ok = (r < UNITS) & (q < P)
    a_in = q_ok[:, None] & (ba < B)[None, :]
    state = ba[None, :] * P + q[:, None]  # [BLOCK_H, BB] offsets into a [B, P] tensor
    # ---- phase B tile: cell units j (== the phase A tile without a projection)
    uc = tl.minimum(pid // n_bt, tl.cdiv(H, UNITS) - 1)
    bc = tl.where(pid < tl.cdiv(H, UNITS) * n_bt, (pid % n_bt) * BLOCK_B, B) + tl.arange(0, BLOCK_B)
    j = uc * UNITS + r
    c_in = ((r < UNITS) & (j < H))[:, None] & (bc < B)[None, :]
    cell = bc[None, :] * H + j[:, None]  # [BLOCK_H, BB] offsets into a [B, H] tensor
    gate = bc[None, :] * GH + j[:, None]  # gate 0 of the tile in a [B, GATES*H] tensor
    cp_in = c_in  # where the state entered step t (c_{t-1}; the GRU's h_{t-1})
    if HAS_RESETS:
        # the first row of the batch tile of both phases (ba / bc are it, or rows >= B where a phase has none)
        row0 = (pid % n_bt) * BLOCK_B
        word_next = _reset_word(rst_ptr, t_begin + 1, row0, B)  # the flags of step t + 1
        word = _reset_word(rst_ptr, t_begin, row0, B)  # ... of step t
        cp_in = c_in & _word_keeps(word, bc)[None, :]
    if GATES == 4:  # the states that entered the steps after the first: c_all, or the GRU's h_all
        hist_ptr = ws_c_ptr
    else:
        hist_ptr = h_all_ptr
    if RUN_DH:
        # W_hh[:, q]^T, loaded once per launch: pieces [KS, BLOCK_H, K_i / KS]
        n_rows = tl.minimum(UNITS, P - va * UNITS)
        w1 = _load_rows_split(w_ptr, va * UNITS, BLOCK_H, n_rows, 0, K1, KS, GH, DOT_DTYPE)
        if K2 > 0:
            w2 = _load_rows_split(w_ptr, va * UNITS, BLOCK_H, n_rows, K1, K2, KS, GH, DOT_DTYPE)
        if K3 > 0:
            w3 = _load_rows_split(w_ptr, va * UNITS, BLOCK_H, n_rows, K1 + K2, K3, KS, GH, DOT_DTYPE)
        if K4 > 0:
            w4 = _load_rows_split(w_ptr, va * UNITS, BLOCK_H, n_rows, K1 + K2 + K3, K4, KS, GH, DOT_DTYPE)
        dh_t = tl.load(dh_all_ptr + tl.maximum(t_begin, 0) * B * P + state, mask=a_in, other=0.0)  # prefetch
    if RUN_CELL:
        if HAS_PROJ:  # W_hr[:, j]^T [H, P] rows j, fp32, loaded once
            r1 = _load_rows_split(w_hr_ptr, uc * UNITS, BLOCK_H, tl.minimum(UNITS, H - uc * UNITS), 0, KP1, KSP, P,
                                  tl.float32)
            if KP2 > 0:
                r2 = _load_rows_split(w_hr_ptr, uc * UNITS, BLOCK_H, tl.minimum(UNITS, H - uc * UNITS), KP1, KP2,
                                      KSP, P, tl.float32)
        # fp32, on chip for all steps: the LSTM's dc; the GRU's carry dh_{t+1} z_{t+1} (0 where step t + 1
        # did not carry the row)
        dc_reg = tl.load(dc_ptr + cell, mask=c_in, other=0.0)
        s_0, s_1, s_2, s_3, s_c, s_prev = _load_saved(ws_gates_ptr, ws_c_ptr, c0_ptr, hist_ptr, t_begin, cell, gate,
                                                      c_in, cp_in, B, H, GATES)
    n_next = tl.load(bs_ptr + t_begin + 2)
    n_t = tl.load(bs_ptr + t_begin + 1)
    # while loops, not range(): runtime loop bounds break the interpreter with NumPy >= 2.
    s = 0
    arrivals = 0
    while s < n_steps:
        t = t_begin - s
        if RUN_DH:
            dg_next = dg_buf_ptr + ((t + 1) % 2) * B * GH
            acc = tl.dot(w1, _load_t_split(dg_next, ba, ba < n_next, 0, K1, KS, GH, DOT_DTYPE),
                         input_precision=DOT_PRECISION)
            if K2 > 0:
                acc = tl.dot(w2, _load_t_split(dg_next, ba, ba < n_next, K1, K2, KS, GH, DOT_DTYPE), acc,
                             input_precision=DOT_PRECISION)
            if K3 > 0:
                acc = tl.dot(w3, _load_t_split(dg_next, ba, ba < n_next, K1 + K2, K3, KS, GH, DOT_DTYPE), acc,
                             input_precision=DOT_PRECISION)
            if K4 > 0:
                acc = tl.dot(w4, _load_t_split(dg_next, ba, ba < n_next, K1 + K2 + K3, K4, KS, GH, DOT_DTYPE), acc,
                             input_precision=DOT_PRECISION)
            dh = tl.sum(acc, axis=0)  # [BLOCK_H, BB] fp32: dG_{t+1} @ W_hh on rows active at t+1
            if GATES == 3:  # the GRU's dh_t also takes dh_{t+1} z_{t+1} directly (P == H: the cell's tile)
                dh += dc_reg
            if HAS_RESETS:  # nothing flows back across a reset at t + 1
                dh = tl.where(_word_keeps(word_next, ba)[None, :], dh, 0.0)
            dh_last = tl.load(dh_last_ptr + state, mask=a_in & (ba >= n_next)[None, :], other=0.0)  # dh_T (L1)
            dh = tl.where((ba >= n_next)[None, :], dh_last.to(tl.float32), dh)
            if t < 0:
                tl.store(dh0_ptr + state, dh, mask=a_in)
            a_active = q_ok[:, None] & (ba < n_t)[None, :]  # none at t = -1 (n_t = 0)
            dh += tl.where(a_active, dh_t.to(tl.float32), tl.zeros_like(dh))
            if HAS_PROJ:
                tl.store(dh_buf_ptr + state, dh, mask=a_in)
                if t >= 0:
                    tl.store(dh_hist_ptr + t * B * P + state, tl.where(a_active, dh, tl.zeros_like(dh)), mask=a_in)
        if RUN_CELL:
            if HAS_PROJ and RUN_DH:  # dh_t complete before any dm: the step's first barrier
                arrivals = _step_arrive(bar_ptr, arrivals, USE_BARRIER)
                _step_wait(bar_ptr, arrivals, nprog, t, rec_ptr, timeout_ns, kernel_code, USE_BARRIER)
            if HAS_PROJ:
                dm = tl.dot(r1, _load_t_split(dh_buf_ptr, bc, bc < n_t, 0, KP1, KSP, P, tl.float32),
                            input_precision=PROJ_PRECISION)
                if KP2 > 0:
                    dm = tl.dot(r2, _load_t_split(dh_buf_ptr, bc, bc < n_t, KP1, KP2, KSP, P, tl.float32), dm,
                                input_precision=PROJ_PRECISION)
                dm = tl.sum(dm, axis=0)
            else:
                dm = dh
            active = c_in & (bc < n_t)[None, :]  # none at t = -1 (n_t = 0): nothing stored
            carried = active  # less the rows that reset at t (the bits tested in the cell's own layout)
            if HAS_RESETS:
                carried = active & _word_keeps(word, bc)[None, :]
            # d_0 .. d_3: what the exchange buffer takes (the LSTM's d_i, d_f, d_g, d_o; the GRU's d_r, d_z,
            # d_hn) and, for the GRU, d_n (the dG output's third gate) in d_3
            if GATES == 4:
                d_0, d_1, d_2, d_3, dc_reg = _lstm_grads(dm, dc_reg, s_0, s_1, s_2, s_3, s_c, s_prev, active, carried,
                                                         HAS_RESETS, False)  # fp32 without tf32: only interpreted here
            else:
                d_0, d_1, d_3, d_2, dc_reg = _gru_grads(dm, s_0, s_1, s_2, s_c, s_prev, active, carried)
            _store_gates(dg_buf_ptr + (t % 2) * B * GH + gate, d_0, d_1, d_2, d_3, active, H, GATES)
        # ---- the step's (last) grid barrier: arrive, independent work, wait
        s += 1
        arrivals = _step_arrive(bar_ptr, arrivals, USE_BARRIER)
        # between arrive and wait: the prefetch of step t - 1's inputs first (their latency runs
        # under the wait), then the dG output of step t (zeros elsewhere), which nobody reads here
        if HAS_RESETS:
            word_next = word
            word = _reset_word(rst_ptr, tl.maximum(t - 1, -1), row0, B)  # step t - 1 (none after -1)
            cp_in = c_in & _word_keeps(word, bc)[None, :]
        if RUN_CELL:
            s_0, s_1, s_2, s_3, s_c, s_prev = _load_saved(ws_gates_ptr, ws_c_ptr, c0_ptr, hist_ptr, t - 1, cell, gate,
                                                          c_in, cp_in, B, H, GATES)
        if RUN_DH:
            dh_t = tl.load(dh_all_ptr + tl.maximum(t - 1, 0) * B * P + state, mask=a_in, other=0.0)
        if RUN_CELL:
            out = dg_ptr + t * B * GH + gate
            if GATES == 4:
                _store_gates(out, d_0, d_1, d_2, d_3, active, H, 4)
            else:
                _store_gates(out, d_0, d_1, d_3, d_3, active, H, 3)
                tl.store(d_hn_ptr + t * B * H + cell, d_2.to(d_hn_ptr.dtype.element_ty), mask=active)
        n_next = n_t
        n_t = tl.load(bs_ptr + tl.maximum(t, 0))  # step t - 1 (none at -1)
        _step_wait(bar_ptr, arrivals, nprog, t, rec_ptr, timeout_ns, kernel_code, USE_BARRIER)
    if RUN_CELL:
        tl.store(dc_ptr + cell, dc_reg, mask=c_in)
