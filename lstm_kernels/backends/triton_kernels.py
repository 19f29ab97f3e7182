"""Shared parts of the Triton LSTM kernels: the design, device helpers, launch configuration.

The kernels are in :mod:`.triton_forward` and :mod:`.triton_backward`; the backend
class that launches them in :mod:`.triton`.

Dimension names:
    T   steps (time)
    B   batch rows
    H   hidden units (cell state size)
    P   state size: proj_size, or H without a projection
    4H  the gate axis, in PyTorch's order i, f, g, o: gate k of unit j is column k*H + j

Each program owns a tile of BLOCK_B batch rows x BLOCK_H hidden units and computes
*all four gates* of those units, so the cell update is local to it.

Forward, step t (triton_forward):
    gates = xg[t] + h_{t-1} @ W_hh^T          4 tl.dot, fp32 accumulation
    i, f, g, o = sigma, sigma, tanh, sigma
    c_t = f * c_{t-1} + i * g                 fp32, kept in a [B, H] fp32 state buffer
    m_t = o * tanh(c_t)
    h_t = m_t (no projection) or m_t @ W_hr^T (a second phase over tiles of P, since it
          needs all H of m_t), rounded to the input dtype as the reference does.
h_{t-1} is read for all P units of a tile's rows, so it lives in a double buffer
``h_buf [2, B, P]``: step t reads slot t % 2 and writes slot (t + 1) % 2; no program
ever writes what another program of the same step reads.

Backward, step t = T-1 ... 0, then t = -1 (triton_backward):
    dh   = dG_{t+1} @ W_hh + dh_all[t]        needs all 4H of dG_{t+1}: the previous step
    dm   = dh (no projection) or dh @ W_hr    (a second phase: needs all P of dh)
    dc   = dc + dm * o * (1 - tanh(c_t)^2)
    dG_t = [dc*g*i(1-i), dc*c_{t-1}*f(1-f), dc*i*(1-g^2), dm*tanh(c_t)*o(1-o)]
    dc   = dc * f
dG_t is kept in fp32 in a double buffer ``dg_buf [2, B, 4H]`` for the next step's tl.dot
and written to the dG output in the input dtype. Phase t = -1 only computes
dh0 = dG_0 @ W_hh. With a projection dW_hr = sum_t dh_t^T m_t is one GEMM afterwards.

Variable lengths: ``bs [T + 1]`` int32 holds the active rows per step and bs[T] = 0.
Step t updates rows [0, bs[t]); other rows keep h and c, get 0 in h_all and in dG.
In backward, rows not active at t+1 carry dh_T (they are never active after t).

Resets inside a sequence (HAS_RESETS, a constexpr: without resets the kernels compile as
before): ``rst [T + 2, cdiv(B, 64)]`` int64 holds resets[t] as bits, row r in bit r % 64 of
word [t + 1, r // 64], and zero words for the steps -1 and T (``reset_rows``), so that every
kernel reads steps t - 1 and t + 1 without a bound check. A row that resets at t starts step t
from zero state, applied where the state enters step t, to the copy each program reads:
h_{t-1}, which other programs wrote to the exchange buffer h_buf, counts as 0 for those rows
(a row mask on its load here; a select on the summed h_{t-1} W_hh^T in triton_persistent), and
c_{t-1} (c buffer or register) is replaced by 0 in the cell update; the buffers and the kept
h / c of inactive rows are untouched. In the backward the gradients leave step t masked:
dc_{t-1} = dc_t * f is 0 for those rows, c_{t-1} read from the workspace for the forget-gate
gradient is 0 (the value the forward used), and dh_{t-1} = dG_t W_hh is 0 for them (a row mask
on the next step's load of dG_t from dg_buf; a select on the summed product in
triton_persistent), so dh0 is 0 where row b resets at step 0; dG_t itself is unchanged. A reset
on a row not active at t changes nothing (it keeps its state, as in the reference). Cost per
step and tile: one load of the tile's flags (a [BLOCK_B] gather of its word, ``_kept_rows``;
triton_persistent loads the one int64 word as a scalar and tests its bits in whatever layout
they are needed: no layout conversion), and a select or a mask term where the state enters.

Two variants, one kernel source each for forward and backward:
  * step:       grid = all tiles, launched once per step (twice with a projection: one
                launch per phase); the launch boundary is the barrier.
  * persistent: one launch loops over all steps; each program loops over its tiles
                (tile = pid, pid + nprog, ...) and a grid-wide barrier (an atomic counter
                in global memory) separates steps and phases. Only launched with grid <=
                number of SMs (one program per SM), so every program is co-resident and the
                spin cannot deadlock. When every program owns one tile and its W_hh slice
                fits (``resident_weights``: RESIDENT_BYTES of shared memory), the slice is
                loaded once before the step loop and stays on chip (W_RESIDENT; one tl.dot
                over all of K per gate); otherwise W_hh is streamed from L2 every step, as
                in the step variant. Under TRITON_INTERPRET=1 programs run one after
                another, so the barrier is compiled out (USE_BARRIER=False) and a single
                program owns all tiles: the same code runs on the CPU.
The gate projections W_hr (projection phases) are always streamed.
Data other programs wrote in this launch (h_buf, m_buf, dh_buf, dg_buf) is made visible by
the barrier: bar.sync, then one release arrival per program, and acquire loads in the spin
(PTX memory model, as cooperative groups' grid sync). The loads also ask for
cache_modifier=".cg"; Triton may lower them otherwise (cp.async through L1 in the
pipelined k-loops), which the acquire makes correct anyway. Persistent launches are
cooperative (launch_cooperative_grid): the driver places every program at once or fails,
so the spin cannot wait on a program that never starts; when the driver refuses it at run
time (MPS or green contexts limiting SMs, another process holding SMs), ``auto`` runs the
step variant instead (``run_with_fallback``) and a named "persistent" raises. A debugger that
runs programs one at a time (single-stepping in cuda-gdb) deadlocks the spin; use the step
variant there, or set LSTM_KERNELS_BARRIER_TIMEOUT=0. Every spin is bounded in time
(LSTM_KERNELS_BARRIER_TIMEOUT seconds, default 10; a runtime argument, so the binary verification
proves is the one that serves): a launch whose wait gave up ends early and the next call on that
device raises, naming the kernel, the step and the program (``barrier_bound``; ``_wait``).

Host side: launches run under a device guard of the tensors' device, on its current stream,
and nothing in a call's path synchronises with the host (``device_rows.step_rows``), so the variants can
be captured in a CUDA graph. The step index arguments are not specialised
(``do_not_specialize``): one compilation per phase, not one per class of t.

Compile-time choices: H and P are tl.constexpr (one compilation per layer size; it makes
the k-loops static, which the interpreter needs: with NumPy >= 2 it cannot take a runtime
loop bound, hence also the `while` loops over steps and tiles). The launch parameters
come from ``launch_config`` alone.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings

import torch
import triton
import triton.language as tl

from . import barrier_bound
from .barrier_bound import BARRIER_TIMEOUT_ENV  # noqa: F401  (the bound's switch, shared with the cuda backend)

#: Environment variable that forces a variant: "auto" (default), "step" or "persistent".
VARIANT_ENV = "LSTM_KERNELS_TRITON_VARIANT"
VARIANTS = ("auto", "step", "persistent")

#: The kernels the last call ran, per direction: "step_budget" (triton_persistent's kernels),
#: "persistent" (the earlier persistent kernels) or "step" (one launch per step), so that a test
#: that claims a kernel can check it ran (as the cuda backend's last_forward_kernel).
LAST_KERNELS: dict = {"forward": None, "backward": None}


def record_kernel(direction: str, kernel: str) -> None:
    LAST_KERNELS[direction] = kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- device code


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}): no overflow, no cancellation for large |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, y, -y)


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


@triton.jit
def _arrive(bar_ptr):
    """First half of the grid barrier: bar.sync, so that every thread's stores of this program
    precede the release, then one release arrival per program (a scalar atomic: one thread)."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(bar_ptr, target, step, rec_ptr, timeout_ns, kernel_code):
    """Second half: spin with acquire loads (gpu scope) until ``target`` arrivals have been
    counted at ``bar_ptr[0]`` (a monotonic counter), which also makes the other programs' stores
    visible; then bar.sync, so no thread runs ahead of the spin.

    Bounded in time (:mod:`.barrier_bound`): a first poll that finds the barrier open costs nothing
    more. After one that finds it closed the wait reads the clock (``_clock_ns``) for its start,
    and after every later closed poll the launch's abort flag ``bar_ptr[1]`` and the clock; it
    gives up once ``timeout_ns`` (a runtime argument; 0: no bound) have passed or another program
    gave up. The first program to give up raises the flag, so every later wait of every program
    leaves at its first closed poll (a stalled launch ends after one bound, not one per step; the
    programs run on with invalid data and no more waiting), and, the first on the device since the
    host looked, writes ``kernel_code``, ``step``, its program id and the time waited into the
    device's record ``rec_ptr`` (int64 [4]); the host raises on it (``barrier_bound``).
    """
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    if seen < target:
        since = _clock_ns()
        waited = since - since
        gave_up = 0
        while (seen < target) & (gave_up == 0):
            gave_up = tl.load(bar_ptr + 1, volatile=True)
            if (gave_up == 0) & (timeout_ns > 0):
                waited = _clock_ns() - since
                if waited > timeout_ns:
                    gave_up = 2  # this program's own give-up
            seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        if gave_up == 2:
            if tl.atomic_cas(bar_ptr + 1, 0, 1) == 0:  # the launch's first give-up
                if tl.atomic_cas(rec_ptr, tl.zeros_like(waited), kernel_code.to(tl.int64)) == 0:  # the device's first since the host looked
                    tl.store(rec_ptr + 1, step.to(tl.int64))
                    tl.store(rec_ptr + 2, tl.program_id(0).to(tl.int64))
                    tl.store(rec_ptr + 3, waited)
    tl.debug_barrier()


