"""Device functions (``@triton.jit``) shared by the kernels: tanh, the grid barrier's two halves
and its clock, the reset flags of a tile's rows, the tile coordinates and a streamed tl.dot.

The grid barrier (persistent kernels only): data other programs wrote in the launch (h_buf,
m_buf, dh_buf, dg_buf) is made visible by it: bar.sync, then one release arrival per program
(``_arrive``), and acquire loads in the spin, by every thread (``_wait``; PTX memory model, as
cooperative groups' grid sync). Its atomics are inline PTX, so that its arrival passes one block
barrier and its spin none, where Triton's scalar atomics passed two per arrival and two per poll
(Triton's own shared-memory analysis may still place one after the spin, before the step's first
shared-memory write). Loads of such data also ask for cache_modifier=".cg"; Triton may lower
them otherwise (cp.async through L1), which the acquire makes correct anyway. Every spin is
bounded in time (LSTM_KERNELS_BARRIER_TIMEOUT seconds, default 10; a runtime argument, so the
binary verification proves is the one that serves): a launch whose wait gave up ends early and
the next call on that device raises, naming the kernel, the step and the program (``barrier_bound``).
"""
from __future__ import annotations

import time

import triton
import triton.language as tl

from .config import interpreting


@triton.jit
def _sigmoid(x, FLOAT32_ACCURACY: tl.constexpr):
    """1 / (1 + exp(-x)). tl.sigmoid's division is div.full.f32, within 2 ulp and with no promise that its
    errors are unbiased; at float32 accuracy (float32 without TF32, ``config.float32_accuracy``) the
    division is correctly rounded, as in the CUDA kernels' precise activations: a division that errs one
    way moves every forget gate the same way, and over a long memory that piles up in c past float32's
    tolerance (tests/test_cell_error_budget.py)."""
    if FLOAT32_ACCURACY:
        return tl.math.div_rn(1.0, 1.0 + tl.exp(-x))
    return tl.sigmoid(x)


@triton.jit
def _tanh(x, FLOAT32_ACCURACY: tl.constexpr):
    # tanh(x) = 2 sigmoid(2x) - 1: one exponential and one division, what a sigmoid costs, so that a
    # tensor of gates can take its g rows' tanh from the one sigmoid of the whole tensor (_activate).
    # 2x and 2s are exact; the result's error is the sigmoid's, doubled (about 1e-7 absolute), and it
    # saturates to -1 and 1 without overflow (exp(-2x) = inf gives s = 0).
    return 2.0 * _sigmoid(2.0 * x, FLOAT32_ACCURACY) - 1.0


@triton.jit
def _activate(pre, is_tanh):
    """tanh where ``is_tanh``, else sigmoid, elementwise, through one sigmoid of the whole tensor: the
    same bits as tl.where(is_tanh, _tanh(pre, False), tl.sigmoid(pre)), half its exponentials and divisions
    (16 bits and tf32: the persistent forward, which float32 without TF32 runs only when interpreted)."""
    s = tl.sigmoid(tl.where(is_tanh, 2.0 * pre, pre))
    return tl.where(is_tanh, 2.0 * s - 1.0, s)


# ----------------------------------------------------------------------------- the grid barrier


