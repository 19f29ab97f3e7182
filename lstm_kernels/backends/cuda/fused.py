"""The fused kernels at the budget of one step (``csrc/fused/fused_forward.cu``,
``csrc/fused/fused_backward.cu``), host side: their tiling plan, the gate-row interleaving of W_hh,
the exchange buffers, the launches, and which launch serves a call (:func:`fused_mode`,
:func:`run_fused`).

The plan mirrors ``csrc/fused/fused_plan.cuh`` (``tests/test_cuda_plan_host.py`` compiles that
header into a host program and checks both agree): a block owns ``UNITS`` hidden units (all four
gates) for ``BATCH_TILE`` batch rows; the grid is ``(ceil(H / UNITS), ceil(B / BATCH_TILE))``.

Interleavings (the kernels read these layouts; the inverse maps recover W_hh):

- forward ``w_fwd`` [ceil(H/8) * 32, H]: row ``fwd_row(g, j) = 32 (j // 8) + 8 g + j % 8`` holds
  ``W_hh[g H + j]``, so one mma.sync thread holds i, f, g, o of the same (b, j); the GRU's (3 gates
  r, z, n) the same map, its fourth gate's rows zero: r, z as the LSTM's i, f, and the n rows the
  operand of a transposed product (batch x units) whose (b, j) the cell thread reads from the
  block's partial sums;
- backward ``w_bwd`` [ceil(H/8) * 8, 4H] = W_hh^T with its columns (the reduction index r over
  4H) in the order ``r' = 4 j + g`` (``bwd_col``); the dG exchange buffer uses the same order; the
  GRU's over 3H, ``r' = 3 j + g``, its exchange [d_r, d_z, d_hn] (the gradient of h_{t-1} W_hh^T).

Dimension names: T steps, B batch, H hidden units. Gate order along 4H: i, f, g, o.

Precisions (the kernels' ``Op``, ``csrc/fused/fused_common.cuh``; the C API's FusedOp codes,
:func:`op_code`): float16 and bfloat16 on mma.sync m16n8k16; float32 on m16n8k8 tf32, either
rounded to tf32 (only where torch allows TF32) or at fp32 accuracy by "3xTF32" (each operand split
into two tf32 parts, three MMAs per product; :func:`tf32_split` emulates it). Sizes are in bytes
where they depend on the storage type: the reduction runs in 32-byte chunks (k16 of a 16-bit type,
k8 of float).

Launch modes: persistent (one cooperative launch for all steps, a light grid barrier between
(half-)steps, its waits bounded in time: :mod:`..barrier_bound`) where the grid is co-resident
(``_C.fused_plan``), else one launch per (half-)step of the same code, with the same bits. A
cooperative launch the runtime refuses although the plan allowed it (MPS, MIG, green contexts,
SMs held elsewhere: ``_C.CooperativeLaunchRefused``) runs again per (half-)step, and that key stays
per-step for the process (:func:`refused_cooperative_launches`), unless
``LSTM_KERNELS_CUDA_VARIANT=persistent`` asked for the persistent launch: then it raises.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ...cells import LSTM, gates
from .. import RecurrenceCall, barrier_bound
from ..device_rows import step_rows
from . import extension
from .extension import ptr as _ptr
from .extension import resets_arg as _resets_arg
from .variants import (
    MMA_ENV, VARIANT_ENV, fused_backward_tile, fused_exchange_tagged, fused_weights_in_registers, requested_variant,
    tensor_cores_requested,
)

WARPS = 8
UNITS = 8
BATCH_TILE = 16
FWD_ROWS = 4 * UNITS
CHUNK_BYTES = 32  # one MMA's k extent
KPAD_BYTES = 64  # K padded to pairs of chunks
SMEM_PAD_BYTES = 16  # padding of a shared row (ldmatrix without bank conflicts)
# The backward streams dG per warp through a ring of RING_STAGES stages of STAGE_PAIRS pairs of chunks.
STAGE_PAIRS = 2
RING_STAGES = 4
STAGE_ROW_BYTES = STAGE_PAIRS * 2 * CHUNK_BYTES + SMEM_PAD_BYTES
STAGE_BYTES = BATCH_TILE * STAGE_ROW_BYTES
WARP_RING_BYTES = RING_STAGES * STAGE_BYTES
# The wide backward (fused_plan.cuh): WIDE_UNITS units per block, each warp's dG range loaded straight into
# MMA fragments, WIDE_PAIR_SLOTS pairs of chunks at a time, no ring.
WIDE_UNITS = 16
WIDE_PAIR_SLOTS = 12
# The narrow backward (fused_plan.cuh): the wide backward's units for NARROW_BATCH_TILE batch rows, W^T and dG^T
# the MMA's A and B operands. The C API's codes of the backward's tiles (BWD_RING, BWD_WIDE, BWD_NARROW).
NARROW_BATCH_TILE = 8
BWD_TILES = {"ring": 0, "wide": 1, "narrow": 2}
#: Shared memory a block may opt in to on sm_80 (A100: 163 KB) and sm_90 (H100: 227 KB).
SMEM_OPTIN_SM80 = 163 * 1024
SMEM_OPTIN_SM90 = 227 * 1024
#: Static shared memory of every fused kernel (the abort flag, as ptxas rounds it); it counts against
#: the opt-in limit with the dynamic bytes (the kernel plan asks the runtime, cudaFuncGetAttributes).
STATIC_SMEM_BYTES = 16

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: FusedOp codes of csrc/fused/fused_lstm.h.
FLOAT32, FLOAT16, BFLOAT16, TF32 = 0, 1, 2, 3


def stage_pairs(n_gates: int) -> int:
    """Pairs of chunks per stage of the backward's dG ring (fused_plan.cuh's bwd_stage_pairs): STAGE_PAIRS
    for the LSTM; 1 for the GRU, whose 3H gives each warp an odd count of pairs at H = 768 (9), so that
    no stage multiplies a zero pair."""
    return STAGE_PAIRS if n_gates == 4 else 1


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def kpad(elem: int) -> int:
    """K is padded to a multiple of this many elements of ``elem`` bytes (fused_plan.cuh's kpad)."""
    return KPAD_BYTES // elem


def smem_pad(elem: int) -> int:
    return SMEM_PAD_BYTES // elem


def k_chunks(Kp: int, elem: int) -> int:
    """32-byte chunks (one MMA each) of a padded reduction of ``Kp`` elements."""
    return Kp * elem // CHUNK_BYTES


def op_code(dtype: torch.dtype, tf32: bool = False) -> int:
    """The FusedOp code of ``dtype``; float32 on tf32 only when ``tf32`` (torch allows TF32), else
    at fp32 accuracy."""
    if dtype == torch.float32:
        return TF32 if tf32 else FLOAT32
    return {torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}[dtype]


def unit_blocks(H: int) -> int:
    return (H + UNITS - 1) // UNITS


def batch_tiles(B: int) -> int:
    return (B + BATCH_TILE - 1) // BATCH_TILE


def warp_k_range(w: int, ks: int) -> tuple[int, int]:
    """Chunks (or pairs) [begin, end) of warp ``w`` out of ``ks`` (fused_plan.cuh's warp_k_range)."""
    return w * ks // WARPS, (w + 1) * ks // WARPS


def fwd_row(g: int, j: int) -> int:
    return (j // UNITS) * FWD_ROWS + g * UNITS + j % UNITS


def bwd_col(g: int, j: int, n_gates: int = 4) -> int:
    return n_gates * j + g


def fwd_cell(q: int, y: int, w: int, lane: int) -> tuple[int, int]:
    """(batch row, unit) that cell thread (warp w < 4, lane) of block (q, y) runs in the forward."""
    return y * BATCH_TILE + ((w >> 1) & 1) * 8 + 2 * (lane & 3) + (w & 1), q * UNITS + (lane >> 2)


def fwd_n_fragment(w: int, lane: int) -> tuple[int, int]:
    """(lane, element) of the GRU forward's transposed n tile (batch x units) where cell thread (warp w < 4,
    lane) finds its (b, j) (fused_plan.cuh's fwd_n_lane, fwd_n_element)."""
    b_local, j_local = ((w >> 1) & 1) * 8 + 2 * (lane & 3) + (w & 1), lane >> 2
    return (b_local & 7) * 4 + (j_local >> 1), (j_local & 1) + 2 * (b_local >> 3)


def tagged_pos(pair):
    """Word of a row of the tagged exchange that holds b16 pair ``pair`` (units 2 pair, 2 pair + 1):
    fused_plan.cuh's tagged_pos, for an int or an integer tensor."""
    return (pair & ~7) | ((pair & 3) << 1) | ((pair >> 2) & 1)


def pack_tagged(h0: torch.Tensor, Bp: int, Pk: int) -> torch.Tensor:
    """The forward's tagged exchange (csrc/fused/fused_common.cuh), zero, [2, Bp, Pk / 2] int64 words,
    with h0 [B, P] (16-bit, P <= Pk even) in slot 1 (the slot of step -1) under tag 0: word tagged_pos(p)
    of row b holds h0[b, 2p] in its low 16 bits and h0[b, 2p + 1] in the next 16 (zero past P). Built on
    h0's device."""
    B, P = h0.shape
    words = torch.zeros((2, Bp, Pk // 2), dtype=torch.int64, device=h0.device)
    padded = torch.zeros((B, Pk), dtype=h0.dtype, device=h0.device)
    padded[:, :P] = h0
    pairs = padded.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [B, Pk / 2]: pair p = units 2p, 2p + 1
    words[1, :B, tagged_pos(torch.arange(Pk // 2, device=h0.device))] = pairs
    return words


def bwd_cell(q: int, y: int, w: int, lane: int, tile: str = "ring") -> tuple[int, int]:
    """(batch row, unit) that cell thread (warp w, lane) of block (q, y) runs in the backward's ``tile``
    (fused_plan.cuh's bwd_cell_row, bwd_cell_unit): warps < 4 in the ring's blocks of UNITS units, every warp in
    the wide backward's blocks of WIDE_UNITS (n tile w // 4), warps < 4 in the narrow backward's blocks of
    WIDE_UNITS units x NARROW_BATCH_TILE rows (its fragments' rows are units, their columns batch rows)."""
    if tile == "narrow":
        return y * NARROW_BATCH_TILE + 2 * (lane & 3) + (w & 1), q * WIDE_UNITS + (lane >> 2) + ((w >> 1) & 1) * 8
    units = WIDE_UNITS if tile == "wide" else UNITS
    return y * BATCH_TILE + (lane >> 2) + ((w >> 1) & 1) * 8, q * units + 8 * (w >> 2) + 2 * (lane & 3) + (w & 1)


def bwd_batch_tile(tile: str) -> int:
    """Batch rows per block of the backward's ``tile`` (fused_plan.cuh's bwd_batch_tile)."""
    return NARROW_BATCH_TILE if tile == "narrow" else BATCH_TILE


def bwd_batch_tiles(B: int, tile: str) -> int:
    """The backward grid's batch tiles (gridDim.y; one grid-barrier counter each) for ``tile``."""
    return -(-B // bwd_batch_tile(tile))


def wide_word(w):
    """Word (4 bytes) of a pair of chunks (64 bytes) of the wide backward's dG exchange that holds the
    reduction's word ``w`` (fused_plan.cuh's wide_word: a 4 x 4 transpose, its own inverse)."""
    return (w & 3) * 4 + (w >> 2)


def wide_exchange_pos(r, elem: int):
    """Element of a row of the wide backward's dG exchange that holds reduction index ``r`` (r' order),
    for ``elem``-byte elements (fused_plan.cuh's wide_exchange_pos); an int or an integer tensor."""
    per_pair, per_word = 2 * CHUNK_BYTES // elem, 4 // elem
    e = r % per_pair
    return r - e + wide_word(e // per_word) * per_word + e % per_word


def bwd_gate_k_longest(H: int, elem: int, n_gates: int = 4) -> int:
    """Pairs of chunks of the backward's busiest warp (fused_plan.cuh's bwd_gate_k_longest)."""
    return -(-(k_chunks(round_up(n_gates * H, kpad(elem)), elem) // 2) // WARPS)


def bwd_wide_batches(H: int, elem: int, n_gates: int = 4) -> int:
    """Batches of WIDE_PAIR_SLOTS pairs (L2 round trips) the wide backward's busiest warp loads per step
    (fused_plan.cuh's bwd_wide_batches)."""
    return -(-bwd_gate_k_longest(H, elem, n_gates) // WIDE_PAIR_SLOTS)


def forward_row_index(H: int, device=None, n_gates: int = 4) -> torch.Tensor:
    """Index [ceil(H/8) * 32] into W_hh's rows (``-1`` for the zero rows of units >= H, and of the fourth
    gate where ``n_gates`` is 3): w_fwd = W_hh[index]. Built on ``device`` (no host-to-device copy:
    CUDA-graph capture allows it)."""
    idx = torch.full((unit_blocks(H) * FWD_ROWS,), -1, dtype=torch.long, device=device)
    g = torch.arange(n_gates, device=device).repeat_interleave(H)
    j = torch.arange(H, device=device).repeat(n_gates)
    idx[(j // UNITS) * FWD_ROWS + g * UNITS + j % UNITS] = g * H + j
    return idx


def backward_col_index(H: int, device=None, n_gates: int = 4) -> torch.Tensor:
    """Index [n_gates*H] into W_hh's rows r = g H + j, in the backward's order r' = n_gates j + g (on
    ``device``)."""
    r_prime = torch.arange(n_gates * H, device=device)
    return (r_prime % n_gates) * H + r_prime // n_gates


def interleave_forward(w_hh: torch.Tensor, n_gates: int = 4) -> torch.Tensor:
    """w_fwd [ceil(H/8) * 32, P] from W_hh [n_gates*H, P] (zero rows for units >= H, and the GRU's
    fourth gate). Device ops only (index_select: no host sync, so CUDA-graph capture allows it)."""
    H = w_hh.shape[0] // n_gates
    idx = forward_row_index(H, w_hh.device, n_gates)
    idx = torch.where(idx >= 0, idx, torch.full_like(idx, n_gates * H))  # the appended zero row
    return torch.cat([w_hh, w_hh.new_zeros((1, w_hh.shape[1]))]).index_select(0, idx)


def deinterleave_forward(w_fwd: torch.Tensor, H: int, n_gates: int = 4) -> torch.Tensor:
    idx = forward_row_index(H, w_fwd.device, n_gates)
    out = w_fwd.new_empty((n_gates * H, w_fwd.shape[1]))
    keep = idx >= 0
    out[idx[keep]] = w_fwd[keep]
    return out


def interleave_backward(w_hh: torch.Tensor, n_gates: int = 4) -> torch.Tensor:
    """w_bwd [ceil(P/16) * 16, n_gates*H] = (W_hh[backward_col_index])^T from W_hh [n_gates*H, P], zero rows
    >= P (whole blocks of the ring's UNITS and of the wide backward's WIDE_UNITS)."""
    H, P = w_hh.shape[0] // n_gates, w_hh.shape[1]
    out = w_hh.new_zeros((round_up(P, WIDE_UNITS), n_gates * H))
    out[:P] = w_hh[backward_col_index(H, w_hh.device, n_gates)].t()
    return out


def deinterleave_backward(w_bwd: torch.Tensor, P: int, n_gates: int = 4) -> torch.Tensor:
    H = w_bwd.shape[1] // n_gates
    out = w_bwd.new_empty((n_gates * H, P))
    out[backward_col_index(H, w_bwd.device, n_gates)] = w_bwd[:P].t()
    return out


def pad_rows(w: torch.Tensor, multiple: int = UNITS) -> torch.Tensor:
    """``w`` with zero rows appended up to a multiple of ``multiple`` rows (W_hr, W_hr^T slices)."""
    n = w.shape[0]
    return torch.cat([w, w.new_zeros((round_up(n, multiple) - n, *w.shape[1:]))]) if n % multiple else w


def _ld(n: int, elem: int) -> int:
    """Row stride, in elements, of a shared tile holding a reduction of ``n`` elements."""
    return round_up(n, kpad(elem)) + smem_pad(elem)


def forward_smem_bytes(H: int, P: Optional[int] = None, elem: int = 2) -> int:
    P = H if P is None else P
    ld, ldh = _ld(P, elem), _ld(H, elem)
    proj = (UNITS + BATCH_TILE) * ldh * elem if P != H else 0
    return (FWD_ROWS + BATCH_TILE) * ld * elem + WARPS * 16 * 32 * 4 + proj


def backward_smem_bytes(H: int, P: Optional[int] = None, elem: int = 2, n_gates: int = 4, tile: str = "ring") -> int:
    """The backward block's dynamic shared memory for ``tile`` (fused_backward.cu's backward_smem_bytes): the W^T
    slice, the ring (the ring's tile only), the partial sums (two 16 x 8 tiles per warp in the wide tile, one
    otherwise), and the projection's tiles."""
    P = H if P is None else P
    ld, ldp = _ld(n_gates * H, elem), _ld(P, elem)
    proj = (UNITS + BATCH_TILE) * ldp * elem if P != H else 0
    units = UNITS if tile == "ring" else WIDE_UNITS
    tiles = 2 if tile == "wide" else 1
    return units * ld * elem + (WARPS * WARP_RING_BYTES if tile == "ring" else 0) + WARPS * 4 * tiles * 32 * 4 + proj


@dataclass(frozen=True)
class Plan:
    """Grid and shared memory of the fused kernels for (B, H)."""

    B: int
    H: int
    P: Optional[int] = None  # proj_size, or None
    n_gates: int = 4  # the cell's gate rows per unit: 4 the LSTM, 3 the GRU

    @property
    def grid(self) -> tuple[int, int]:
        return unit_blocks(self.H), batch_tiles(self.B)

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1]

    def block_units(self, q: int) -> range:
        return range(q * UNITS, min((q + 1) * UNITS, self.H))

    def block_rows(self, y: int) -> range:
        return range(y * BATCH_TILE, min((y + 1) * BATCH_TILE, self.B))

    def smem_bytes(self, direction: str, elem: int = 2) -> int:
        if direction == "forward":
            return forward_smem_bytes(self.H, self.P, elem)
        return backward_smem_bytes(self.H, self.P, elem, self.n_gates)

    def fits(self, smem_optin: int = SMEM_OPTIN_SM90, elem: int = 2,
             directions: tuple = ("forward", "backward")) -> bool:
        """Whether a block of each of ``directions`` fits in ``smem_optin`` bytes for ``elem``-byte storage
        (its dynamic shared memory and the kernels' static bytes)."""
        return all(self.smem_bytes(d, elem) + STATIC_SMEM_BYTES <= smem_optin for d in directions)


def exchange_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit exchange of a value computed in fp32: round to nearest even in ``dtype``, back to fp32."""
    return x.float().to(dtype).float()


def exchange_unit_roundoff(dtype: torch.dtype) -> float:
    """Relative error bound of one rounding to ``dtype`` in its normal range (half an ulp)."""
    return {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[dtype]


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to tf32 as ``cvt.rna.tf32.f32`` does (the kernels' ``to_tf32``): nearest,
    ties away from zero, the low 13 mantissa bits zero; half a tf32 ulp is added to the magnitude of
    finite values only (ptxas's lowering), so infinities stay and NaNs stay NaN."""
    x = x.float().contiguous()
    bits = x.view(torch.int32)
    finite = x.abs() < float("inf")
    mag = (bits & 0x7FFFFFFF) + torch.where(finite, 0x1000, 0).to(torch.int32)  # ties round away
    return ((bits & ~0x7FFFFFFF) | (mag & ~0x1FFF)).view(torch.float32)


def tf32_split(x: torch.Tensor) -> tuple:
    """(big, small): float32 ``x`` ~ big + small, both tf32, as Fp32Mma splits its operands."""
    big = to_tf32(x)
    return big, to_tf32(x.float() - big)


def tf32_matmul(a: torch.Tensor, b: torch.Tensor, split: bool) -> torch.Tensor:
    """a @ b (float32 operands) as the fused kernels' float products compute it, in float64
    (products of tf32 values are exact; the kernels' fp32 sums add at most K * 2^-24 relative):
    Tf32Mma rounds both operands to tf32; Fp32Mma (``split``) adds a_small b_big + a_big b_small +
    a_big b_big."""
    a_big, a_small = tf32_split(a)
    b_big, b_small = tf32_split(b)
    d = lambda t: t.double()  # noqa: E731
    out = d(a_big) @ d(b_big)
    if split:
        out = out + d(a_small) @ d(b_big) + d(a_big) @ d(b_small)
    return out


# ---- launches ------------------------------------------------------------------------------
# ``entry`` is the extension's ``_C.fused_forward`` / ``_C.fused_backward`` (or the ctypes function of
# a standalone build: same arguments, ints for pointers, sizes and the stream, then the barrier's four;
# the keyword ``resets`` only where a call has resets).
PERSISTENT, PER_STEP = 1, 0


def forward(entry: Callable, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad: bool, persistent: bool,
            barrier: tuple = (0, 0, 0, 0), tf32: bool = False, resets: Optional[torch.Tensor] = None,
            cell: str = LSTM, b_hn: Optional[torch.Tensor] = None):
    """Run the fused forward. Returns h_all [T, B, P], h_T [B, P], c_T [B, H] and, when needs_grad,
    the workspace (act [T, B, 4H] fp32, c_all [T, B, H] fp32), zero on rows a step does not touch.
    The GRU (``cell="gru"``: xg [T, B, 3H], w_hh [3H, H], c0 and w_hr None, b_hn [H] or None): c_T
    None, and the workspace of the per-step kernels (act: r, z, n [T, B, 3H]; c_all: hn [T, B, H]).

    ``w_hr``: None or W_hr [P, H] (proj_size P < H). ``batch_sizes``: None or an int tensor [T]
    (non-increasing, batch_sizes[0] == B). ``barrier``: (per-launch state pointer, device record
    pointer, bound in ns, kernel code) of the persistent launch's time-bounded grid wait
    (csrc/fused/barrier_wait.cuh), or (0, 0, 0, 0): no bound. ``tf32``: float32 products on tf32
    (:func:`op_code`; the caller asks only where torch allows TF32). ``resets``: None or a contiguous uint8
    [T, B] on xg's device (nonzero: that row starts step t from zero state; the kernel masks h_{t-1} in its
    exchange copy and c_{t-1} in its register, so h0 / c0 go in unmasked). The kernel keeps W_hh in
    registers where it fits when ``LSTM_KERNELS_CUDA_FUSED_WEIGHTS=registers`` (variants.py), and exchanges h
    as tagged words (:func:`pack_tagged`) where it can when ``LSTM_KERNELS_CUDA_FUSED_EXCHANGE=tagged``.
    """
    T, B, gate_rows = xg.shape
    n_gates, is_lstm = gates(cell), cell == LSTM
    H = gate_rows // n_gates
    P = H if w_hr is None else w_hr.shape[0]
    dev, dt = xg.device, xg.dtype
    xg = xg.contiguous()
    c0 = c0.to(dt).contiguous() if is_lstm else None  # the kernel reads c0 in the input dtype
    w_fwd = interleave_forward(w_hh.contiguous(), n_gates)
    w_hr_p = None if w_hr is None else pad_rows(w_hr.contiguous())
    pad = kpad(xg.element_size())
    hx = torch.zeros((2, round_up(B, BATCH_TILE), round_up(P, pad)), dtype=dt, device=dev)
    hx[1, :B, :P] = h0  # h_{-1}: the slot of step -1
    tagged = is_lstm and w_hr is None and xg.element_size() == 2 and fused_exchange_tagged()
    hx_tagged = pack_tagged(h0.to(dt), hx.shape[1], hx.shape[2]) if tagged else None  # the kernel says if it serves
    mx = None if w_hr is None else torch.zeros((round_up(B, BATCH_TILE), round_up(H, pad)), dtype=dt, device=dev)
    h_all = torch.empty((T, B, P), dtype=dt, device=dev)
    h_T = h0.to(dt).clone()
    c_T = c0.clone() if is_lstm else None
    c_work = torch.empty((B, H), dtype=torch.float32, device=dev) if is_lstm else None
    alloc = torch.zeros if batch_sizes is not None else torch.empty
    act = alloc((T, B, gate_rows), dtype=torch.float32, device=dev) if needs_grad else None
    c_all = alloc((T, B, H), dtype=torch.float32, device=dev) if needs_grad else None
    bs = None if batch_sizes is None else step_rows(batch_sizes, T, B, dev)[:T]  # no host sync
    counters = torch.zeros(batch_tiles(B), dtype=torch.int32, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    b_hn = None if b_hn is None else b_hn.contiguous()  # kept alive through the launch
    err = entry(op_code(dt, tf32), _ptr(xg), _ptr(w_fwd), _ptr(w_hr_p), _ptr(c0), _ptr(c_work), _ptr(hx), _ptr(mx),
                _ptr(h_all), _ptr(h_T), _ptr(c_T), _ptr(act), _ptr(c_all), _ptr(bs), _ptr(counters), T, B, H, P,
                PERSISTENT if persistent else PER_STEP, stream, *barrier, **_resets_arg(resets),
                **({} if is_lstm else dict(gates=n_gates, b_hn=_ptr(b_hn))),
                **({"w_registers": 1} if fused_weights_in_registers() else {}),
                **({"hx_tagged": _ptr(hx_tagged)} if tagged else {}))
    if err:
        raise RuntimeError(f"lstm fused_forward_kernel failed: CUDA error {err}")
    return h_all, h_T, c_T, ((act, c_all) if needs_grad else ())


def backward(entry: Callable, w_hh, c0, act, c_all, w_hr, dh_all, dh_T, dc_T, batch_sizes, persistent: bool,
             barrier: tuple = (0, 0, 0, 0), tf32: bool = False, resets: Optional[torch.Tensor] = None,
             cell: str = LSTM, h0: Optional[torch.Tensor] = None, h_all: Optional[torch.Tensor] = None):
    """Run the fused backward on the forward's (act, c_all). Returns dG [T, B, 4H], dh0 [B, P],
    dc0 [B, H] and dW_hr [P, H] (None without projection). ``tf32`` and ``resets`` as for :func:`forward`
    (the same mask: nothing flows back across a reset, and c_{t-1} is 0 in the forget gate's gradient).
    The GRU (``cell="gru"``; c0, w_hr and dc_T None) takes the forward's h0 [B, H] and h_all [T, B, H] and
    returns dG [T, B, 3H] (d_r, d_z, d_n), dh0, None and d_hn [T, B, H]. Under
    ``LSTM_KERNELS_CUDA_FUSED_BACKWARD=wide`` or ``narrow`` the kernel runs those blocks where they serve."""
    T, B, P = dh_all.shape
    n_gates, is_lstm = gates(cell), cell == LSTM
    H = act.shape[-1] // n_gates
    dev, dt = dh_all.device, dh_all.dtype
    w_bwd = interleave_backward(w_hh.contiguous(), n_gates)
    w_hrT = None if w_hr is None else pad_rows(w_hr.t().contiguous())
    state0 = c0 if is_lstm else h0  # the state that entered step 0
    state0, dh_all, dh_T = (t.to(dt).contiguous() for t in (state0, dh_all, dh_T))
    dc_T = dc_T.to(dt).contiguous() if is_lstm else None
    h_all = None if is_lstm else h_all.to(dt).contiguous()  # kept alive through the launch
    Bp = round_up(B, BATCH_TILE)
    pad = kpad(dh_all.element_size())
    dgx = torch.zeros((2, Bp, round_up(n_gates * H, pad)), dtype=dt, device=dev)
    dhx = None if w_hr is None else torch.zeros((Bp, round_up(P, pad)), dtype=dt, device=dev)
    dh_tot = None if w_hr is None else torch.empty((T, B, P), dtype=torch.float32, device=dev)
    dG = torch.empty((T, B, n_gates * H), dtype=dt, device=dev)
    dh0 = torch.empty((B, P), dtype=dt, device=dev)
    dc0 = torch.empty((B, H), dtype=dt, device=dev) if is_lstm else None
    d_hn = None if is_lstm else torch.empty((T, B, H), dtype=dt, device=dev)
    dc_work = torch.empty((B, H), dtype=torch.float32, device=dev)
    bs = None if batch_sizes is None else step_rows(batch_sizes, T, B, dev)[:T]  # no host sync
    tile = fused_backward_tile()
    # one counter per batch tile of the tile asked for: at least the ring's, which serves where it does not
    counters = torch.zeros(bwd_batch_tiles(B, tile), dtype=torch.int32, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    err = entry(op_code(dt, tf32), _ptr(w_bwd), _ptr(w_hrT), _ptr(act), _ptr(c_all), _ptr(state0), _ptr(dh_all),
                _ptr(dh_T), _ptr(dc_T), _ptr(dc_work), _ptr(dgx), _ptr(dhx), _ptr(dG), _ptr(dh0), _ptr(dc0),
                _ptr(dh_tot), _ptr(bs), _ptr(counters), T, B, H, P, PERSISTENT if persistent else PER_STEP, stream,
                *barrier, **_resets_arg(resets),
                **({} if is_lstm else dict(gates=n_gates, h_all=_ptr(h_all), d_hn=_ptr(d_hn))),
                **({"tile": BWD_TILES[tile]} if tile != "ring" else {}))
    if err:
        raise RuntimeError(f"lstm fused_backward_kernel failed: CUDA error {err}")
    if not is_lstm:
        return dG, dh0, None, d_hn
    dw_hr = None
    if w_hr is not None:  # dW_hr = sum_t dh_t^T m_t, m_t = o_t * tanh(c_t): one GEMM outside the recurrence
        m = act[..., 3 * H:] * torch.tanh(c_all)
        dw_hr = (dh_tot.reshape(T * B, P).t() @ m.reshape(T * B, H)).to(w_hr.dtype)
    return dG, dh0, dc0, dw_hr


# ---- which launch serves a call ---------------------------------------------------------------

#: Cooperative launches the runtime refused, {(device, "fused-" + direction, dtype, B, H, P): error}:
#: those keys run one launch per (half-)step from then on.
_REFUSED: dict = {}


def refused_cooperative_launches() -> dict:
    """The keys whose cooperative launch the runtime refused in this process, with the error."""
    return dict(_REFUSED)


def _tile(direction: str) -> str:
    """The tile ``direction``'s kernel is asked for with: the backward's LSTM_KERNELS_CUDA_FUSED_BACKWARD, the
    forward's "ring" (its one kind of block)."""
    return fused_backward_tile() if direction == "backward" else "ring"


def _registers(direction: str) -> bool:
    """Whether the ``direction`` kernel's instance is the forward's with the register path (the weights switch)."""
    return direction == "forward" and fused_weights_in_registers()


def _refusal_key(device: torch.device, direction: str, dtype, B: int, H: int, P: int, cell: str = LSTM,
                 resets: bool = False) -> tuple:
    """The key of a refused cooperative launch: the call's shape, cell and the kernel instance that was refused,
    as device_plan tells them apart: its Op (float32 on TF32 or at fp32 accuracy), resets, the wide and the narrow
    backward's grids (not the ring's), the forward's instance with the register path (its own registers, so its
    own co-residency)."""
    tile = _tile(direction)
    return (str(device), "fused-" + direction, op_code(dtype, fused_tf32(dtype)), B, H, P) + (
        () if cell == LSTM else (cell,)) + (("resets",) if resets else ()) + (
        (tile,) if tile != "ring" else ()) + (("registers",) if _registers(direction) else ())


def smem_optin(device: torch.device) -> int:
    """Shared memory a block may opt in to on ``device`` (a conservative sm_80 figure when unknown)."""
    try:
        return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)
    except Exception:  # no GPU here, or an older torch
        return SMEM_OPTIN_SM80


def fused_tf32(dtype: torch.dtype) -> bool:
    """Whether the fused kernels run a float32 call's products on tf32 (torch allows TF32), rather
    than at fp32 accuracy."""
    return dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32)


def directions(call: RecurrenceCall) -> tuple:
    """The directions a call runs: the forward, and the backward when it needs gradients."""
    return ("forward", "backward") if call.needs_grad else ("forward",)


def fused_unserved_reason(call: RecurrenceCall, dirs: Optional[tuple] = None) -> Optional[str]:
    """Why the fused kernels do not serve ``call`` in ``dirs`` (default: :func:`directions`), or None.
    Host knowledge only (dtype, the tensor-core switch, proj_size, the block's shared memory against
    the device's opt-in); the device's own plan is asked by :func:`fused_mode`."""
    if call.dtype not in DTYPES:
        return f"the fused kernels serve float16, bfloat16 and float32, not {call.dtype}"
    if not tensor_cores_requested():
        return f"the fused kernels run on tensor cores, which {MMA_ENV}=0 turns off"
    if call.has_projection and not 0 < call.state_size < call.hidden_size:
        return f"proj_size must be in [1, H), got {call.state_size} (H={call.hidden_size})"
    plan = Plan(call.batch, call.hidden_size, call.state_size if call.has_projection else None, gates(call.cell))
    elem = torch.empty((), dtype=call.dtype).element_size()
    for direction in dirs or directions(call):
        if not plan.fits(smem_optin(call.device), elem, (direction,)):
            return (f"H={call.hidden_size} is too large for the fused {direction} kernel's shared memory "
                    f"({plan.smem_bytes(direction, elem)} bytes in {call.dtype}) on this device")
    return None


@functools.lru_cache(maxsize=None)
def _fused_plan_of(device: str, direction: str, code: int, B: int, H: int, P: int, resets: bool = False,
                   n_gates: int = 4, tile: str = "ring", w_registers: bool = False) -> dict:
    kw = ({"resets": True} if resets else {}) | ({"gates": n_gates} if n_gates != 4 else {}) | (
        {"tile": BWD_TILES[tile]} if tile != "ring" else {}) | ({"w_registers": 1} if w_registers else {})
    with torch.cuda.device(torch.device(device)):
        return dict(extension._C.fused_plan(direction, code, B, H, P, **kw))


def device_plan(device: torch.device, direction: str, dtype, B: int, H: int, P: int, resets: bool = False,
                cell: str = LSTM) -> dict:
    """``_C.fused_plan`` of the fused ``direction`` kernel for this call on ``device`` (cached); ``resets``:
    of the kernel's instance that serves resets (its own registers, so its own occupancy); ``cell``: of
    the cell's instance; the forward's under ``LSTM_KERNELS_CUDA_FUSED_WEIGHTS`` (the instance with the
    register path, or the one without: their own registers); the backward's under
    ``LSTM_KERNELS_CUDA_FUSED_BACKWARD`` (the wide or narrow kernel's where it serves: its own grid and shared
    memory; the plan's ``tile`` names the kernel planned, the C API's code of :data:`BWD_TILES`)."""
    return _fused_plan_of(str(device), direction, op_code(dtype, fused_tf32(dtype)), B, H, P, resets, gates(cell),
                          _tile(direction), _registers(direction))


def fused_persistent_possible(device: torch.device, direction: str, dtype, B: int, H: int, P: int,
                              resets: bool = False, cell: str = LSTM) -> bool:
    """The fused ``direction`` kernel's grid is co-resident on ``device`` (``_C.fused_plan``, cached) and
    the runtime has not refused its cooperative launch in this process."""
    return (_refusal_key(device, direction, dtype, B, H, P, cell, resets) not in _REFUSED
            and device_plan(device, direction, dtype, B, H, P, resets, cell)["possible"])


def _what_only_fused(call: RecurrenceCall) -> str:
    return "proj_size > 0" if call.has_projection else "variable lengths (PackedSequence)"


def fused_mode(call: RecurrenceCall, direction: str) -> Optional[bool]:
    """How the fused kernels run ``call``'s ``direction`` under ``LSTM_KERNELS_CUDA_VARIANT``: True one
    persistent launch, False one launch per (half-)step, None not at all (the per-step kernels of
    csrc/step/ serve it).

    ``fused`` / ``auto``: persistent where the grid is co-resident, else per (half-)step, else None.
    ``persistent``: True, or RuntimeError (the fused kernels cannot serve the call, or their grid is
    not co-resident here). ``step``: None, but a projected or packed call (which only the fused
    kernels serve) runs them per (half-)step. A projected or packed call raises RuntimeError where the
    fused kernels cannot run it (never a kernel that ignores W_hr or batch_sizes)."""
    requested = requested_variant()
    only_fused = call.has_projection or call.variable_lengths
    if requested == "step" and not only_fused:
        return None
    P = call.state_size
    why = fused_unserved_reason(call, (direction,))
    if why is None and not device_plan(call.device, direction, call.dtype, call.batch, call.hidden_size, P,
                                       call.has_resets, call.cell)["fits"]:
        why = f"the device's plan says the fused {direction} block's shared memory does not fit (B={call.batch}, " \
              f"H={call.hidden_size}, P={P}, {call.dtype})"
    if why is not None:
        if only_fused:
            raise RuntimeError(f"cuda backend: {_what_only_fused(call)} is served by the fused kernels only, and {why}")
        if requested == "persistent":
            raise RuntimeError(f"cuda backend: the persistent fused {direction} kernel was requested "
                               f"({VARIANT_ENV}=persistent), but {why}")
        return None
    if requested == "step":
        return False
    if fused_persistent_possible(call.device, direction, call.dtype, call.batch, call.hidden_size, P, call.has_resets,
                                 call.cell):
        return True
    if requested == "persistent":
        refused = _REFUSED.get(_refusal_key(call.device, direction, call.dtype, call.batch, call.hidden_size, P,
                                            call.cell, call.has_resets))
        raise RuntimeError(
            f"cuda backend: the persistent fused {direction} kernel was requested ({VARIANT_ENV}=persistent) but "
            + (f"the runtime refused its cooperative launch here ({refused})" if refused else
               f"its grid cannot be co-resident here (B={call.batch}, H={call.hidden_size}, P={P})"))
    return False


def barrier(device: torch.device, kernel: str) -> tuple:
    """The barrier of a persistent launch of ``kernel`` (a :data:`barrier_bound.KERNELS` name): a zeroed
    per-launch state, the device's error record, the bound in ns and the kernel's code."""
    return (barrier_bound.launch_state(device), barrier_bound.device_record(device),
            barrier_bound.barrier_timeout_ns(), barrier_bound.kernel_code(kernel))


def barrier_args(state: tuple) -> tuple:
    """:func:`barrier` as the entry's four ints (pointers, bound, code)."""
    launch_state, record, timeout_ns, code = state
    return _ptr(launch_state), _ptr(record), timeout_ns, code


def run_fused(fn: Callable, direction: str, call: RecurrenceCall, persistent: bool, device: torch.device, *args,
              resets: Optional[torch.Tensor] = None):
    """``fn(entry, *args, persistent, barrier=..., tf32=...)`` (and ``resets=`` where not None; ``fn`` is
    :func:`forward` or :func:`backward`) on ``device``'s current stream; returns (result, whether the
    persistent launch ran). A refused cooperative launch (nothing ran) is run again per (half-)step and
    its key remembered (:func:`refused_cooperative_launches`); under ``persistent`` it raises. The
    persistent launch's grid waits are bounded in time (:mod:`..barrier_bound`), and the copy of the
    device's record is queued after it (no host sync)."""
    ext = extension._C
    entry = getattr(ext, "fused_" + direction)
    tf32 = fused_tf32(call.dtype)
    kw = {} if resets is None else {"resets": resets}
    with torch.cuda.device(device):
        if persistent:
            state = barrier(device, f"cuda fused {direction} (persistent)")
            try:
                out = fn(entry, *args, True, barrier=barrier_args(state), tf32=tf32, **kw)
            except ext.CooperativeLaunchRefused as e:
                if requested_variant() == "persistent":
                    raise
                _REFUSED[_refusal_key(device, direction, call.dtype, call.batch, call.hidden_size,
                                      call.state_size, call.cell, resets is not None)] = str(e)
                warnings.warn(f"lstm_kernels cuda backend: the runtime refused the fused {direction} kernel's "
                              f"cooperative launch ({e}); one launch per step for this shape from now on",
                              RuntimeWarning, stacklevel=3)
            else:
                barrier_bound.after_launch(device, state[1])
                return out, True
        return fn(entry, *args, False, tf32=tf32, **kw), False