@triton.jit
def _grid_barrier(bar_ptr, target, step, rec_ptr, timeout_ns, kernel_code):
    """The whole grid barrier: ``_arrive``, then ``_wait`` for ``target`` arrivals."""
    _arrive(bar_ptr)
    _wait(bar_ptr, target, step, rec_ptr, timeout_ns, kernel_code)


@triton.jit
def _phase_barrier(bar_ptr, arrivals, nprog, step, rec_ptr, timeout_ns, kernel_code, USE_BARRIER: tl.constexpr):
    """The barrier between phases and steps (after step ``step``); returns the updated arrival count.

    A grid barrier when several programs share the launch (USE_BARRIER), else a block
    barrier: even one program exchanges data between its own threads through global
    memory (a tile stored in one register layout is loaded in another by other warps).
    Under the interpreter tl.debug_barrier is a no-op, as nothing runs concurrently there.
    """
    if USE_BARRIER:
        arrivals += 1
        _grid_barrier(bar_ptr, arrivals * nprog, step, rec_ptr, timeout_ns, kernel_code)
    else:
        tl.debug_barrier()
    return arrivals


@triton.jit
def _reset_word(rst_ptr, t, row0, B):
    """The reset flags of step ``t`` (-1 <= t <= T) of the 64 rows around ``row0``, as the bits of one
    int64 (``reset_rows``); every row of a tile of at most 64 rows, aligned, is in that word."""
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