@triton.jit
def _gpu_clock_ns():
    """The GPU's global timer in ns (%globaltimer)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _host_clock_ns():
    """The clock of the interpreter (TRITON_INTERPRET=1 runs no inline asm): the host's monotonic
    clock in ns, read by the Python that interprets the kernel."""
    return tl.full((), time.monotonic_ns(), tl.int64)


#: The clock of the barriers' time bound, chosen when the module is imported, as triton.jit
#: chooses between compiling and interpreting.
_clock_ns = _host_clock_ns if interpreting() else _gpu_clock_ns


# Atomics and polls as inline PTX, each by the threads that run it: Triton lowers an atomic on a
# scalar with a block barrier before it and, where its result is used, another after it to broadcast
# the one thread's result through shared memory. That put two block barriers in every arrival and in
# every poll of the spin. Here the arrival passes one (its own bar.sync), and a poll none: every
# thread polls for itself (one L2 transaction per warp, 8 per poll of an 8-warp program where the
# scalar atomic made 1) and leaves the spin on what it saw itself.


@triton.jit
def _release_add_one_ptx(bar_ptr):
    """bar_ptr[0] += 1 (int32) with release semantics at GPU scope, by thread 0 of the program alone."""
    tl.inline_asm_elementwise(
        "{ .reg .pred first; .reg .u32 tid; mov.u32 tid, %tid.x; setp.eq.u32 first, tid, 0; "
        "@first red.release.gpu.global.add.u32 [$1], 1; mov.u32 $0, 0; }",
        "=r,l", [bar_ptr], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _acquire_load_ptx(ptr):
    """ptr[0] (int32) by an acquire load at GPU scope, in every thread: later loads see what the
    releasers stored before their release."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.u32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _cas_i32_ptx(ptr, expected, value):
    """Compare-and-swap of ptr[0] (int32) at GPU scope in the calling thread; returns the old value."""
    return tl.inline_asm_elementwise("atom.acq_rel.gpu.global.cas.b32 $0, [$1], $2, $3;", "=r,l,r,r",
                                     [ptr, expected, value], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _cas_i64_ptx(ptr, expected, value):
    """Compare-and-swap of ptr[0] (int64) at GPU scope in the calling thread; returns the old value."""
    return tl.inline_asm_elementwise("atom.acq_rel.gpu.global.cas.b64 $0, [$1], $2, $3;", "=l,l,l,l",
                                     [ptr, expected, value], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _store_i64_ptx(ptr, value):
    """ptr[0] = value (int64) by the calling thread, whichever it is (a scalar tl.store is one thread's)."""
    tl.inline_asm_elementwise("st.global.b64 [$1], $2; mov.u32 $0, 0;", "=r,l,l", [ptr, value], dtype=tl.int32,
                              is_pure=False, pack=1)


# The same under the interpreter (TRITON_INTERPRET=1 runs no inline asm; its programs run one after
# another, one thread each): Triton's own atomics and store.


@triton.jit
def _release_add_one_interpreted(bar_ptr):
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _acquire_load_interpreted(ptr):
    return tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _cas_interpreted(ptr, expected, value):
    return tl.atomic_cas(ptr, expected, value)


@triton.jit
def _store_i64_interpreted(ptr, value):
    tl.store(ptr, value)


if interpreting():
    _release_add_one, _acquire_load = _release_add_one_interpreted, _acquire_load_interpreted
    _cas_i32, _cas_i64, _store_i64 = _cas_interpreted, _cas_interpreted, _store_i64_interpreted
else:
    _release_add_one, _acquire_load = _release_add_one_ptx, _acquire_load_ptx
    _cas_i32, _cas_i64, _store_i64 = _cas_i32_ptx, _cas_i64_ptx, _store_i64_ptx


@triton.jit
def _arrive(bar_ptr):
    """First half of the grid barrier: bar.sync, so that every thread's stores of this program
    precede the release, then one release arrival per program (thread 0: ``_release_add_one``)."""
    tl.debug_barrier()
    _release_add_one(bar_ptr)


@triton.jit
def _wait(bar_ptr, target, step, rec_ptr, timeout_ns, kernel_code):
    """Second half: every thread spins with its own acquire loads (gpu scope) until it has seen
    ``target`` arrivals counted at ``bar_ptr[0]`` (a monotonic counter), which also makes the other
    programs' stores visible to it. No block barrier: the counter only grows, so every thread leaves
    the spin, each after its own acquire.

    Bounded in time (:mod:`..barrier_bound`): a first poll that finds the barrier open costs nothing
    more. After one that finds it closed the thread reads the clock (``_clock_ns``) for its start,
    and after every later closed poll the launch's abort flag ``bar_ptr[1]`` and the clock; it
    gives up once ``timeout_ns`` (a runtime argument; 0: no bound) have passed or another program
    gave up. The first thread of the launch to give up raises the flag, so every later wait of every
    program leaves at its first closed poll (a stalled launch ends after one bound, not one per step;
    the programs run on with invalid data and no more waiting), and, the first on the device since the
    host looked, writes ``kernel_code``, ``step``, its program id and the time waited into the
    device's record ``rec_ptr`` (int64 [4]); the host raises on it (``barrier_bound``). The give-up
    runs in the threads that gave up, by atomics of their own, so no block barrier is passed by some
    threads and not others.
    """
    seen = _acquire_load(bar_ptr)
    if seen < target:
        since = _clock_ns()
        waited = since - since
        gave_up = 0
        while (seen < target) & (gave_up == 0):
            gave_up = tl.load(bar_ptr + 1, volatile=True)
            if (gave_up == 0) & (timeout_ns > 0):
                waited = _clock_ns() - since
                if waited > timeout_ns:
                    gave_up = 2  # this thread's own give-up
            seen = _acquire_load(bar_ptr)
        if gave_up == 2:
            if _cas_i32(bar_ptr + 1, 0, 1) == 0:  # the launch's first give-up
                # the device's first since the host looked
                if _cas_i64(rec_ptr, waited - waited, kernel_code.to(tl.int64)) == 0:
                    _store_i64(rec_ptr + 1, step.to(tl.int64))
                    _store_i64(rec_ptr + 2, tl.program_id(0).to(tl.int64))
                    _store_i64(rec_ptr + 3, waited)


@triton.jit
def _step_arrive(bar_ptr, arrivals, USE_BARRIER: tl.constexpr):
    """A persistent kernel's arrival at a barrier between phases or steps; returns the arrivals so far
    (``_arrive``: only with USE_BARRIER, a launch of several programs)."""
    if USE_BARRIER:
        arrivals += 1
        _arrive(bar_ptr)
    return arrivals


@triton.jit
def _step_wait(bar_ptr, arrivals, nprog, step, rec_ptr, timeout_ns, kernel_code, USE_BARRIER: tl.constexpr):
    """The wait that completes ``_step_arrive`` (after step ``step``): for ``arrivals`` arrivals of each of
    the ``nprog`` programs (USE_BARRIER), else a block barrier: even one program exchanges data between
    its own threads through global memory (a tile stored in one register layout is loaded in another).
    Under the interpreter tl.debug_barrier is a no-op, as nothing runs concurrently there."""
    if USE_BARRIER:
        _wait(bar_ptr, arrivals * nprog, step, rec_ptr, timeout_ns, kernel_code)
    else:
        tl.debug_barrier()


# ----------------------------------------------------------------------------- reset flags


@triton.jit
def _reset_word(rst_ptr, t, row0, B):
    """The reset flags of step ``t`` (-1 <= t <= T) of the 64 rows around ``row0``, as the bits of one
    int64 (``config.reset_rows``); every row of a tile of at most 64 rows, aligned, is in that word."""
    return tl.load(rst_ptr + (t + 1) * tl.cdiv(B, 64) + row0 // 64)


@triton.jit
def _word_keeps(word, rows):
    """Which ``rows`` (any shape; of ``word``'s 64) carry their state into the step: their bit is clear.
    Computed from the row indices, so Triton builds it in the layout where it is used: no layout
    conversion, where a loaded vector of flags would need one per layout."""
    return ((word >> (rows % 64).to(tl.int64)) & 1) == 0


@triton.jit
def _kept_rows(rst_ptr, t, rows, B):
    """[BLOCK_B] bool: which ``rows`` carry their state into step ``t`` (rows >= B count as kept)."""
    words = tl.load(rst_ptr + (t + 1) * tl.cdiv(B, 64) + rows // 64, mask=rows < B, other=0)
    return _word_keeps(words, rows)


# ----------------------------------------------------------------------------- tiles of the step kernels


@triton.jit
def tile_coords(tile, n_unit_tiles, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows [BLOCK_B] and units [BLOCK_H] of ``tile``; tiles are numbered batch-tile major."""
    rows = (tile // n_unit_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = (tile % n_unit_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    return rows, cols


@triton.jit
def _dot_tile(
    acc,  # [BLOCK_B, BLOCK_N] fp32: acc += A[rows, :K] @ M[:K, cols]
    a_ptr, a_row_stride,  # A[r, k] at a_ptr + r * a_row_stride + k (fp32, written by other programs)
    rows, a_rows_in,  # [BLOCK_B] row indices and which rows to read (others count as 0)
    m_ptr, m_k_stride, m_n_stride,  # M[k, n] at m_ptr + k * m_k_stride + n * m_n_stride
    cols, cols_in,  # [BLOCK_N]
    K: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < K
        a = tl.load(a_ptr + rows[:, None] * a_row_stride + ks[None, :], mask=a_rows_in[:, None] & k_in[None, :],
                    other=0.0, cache_modifier=".cg")
        m = tl.load(m_ptr + ks[:, None] * m_k_stride + cols[None, :] * m_n_stride,
                    mask=k_in[:, None] & cols_in[None, :], other=0.0)
        acc = tl.dot(a.to(tl.float32), m.to(tl.float32), acc, input_precision=DOT_PRECISION)
    return acc
