"""The persistent kernels, built to "the budget of one step" (docs/design.md; issue 12): their plans
and their launch. They serve every persistent call whose plan fits; the per-step kernels
(:mod:`.step_forward` / :mod:`.step_backward`) serve the others.

The kernels are in :mod:`.persistent_forward` and :mod:`.persistent_backward`; this module chooses
their tiles (``forward_plan`` / ``backward_plan``), says when they do not serve a call (a reason
string; :mod:`.launch` then runs the per-step kernels), prepares the interleaved weights and
launches them.

Dimension names:
    T steps, B batch rows, H hidden units, P state size (proj_size or H)
    4H  the gate axis in PyTorch's order i, f, g, o: gate k of unit j is column k*H + j
    U   units per program (BLOCK_H); NU = cdiv(H, U) unit blocks
    BB  batch rows per program (BLOCK_B), the N side of every MMA

Design (both kernels):
  * Operands are swapped so that weight rows are the M side of the MMA and the batch is N:
    forward gates^T [4U, BB] = W_u [4U, P] @ h_{t-1}^T [P, BB]; backward
    dh^T [U, BB] = W_hh[:, units]^T [U, 4H] @ dG_{t+1}^T [4H, BB] (U padded to 16 MMA rows).
  * K is split over the warps: every recurrent product is a batched (3D) tl.dot of KS
    K-slices, one slice per warp (Triton's warpsPerCTA = [KS, 1, 1]), then one cross-warp sum.
    num_warps = KS, so no warp repeats another's MMA and each warp's chain of dependent MMAs
    is K / KS deep. (A 2D tl.dot of the same tile gets warpsPerCTA = [num_warps, 1] and every
    warp computes the whole 16-row tile: 8x replication.)
  * W_hh is interleaved on the host for the forward (``interleave_gate_rows``): unit block u's
    rows are [i rows; f rows; g rows; o rows] of its U units, so one tl.dot gives all four
    gates of the block and one thread holds i, f, g, o of a (unit, row).
  * A program owns its tile for all steps: its weight slice is loaded from global memory once,
    before the step loop, and Triton keeps it as MMA register fragments (the shared-memory
    read is hoisted out of the loop; nothing is restaged per step); c (forward) / dc
    (backward) and the kept h stay in registers across steps.
  * One grid barrier per step (two with a projection), split into arrive (after the stores the
    other programs need) and wait (before the loads of them); the workspace / dG-output
    stores and the prefetch of xg_{t+1} (forward) / the saved activations of step t-1
    (backward) sit between. Only launched with every program co-resident (at most one per SM,
    ``co_resident_programs``), as a cooperative launch (launch_cooperative_grid): the driver
    places every program at once or refuses the launch, so the spin cannot wait on a program
    that never starts (a refusal at run time: :mod:`.launch` falls back to the step kernels).
  * Nearly all SMs busy where that costs no traffic: at B = 16, H = 768 the forward runs 96
    programs of 8 units on a 132-SM H100. The backward runs 48 of 16 units: its MMA has at least 16
    rows either way, and each program reads the whole dG_{t+1} of its batch tile every step, so 16
    units per program halve that L2 traffic (4.7 MB per step in 16 bits) at the same MMA count.
  * On the CPU (TRITON_INTERPRET=1) programs run one after another, so a grid barrier would
    deadlock: there the same kernels are launched once per step (and phase) with
    n_steps = 1 and USE_BARRIER=False (``use_steps_mode``); c / dc then live in global memory
    between launches (the kernels load them on entry and store them on exit in every mode).
    This "steps" mode (``steps_mode=True``) also serves a GPU, for tests and debugging (a
    debugger that runs programs one at a time deadlocks the spin).
  * The GRU (``cell="gru"``): the same kernels with GATES = 3. Forward: its gate rows two
    resident operands, W_rz [2U, P] interleaved as the LSTM's and W_n [U, P], two dots and two
    cross-warp sums per step, U >= 16 (GRU_UNIT_BLOCKS) so that neither pads MMA rows
    (:mod:`.persistent_forward`). Backward: K = 3H in power-of-two pieces that pad nothing where
    they can (``backward_pieces``: 2304 = 1024 + 1024 + 256), the carry dh_{t+1} z_{t+1} in
    registers (:mod:`.persistent_backward`).
  * Resets inside a sequence (HAS_RESETS, see :mod:`.config`): one scalar int64 load of the
    tile's flags per step, prefetched before the wait; without resets the kernels compile as
    before.
  * Deterministic: the only atomic is the barrier counter; every output element is written by
    one program in a fixed order.
  * Not served (the plans return the reason; the per-step kernels serve the call): more tiles
    than co-resident programs (one per SM), resident weights over MAX_WEIGHT_REGISTERS
    registers per thread or the shared-memory budget (``resident_budget``), and fp32 without
    tf32 (an "ieee" tl.dot runs on the FMA units with both operands in registers and spills).

Numerics: forward as the step kernels (16-bit operands, fp32 accumulation, fp32 cell state;
fp32 inputs with tf32 when torch allows it; the projection multiplies fp32 m with W_hr in tf32
for 16-bit inputs). Backward exchanges dG_{t+1} in the input dtype (16-bit) where the step
kernel keeps fp32: see ``persistent_backward`` for the added error.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton

from ...cells import GRU, LSTM, gates
from .. import barrier_bound
from ..device_rows import step_rows
from .config import (
    backward_buffers, barrier_args, dot_precisions, forward_buffers, forward_dot_dtype, interpreting,
    projection_weight_grad, recurrent_bias, reset_rows,
)
from .persistent_backward import _lstm_pbw_kernel
from .persistent_forward import _lstm_pfw_kernel

#: Most shared memory (bytes) a program's on-chip operands may take (the resident weight slices
#: Triton stages through shared memory before the step loop, and the per-step operands).
#: 144 KiB stays within sm_80's 163 KiB per block with room for Triton's own scratch;
#: tests/test_triton_step_budget.py compiles the kernels within it and checks their shared memory.
RESIDENT_BYTES = 144 * 1024
#: Shared memory per block left to Triton's own scratch below the device's opt-in limit.
RESIDENT_MARGIN = 19 * 1024

#: Units per program tried, smallest first (most programs): the forward's M = 4U >= 16.
UNIT_BLOCKS = (4, 8, 16, 32)
#: The GRU's: both of its dots (2U and U rows) at least one MMA's 16 rows.
GRU_UNIT_BLOCKS = (16, 32)
#: Most batch rows per program (the N side); more rows become more batch tiles (more programs).
MAX_BLOCK_B = 64
#: ptxas's register limit per thread (.maxnreg): without it ptxas may settle for 128 registers and spill
#: (seen at B = 64, H = 256 on sm_90); a persistent program is alone on its SM, so it may take them all.
MAX_REGISTERS = 255
#: Most 32-bit registers per thread the resident weight fragments may take (the rest is the step's).
MAX_WEIGHT_REGISTERS = 96
#: Programs a launch may have under the interpreter (no SM limit there; the launch is per step).
INTERPRETER_PROGRAMS = 1 << 20


#: Most warps that split K of the recurrent MMA (each holds K / KS of the resident slice).
MAX_K_SPLIT = 8


def _operand_bytes(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def padded(n: int) -> int:
    """The next power of two >= n, at least 16 (tl.arange extents and tl.dot dimensions)."""
    return max(16, triton.next_power_of_2(n))


def resident_budget(device: torch.device) -> int:
    """RESIDENT_BYTES, lowered on GPUs with less shared memory per block (sm_86/89/120: 99 KiB)."""
    if interpreting() or device.type != "cuda":
        return RESIDENT_BYTES
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    return min(RESIDENT_BYTES, optin - RESIDENT_MARGIN)


def co_resident_programs(device: torch.device) -> int:
    """How many programs a persistent launch may have: one per SM (conservative; INTERPRETER_PROGRAMS
    under the interpreter, where the launch is per step, and 1 off a GPU)."""
    if interpreting():
        return INTERPRETER_PROGRAMS
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def k_split(*extents: int, most: int = MAX_K_SPLIT) -> int:
    """Warps that split K of every dot of a kernel (its num_warps: a 3D tl.dot puts all warps on the
    K slices, so no warp repeats another's MMA): a power of two <= ``most`` with slices of the
    shortest K at least 16 deep (fewer when K is short; pieces are padded up to 16 per slice)."""
    k = min(extents) // 16
    return max(1, min(most, 1 << (k.bit_length() - 1))) if k else 1


def k_pieces(K: int, ks: int = 1) -> tuple[int, int]:
    """K extents (K1, K2) covering K, both powers of two >= 16 * ks: K1 the largest power of two <= K
    (at least 16 * ks), K2 the rest padded, or 0 when K1 covers K (768 = 512 + 256; 256 = 256 + 0)."""
    k1 = max(16 * ks, 1 << (K.bit_length() - 1))
    return k1, (max(16 * ks, padded(K - k1)) if K > k1 else 0)


def forward_on_chip_bytes(H: int, P: int, cfg: dict, dtype: torch.dtype, has_proj: bool, cell: str = LSTM) -> int:
    """Shared memory of the resident operands: W_u [4U, K1 + K2] (the GRU's [3U, ...]) and h^T
    [K1 + K2, BB] in the operand dtype, plus with a projection W_hr's slice [PB, KH1 + KH2] and m^T
    [KH1 + KH2, BB] in fp32."""
    kp, kh = sum(k_pieces(P, cfg["KS"])), sum(k_pieces(H, cfg["KS"]))
    ob = _operand_bytes(dtype)
    fw = (gates(cell) * cfg["BLOCK_H"] + cfg["BLOCK_B"]) * kp * ob
    return fw + ((cfg["BLOCK_P"] + cfg["BLOCK_B"]) * kh * 4 if has_proj else 0)


def forward_plan(B: int, H: int, P: int, dtype: torch.dtype, device: torch.device, has_proj: bool,
                 programs: Optional[int] = None, budget: Optional[int] = None,
                 block_h: Optional[int] = None, block_b: Optional[int] = None, cell: str = LSTM) -> Union[dict, str]:
    """The tiles of the persistent forward, or a reason why it does not serve the call.

    BB = padded(B) up to MAX_BLOCK_B rows; U the smallest of UNIT_BLOCKS (the most programs)
    whose tiles (cdiv(H, U) x cdiv(B, BB), and cdiv(P, PB) x cdiv(B, BB) for a projection, PB >= 16
    the fewest state units that fit) fit in ``programs`` co-resident programs (default: one per
    SM), whose resident weights take at most MAX_WEIGHT_REGISTERS registers per thread and whose
    on-chip operands fit ``budget`` bytes of shared memory (default: ``resident_budget``).
    num_warps = KS, the K split (``k_split``). ``block_h`` / ``block_b`` force a tile (tests). The
    GRU's (``cell="gru"``): U from GRU_UNIT_BLOCKS, 3U resident rows.
    """
    limits = _plan_limits(B, dtype, device, programs, budget, block_b)
    if isinstance(limits, str):
        return f"persistent forward: {limits}"
    programs, budget, bb, n_bt, ob = limits
    unit_blocks = UNIT_BLOCKS if cell == LSTM else GRU_UNIT_BLOCKS
    reason = f"no tile of {unit_blocks} units fits"
    pb = 16  # projection: the fewest state units per program (smallest resident fp32 W_hr slice) that fit
    while has_proj and triton.cdiv(P, pb) * n_bt > programs and pb < 128:
        pb *= 2
    for u in ((block_h,) if block_h else unit_blocks):
        ks = k_split(P, H) if has_proj else k_split(P)
        cfg = dict(BLOCK_H=u, BLOCK_B=bb, BLOCK_P=pb, KS=ks, KSP=ks, num_warps=ks)
        tiles = triton.cdiv(H, u) * n_bt
        if has_proj:
            tiles = max(tiles, triton.cdiv(P, pb) * n_bt)
        if tiles > programs:
            reason = f"{tiles} tiles of {u} units x {bb} rows exceed {programs} co-resident programs"
            continue
        on_chip = forward_on_chip_bytes(H, P, cfg, dtype, has_proj, cell)
        w_bytes = gates(cell) * u * sum(k_pieces(P, ks)) * ob + (pb * sum(k_pieces(H, ks)) * 4 if has_proj else 0)
        regs = w_bytes / 4 / (32 * ks)
        if on_chip > budget or regs > MAX_WEIGHT_REGISTERS:
            reason = (f"the resident weights of {u} units x {bb} rows take {regs:.0f} registers per thread (at "
                      f"most {MAX_WEIGHT_REGISTERS}) and {on_chip} bytes of shared memory (at most {budget})")
            continue
        cfg["programs"] = tiles
        return cfg
    return f"persistent forward: {reason}"


def _plan_limits(B: int, dtype: torch.dtype, device: torch.device, programs: Optional[int], budget: Optional[int],
                 block_b: Optional[int]):
    """What both plans start from: (co-resident programs, shared-memory budget, batch rows per
    program, batch tiles, operand bytes), defaults filled in; or the reason (fp32 without tf32)."""
    fp32_reason = _fp32_reason(dtype)
    if fp32_reason:
        return fp32_reason
    if programs is None:
        programs = co_resident_programs(device)
    if budget is None:
        budget = resident_budget(device)
    bb = block_b or min(MAX_BLOCK_B, padded(B))
    return programs, budget, bb, triton.cdiv(B, bb), _operand_bytes(dtype)


def _fp32_reason(dtype: torch.dtype) -> Optional[str]:
    """fp32 without tf32 (torch.backends.cuda.matmul.allow_tf32 False, torch's default): Triton computes
    an "ieee" tl.dot on the FMA units with both operands in registers, and the resident slice spills
    (1.2 KB of stack at B = 16, H = 768). The step kernels serve it. Under the interpreter it
    is served (the same kernel code is tested there)."""
    if dtype == torch.float32 and dot_precisions(dtype)[0] == "ieee" and not interpreting():
        return "fp32 without tf32 (torch.backends.cuda.matmul.allow_tf32 is False) is not served"
    return None


def _planned(cfg, plan, *args, **kwargs) -> dict:
    """``cfg``, or ``plan(*args, **kwargs)`` when it is None; a plan that does not serve the call (its
    reason, a string) raises ValueError with that reason."""
    cfg = plan(*args, **kwargs) if cfg is None else cfg
    if isinstance(cfg, str):
        raise ValueError(cfg)
    return cfg


def forward_constants(H: int, P: int, dtype: torch.dtype, cfg: dict, has_proj: bool, store_workspace: bool,
                      use_barrier: bool, has_resets: bool = False, cell: str = LSTM) -> dict:
    """The constexpr arguments (and num_warps) of ``_lstm_pfw_kernel`` for a plan, both phases on."""
    fw_prec, proj_prec = dot_precisions(dtype)
    k1, k2 = k_pieces(P, cfg["KS"])
    kh1, kh2 = k_pieces(H, cfg["KS"])
    return dict(H=H, P=P, HAS_PROJ=has_proj, RUN_CELL=True, RUN_PROJ=True, STORE_WS=store_workspace,
                USE_BARRIER=use_barrier, HAS_RESETS=has_resets, BLOCK_H=cfg["BLOCK_H"],
                BLOCK_B=cfg["BLOCK_B"], BLOCK_P=cfg["BLOCK_P"],
                K1=k1, K2=k2, KS=cfg["KS"], KSP=cfg["KSP"], KH1=kh1, KH2=kh2, DOT_PRECISION=fw_prec,
                DOT_DTYPE=forward_dot_dtype(dtype), PROJ_PRECISION=proj_prec, num_warps=cfg["num_warps"],
                maxnreg=MAX_REGISTERS, GATES=gates(cell),
                GATE_ROWS=(4 if cell == LSTM else 2) * cfg["BLOCK_H"])


def interleave_gate_rows(w: torch.Tensor, H: int, U: int) -> torch.Tensor:
    """W [G*H, K] (G gates' rows: the LSTM's i, f, g, o; the GRU's r, z; one gate) -> [NU * G*U, K]:
    unit block u holds the G gates' rows of units u*U ... u*U + U - 1, zero rows beyond H."""
    nu, g = triton.cdiv(H, U), w.shape[0] // H
    wg = w.reshape(g, H, -1)
    if nu * U != H:
        wg = torch.cat([wg, wg.new_zeros((g, nu * U - H, wg.shape[2]))], dim=1)
    return wg.reshape(g, nu, U, -1).transpose(0, 1).reshape(nu * g * U, -1).contiguous()


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return w if w.shape[0] == rows else torch.cat([w, w.new_zeros((rows - w.shape[0], w.shape[1]))]).contiguous()


def use_steps_mode() -> bool:
    """Per-step launches (no grid barrier): the interpreter runs programs one after another."""
    return interpreting()


def _launch(kernel, grid: int, args: tuple, consts: dict, B: int, device, name: str, steps, t_begin: int,
            n_steps: int) -> None:
    """Launch ``kernel`` (``name``: its ``barrier_bound.KERNELS`` name) over ``grid`` programs: once for
    ``n_steps`` steps from ``t_begin``, cooperatively, with the grid barrier where consts["USE_BARRIER"];
    or, in steps mode, once per ``(t, phase)`` of ``steps`` (``phase``: the constexprs that switch a phase
    off), without barrier. Raises first when an earlier persistent launch on the device gave up a wait."""
    barrier_bound.raise_if_gave_up(device)
    barrier = barrier_args(device, name)
    if steps is not None:
        for t, phase in steps:
            kernel[(grid,)](*args, *barrier, t, 1, B, **(consts | phase))
        return
    kernel[(grid,)](*args, *barrier, t_begin, n_steps, B, launch_cooperative_grid=grid > 1, **consts)
    if consts["USE_BARRIER"]:
        barrier_bound.after_launch(device, barrier[1])


def persistent_forward(xg, w_hh, h0, c0, w_hr=None, batch_sizes=None, store_workspace=True, cfg=None,
                       steps_mode: Optional[bool] = None, resets=None, cell=LSTM, b_hn=None):
    """Forward recurrence. xg [T, B, 4H], w_hh [4H, P], h0 [B, P], c0 [B, H], w_hr [P, H] or None,
    resets [T, B] bool or None (a row where True starts that step from zero state). The GRU
    (``cell="gru"``): xg [T, B, 3H], w_hh [3H, H], c0 and w_hr None, b_hn [H] or None; c_T None.

    Same contract and workspace as ``step_forward.step_forward``: returns h_all [T, B, P],
    h_T [B, P], c_T [B, H] fp32, and (gates [T, B, 4H], c_all [T, B, H] (+ m_all [T, B, H]))
    fp32 or () without ``store_workspace``. Raises ValueError with the reason of
    ``forward_plan`` when it does not serve the call.
    ``cfg``: a ``forward_plan`` (default: planned here). ``steps_mode``: one launch per step and
    phase, no grid barrier (default: under the interpreter only). The persistent launch's grid
    waits are bounded in time (``barrier_bound``): one that gave up is raised by the next call on
    the device (at once under ``bounded_barriers``), and this checks for an earlier one first.
    Launches on the current CUDA device and stream (the caller's device guard).
    """
    T, B, gate_rows = xg.shape
    H, P = gate_rows // gates(cell), w_hh.shape[1]
    has_proj = w_hr is not None
    dtype, device = xg.dtype, xg.device
    cfg = _planned(cfg, forward_plan, B, H, P, dtype, device, has_proj, cell=cell)
    steps = use_steps_mode() if steps_mode is None else steps_mode
    U, BB, PB = cfg["BLOCK_H"], cfg["BLOCK_B"], cfg["BLOCK_P"]
    n_bt = triton.cdiv(B, BB)
    grid = triton.cdiv(H, U) * n_bt
    if has_proj:
        grid = max(grid, triton.cdiv(P, PB) * n_bt)
    w_hh = w_hh.contiguous()
    if cell == GRU:  # the r, z rows interleaved as the LSTM's; the n rows an operand of their own
        w_int, w_n = interleave_gate_rows(w_hh[:2 * H], H, U), interleave_gate_rows(w_hh[2 * H:], H, U)
    else:
        w_int = interleave_gate_rows(w_hh, H, U)
        w_n = w_int  # never read
    w_hr_p = _pad_rows(w_hr.contiguous(), triton.cdiv(P, PB) * PB) if has_proj else w_int
    bs = step_rows(batch_sizes, T, B, device)
    h_buf, c, h_all, m_buf, ws, ws_args = forward_buffers(xg, h0, c0, P, has_proj, store_workspace, gates(cell))
    consts = forward_constants(H, P, dtype, cfg, has_proj, store_workspace, use_barrier=not steps and grid > 1,
                               has_resets=resets is not None, cell=cell)
    args = (xg.contiguous(), w_int, w_hr_p, w_n, recurrent_bias(b_hn, cell, H, xg), bs, reset_rows(resets, T, B, bs),
            h_buf, c, h_all, m_buf, *ws_args)
    phases = (dict(RUN_PROJ=False), dict(RUN_CELL=False)) if has_proj else ({},)  # cell, projection
    _launch(_lstm_pfw_kernel, grid, args, consts, B, device, "triton forward (persistent, step budget)",
            steps=[(t, phase) for t in range(T) for phase in phases] if steps else None, t_begin=0, n_steps=T)
    return h_all, h_buf[T % 2].clone(), c if c0 is not None else None, ws


# ----------------------------------------------------------------------------- backward

#: Most warps that split K = 4H of the backward's recurrent MMA.
MAX_K_SPLIT_BACKWARD = 8
#: Units per program tried by the backward, smallest first; its MMA has max(16, U) rows, so fewer than 16
#: units would pad rows with zeros at the same MMA count, registers and shared memory, and only add
#: programs, each of which reads the whole dG_{t+1} of its batch tile every step (twice the L2 traffic
#: for 8 units).
BACKWARD_UNIT_BLOCKS = (16, 32)


def backward_pieces(K: int, ks: int) -> tuple[int, int, int, int]:
    """K in at most 4 power-of-two pieces (0: no piece), each >= 16 * ks and at most a quarter of K
    rounded up to a power of two (smaller pieces keep fewer operand registers live per dot), largest
    first: the largest power of two that fits the rest, so that only the last piece pads
    (3072 = 3 x 1024; the GRU's 2304 = 1024 + 1024 + 256). Equal pieces where that takes more
    than 4."""
    smallest, cap = 16 * ks, max(16 * ks, triton.next_power_of_2(triton.cdiv(K, 4)))
    pieces, rest = [], K
    while rest > 0:
        pieces.append(min(cap, max(smallest, 1 << (rest.bit_length() - 1))))
        rest -= pieces[-1]
    if len(pieces) > 4:
        pieces = [cap] * triton.cdiv(K, cap)
    return tuple(pieces) + (0,) * (4 - len(pieces))


def backward_plan(B: int, H: int, P: int, dtype: torch.dtype, device: torch.device, has_proj: bool,
                  programs: Optional[int] = None, budget: Optional[int] = None,
                  units: Optional[int] = None, block_b: Optional[int] = None, cell: str = LSTM) -> Union[dict, str]:
    """The tiles of the persistent backward, or a reason why it does not serve the call.

    U units per program (the smallest of BACKWARD_UNIT_BLOCKS whose tiles, cdiv(P, U) and
    cdiv(H, U) times the batch tiles, fit ``programs``), MMA rows BLOCK_H = max(16, U); K = 4H
    (the GRU's 3H) split over KS warps and in the pieces of ``backward_pieces`` so that the
    resident W_hh[:, units]^T fragments take at most MAX_WEIGHT_REGISTERS registers per thread,
    and its shared staging (and the per-step dG operand) fit ``budget``.
    """
    limits = _plan_limits(B, dtype, device, programs, budget, block_b)
    if isinstance(limits, str):
        return f"persistent backward: {limits}"
    programs, budget, bb, n_bt, ob = limits
    K = gates(cell) * H
    ks = k_split(K, P, most=MAX_K_SPLIT_BACKWARD) if has_proj else k_split(K, most=MAX_K_SPLIT_BACKWARD)
    pieces = backward_pieces(K, ks)
    k4, kp = sum(pieces), sum(k_pieces(P, ks))
    warps = ks
    reason = f"no tile of {BACKWARD_UNIT_BLOCKS} units fits"
    for u in ((units,) if units else BACKWARD_UNIT_BLOCKS):
        rows = max(16, u)
        tiles = max(triton.cdiv(P, u), triton.cdiv(H, u)) * n_bt
        if tiles > programs:
            reason = f"{tiles} tiles of {u} units x {bb} rows exceed {programs} co-resident programs"
            continue
        w_bytes = rows * k4 * ob + (rows * kp * 4 if has_proj else 0)
        regs = w_bytes / 4 / (32 * warps)
        smem = max(rows * k4 * ob, k4 * bb * ob) + ((rows + bb) * kp * 4 if has_proj else 0)
        if regs <= MAX_WEIGHT_REGISTERS and smem <= budget:
            return dict(UNITS=u, BLOCK_H=rows, BLOCK_B=bb, PIECES=pieces, KS=ks, KSP=ks, num_warps=warps,
                        programs=tiles)
        reason = (f"the resident weights of {u} units take {regs:.0f} registers per thread (at most "
                  f"{MAX_WEIGHT_REGISTERS}) and {smem} bytes of shared memory (at most {budget})")
    return f"persistent backward: {reason}"


def backward_constants(H: int, P: int, dtype: torch.dtype, cfg: dict, has_proj: bool, use_barrier: bool,
                       has_resets: bool = False, cell: str = LSTM) -> dict:
    """The constexpr arguments (and num_warps) of ``_lstm_pbw_kernel`` for a plan, both phases on."""
    prec, proj_prec = dot_precisions(dtype)
    kp1, kp2 = k_pieces(P, cfg["KS"])
    k1, k2, k3, k4 = cfg["PIECES"]
    return dict(H=H, P=P, HAS_PROJ=has_proj, RUN_DH=True, RUN_CELL=True, USE_BARRIER=use_barrier,
                HAS_RESETS=has_resets, UNITS=cfg["UNITS"], BLOCK_H=cfg["BLOCK_H"], BLOCK_B=cfg["BLOCK_B"],
                K1=k1, K2=k2, K3=k3, K4=k4, KS=cfg["KS"], KP1=kp1, KP2=kp2, KSP=cfg["KSP"], DOT_PRECISION=prec,
                DOT_DTYPE=forward_dot_dtype(dtype), PROJ_PRECISION=proj_prec, num_warps=cfg["num_warps"],
                maxnreg=MAX_REGISTERS, GATES=gates(cell))


def persistent_backward(xg, w_hh, c0, w_hr, workspace, dh_all, dh_T, dc_T, batch_sizes=None, cfg=None,
                        steps_mode: Optional[bool] = None, resets=None, cell=LSTM, h0=None, h_all=None):
    """Backward recurrence from the workspace of ``persistent_forward`` (the same as
    ``step_forward.step_forward``'s: gates [T, B, 4H], c_all [T, B, H] (+ m_all) fp32). The GRU
    (``cell="gru"``; c0, w_hr and dc_T None) also takes the forward's h0 [B, H] and h_all [T, B, H],
    and its workspace is r, z, n [T, B, 3H] and hn [T, B, H].

    Same contract as ``step_backward.step_backward``: returns dG [T, B, 4H] in xg's dtype,
    dh0 [B, P] fp32, dc0 [B, H] fp32, and dW_hr [P, H] fp32 or None; the GRU's: dG [T, B, 3H],
    dh0, None and d_hn [T, B, H] in xg's dtype. Raises ValueError with the reason of
    ``backward_plan`` when it does not serve the call.
    ``cfg``, ``steps_mode``, ``resets`` (the forward's) and the barrier's bound: as ``persistent_forward``.

    Numerics: dG_{t+1} (the GRU's [d_r, d_z, d_hn]) is exchanged between programs in the input dtype
    (the dG output's own rounding) and multiplied with W_hh in the input dtype, fp32 accumulation,
    where the step kernel keeps dG_{t+1} in fp32 (tf32 MMA). For 16-bit inputs that adds one
    rounding of dG (relative 2^-8 for bf16, 2^-11 for fp16) to every dh_t = dG_{t+1} W_hh:
    measured against float64 in tests/triton/test_triton_persistent_budget.py, within
    docs/design.md's 1e-2. fp32 inputs keep fp32 (tf32 only when torch allows it).
    """
    T, B, gate_rows = xg.shape
    H, P = gate_rows // gates(cell), w_hh.shape[1]
    has_proj, is_gru = w_hr is not None, cell != LSTM
    dtype, device = xg.dtype, xg.device
    cfg = _planned(cfg, backward_plan, B, H, P, dtype, device, has_proj, cell=cell)
    steps = use_steps_mode() if steps_mode is None else steps_mode
    saved, c_all = workspace[:2]
    n_bt = triton.cdiv(B, cfg["BLOCK_B"])
    grid = max(triton.cdiv(P, cfg["UNITS"]), triton.cdiv(H, cfg["UNITS"])) * n_bt
    rows = step_rows(batch_sizes, T, B, device)  # [T + 1]: bs[t], then 0
    bs = torch.cat([rows.new_zeros(1), rows])  # [T + 2]: step t at t + 1; steps -1 and T have no rows
    dc, dh0, dh_buf, dh_hist = backward_buffers(dc_T, dh_T, T, P, has_proj)  # the GRU's dc: its carry, zeros
    dg_buf = torch.zeros((2, B, gate_rows), dtype=dtype, device=device)
    dG = torch.zeros((T, B, gate_rows), dtype=dtype, device=device)  # rows not active at t stay 0
    d_hn = torch.zeros((T, B, H), dtype=dtype, device=device) if is_gru else dG
    w_t = w_hh.t().contiguous()  # [P, 4H]
    w_hr_t = w_hr.t().contiguous() if has_proj else w_t  # [H, P]
    consts = backward_constants(H, P, dtype, cfg, has_proj, use_barrier=not steps and grid > 1,
                                has_resets=resets is not None, cell=cell)
    args = (w_t, w_hr_t, bs, reset_rows(resets, T, B, bs), dh_all.contiguous(), dh_T.contiguous(), saved, c_all,
            (h0 if is_gru else c0).contiguous(), dc, dg_buf, dG, dh_buf, dh_hist, dh0,
            h_all.contiguous() if is_gru else dG, d_hn)
    phases = (dict(RUN_CELL=False), dict(RUN_DH=False)) if has_proj else ({},)  # dh, cell (t >= 0)
    steps = [(t, phase) for t in range(T - 1, -2, -1) for phase in phases[:1 + (t >= 0)]] if steps else None
    _launch(_lstm_pbw_kernel, grid, args, consts, B, device, "triton backward (persistent, step budget)", steps=steps,
            t_begin=T - 1, n_steps=T + 1)
    if is_gru:
        return dG, dh0, None, d_hn
    return dG, dh0, dc, projection_weight_grad(dh_hist, workspace[2]) if has_proj else None