# ----------------------------------------------------------------------------- host code


def launch_config(hidden: int, batch: int, dtype: torch.dtype) -> dict:
    """Block sizes and warps for one (H, B, dtype): the one place launch parameters are chosen.

    ``hidden`` is max(H, P): BLOCK_H tiles both H and P, BLOCK_K steps every k-loop.

    tl.dot needs every block dimension >= 16, so blocks are at least 16 and masked.
    BLOCK_B covers the batch up to 64 rows; BLOCK_H = 32 hidden units (x 4 gates = 128
    gate columns per program) keeps the four fp32 accumulators at 64 registers per
    thread with 4 warps; BLOCK_K = 64 for 16-bit inputs, 32 for fp32 (shared memory).
    Under the interpreter blocks are as large as the problem allows (up to 64):
    fewer, larger programs run much faster there.
    """
    pow2 = triton.next_power_of_2
    block_b = min(64, max(16, pow2(batch)))
    if interpreting():
        block_h = block_k = min(64, max(16, pow2(hidden)))
        return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=4)
    block_h = min(32, max(16, pow2(hidden)))
    block_k = min(64 if dtype in (torch.float16, torch.bfloat16) else 32, max(16, pow2(hidden)))
    return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=4)


#: Most shared memory (bytes) the on-chip operands of a resident-W_hh launch may take: the
#: W_hh slice a persistent program loads once and keeps for all steps, plus the per-step
#: operand of its tl.dot (Triton places both in shared memory, allocated before the step loop).
#: Larger launches stream W_hh from L2 every step. 144 KiB stays within sm_80's 163 KiB per
#: block with room for Triton's own scratch; tests/test_triton_aot.py compiles the kernels at
#: this bound and checks their shared memory and spills. A first rule, to be tuned on a GPU.
RESIDENT_BYTES = 144 * 1024
RESIDENT_WARPS = 8


def _operand_bytes(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def split_k(n: int) -> tuple[int, int]:
    """The K extents (K1, K2) of a resident slice over ``n`` rows, two powers of two >= 16 with
    K1 + K2 >= n: K1 the largest power of two <= n, K2 the rest padded (16, all masked, if
    nothing is left). tl.arange needs power-of-two extents; two pieces pad 768 to 512 + 256
    where one would pad it to 1024."""
    k1 = max(16, 1 << (n.bit_length() - 1))
    rest = n - k1
    return k1, padded(rest) if rest > 0 else 16


def forward_resident_bytes(P: int, cfg: dict, dtype: torch.dtype) -> int:
    """Forward: four W_hh^T tiles [K1 + K2, BLOCK_H] and h_{t-1} [BLOCK_B, K1 + K2], in the operand dtype."""
    return (4 * cfg["BLOCK_H"] + cfg["BLOCK_B"]) * sum(split_k(P)) * _operand_bytes(dtype)


def backward_resident_bytes(H: int, cfg: dict) -> int:
    """Backward: W_hh[:, tile] [K1 + K2, BLOCK_H] and dG_{t+1} [BLOCK_B, K1 + K2] over K = 4H, fp32."""
    return (cfg["BLOCK_H"] + cfg["BLOCK_B"]) * sum(split_k(4 * H)) * 4


#: Shared memory per block left to Triton's own scratch below the device's opt-in limit.
RESIDENT_MARGIN = 19 * 1024


def resident_budget(device: torch.device) -> int:
    """RESIDENT_BYTES, lowered on GPUs with less shared memory per block (sm_86/89/120: 99 KiB)."""
    if interpreting() or device.type != "cuda":
        return RESIDENT_BYTES
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    return min(RESIDENT_BYTES, optin - RESIDENT_MARGIN)


def resident_weights(variant: str, grid: int, tiles: int, on_chip_bytes: int, budget: int = RESIDENT_BYTES) -> bool:
    """Whether a launch keeps its W_hh slice on chip: persistent, one tile per program, and
    ``on_chip_bytes`` (``forward_resident_bytes`` / ``backward_resident_bytes``) within
    ``budget`` (``resident_budget`` of the launch's device)."""
    return variant == "persistent" and grid >= tiles and on_chip_bytes <= budget


def persistent_config(cfg: dict, hidden: int, batch: int, resident_bytes, budget: int, programs: int) -> dict:
    """The launch configuration of a persistent launch: ``cfg``, or the same with 16-unit tiles
    when those make every program's W_hh slice resident (``resident_bytes(cfg)`` within
    ``budget``) and still give at most ``programs`` tiles, where ``cfg``'s own tiles do not.
    (B = 16, H = 768, bf16: 48 programs each keeping a 96 KiB slice, where 32-unit tiles would
    stream 192 KiB per program per step.)"""
    if cfg["BLOCK_H"] == 16 or (num_tiles(hidden, batch, cfg) <= programs and resident_bytes(cfg) <= budget):
        return cfg
    narrow = dict(cfg, BLOCK_H=16)
    if num_tiles(hidden, batch, narrow) <= programs and resident_bytes(narrow) <= budget:
        return narrow
    return cfg


def reset_rows(resets, seq_len: int, batch: int, placeholder):
    """The kernels' ``rst`` argument: [T + 2, cdiv(B, 64)] int64 on resets' device, bit r % 64 of
    word [t + 1, r // 64] set where resets[t, r], and zero words for the steps -1 and T (read
    without a bound check); ``placeholder`` (never read: HAS_RESETS is False) where ``resets`` is
    None. Made on the device, no host sync."""
    if resets is None:
        return placeholder
    words = triton.cdiv(batch, 64)
    bits = torch.zeros((seq_len + 2, words * 64), dtype=torch.int64, device=resets.device)
    bits[1:seq_len + 1, :batch] = resets
    shifts = torch.arange(64, dtype=torch.int64, device=resets.device)
    # distinct bits: the sum is their OR (bit 63 wraps to the sign, as int64 holds it)
    return (bits.view(seq_len + 2, words, 64) << shifts).sum(dim=2)


def padded(n: int) -> int:
    """The next power of two >= n, at least 16 (tl.arange extents and tl.dot dimensions)."""
    return max(16, triton.next_power_of_2(n))


def num_tiles(hidden: int, batch: int, cfg: dict) -> int:
    return triton.cdiv(batch, cfg["BLOCK_B"]) * triton.cdiv(hidden, cfg["BLOCK_H"])


def co_resident_programs(device: torch.device) -> int:
    """How many programs a persistent launch may have: one per SM (conservative), 1 when interpreting."""
    if interpreting() or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_variant(variant: str, hidden: int, batch: int, cfg: dict, device: torch.device) -> str:
    """Resolve "auto" (or the environment variable) to "step" or "persistent".

    auto = persistent on a GPU when every tile gets its own co-resident program
    (tiles <= SMs), else step. Under the interpreter auto is step; persistent runs there
    with one program and no barrier (for testing). On a GPU a forced "persistent" with
    more tiles than SMs still launches only one program per SM, each looping over tiles.
    """
    if variant == "auto":
        variant = os.environ.get(VARIANT_ENV, "auto") or "auto"
    if variant not in VARIANTS:
        raise ValueError(f"unknown Triton LSTM variant {variant!r}; choose one of {VARIANTS}")
    if variant != "auto":
        return variant
    if interpreting() or device.type != "cuda":
        return "step"
    return "persistent" if num_tiles(hidden, batch, cfg) <= co_resident_programs(device) else "step"


def dot_precisions(dtype: torch.dtype) -> tuple[str, str]:
    """input_precision of tl.dot: (h @ W_hh^T, every product with an fp32 operand).

    The forward gate product multiplies h and W_hh in the input dtype (16-bit products are
    exact in fp32); fp32 uses tf32 only when torch.backends.cuda.matmul.allow_tf32 is set.
    The other products (dG @ W_hh, m @ W_hr^T, dh @ W_hr) have an fp32 operand: for 16-bit
    inputs they use tf32 (the weights are exact in tf32, whose 10-bit mantissa is finer than
    bf16's), for fp32 inputs the same rule as the forward.
    """
    fp32 = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype == torch.float32:
        return fp32, fp32
    return "ieee", "tf32"


def forward_dot_dtype(dtype: torch.dtype):
    """Operand dtype of the forward tl.dot: the input dtype, except bfloat16 under the interpreter.

    The interpreter (Triton 3.6) computes tl.dot on bfloat16 operands wrongly (it sees the
    raw bits), so there the operands are upcast to fp32: bf16 products are exact in fp32,
    so the result is the same as on a GPU up to summation order.
    """
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def forward_buffers(xg, h0, c0, P: int, has_proj: bool, store_workspace: bool):
    """The tensors a forward launch writes, shared by the kernels of triton_forward and triton_persistent.

    Returns h_buf [2, B, P] (h0 in slot 0), c [B, H] fp32 (c0 on entry, c_T on exit),
    h_all [T, B, P], m_buf [B, H] fp32 (an alias of c without a projection: never touched),
    the workspace (gates [T, B, 4H], c_all [T, B, H] (+ m_all [T, B, H]) fp32, or ()) and the
    three workspace arguments of the kernels (placeholders never written where absent).
    """
    T, B, four_h = xg.shape
    H, dtype, device = four_h // 4, xg.dtype, xg.device
    h_buf = torch.empty((2, B, P), dtype=dtype, device=device)
    h_buf[0].copy_(h0)
    c = c0.to(torch.float32).contiguous().clone()
    h_all = torch.empty((T, B, P), dtype=dtype, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    m_buf = torch.empty((B, H), **f32) if has_proj else c
    ws = ()
    if store_workspace:
        ws = (torch.empty((T, B, 4 * H), **f32), torch.empty((T, B, H), **f32))
        ws += (torch.empty((T, B, H), **f32),) if has_proj else ()
    return h_buf, c, h_all, m_buf, ws, (ws + (c, c, c))[:3]


def backward_buffers(dc_T, T: int, P: int, has_proj: bool):
    """The fp32 state a backward launch writes, shared by triton_backward and triton_persistent:
    dc [B, H] (dc_T on entry, dc0 on exit), dh0 [B, P], and with a projection dh_buf [B, P] and
    dh_hist [T, B, P] (dh_t on active rows, 0 elsewhere); without one both alias dh0, never touched."""
    B, device = dc_T.shape[0], dc_T.device
    f32 = dict(dtype=torch.float32, device=device)
    dc = dc_T.to(torch.float32).contiguous().clone()
    dh0 = torch.empty((B, P), **f32)
    dh_buf = torch.empty((B, P), **f32) if has_proj else dh0
    dh_hist = torch.zeros((T, B, P), **f32) if has_proj else dh0
    return dc, dh0, dh_buf, dh_hist


def projection_weight_grad(dh_hist, m_all):
    """dW_hr [P, H] = sum_t dh_t^T m_t: one deterministic GEMM (dh_hist is 0 on inactive rows)."""
    T, B, P = dh_hist.shape
    return dh_hist.reshape(T * B, P).t() @ m_all.reshape(T * B, m_all.shape[-1])


def device_guard(device: torch.device):
    """The device every launch runs on: Triton launches on the current CUDA device and its
    current stream, so make that the tensors' device (as the CUDA backend does)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


#: The runtime barrier arguments of the persistent kernels that are never specialised (one binary
#: for every bound): for triton.jit(do_not_specialize=...), with the kernels' own step arguments.
BARRIER_RUNTIME_ARGS = ("timeout_ns", "kernel_code")


def barrier_args(device, kernel: str) -> tuple:
    """The barrier arguments of a persistent launch of ``kernel`` (a ``barrier_bound.KERNELS`` name):
    the zeroed per-launch state (int32 [2]: arrival counter, gave up), the device's error record,
    the bound in ns (0: none) and the kernel's code. After the launch: ``barrier_bound.after_launch``."""
    return (torch.zeros(2, dtype=torch.int32, device=device), barrier_bound.device_record(device),
            barrier_bound.barrier_timeout_ns(), barrier_bound.kernel_code(kernel))


def auto_requested(variant: str) -> bool:
    """Whether ``variant`` leaves the choice to the backend ("auto", and the environment variable
    does not name a variant either)."""
    if variant == "auto":
        variant = os.environ.get(VARIANT_ENV, "auto") or "auto"
    return variant == "auto"


def cooperative_launch_refused(err: BaseException) -> bool:
    """Whether ``err`` is the driver refusing a cooperative launch at run time (too many blocks to
    be co-resident: MPS or green contexts limiting SMs, another process holding SMs, or no
    cooperative launch in this context), as Triton's launcher reports it: a RuntimeError
    "Triton Error [CUDA]: <cuGetErrorString>" from cuLaunchKernelEx
    (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: "too many blocks in cooperative launch";
    CUDA_ERROR_NOT_SUPPORTED: "operation not supported")."""
    msg = str(err)
    return isinstance(err, RuntimeError) and "Triton Error [CUDA]" in msg and (
        "cooperative launch" in msg or "operation not supported" in msg
    )


def run_with_fallback(variant: str, chosen: str, run):
    """``run(chosen)``; when ``auto`` chose "persistent" and the driver refuses the cooperative
    launch, ``run("step")`` instead. A named variant still raises."""
    if chosen == "persistent" and auto_requested(variant):
        try:
            return run("persistent")
        except RuntimeError as err:
            if not cooperative_launch_refused(err):
                raise
            warnings.warn(f"lstm_kernels: the persistent Triton kernel's cooperative launch was refused ({err}); "
                          "running the per-step variant", RuntimeWarning, stacklevel=3)
            return run("step")
    return run(chosen)
