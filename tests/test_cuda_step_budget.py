"""Structural checks of the CUDA fused kernels' step loop, on the cubins, without a GPU
(issue 13; DESIGN.md "The budget of one step"). A CPU proxy for speed, not a measurement.

The fused kernels (``csrc/fused/fused_forward.cu``, ``csrc/fused/fused_backward.cu``), one instance per operand
precision (fp16, bf16, float on tf32, float at fp32 accuracy by three tf32 MMAs per product), are
compiled here with nvcc for sm_80 and sm_90 and read with cuobjdump -sass. In each kernel the step loop is the
outermost loop (a conditional backward branch) that holds both tensor-core (HMMA) and block
barrier (BAR.SYNC) instructions; the k loop is the innermost loop inside it that holds HMMA.
Checked, at the flagship shape (B = 16, H = 768) where a count depends on sizes (float32's
backward: H = 592, the largest it serves on sm_90):

- W_hh is never read from global memory in the step loop: no global load (LDG) inside any loop
  nested in the step loop except the barrier's acquire-poll, only the designed handful of
  scalar loads in the step loop (xg / saved activations prefetch, batch_sizes), and no shared
  store (STS) in the k loop (W is not restaged from one on-chip buffer to another);
- the k loop is ldmatrix (LDSM) + HMMA only, and HMMA per warp per step is within 10% of the
  ideal for the tile (its product count divided over the warps), derived from the tile sizes
  of ``lstm_kernels/backends/cuda/fused.py`` (which tests/test_cuda_plan_host.py ties to the
  header) and the warps' k ranges;
- block barriers per step as designed (2) and none inside nested loops; one grid barrier per
  step: one release-add (RED/REDG ... STRONG.GPU) and one acquire-poll loop;
- the grid barrier's arrival is once per block (issue 21): the cell warps meet at named barrier 1
  (BAR.SYNC 0x1, 0x80), and one fence per arrival (the release's own MEMBAR, no separate
  sequentially consistent fence); between the block barrier before the cell and that named barrier
  the only global stores are the exchange's (h_t, m_t, dG_t, dh_t: what other blocks read), so the
  fence waits for nothing else;
- h_{t-1} (dG_{t+1}) copied with cp.async (LDGSTS);
- the cell (csrc/common/cell.cuh) of the 16-bit and tf32 instances is branch free: no branch,
  convergence region or call between the step loop's first special-function instruction (MUFU) and its
  last (a precise division puts its slow path behind one), the MUFU are the cell's designed count, one
  ex2 and one rcp per activation (the LSTM's forward 5 + 5, backward 1 + 1 for tanh(c_t); the GRU's
  forward 3 + 3, backward none), and each activation's argument is the fast formula's (an FMUL by
  -log2 e or -2 log2 e); the float32-accuracy instances have no such argument (the precise activations;
  tests/test_cuda_activations_sass.py checks the per-step kernels);
- no local memory (spills);
- the exchange's L2 reads per step, from the plan (fused_plan.cuh's grid and k ranges), are the figures
  the kernels' docstrings state (2.4 MB forward, 4.7 MB tagged, 9.4 MB backward in 16 bits, 18.9 MB in
  float, at the flagship);
- resets inside a sequence (the kernels' RESETS template parameter): the instance without resets is
  the one checked above, and the instance with resets keeps every designed count (k loops, HMMA per
  warp, barriers, release-adds, no loads in nested loops) and differs from it only by the mask's load
  (one more LDG in the step loop), a vote (forward) and integer/select instructions, with the k loops
  instruction for instruction the same;
- the wide backward (fused_backward_kernel's TILE = BWD_WIDE, no projection; fused_plan.cuh "THE WIDE BACKWARD"),
  LSTM and GRU, with resets or not: blocks of WIDE_UNITS units (two n tiles), no ring: no cp.async (LDGSTS);
  one k loop, over batches of WIDE_PAIR_SLOTS pairs, holding every HMMA, ldmatrix and operand load of the
  step; each warp's dG_{t+1} range loaded straight into A fragments by 2 x WIDE_PAIR_SLOTS 16-byte loads
  per batch (ld.global.cg.v4.u32: LDG.E.128.STRONG.GPU), all after the block barrier that ends the grid
  wait and before the batch's first HMMA in address order (a batch in flight at once, no load sunk to
  its MMA), no shared store between them and the last HMMA (dG is not staged); per slot, unrolled, 2
  ldmatrix (B of the two n tiles, none elsewhere in the step) and 2 chunks x 2 tiles x passes HMMA; the
  busiest warp's batches (the plan's k ranges: one at the flagship in 16 bits, two in float) and its HMMA
  within 10% of the ideal for the 16-unit block; the ring backward's barriers (3 per step, one release-add,
  one fence), every warp a cell warp (named barrier 1 of 256 threads), the exchange's stores before the
  arrival (the LSTM's 2 words in 16 bits, its 4 gradients in float, the GRU's 3), the cell's activations as
  the other instances', no local memory; its exchange L2 reads (half the ring backward's blocks) are the
  4.7 MB per step fused_backward.cu states, in 16 bits at the flagship;
- the narrow backward (fused_backward_kernel's TILE = BWD_NARROW; fused_plan.cuh "THE NARROW BACKWARD"),
  LSTM and GRU, with resets or not: the wide backward's checks with its own design: blocks of 16 units x
  NARROW_BATCH_TILE rows (one m16n8 tile, W^T the A operand), per slot one 16-byte operand load (row r), 2
  ldmatrix (A of both chunks) and 2 x passes HMMA, the busiest warp's HMMA half the wide warp's, warps 0-3
  the cell warps (named barrier 1 of 128 threads); its exchange L2 reads (the ring's number of blocks, each
  half the rows) are the 4.7 MB per step fused_backward.cu states.

``pytest -s`` prints the counts.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cuda_tools import (ACTIVATIONS_PER_CELL, CUOBJDUMP, NVCC, backward_tile, compile_cubins,
                        is_fast_activation_argument, is_tagged_load, is_tagged_vote, is_wide_operand_load)
from lstm_kernels.backends.cuda import fused as cf
from plan_dump import compile_mutant_plan_dump

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")
FLAGSHIP_B, FLAGSHIP_H = 16, 768


pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump")


# ---- SASS parsing --------------------------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"^(@!?U?P\w+\s+)?BRA(?:\.[\w.]+)?\s+(?:[^,]*,\s*)?0x([0-9a-f]+)")


def split_functions(sass: str) -> dict:
    """{(arch, function name): [(address, instruction text)]} from cuobjdump -sass output."""
    out = {}
    arch = None
    for section in re.split(r"(?=\n\s*(?:Fatbin \w+ code:|code for sm_\d+))", sass):
        m = re.search(r"arch = (sm_\d+)|code for (sm_\d+)", section)
        if m:
            arch = m.group(1) or m.group(2)
        for block in re.split(r"\n\s*Function : ", section)[1:]:
            name = block.split("\n", 1)[0].strip()
            out[(arch, name)] = [(int(a, 16), text.strip()) for a, text in _INSTR.findall(block)]
    return out


@dataclass
class Loop:
    start: int
    end: int  # address of the backward branch

    def holds(self, addr: int) -> bool:
        return self.start <= addr <= self.end

    def inside(self, other: "Loop") -> bool:
        return other.start <= self.start and self.end <= other.end and (self.start, self.end) != (other.start,
                                                                                                    other.end)


@dataclass
class StepLoop:
    """Counts of one kernel's step loop (static: instructions in the loop body)."""

    name: str
    ops: list  # [(addr, text)] of the step loop
    k_loops: list  # innermost loops holding HMMA, in address order
    nested: list = field(default_factory=list)  # loops nested in the step loop

    def count(self, pred, where=None) -> int:
        return sum(1 for a, t in self.ops if pred(t) and (where is None or where(a)))

    @property
    def k_loop(self) -> Loop:
        return self.k_loops[0]

    def in_k(self, a):
        return any(lp.holds(a) for lp in self.k_loops)

    def in_nested(self, a):
        return any(lp.holds(a) for lp in self.nested)


_BRA_DIV = re.compile(r"BRA\.DIV\s+[^,]*,\s*0x([0-9a-f]+)")


def loops_of(instrs) -> list:
    """Loops as backward branches (conditional, or the unconditional back edge of a rotated
    loop) placed before the body's last unpredicated EXIT: the out-of-line stubs after it
    (divergence handling of warp-synchronous code, entered by BRA.DIV) jump back into the body and
    are not loops. An early return inside the body (a block that leaves the step loop) is an
    unpredicated EXIT too, so the body ends at the last one before the first stub."""
    stubs = min((int(m.group(1), 16) for _, t in instrs for m in [_BRA_DIV.search(t)] if m), default=float("inf"))
    last = max((a for a, t in instrs if (t == "EXIT" or t.startswith("EXIT ")) and a < stubs),
               default=max(a for a, _ in instrs))
    loops = []
    for addr, text in instrs:
        m = _BRA.match(text)
        if m and addr < last and int(m.group(2), 16) < addr:
            loops.append(Loop(int(m.group(2), 16), addr))
    return loops


def opcode(t):
    """The opcode of an instruction, without its predicate and modifiers (``@!P1 LDGSTS.E.BYPASS`` -> LDGSTS)."""
    words = t.split()
    return (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]


def is_hmma(t):
    return t.split()[0].startswith("HMMA") or " HMMA" in t


def is_bar_sync(t):
    return re.search(r"\bBAR\.SYNC", t) is not None


def is_ldg(t):
    return re.search(r"\bLDG\.", t) is not None and "LDGSTS" not in t and "LDGDEPBAR" not in t


def is_poll(t):
    return is_ldg(t) and "STRONG.GPU" in t


def is_block_barrier(t):
    """__syncthreads (barrier 0), as against the cell warps' named barrier of the arrival."""
    return is_bar_sync(t) and not is_arrival_barrier(t)


_ARRIVAL_BARRIER = re.compile(r"\bBAR\.SYNC(?:\.\w+)*\s+0x1,\s*0x([0-9a-f]+)\b")


def is_arrival_barrier(t):
    """The named barrier 1 of the cell warps that precedes a block's arrival (4 x 32 threads; the wide
    backward's 8 x 32: every warp is a cell warp); arrival_threads tells the counts."""
    return _ARRIVAL_BARRIER.search(t) is not None


def arrival_threads(loop: "StepLoop") -> list:
    """The thread counts of the step loop's arrival barriers (named barrier 1), in address order."""
    return [int(_ARRIVAL_BARRIER.search(t).group(1), 16) for _, t in loop.ops if is_arrival_barrier(t)]


def is_fence(t):
    return re.search(r"\bMEMBAR\.", t) is not None


def is_stg(t):
    return opcode(t) == "STG"


def stores_before_arrivals(loop: "StepLoop") -> list:
    """Per arrival (named barrier 1) of the step loop, in address order: the global stores issued since
    the block barrier before it, the stores the arrival's fence waits for, counted by address (ptxas
    may write a select as a predicated pair of stores to one address, of which one runs)."""
    counts, since = [], set()
    for _, t in loop.ops:
        if is_block_barrier(t):
            since = set()
        elif is_arrival_barrier(t):
            counts.append(len(since))
        elif is_stg(t):
            since.add(re.findall(r"\[[^\]]+\]", t)[-1])  # desc[UR..][address]
    return counts


def arrival_counts(loop: "StepLoop") -> dict:
    """The step loop's named barriers, fences (SC among them) and stores before each arrival."""
    return dict(arrival_barriers=loop.count(is_arrival_barrier), arrival_threads=arrival_threads(loop),
                fences=loop.count(is_fence), sc_fences=loop.count(lambda t: "MEMBAR.SC" in t),
                stores_before_arrivals=stores_before_arrivals(loop))


def ldsm_outside_k_loops(loop: "StepLoop") -> int:
    """ldmatrix in the step loop but outside its k loops (the forward's register path)."""
    return loop.count(lambda t: "LDSM" in t) - loop.count(lambda t: "LDSM" in t, loop.in_k)


def is_mufu(t, fn: str) -> bool:
    """A special-function instruction ``fn`` (EX2, RCP, TANH, ...): MUFU.fn."""
    return re.search(rf"\bMUFU\.{fn}\b", t) is not None


def activations_per_step(stem: str, gates: int) -> int:
    """The cell's activations per step of the fused kernel ``stem`` (cuda_tools.ACTIVATIONS_PER_CELL)."""
    return ACTIVATIONS_PER_CELL[stem.split("_")[1], gates]


#: Control flow: a branch, a convergence region, a call (a precise division calls its slow path).
CONTROL_OPS = {"BRA", "BSSY", "BSYNC", "CALL", "RET", "WARPSYNC", "JMP", "BRX"}


#: The Ops whose cell runs the fast activations (csrc/fused/fused_common.cuh); Fp32Mma, float32 accuracy,
#: keeps the precise ones.
FAST_ACTIVATION_OPS = {"Fp16Mma", "Bf16Mma", "Tf32Mma"}


def cell_counts(loop: "StepLoop") -> dict:
    """The step loop's special-function instructions, and the cell's span: the instructions from its first
    MUFU to its last, and the control-flow instructions among them."""
    mufu = [i for i, (_, t) in enumerate(loop.ops) if opcode(t) == "MUFU"]
    span = loop.ops[mufu[0]:mufu[-1] + 1] if mufu else []
    return dict(mufu_ex2=loop.count(lambda t: is_mufu(t, "EX2")), mufu_rcp=loop.count(lambda t: is_mufu(t, "RCP")),
                mufu_other=loop.count(lambda t: opcode(t) == "MUFU" and not (is_mufu(t, "EX2") or is_mufu(t, "RCP"))),
                fast_arguments=loop.count(is_fast_activation_argument),
                cell_span=len(span), cell_control=sum(opcode(t) in CONTROL_OPS for _, t in span))


def cell_problems(counts: dict, activations: int) -> list:
    """What departs from the branch-free cell: control flow between its first special function and its last,
    MUFU other than one ex2 and one rcp per activation, or an activation not the fast formula (tanhf, say,
    which also ends in one MUFU.EX2 and one MUFU.RCP and has no branch: its argument is no FMUL by -2 log2 e)."""
    problems = []
    if counts["fast_arguments"] != activations:
        problems.append(f"{counts['fast_arguments']} fast activation arguments, designed {activations}")
    if counts["cell_control"]:
        problems.append(f"{counts['cell_control']} branches or calls among the cell's {counts['cell_span']} "
                        "instructions")
    got = (counts["mufu_ex2"], counts["mufu_rcp"], counts["mufu_other"])
    if got != (activations, activations, 0):
        problems.append(f"MUFU ex2, rcp, other {got}, designed ({activations}, {activations}, 0)")
    return problems


def is_release_add(t):
    return re.search(r"\b(REDG?|ATOMG?)\.E\.ADD\.STRONG\.GPU", t) is not None


def is_sts(t):
    return re.search(r"\bSTS(\.|\s)", t) is not None


def step_loop_of(name: str, instrs) -> StepLoop:
    """The step loop of a kernel and its k loops (the wide backward's: its batches of slots)."""
    loops = loops_of(instrs)
    addr_ops = lambda lp, pred: [a for a, t in instrs if lp.holds(a) and pred(t)]  # noqa: E731
    steps = [lp for lp in loops if addr_ops(lp, is_hmma) and addr_ops(lp, is_bar_sync)]
    assert steps, f"{name}: no loop holds both HMMA and BAR.SYNC"
    step = max(steps, key=lambda lp: lp.end - lp.start)
    nested = [lp for lp in loops if lp.inside(step) and lp.start > step.start]
    with_hmma = [lp for lp in nested if addr_ops(lp, is_hmma)]
    k_loops = sorted((lp for lp in with_hmma if not any(o.inside(lp) for o in with_hmma)), key=lambda lp: lp.start)
    assert k_loops, f"{name}: no k loop with HMMA inside the step loop"
    return StepLoop(name, [(a, t) for a, t in instrs if step.holds(a)], k_loops, nested)


# ---- compiling ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_sass(tmp_path_factory):
    """{(arch, kernel): [(addr, text)]} and the res-usage text of the fused kernels, both archs."""
    listings, usage = compile_cubins(["fused/fused_forward.cu", "fused/fused_backward.cu"], ARCHS,
                                     tmp_path_factory.mktemp("fused_cubins"))
    return functions_of(listings), usage


def functions_of(listings) -> dict:
    """{(arch, kernel): [(addr, text)]} of compile_cubins' listings."""
    return {(a or arch, name): instrs for arch, sass in listings for (a, name), instrs in split_functions(sass).items()}


#: The kernels' operand precisions (csrc/fused/fused_common.cuh): storage bytes and MMAs per tile and chunk.
OPS = {"Fp16Mma": (2, 1), "Bf16Mma": (2, 1), "Tf32Mma": (4, 1), "Fp32Mma": (4, 3)}


def op_of(name: str) -> str:
    found = [op for op in OPS if op in name]
    assert len(found) == 1, name
    return found[0]


def flags_tag(proj: bool, resets: bool = False, gates: int = None, tile: str = None, wregs: bool = None) -> str:
    """The mangled template flags <..., PROJ, RESETS(, GATES(, TILE | WREGS))> of a fused kernel instance (GATES,
    the cell's gate rows: 4 the LSTM, 3 the GRU; TILE, the backward's fifth: fused_plan.cuh's BWD_RING, BWD_WIDE
    or BWD_NARROW, named here "ring", "wide", "narrow"; WREGS, the forward's fifth: the instance with the
    register path). Without ``tile`` (``wregs``) the tag matches a backward (forward) instance of any tile
    (either instance): name it to pick one."""
    return (f"Lb{int(proj)}ELb{int(resets)}E" + ("" if gates is None else f"Li{gates}E")
            + ("" if tile is None else f"Li{cf.BWD_TILES[tile]}E") + ("" if wregs is None else f"Lb{int(wregs)}E"))


#: The Ops whose forward has an instance with the register path (WREGS): not 3xTF32 (fused_forward.cu's
#: with_weights), whose small parts would double the fragments.
REGISTER_OPS = ("Fp16Mma", "Bf16Mma", "Tf32Mma")
#: The fused kernels' instances per architecture: per Op with a projection or not, with resets or not, and
#: the GRU's (GATES = 3, no projection), with resets or not; the forward's those again with the register
#: path for REGISTER_OPS; the backward's also wide and narrow (no projection: the LSTM's and the GRU's, with
#: resets or not).
INSTANCES = {"fused_forward_kernel": (4 + 2) * (len(OPS) + len(REGISTER_OPS)),
             "fused_backward_kernel": (4 + 2 + 4 + 4) * len(OPS)}


def weights_instances(stem: str) -> tuple:
    """The WREGS values of ``stem``'s instances: the forward's without and with the register path."""
    return (False, True) if stem == "fused_forward_kernel" else (False,)


def _kernels(funcs, stem: str, arch: str, proj: bool, resets: bool = False, gates: int = 4, tile: str = "ring",
             wregs: bool = False):
    """{op: (name, instrs)} of the instances (one per Op) of ``stem`` with these flags (the backward's with
    TILE = ``tile``, the forward's with WREGS = ``wregs``: the tag names them, so that one instance per Op
    matches; with ``wregs`` the REGISTER_OPS)."""
    assert tile == "ring" or stem == "fused_backward_kernel", stem
    assert not wregs or stem == "fused_forward_kernel", stem
    forward = stem == "fused_forward_kernel"
    tag = flags_tag(proj, resets, gates, None if forward else tile, wregs if forward else None)
    ops = REGISTER_OPS if wregs else tuple(OPS)
    matching = [(name, instrs) for (a, name), instrs in funcs.items() if a == arch and stem in name and tag in name]
    found = {op_of(name): (name, instrs) for name, instrs in matching}
    assert len(matching) == len(ops) and sorted(found) == sorted(ops), (
        f"{stem} {arch} proj={proj} resets={resets} gates={gates} tile={tile} wregs={wregs}: expected one instance "
        f"per Op, got {sorted(n for n, _ in matching)}")
    return found


FLAGSHIP_P = 256  # proj_size of the projected flagship (B = 16, H = 768, P = 256)


def design_shape(stem: str, op: str, proj: bool) -> tuple:
    """(H, P) at which the counts of ``stem`` for ``op`` are taken."""
    return FLAGSHIP_H, (FLAGSHIP_P if proj else FLAGSHIP_H)


#: The threads of the cell warps that meet at the arrival's named barrier (fused_plan.cuh's CELL_WARPS x 32);
#: the wide backward's are every warp's (THREADS).
CELL_THREADS = 4 * 32


# Designed per-step figures of the fused kernels (the headers of fused_forward.cu / fused_backward.cu).
# k loops, in address order: (output tiles of one block's product as m16n8 tiles, 32-byte chunks of
# K at the design shape, chunks per k-loop iteration, MMAs per tile and chunk).
def design(stem: str, proj: bool, op: str = "Fp16Mma", resets: bool = False, gates: int = 4,
           wregs: bool = False) -> dict:
    """With ``resets``: the same, and one more scalar load per step (the step's reset flags). ``gates``: the
    forward's cell (3: the GRU, whose 24 gate rows are one W tile (r, z) x 2 batch tiles and one transposed
    tile, batch x the 8 units' n rows: 3 MMA tiles per chunk, the ideal for 24 rows x 16 batch rows).
    ``wregs``: the forward's instance with the register path (and with it the tagged exchange)."""
    elem, passes = OPS[op]
    extra = 1 if resets else 0
    H, P = design_shape(stem, op, proj)
    Pk, Hk, K4k = (cf.k_chunks(cf.round_up(n, cf.kpad(elem)), elem) for n in (P, H, gates * H))
    if stem == "fused_forward_kernel":
        tiles = (gates * cf.UNITS) * cf.BATCH_TILE // (16 * 8)  # m16n8 tiles of the gate rows x batch
        loops = [(tiles, Pk, 1, passes)]  # gates: W rows x batch
        if proj:
            loops.append(((cf.BATCH_TILE // 16) * (cf.UNITS // 8), Hk, 2, passes))  # h = m W_hr^T: batch x p
        # loads per half-step: the xg prefetch (one per gate), batch_sizes of t and t+1
        # arrivals: one per half-step, after the one exchange store of the cell thread (hx; PROJ: mx, then hx)
        # The tagged exchange (16-bit LSTM without projection) is a second path through the same step: its own
        # block barrier after the products, and its tagged store beside hx's (the two exchange stores that lie
        # between the block barrier and the arrival in address order; one of them runs)
        tagged = wregs and elem == 2 and gates == 4 and not proj
        return dict(loops=loops, bar_sync=3 * len(loops) + tagged, release_add=len(loops), ldg_max=gates + 2 + extra,
                    exchange_stores=[1 + tagged] * len(loops), tagged=tagged, arrival_threads=CELL_THREADS)
    # dG W_hh (K = 4H; the GRU's 3H): batch x units (p), dG streamed per warp: one ring stage (STAGE_PAIRS
    # pairs) per iteration
    loops = [((cf.BATCH_TILE // 16) * (cf.UNITS // 8), K4k, 2 * cf.stage_pairs(gates), passes)]
    if proj:
        loops.append(((cf.BATCH_TILE // 16) * (cf.UNITS // 8), Pk, 2, passes))  # dm = dh W_hr: batch x units
    # loads: 7 prefetched cell inputs, dh_T, dc_T, dh_all (proj), batch_sizes of t and t+1, c0; the GRU's
    # 6 cell inputs (r, z, n, hn, h_{t-1} from h_all or h0), dh_all, dh_T, batch_sizes of t and t+1
    ldg_max = 13 if gates == 4 else 11
    # exchange stores before each arrival: the LSTM's four gate gradients in one store, the GRU's three;
    # PROJ: dh_t (one), then dG_t
    exchange = [1 if gates == 4 else 3] + ([1] if proj else [])
    return dict(loops=loops, bar_sync=3 * len(loops), release_add=len(loops), ldg_max=ldg_max + extra, streamed=True,
                exchange_stores=exchange, arrival_threads=CELL_THREADS)


#: The products of each kernel's k loops, in address order, by the name of the function of
#: csrc/fused/fused_plan.cuh that gives each warp its k range there (printed by tests/cuda_host/plan_dump.cpp).
K_RANGES = {"fused_forward_kernel": ("fwd_gate_k", "fwd_proj_k"), "fused_backward_kernel": ("bwd_gate_k", "bwd_proj_k")}


def kernel_k_ranges(plan_dump, stem: str, op: str, proj: bool, gates: int = 4) -> list:
    """Per k loop of ``stem``: every warp's [begin, end), from the kernels' own index arithmetic
    (fused_plan.cuh run on the host) at the design shape; the GRU's backward over K = 3H."""
    elem, _ = OPS[op]
    H, P = design_shape(stem, op, proj)
    d = plan_dump(FLAGSHIP_B, H, elem, P)
    names = K_RANGES[stem][: 2 if proj else 1]
    if gates == 3 and stem == "fused_backward_kernel":
        names = ("bwd_gru_gate_k",)
    return [d[name] for name in names]


def hmma_per_warp_per_step(loop: StepLoop, spec, k_ranges) -> tuple:
    """(busiest warp's HMMA per step in the k loops, ideal, k-loop bodies, trips): k loop i's body runs once per
    k_unit chunks of the warp's range, taken from the kernels' own arithmetic (``k_ranges``, in
    chunks where k_unit is 1, else in pairs); the ideal is each product's MMA count (tiles x chunks
    x MMAs per tile and chunk) divided over the warps. A warp given more than its share of K makes
    the busiest warp's count exceed the ideal."""
    per_warp, ideal, bodies, trips = 0, 0.0, [], []
    for lp, (tiles, k_steps, k_unit, passes), ranges in zip(loop.k_loops, spec, k_ranges):
        body = loop.count(is_hmma, lp.holds)
        assert sum(e - b for b, e in ranges) * (2 if k_unit > 1 else 1) == k_steps, (ranges, k_steps)
        pairs_per_trip = k_unit // 2 if k_unit > 2 else 1  # a streamed ring stage holds STAGE_PAIRS pairs
        trip = max(-(-(e - b) // pairs_per_trip) for b, e in ranges)
        per_warp += body * trip
        ideal += tiles * k_steps * passes / cf.WARPS
        bodies.append(body), trips.append(trip)
    return per_warp, ideal, bodies, trips


def is_tagged_store(t):
    """The tagged exchange's store: st.relaxed.gpu.u64 (one tagged word)."""
    return is_stg(t) and ".64" in t and "STRONG.GPU" in t


def is_memory_or_sync(t):
    """A load, store, copy, fence or barrier: what a wait's exit must not pass on its way to the MMAs."""
    return opcode(t) in {"LDG", "LDS", "LDSM", "LDGSTS", "STG", "STS", "RED", "ATOMG", "MEMBAR", "BAR", "DEPBAR"}


def spin_exit_to_mma(loop: "StepLoop", spin: Loop) -> list:
    """The instructions (in address order) from the tagged wait's exit to the first HMMA after it: the
    exit is the vote's branch (VOTE.ANY into a predicate, then a predicated BRA) where it leaves the spin
    loop, whether by its target or by falling through."""
    ops = loop.ops
    for i, (a, t) in enumerate(ops):
        if spin.holds(a) and is_tagged_vote(t):
            j = next(j for j in range(i + 1, len(ops)) if _BRA.match(ops[j][1]))
            m = _BRA.match(ops[j][1])
            target = int(m.group(2), 16) if not spin.holds(int(m.group(2), 16)) else ops[j + 1][0]
            after = [(b, u) for b, u in ops if b >= target]
            first = next(k for k, (_, u) in enumerate(after) if is_hmma(u))
            return after[:first]
    raise AssertionError(f"{loop.name}: no vote in the tagged spin at {spin.start:#x}")


def tagged_counts(loop: "StepLoop") -> dict:
    """The tagged exchange in the step loop: its operand loads (in the step, and in the wait's spin loop, a
    loop nested in it), its stores, what the spin loop holds besides the loads, and the path from the
    wait's exit to the first MMA (its instructions, and the memory operations and barriers among them)."""
    spins = [lp for lp in loop.nested if any(lp.holds(a) and is_tagged_load(t) for a, t in loop.ops)]
    in_spin = lambda a: any(lp.holds(a) for lp in spins)  # noqa: E731
    exits = [spin_exit_to_mma(loop, lp) for lp in spins]
    return dict(tagged_loads=loop.count(is_tagged_load), tagged_loads_in_spin=loop.count(is_tagged_load, in_spin),
                tagged_stores=loop.count(is_tagged_store), spin_loops=len(spins),
                spin_barriers_fences=loop.count(lambda t: is_bar_sync(t) or is_fence(t), in_spin),
                exit_to_mma_instructions=[len(e) for e in exits],
                exit_to_mma_memory_or_sync=[sum(is_memory_or_sync(t) for _, t in e) for e in exits])


def tagged_problems(counts: dict, slots: int) -> list:
    """What departs from the tagged exchange's design: every slot's two 16-byte loads issued at once, then
    a spin loop that reloads only those (no barrier, no fence in it), and one tagged store per step."""
    problems = []
    if counts["tagged_loads"] != 4 * slots or counts["tagged_loads_in_spin"] != 2 * slots:
        problems.append(f"{counts['tagged_loads']} tagged loads ({counts['tagged_loads_in_spin']} in the spin), "
                        f"designed {4 * slots} ({2 * slots})")
    if counts["spin_loops"] != 1 or counts["spin_barriers_fences"]:
        problems.append(f"{counts['spin_loops']} spin loops with {counts['spin_barriers_fences']} barriers/fences")
    if counts["tagged_stores"] != 1:
        problems.append(f"{counts['tagged_stores']} tagged stores per step, designed 1")
    # past the wait, the loaded words go straight into the MMAs: register moves, nothing that waits
    if any(counts["exit_to_mma_memory_or_sync"]):
        problems.append(f"{counts['exit_to_mma_memory_or_sync']} memory operations or barriers between the tagged "
                        "wait's exit and the first MMA, designed none")
    return problems


def register_path(plan_dump, stem: str, op: str, proj: bool, gates: int):
    """(slots, HMMA per chunk, ldmatrix per chunk) of the forward's path with W in registers (16-bit and
    tf32 Ops: fused_plan.cuh's w_reg_chunks for the element size, unrolled), or None where a kernel has none
    (the backward; 3xTF32, whose small parts would double the fragments)."""
    elem, passes = OPS[op]
    if stem != "fused_forward_kernel" or passes > 1:  # 3xTF32 (three passes: fused_common.cuh's kSplit)
        return None
    H, P = design_shape(stem, op, proj)
    slots = plan_dump(FLAGSHIP_B, H, elem, P)["W_REG_CHUNKS"]
    tiles = (gates * cf.UNITS) * cf.BATCH_TILE // (16 * 8)
    return slots, tiles * passes, 1 if gates == 4 else 2


#: (stem, proj, gates) of every fused kernel instance family: the LSTM's with and without a projection,
#: the GRU's.
FAMILIES = [("fused_forward_kernel", False, 4), ("fused_forward_kernel", True, 4), ("fused_forward_kernel", False, 3),
            ("fused_backward_kernel", False, 4), ("fused_backward_kernel", True, 4), ("fused_backward_kernel", False, 3)]


@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stem, proj, gates", FAMILIES,
                         ids=[f"{s.split('_')[1]}{'-proj' if p else ''}{'-gru' if g == 3 else ''}" for s, p, g in FAMILIES])
def test_fused_step_loop_structure(fused_sass, plan_dump, arch, stem, proj, gates, resets):
    funcs, _ = fused_sass
    instances = [(wregs, op, name, instrs) for wregs in weights_instances(stem)
                 for op, (name, instrs) in _kernels(funcs, stem, arch, proj, resets, gates, wregs=wregs).items()]
    for wregs, op, name, instrs in instances:
        d = design(stem, proj, op, resets, gates, wregs)
        loop = step_loop_of(name, instrs)
        tag = (f"{stem}{'<proj>' if proj else ''}{'<gru>' if gates == 3 else ''}{'<resets>' if resets else ''}"
               f"{'<registers>' if wregs else ''} {arch} {op}")
        assert len(loop.k_loops) == len(d["loops"]), (tag, loop.k_loops)
        per_warp, ideal, bodies, trips = hmma_per_warp_per_step(loop, d["loops"],
                                                                kernel_k_ranges(plan_dump, stem, op, proj, gates))
        counts = dict(
            k_loops=len(loop.k_loops), hmma_k_loop_bodies=bodies, hmma_outside_k_loops=loop.count(is_hmma)
            - loop.count(is_hmma, loop.in_k), k_trips_busiest_warp=trips,
            hmma_per_warp_per_step=per_warp, hmma_ideal=ideal,
            bar_sync=loop.count(is_bar_sync), bar_sync_in_nested_loops=loop.count(is_bar_sync, loop.in_nested),
            release_add=loop.count(is_release_add), poll_loads=loop.count(is_poll),
            **arrival_counts(loop),
            ldg=loop.count(lambda t: is_ldg(t) and not is_poll(t)),
            ldg_in_nested_loops=loop.count(lambda t: is_ldg(t) and not is_poll(t), loop.in_nested),
            ldg_in_k_loop=loop.count(is_ldg, loop.in_k), sts_in_k_loop=loop.count(is_sts, loop.in_k),
            ldsm_in_k_loop=loop.count(lambda t: "LDSM" in t, loop.in_k),
            k_loop_instructions=[loop.count(lambda t: not t.startswith("@!PT "), lp.holds) for lp in loop.k_loops],
            cp_async=loop.count(lambda t: "LDGSTS" in t),
            **tagged_counts(loop), **cell_counts(loop),
        )
        H, P = design_shape(stem, op, proj)
        shape = f"B={FLAGSHIP_B}, H={H}" + (f", P={P}" if proj else "")
        print(f"\n[after] {tag} ({shape}): " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        # the forward's W in registers (16-bit and tf32): outside the k loops, the register path unrolled over
        # the plan's W_REG_CHUNKS slots, each chunk one ldmatrix of h (the GRU's two: h as B and as A operand)
        # and its MMA tiles, and no ldmatrix of W; the busiest warp's range fits the slots at the design shape
        reg = register_path(plan_dump, stem, op, proj, gates) if wregs else None
        ldsm_outside = ldsm_outside_k_loops(loop)
        if not d.get("tagged"):
            assert counts["tagged_loads"] == 0 and counts["tagged_stores"] == 0, counts
        if reg is None:
            assert counts["hmma_outside_k_loops"] == 0 and ldsm_outside == 0, counts
        else:
            slots, hmma_per_chunk, ldsm_per_chunk = reg
            busiest = max(e - b for b, e in kernel_k_ranges(plan_dump, stem, op, proj, gates)[0])
            print(f"[registers] {tag}: {slots} slots, HMMA {counts['hmma_outside_k_loops']}, LDSM {ldsm_outside}, "
                  f"busiest warp {busiest} chunks: {busiest * hmma_per_chunk} HMMA per step")
            # the tagged exchange's path multiplies the same slots from fragments it loaded itself (no ldmatrix)
            paths = 2 if d.get("tagged") else 1
            assert counts["hmma_outside_k_loops"] == paths * slots * hmma_per_chunk, counts
            assert ldsm_outside == slots * ldsm_per_chunk, (ldsm_outside, counts)
            if d.get("tagged"):
                assert not tagged_problems(counts, slots), (tagged_problems(counts, slots), counts)
            tiles, k_steps, _, passes = d["loops"][0]
            ideal_gates = tiles * k_steps * passes / cf.WARPS
            assert busiest <= slots and abs(busiest * hmma_per_chunk / ideal_gates - 1.0) <= 0.10, (busiest, counts)
        # W_hh (and W_hr) stay on chip: no global load in a k loop or any nested loop, no restaging store
        assert counts["ldg_in_k_loop"] == 0 and counts["ldg_in_nested_loops"] == 0, counts
        assert counts["sts_in_k_loop"] == 0, counts
        assert counts["ldg"] <= d["ldg_max"], counts
        # "@!PT" (never true) instructions are placeholders ptxas emits after cp.async; they never run
        k_ops = {opcode(t) for a, t in loop.ops if loop.in_k(a) and not t.startswith("@!PT ")}
        # the k loop multiplies from shared memory; the backward's also streams its dG stage (cp.async)
        streamed = {"LDGSTS"} if d.get("streamed") else set()
        assert {"HMMA", "LDSM"} | streamed <= k_ops, k_ops
        assert not (k_ops & ({"LDG", "LDS", "STS", "STG", "LDGSTS"} - streamed)), k_ops
        # tensor-core work per warp per step within 10% of the ideal
        assert bodies == [tiles * k_unit * passes for tiles, _, k_unit, passes in d["loops"]], counts
        assert abs(per_warp / ideal - 1.0) <= 0.10, counts
        # barriers per step as designed
        assert counts["bar_sync"] == d["bar_sync"] and counts["bar_sync_in_nested_loops"] == 0, counts
        assert counts["release_add"] == d["release_add"] and counts["poll_loads"] >= 1, counts
        assert not arrival_problems(counts, d), (arrival_problems(counts, d), counts)
        assert counts["cp_async"] >= 1, counts
        if op in FAST_ACTIVATION_OPS:
            problems = cell_problems(counts, activations_per_step(stem, gates))
            assert not problems, (problems, counts)
        else:  # float32 accuracy: the precise activations, no fast argument
            assert counts["fast_arguments"] == 0, counts


# ---- the wide backward (fused_backward_kernel<..., WIDE = 1>) -------------------------------------------

#: (gates) of the wide backward's instance families (no projection): the LSTM's, the GRU's.
WIDE_GATES = (4, 3)

#: Batches of WIDE_PAIR_SLOTS pairs (L2 round trips) of the wide backward's busiest warp at the flagship, per
#: (storage bytes, gates): 16 bits one (the LSTM's 12 pairs, the GRU's 9); float two (24, 18).
WIDE_BATCHES = {(2, 4): 1, (2, 3): 1, (4, 4): 2, (4, 3): 2}


def wide_design(plan_dump, op: str = "Fp16Mma", resets: bool = False, gates: int = 4, tile: str = "wide") -> dict:
    """Designed per-step figures of the wide backward (``tile`` "wide") or the narrow one ("narrow"), from the
    plan (fused_plan.cuh run on the host: its WIDE_PAIR_SLOTS, WIDE_UNITS, NARROW_BATCH_TILE and the warps' k
    ranges bwd_gate_k, the GRU's over 3H) at the flagship. The product's k loop runs batches of
    WIDE_PAIR_SLOTS pairs, its body unrolled over the slots (uniform branches on the batch's pairs), so the
    body's static counts are the slots'. The wide block's product is 16 rows x 16 units, two m16n8 tiles: per
    slot 2 ldmatrix.x4 (B of each n tile, both chunks of the pair), 2 chunks x 2 tiles x passes HMMA and 2
    16-byte loads (rows r and r + 8). The narrow block's is 16 units x 8 rows, one tile: per slot 2
    ldmatrix.x4 (A: W^T of each chunk), 2 chunks x passes HMMA and one 16-byte load (row r); in 16 bits the
    narrow warp whose range fits the slots holds W^T's fragments in registers, a path of its own outside the k
    loop: the slots' loads, all before its first HMMA, and their HMMA, with no ldmatrix (``register_path``). The
    busiest warp runs its pairs in ``batches`` trips. The rest is the ring backward's (design), but in the wide block
    every warp is a cell warp, and the exchange stores before the arrival are the transposed layout's: the
    LSTM's gradients as two 4-byte words in 16 bits (i, f and g, o), as four stores in float; the GRU's
    three."""
    elem, passes = OPS[op]
    H = FLAGSHIP_H
    d = plan_dump(FLAGSHIP_B, H, elem, H)
    slots, units = d["WIDE_PAIR_SLOTS"], d["WIDE_UNITS"]
    narrow = tile == "narrow"
    rows = d["NARROW_BATCH_TILE"] if narrow else cf.BATCH_TILE
    tiles = rows * units // (16 * 8)  # m16n8 tiles of the block's product: the wide one's 2, the narrow one's 1
    # ldmatrix.x4 per slot: the narrow one's A of each chunk; the wide one's B of each n tile of 8 units
    ldsm_per_slot = 2 if narrow else units // 8
    chunks = cf.k_chunks(cf.round_up(gates * H, cf.kpad(elem)), elem)
    ranges = d["bwd_gate_k" if gates == 4 else "bwd_gru_gate_k"]
    longest = max(e - b for b, e in ranges)
    assert longest == d["bwd_gate_k_longest"][str(gates)], (longest, d["bwd_gate_k_longest"])
    assert sum(e - b for b, e in ranges) * 2 == chunks, (ranges, chunks)
    ring = design("fused_backward_kernel", False, op, resets, gates)
    batches = -(-longest // slots)
    assert batches == d["bwd_wide_batches"][str(gates)] == WIDE_BATCHES[elem, gates], (batches, d["bwd_wide_batches"])
    register_path = narrow and elem == 2  # W^T's fragments in registers (16 bits), beside the k loop
    loop_loads, loop_hmma = (1 if narrow else 2) * slots, slots * 2 * tiles * passes
    return dict(H=H, slots=slots, passes=passes, longest=longest, batches=batches,
                register_path=register_path, path_loads=loop_loads if register_path else 0,
                path_hmma=loop_hmma if register_path else 0,
                operand_loads=loop_loads, ldsm=slots * ldsm_per_slot,
                hmma=loop_hmma, hmma_busiest=longest * 2 * tiles * passes,
                hmma_ideal=tiles * chunks * passes / cf.WARPS,
                bar_sync=ring["bar_sync"], release_add=ring["release_add"], ldg_max=ring["ldg_max"],
                exchange_stores=[3 if gates == 3 else (2 if elem == 2 else 4)],
                arrival_threads=CELL_THREADS if narrow else d["THREADS"])


def wide_counts(loop: "StepLoop") -> dict:
    """The wide backward's step loop: its loops, operand loads, ldmatrix, HMMA, where the loads lie (after the
    first block barrier, that ends warp 0's grid wait; before the first HMMA), the shared stores between the
    first load and the last HMMA, and the counts the ring backward's checks take (barriers, arrival, cell)."""
    first_bar = min((a for a, t in loop.ops if is_block_barrier(t)), default=None)
    operand_or_poll = lambda t: is_wide_operand_load(t) or is_poll(t)  # noqa: E731
    outside = lambda a: not loop.in_k(a)  # noqa: E731

    def loads_first(where) -> int:  # of the operand loads in `where`, those before its first HMMA
        loads = [a for a, t in loop.ops if is_wide_operand_load(t) and where(a)]
        hmma = [a for a, t in loop.ops if is_hmma(t) and where(a)]
        return sum(a < min(hmma) for a in loads) if hmma else 0

    loads = [a for a, t in loop.ops if is_wide_operand_load(t)]
    hmma = [a for a, t in loop.ops if is_hmma(t)]
    return dict(
        k_loops=len(loop.k_loops), nested_loops=len(loop.nested),
        path_loads=loop.count(is_wide_operand_load, outside), path_hmma=loop.count(is_hmma, outside),
        path_ldsm=loop.count(lambda t: "LDSM" in t, outside), path_loads_first=loads_first(outside),
        operand_loads=loop.count(is_wide_operand_load, loop.in_k), hmma=loop.count(is_hmma, loop.in_k),
        ldsm=loop.count(lambda t: "LDSM" in t, loop.in_k),
        cp_async=loop.count(lambda t: opcode(t) in ("LDGSTS", "LDGDEPBAR", "DEPBAR")),
        loads_before_first_hmma=loads_first(loop.in_k),
        loads_after_first_block_barrier=sum(first_bar is not None and a > first_bar for a in loads),
        sts_between_loads_and_last_hmma=loop.count(is_sts, lambda a: loads and hmma and min(loads) < a < max(hmma)),
        bar_sync=loop.count(is_bar_sync), bar_sync_in_nested_loops=loop.count(is_bar_sync, loop.in_nested),
        release_add=loop.count(is_release_add), poll_loads=loop.count(lambda t: is_poll(t) and not is_wide_operand_load(t)),
        ldg=loop.count(lambda t: is_ldg(t) and not operand_or_poll(t)),
        ldg_in_nested_loops=loop.count(lambda t: is_ldg(t) and not operand_or_poll(t), loop.in_nested),
        **arrival_counts(loop), **cell_counts(loop))


def wide_problems(counts: dict, d: dict) -> list:
    """What departs from the wide backward's design (wide_design) in its step loop's counts (wide_counts)."""
    problems = []
    path = (counts["path_loads"], counts["path_hmma"], counts["path_ldsm"])
    if counts["k_loops"] != 1 or path != (d["path_loads"], d["path_hmma"], 0):
        problems.append(f"{counts['k_loops']} k loops; outside the one k loop (the batches of slots) {path} operand "
                        f"loads, HMMA and ldmatrix, designed ({d['path_loads']}, {d['path_hmma']}, 0): "
                        + ("the register path" if d["register_path"] else "none"))
    if counts["path_loads_first"] != counts["path_loads"]:
        problems.append(f"{counts['path_loads_first']} of the register path's {counts['path_loads']} operand loads "
                        "before its first HMMA")
    if counts["cp_async"]:
        problems.append(f"{counts['cp_async']} cp.async (LDGSTS / its barriers): the ring, not the wide or narrow loads")
    if counts["operand_loads"] != d["operand_loads"]:
        problems.append(f"{counts['operand_loads']} 16-byte operand loads, designed {d['operand_loads']}")
    if counts["loads_before_first_hmma"] != counts["operand_loads"]:
        problems.append(f"{counts['loads_before_first_hmma']} of {counts['operand_loads']} operand loads before the "
                        "first HMMA: the rest sunk to their MMAs (not a batch in flight at once)")
    if counts["loads_after_first_block_barrier"] != counts["operand_loads"] + counts["path_loads"]:
        problems.append(f"{counts['loads_after_first_block_barrier']} of {counts['operand_loads']} operand loads after "
                        "the block barrier that ends the grid wait")
    if counts["sts_between_loads_and_last_hmma"]:
        problems.append(f"{counts['sts_between_loads_and_last_hmma']} shared stores among the loads and MMAs: "
                        "dG staged")
    if counts["hmma"] != d["hmma"] or counts["ldsm"] != d["ldsm"]:
        problems.append(f"HMMA {counts['hmma']}, ldmatrix {counts['ldsm']}, designed {d['hmma']}, {d['ldsm']} "
                        f"({d['slots']} slots unrolled)")
    if counts["bar_sync"] != d["bar_sync"] or counts["bar_sync_in_nested_loops"]:
        problems.append(f"{counts['bar_sync']} BAR.SYNC ({counts['bar_sync_in_nested_loops']} in nested loops), "
                        f"designed {d['bar_sync']}")
    if counts["release_add"] != d["release_add"] or counts["poll_loads"] < 1:
        problems.append(f"{counts['release_add']} release-adds, {counts['poll_loads']} polls")
    if counts["ldg"] > d["ldg_max"] or counts["ldg_in_nested_loops"]:
        problems.append(f"{counts['ldg']} other loads ({counts['ldg_in_nested_loops']} in nested loops), at most "
                        f"{d['ldg_max']}")
    return problems + arrival_problems(counts, d)


@pytest.mark.parametrize("tile", ["wide", "narrow"])
@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("gates", WIDE_GATES, ids=["lstm", "gru"])
def test_wide_backward_step_loop_structure(fused_sass, plan_dump, arch, gates, resets, tile):
    """The wide and the narrow backward of every Op (the module docstring's last items): wide_problems, the
    busiest warp's batches of slots and its HMMA within 10% of the ideal at the flagship, the cell's activations
    as the ring backward's, and no local memory with at most 255 registers."""
    funcs, usage = fused_sass
    regs = {n: (int(r), int(st), int(lo)) for n, r, st, lo in
            re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)}
    for op, (name, instrs) in _kernels(funcs, "fused_backward_kernel", arch, False, resets, gates, tile).items():
        d = wide_design(plan_dump, op, resets, gates, tile)
        loop = step_loop_of(name, instrs)
        counts = wide_counts(loop)
        tag = f"{tile} backward{'<gru>' if gates == 3 else ''}{'<resets>' if resets else ''} {arch} {op}"
        print(f"\n[{tile}] {tag} (B={FLAGSHIP_B}, H={d['H']}): " + ", ".join(f"{k}={v}" for k, v in counts.items())
              + f"; busiest warp {d['longest']} pairs in {d['batches']} batches, {d['hmma_busiest']} HMMA, ideal "
              f"{d['hmma_ideal']:g}; "
              f"REG/STACK/LOCAL {regs.get(name)}")
        problems = wide_problems(counts, d)
        assert not problems, (tag, problems, counts)
        # the busiest warp's HMMA (2 chunks x tiles x passes per pair of its range) are within 10% of the even
        # share of the block's product
        assert abs(d["hmma_busiest"] / d["hmma_ideal"] - 1.0) <= 0.10, (tag, d)
        if op in FAST_ACTIVATION_OPS:
            problems = cell_problems(counts, activations_per_step("fused_backward_kernel", gates))
            assert not problems, (tag, problems, counts)
        else:  # float32 accuracy: the precise activations, no fast argument
            assert counts["fast_arguments"] == 0, (tag, counts)
        # no spill: the registers of the slots (8 or 4 x 12) and the accumulators fit the 255 of a thread
        assert name in regs and regs[name][0] <= 255 and regs[name][1:] == (0, 0), (tag, regs.get(name))
        assert not any(re.search(r"\b(LDL|STL)\b", t) for _, t in instrs), (tag, "local memory")


def test_the_ops_name_their_activations_as_the_checks_assume():
    """FAST_ACTIVATION_OPS is what fused_common.cuh's Op structs say."""
    header = (ROOT / "csrc" / "fused" / "fused_common.cuh").read_text()
    found = dict(re.findall(r"struct (\w+Mma) \{[^}]*?using Activations = (\w+);", header))
    assert sorted(found) == sorted(OPS), found
    assert {op for op, act in found.items() if act == "FastActivations"} == FAST_ACTIVATION_OPS, found
    assert {found[op] for op in set(OPS) - FAST_ACTIVATION_OPS} == {"PreciseActivations"}, found


#: What all blocks together read from L2 per step for the exchange at the flagship (B = 16, H = 768), in MB, as
#: the kernels' docstrings state it: (kernel, storage bytes, variant) -> MB, variant "" (the copy; the backward's
#: ring), "tagged" or "wide". The forward's h_{t-1} (the tagged exchange's 8-byte words carry 4 bytes of h: twice
#: the copy's bytes), the backward's dG_{t+1} (the wide backward's blocks of WIDE_UNITS: half the blocks, each
#: reading the same whole dG of its batch tile: 48 blocks x 16 rows x 6144 bytes).
EXCHANGE_MB = {("fused_forward_kernel", 2, ""): 2.4, ("fused_forward_kernel", 2, "tagged"): 4.7,
               ("fused_backward_kernel", 2, ""): 9.4, ("fused_backward_kernel", 4, ""): 18.9,
               ("fused_backward_kernel", 2, "wide"): 4.7, ("fused_backward_kernel", 2, "narrow"): 4.7}


def exchange_bytes_per_step(d: dict, stem: str, variant: str = "") -> int:
    """From the plan (fused_plan.cuh run on the host: the kernels' own grid and k ranges): the bytes of the
    exchange every block reads per step, summed over the grid; each warp reads its k range of the batch
    tile's rows (the forward's in chunks, the backward's in pairs of chunks). ``variant``: "tagged" (the
    forward's tagged words), "wide" (the wide backward's grid, the plan's wide_grid), "narrow" (the narrow
    backward's grid of NARROW_BATCH_TILE rows per block)."""
    if stem == "fused_forward_kernel":
        per_row = sum(e - b for b, e in d["fwd_gate_k"]) * d["CHUNK_BYTES"] * (2 if variant == "tagged" else 1)
    else:
        per_row = sum(e - b for b, e in d["bwd_gate_k"]) * 2 * d["CHUNK_BYTES"]
    grid = d.get(f"{variant}_grid", d["grid"])
    rows = d["NARROW_BATCH_TILE"] if variant == "narrow" else d["BATCH_TILE"]
    return grid[0] * grid[1] * rows * per_row


@pytest.mark.parametrize("stem, elem, variant", sorted(EXCHANGE_MB), ids=[
    f"{s.split('_')[1]}-{8 * e}bit{'-' + v if v else ''}" for s, e, v in sorted(EXCHANGE_MB)])
def test_exchange_l2_bytes_per_step_from_the_plan(plan_dump, stem, elem, variant):
    """The L2 traffic of the exchange per step (issue 21: the backward is bound by it), from the plan, is the
    docstring's figure, and the docstring states it: a plan that reads more (a warp reading a k range twice,
    smaller blocks) changes the figure. The wide backward's grid is ceil(H / WIDE_UNITS) unit blocks."""
    d = plan_dump(FLAGSHIP_B, FLAGSHIP_H, elem, FLAGSHIP_H)
    if variant == "wide":
        assert d["wide_grid"] == [-(-FLAGSHIP_H // d["WIDE_UNITS"]), d["grid"][1]], (d["wide_grid"], d["WIDE_UNITS"])
    if variant == "narrow":  # as many blocks as the ring's, each reading half the rows
        assert d["narrow_grid"] == [d["wide_grid"][0], -(-FLAGSHIP_B // d["NARROW_BATCH_TILE"])], d["narrow_grid"]
    mb = exchange_bytes_per_step(d, stem, variant) / 1e6
    print(f"\n{stem} {8 * elem}-bit{' ' + variant if variant else ''}: {mb:.2f} MB of L2 reads per step")
    assert round(mb, 1) == EXCHANGE_MB[stem, elem, variant], mb
    source = (ROOT / "csrc" / "fused" / f"{stem.rsplit('_', 1)[0]}.cu").read_text()
    assert f"{EXCHANGE_MB[stem, elem, variant]} MB" in source, "the docstring no longer states the figure"


def test_exchange_bytes_check_catches_smaller_blocks(tmp_path):
    """A plan of 4 units per block (twice the blocks, each still reading the whole exchange of its batch
    tile) doubles the forward's L2 traffic, and the check sees it."""
    mutant_dump = compile_mutant_plan_dump(tmp_path, "constexpr int UNITS = 8;", "constexpr int UNITS = 4;")
    if mutant_dump is None:
        pytest.skip("no host C++ compiler")
    mb = exchange_bytes_per_step(mutant_dump(FLAGSHIP_B, FLAGSHIP_H, 2, FLAGSHIP_H), "fused_forward_kernel") / 1e6
    assert round(mb, 1) != EXCHANGE_MB["fused_forward_kernel", 2, ""], mb


def test_fused_kernels_use_no_local_memory(fused_sass):
    funcs, usage = fused_sass
    kernels = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    names = [n for n, *_ in kernels]
    for stem, count in INSTANCES.items():
        assert sum(stem in n for n in names) == count * len(ARCHS), stem
    for name, reg, stack, local in kernels:
        print(f"\n{name[:60]}: REG {reg} STACK {stack} LOCAL {local}")
        assert int(local) == 0 and int(stack) == 0, name
    for (arch, name), instrs in funcs.items():
        assert not any(re.search(r"\b(LDL|STL)\b", t) for _, t in instrs), f"{arch} {name}: local memory"


#: A mutant of fused_plan.cuh's k split: warp 0 takes half of the forward's K, the other warps share the rest.
UNBALANCED_FWD_GATE_K = """FUSED_HD KRange fwd_gate_k(int w, int P, int elem) {
  const int n = k_chunks(round_up(P, kpad(elem)), elem), half = n / 2;
  KRange r;
  r.begin = w == 0 ? 0 : half + (w - 1) * (n - half) / (WARPS - 1);
  r.end = w == 0 ? half : half + w * (n - half) / (WARPS - 1);
  return r;
}"""


def arrival_problems(counts: dict, d: dict) -> list:
    """What departs from one arrival per block (issue 21): the cell warps' named barrier, one fence each
    (the release's own, no sequentially consistent fence), and before it only the exchange's stores."""
    problems = []
    if counts["arrival_barriers"] != d["release_add"]:
        problems.append(f"{counts['arrival_barriers']} named barriers for {d['release_add']} arrivals")
    elif counts["arrival_threads"] != [d["arrival_threads"]] * d["release_add"]:
        problems.append(f"named barriers of {counts['arrival_threads']} threads, designed {d['arrival_threads']}")
    if counts["fences"] != d["release_add"] or counts["sc_fences"]:
        problems.append(f"{counts['fences']} fences ({counts['sc_fences']} SC) for {d['release_add']} arrivals")
    if counts["stores_before_arrivals"] != d["exchange_stores"]:
        problems.append(f"stores before the arrivals {counts['stores_before_arrivals']}, designed "
                        f"{d['exchange_stores']}")
    return problems


def register_path_problems(loop: "StepLoop", plan_dump, wregs: bool = True) -> list:
    """What departs from the fp16 LSTM forward's register path (ldmatrix of h only, one per slot)."""
    slots, _, ldsm_per_chunk = register_path(plan_dump, "fused_forward_kernel", "Fp16Mma", False, 4)
    ldsm = ldsm_outside_k_loops(loop)
    return [] if ldsm == slots * ldsm_per_chunk else [f"{ldsm} ldmatrix in the register path, designed {slots}"]


def arrival_problems_of(loop: "StepLoop", plan_dump, wregs: bool = True) -> list:
    """``wregs``: of the forward's instance with the register path (and the tagged exchange's store), or without."""
    return arrival_problems(arrival_counts(loop), design("fused_forward_kernel", False, wregs=wregs))


def cell_problems_of(loop: "StepLoop", plan_dump, wregs: bool = True) -> list:
    return cell_problems(cell_counts(loop), activations_per_step("fused_forward_kernel", 4))


def tagged_problems_of(loop: "StepLoop", plan_dump, wregs: bool = True) -> list:
    slots, _, _ = register_path(plan_dump, "fused_forward_kernel", "Fp16Mma", False, 4)
    return tagged_problems(tagged_counts(loop), slots)


def wide_problems_of(loop: "StepLoop", plan_dump, wregs: bool = True) -> list:
    return wide_problems(wide_counts(loop), wide_design(plan_dump, "Fp16Mma"))


def narrow_problems_of(loop: "StepLoop", plan_dump, wregs: bool = True) -> list:
    return wide_problems(wide_counts(loop), wide_design(plan_dump, "Fp16Mma", tile="narrow"))


#: Mutants of the fp16 LSTM forward (csrc/fused/) and the check that must catch each: the arrival as it
#: was, one per warp with a fence of every lane and a release-add by each cell warp's lane 0; h_all
#: stored before the arrival, so its fence waits for it; the register path reading W from shared memory; a
#: fence in the tagged exchange's spin (each round would wait for the warp's earlier stores); a fence between
#: the tagged wait and the MMAs (an "acquire" the single-copy atomic words do not need); the fast
#: activations' sigmoid as the precise expf and division (the division's slow path behind a branch and a call);
#: their tanh as tanhf (branch free too, one MUFU.EX2 and one MUFU.RCP, but not the fast formula). And one of
#: the fp16 LSTM's wide backward (MUTANT_KERNELS): split_k_mma_wide loading each slot just before its MMAs, behind
#: a __syncwarp (2 of the 24 loads before the first HMMA: one slot in flight at a time).
SOURCE_MUTANTS = {
    "tanhf as the fast tanh": ("common/cell.cuh", "return fmaf(2.0f, rcp_approx(1.0f + exp2_approx(x * (2.0f * kNegLog2e))), -1.0f);",
                               "return tanhf(x);", cell_problems_of),
    "precise sigmoid": ("common/cell.cuh",
                        "static LSTM_HD float sigmoid(float x) { return rcp_approx(1.0f + exp2_approx(x * kNegLog2e)); }",
                        "static LSTM_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }", cell_problems_of),
    "arrival per warp": ("fused/fused_common.cuh", """  asm volatile("bar.sync 1, %0;" ::"n"(CELL_THREADS) : "memory");
  if (threadIdx.x == 0) asm""", """  __threadfence();
  __syncwarp();
  if ((threadIdx.x & 31) == 0) asm""", arrival_problems_of),
    "output before the arrival": ("fused/fused_forward.cu", """            hx[(t & 1) * hx_slot + (size_t)b * Pk + j] = hT;
""", """            hx[(t & 1) * hx_slot + (size_t)b * Pk + j] = hT;
            h_all[t * BH + s] = hT;
""", arrival_problems_of),
    "W from shared memory in the register path": (
        "fused/fused_forward.cu", "chunk_mma(w_reg[i][0], w_reg[i][1], h[i]);",
        "chunk_mma(w_frags(ks_begin + i, 0), w_reg[i][1], h[i]);", register_path_problems),
    "wide loads one slot at a time": (
        "fused/fused_common.cuh", """          load_cg_16(a[i][half], src + wide_lane_byte(lane, half, base + i, row_bytes), i < n);
      __syncwarp();  // a memory-ordering point ptxas keeps the loads above: all in flight, none sunk to its MMA
#pragma unroll
      for (int i = 0; i < SLOTS; ++i) {
        if (i < n) {
""", """          ;
#pragma unroll
      for (int i = 0; i < SLOTS; ++i) {
        if (i < n) {
          load_cg_16(a[i][0], src + wide_lane_byte(lane, 0, base + i, row_bytes), true);
          load_cg_16(a[i][1], src + wide_lane_byte(lane, 1, base + i, row_bytes), true);
          __syncwarp();
""", wide_problems_of),
    "narrow loads one slot at a time": (
        "fused/fused_common.cuh", """    for (int i = 0; i < SLOTS; ++i) load_cg_16(v[i], src + wide_lane_byte(lane, 0, base + i, row_bytes), i < n);
    __syncwarp();  // as split_k_mma_wide's: the loads all in flight, none sunk to its MMA
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
      if (i < n) {
""", """    for (int i = 0; i < SLOTS; ++i) {
      if (i < n) {
        load_cg_16(v[i], src + wide_lane_byte(lane, 0, base + i, row_bytes), true);
        __syncwarp();
""", narrow_problems_of),
    "fence in the tagged spin": ("fused/fused_common.cuh", """    if (round % TAGGED_ROUNDS_PER_CHECK == 0) {""",
                                 """    __threadfence();
    if (round % TAGGED_ROUNDS_PER_CHECK == 0) {""", tagged_problems_of),
    "fence between the tagged wait and the MMAs": ("fused/fused_forward.cu", """            if (ok) {
#pragma unroll
              for (int i = 0; i < kWRegChunks; ++i) {
                HFrags f;""", """            __threadfence();
            if (ok) {
#pragma unroll
              for (int i = 0; i < kWRegChunks; ++i) {
                HFrags f;""", tagged_problems_of),
}


#: The mutants of code both forward instances run (the cell, the arrival), checked in the instance without the
#: register path as well as in the one with it.
SHARED_PATH_MUTANTS = ("tanhf as the fast tanh", "precise sigmoid", "arrival per warp", "output before the arrival")

#: The kernel a mutant is read in, (source, stem, backward tile), where it is not the fp16 LSTM forward.
MUTANT_KERNELS = {"wide loads one slot at a time": ("fused/fused_backward.cu", "fused_backward_kernel", "wide"),
                  "narrow loads one slot at a time": ("fused/fused_backward.cu", "fused_backward_kernel", "narrow")}


@pytest.mark.parametrize("mutant", sorted(SOURCE_MUTANTS))
def test_step_checks_catch_a_mutant_source(tmp_path, plan_dump, mutant):
    """The checks of the arrival, of the register path, of the tagged exchange, of the cell and of the wide
    backward fail on the fp16 LSTM kernel (the forward; the wide backward where MUTANT_KERNELS says) compiled
    from a mutant of its source (the unmutated source, compiled the same way, passes them in
    test_fused_step_loop_structure and test_wide_backward_step_loop_structure)."""
    path, site, replacement, problems_of = SOURCE_MUTANTS[mutant]
    source, stem, tile = MUTANT_KERNELS.get(mutant, ("fused/fused_forward.cu", "fused_forward_kernel", "ring"))
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    text = (csrc / path).read_text()
    assert text.count(site) == 1, f"{path}: the mutated site is gone"
    (csrc / path).write_text(text.replace(site, replacement))
    listings, _ = compile_cubins([source], ("sm_90",), tmp_path, csrc=csrc)
    # the forward's instance with the register path holds every path (shared, registers, tagged); the one
    # without is checked too where the mutant is in code both run
    forward = stem == "fused_forward_kernel"
    for wregs in ((True, False) if mutant in SHARED_PATH_MUTANTS else (forward,)):
        name, instrs = _kernels(functions_of(listings), stem, "sm_90", False, tile=tile, wregs=wregs)["Fp16Mma"]
        problems = problems_of(step_loop_of(name, instrs), plan_dump, wregs)
        print(f"\n[{mutant}{' <registers>' if wregs else ''}] {problems}")
        assert problems, (mutant, wregs)


def test_kernels_take_their_k_ranges_from_the_plan_header():
    """The per-warp count reads the k split from fused_plan.cuh's range functions; the kernels must take
    theirs from the same functions, not compute their own."""
    for src, functions in (("fused_forward.cu", ("fwd_gate_k", "fwd_proj_k")),
                           ("fused_backward.cu", ("bwd_gate_k", "bwd_proj_k"))):
        text = (ROOT / "csrc" / "fused" / src).read_text()
        assert all(f"{name}(warp," in text for name in functions), src
        assert "warp_k_range(" not in text, f"{src} splits K itself"


def test_per_warp_mma_check_catches_an_unbalanced_k_split(fused_sass, tmp_path):
    """The busiest warp's MMA count follows the kernels' own k split: a header whose split gives warp 0
    half of K (96 HMMA on that warp against an ideal of 24 at the flagship) fails the 10% bound."""
    mutant_dump = compile_mutant_plan_dump(
        tmp_path, "FUSED_HD KRange fwd_gate_k(int w, int P, int elem) { return warp_k_chunks(w, P, elem, 1); }",
        UNBALANCED_FWD_GATE_K)
    if mutant_dump is None:
        pytest.skip("no host C++ compiler")
    funcs, _ = fused_sass
    stem = "fused_forward_kernel"
    name, instrs = _kernels(funcs, stem, "sm_90", False)["Fp16Mma"]
    loop = step_loop_of(name, instrs)
    per_warp, ideal, _, _ = hmma_per_warp_per_step(loop, design(stem, False)["loops"],
                                                   kernel_k_ranges(mutant_dump, stem, "Fp16Mma", False))
    assert per_warp == 4 * ideal  # half of K on one warp: four times the even share of an eighth
    assert abs(per_warp / ideal - 1.0) > 0.10


#: What the step loop of a fused kernel's instance with resets may have more of than the instance
#: without: the flags' load, the forward's vote over its batch tile, and integer, predicate, select,
#: constant and control instructions (the masked exchange copy is its own small loop), among them the
#: uniform votes (VOTEU) by which ptxas makes the register path's per-slot conditions uniform, and the
#: uniform compares (UISETP) of the tagged exchange's rows to wait for.
RESETS_MAY_ADD = {"LDG", "VOTE", "VOTEU", "ISETP", "UISETP", "SEL", "FSEL", "LOP3", "SHF", "IMAD", "LEA", "IADD3", "VIADD", "MOV",
                  "PRMT", "P2R", "R2P", "PLOP3", "BRA", "BSSY", "BSYNC", "WARPSYNC", "S2R", "CS2R", "S2UR", "LDC",
                  "ULDC", "UMOV", "USHF", "UIADD3", "UIMAD", "ULEA", "ULOP3", "NOP", "YIELD"}


#: Integer address arithmetic, which ptxas may write one way or another (LEA or IMAD) per instance, and
#: the branches, convergence markers and out-of-line calls of the warp's __syncwarp, which it may lay out
#: one way or another (seen in the GRU's and the LSTM's fp32 backward), the same arithmetic on the
#: uniform datapath (U*, S2UR) and the NOPs of the schedule, and the thread index the ring's copy addresses start from, which it may read
#: again (S2R SR_TID) rather than keep in a register (seen in the LSTM's sm_80 backward). The k loop's
#: instruction count bounds them.
_ADDRESS_OPS = {"IMAD", "LEA", "IADD3", "VIADD", "SHF", "LOP3", "MOV", "BRA", "BSSY", "BSYNC", "CALL", "S2R", "S2UR",
                "UIADD3", "ULEA", "UMOV", "UIMAD", "USHF", "ULOP3", "NOP"}


def _k_loop_profile(loop: StepLoop, lp: Loop) -> tuple:
    """(instructions, sorted opcodes but address arithmetic and branch layout) of one k loop."""
    ops = [opcode(t) for a, t in loop.ops if lp.holds(a)]
    return len(ops), sorted(o for o in ops if o not in _ADDRESS_OPS)


def _loop_counts(loop: StepLoop) -> dict:
    return dict(hmma=loop.count(is_hmma), bar_sync=loop.count(is_bar_sync), release_add=loop.count(is_release_add),
                poll=loop.count(is_poll), ldg=loop.count(lambda t: is_ldg(t) and not is_poll(t)),
                ldg_nested=loop.count(lambda t: is_ldg(t) and not is_poll(t), loop.in_nested), vote=loop.count(lambda t: opcode(t) == "VOTE"),
                k_loops=[_k_loop_profile(loop, lp) for lp in loop.k_loops])


#: FAMILIES and the wide and narrow backward's (stem, proj, gates, tile).
ALL_FAMILIES = ([(s, p, g, "ring") for s, p, g in FAMILIES]
                + [("fused_backward_kernel", False, g, t) for t in ("wide", "narrow") for g in WIDE_GATES])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stem, proj, gates, tile", ALL_FAMILIES,
                         ids=[f"{s.split('_')[1]}{'' if t == 'ring' else '-' + t}{'-proj' if p else ''}"
                              f"{'-gru' if g == 3 else ''}" for s, p, g, t in ALL_FAMILIES])
def test_resets_instance_adds_only_the_mask(fused_sass, arch, stem, proj, gates, tile):
    """The instance with resets against the one without, per Op: the same k loops (the same instructions
    but for how the address arithmetic is written: at most 2, or a sixth of the loop, more of it; the wide
    backward has none), HMMA, block barriers, release-adds and polls (with the wide backward's operand
    loads); one byte load in the step loop (the flags) and at most one global load more than without, none
    in a nested loop; one vote in the forward (the batch tile's flags), none in the backward; and
    nothing else but integer, select and control instructions more."""
    funcs, _ = fused_sass
    pairs = []  # (wregs, op, instance without resets, with): the forward's both instances
    for wregs in weights_instances(stem):
        free = _kernels(funcs, stem, arch, proj, gates=gates, tile=tile, wregs=wregs)
        with_resets = _kernels(funcs, stem, arch, proj, True, gates, tile=tile, wregs=wregs)
        pairs += [(wregs, op, free[op], with_resets[op]) for op in free]
    for wregs, op, *instances in pairs:
        a, b = (step_loop_of(name, instrs) for name, instrs in instances)
        ca, cb = _loop_counts(a), _loop_counts(b)
        tag = (f"{stem}{'' if tile == 'ring' else '<' + tile + '>'}{'<proj>' if proj else ''}"
               f"{'<gru>' if gates == 3 else ''}{'<registers>' if wregs else ''} {arch} {op}")
        # "@!PT" (never true) instructions are placeholders ptxas emits after cp.async; they never run
        ops_a, ops_b = ({} for _ in range(2))
        for ops, loop in ((ops_a, a), (ops_b, b)):
            for _, t in loop.ops:
                if not t.startswith("@!PT "):
                    ops[opcode(t)] = ops.get(opcode(t), 0) + 1
        more = {k: ops_b[k] - ops_a.get(k, 0) for k in ops_b if ops_b[k] > ops_a.get(k, 0)}
        print(f"\n[resets] {tag}: without {({k: v for k, v in ca.items() if k != 'k_loops'})}, with "
              f"{({k: v for k, v in cb.items() if k != 'k_loops'})}, static instructions {len(a.ops)} -> {len(b.ops)}, "
              f"more of: {more}")
        assert [ops for _, ops in cb["k_loops"]] == [ops for _, ops in ca["k_loops"]], tag
        assert all(nb <= na + max(2, na // 6)
                   for (na, _), (nb, _) in zip(ca["k_loops"], cb["k_loops"])), (tag, ca, cb)
        for key in ("hmma", "bar_sync", "release_add", "poll"):
            assert cb[key] == ca[key], (tag, key, ca, cb)
        # the flags: one byte load per step (ptxas may fold another load of the step's into one, never more)
        flags = b.count(lambda t: is_ldg(t) and ".U8" in t)
        assert flags == 1 and cb["ldg"] <= ca["ldg"] + 1 and cb["ldg_nested"] == 0, (tag, flags, ca, cb)
        assert cb["vote"] == ca["vote"] + (1 if stem == "fused_forward_kernel" else 0), (tag, ca, cb)
        # the GRU's exchange stores of a row that resets: ptxas may write a select as a predicated pair of
        # stores (one runs), never one more store that runs
        plain_stores = [sum(opcode(t) == "STG" and not t.startswith("@") for _, t in loop.ops) for loop in (a, b)]
        allowed = RESETS_MAY_ADD | ({"STG"} if gates == 3 and plain_stores[1] <= plain_stores[0] else set())
        assert set(more) <= allowed, (tag, more, plain_stores)


def test_structure_checks_can_fail():
    """The checks see what they should not accept: a W restaging loop in the style of the
    previous kernels (STS in the k loop, LDG in a nested loop) is caught by the same parser."""
    fake = [(0x100, "@P0 BRA 0x300"), (0x110, "BAR.SYNC.DEFER_BLOCKING 0x0"), (0x120, "LDG.E.U16 R1, desc[UR4][R2.64]"),
            (0x130, "STS.U16 [R3], R1"), (0x140, "HMMA.16816.F32 R4, R8, R10, R4"), (0x150, "@!P1 BRA 0x120"),
            (0x160, "BAR.SYNC.DEFER_BLOCKING 0x0"), (0x170, "@!P2 BRA 0x110"), (0x180, "EXIT")]
    loop = step_loop_of("fake", fake)
    assert (loop.k_loop.start, loop.k_loop.end) == (0x120, 0x150)
    assert loop.count(is_sts, loop.in_k) == 1 and loop.count(is_ldg, loop.in_nested) == 1


def test_extension_carries_the_fused_kernels_for_sm80_and_sm90():
    """The built extension holds the fused kernels (every Op, with and without projection, the backward's
    wide and narrow instances too) for both architectures, so what these checks read is what the GPU will run."""
    try:
        from lstm_kernels import _C
    except ImportError:
        pytest.skip("lstm_kernels._C is not built")
    sass = subprocess.run([CUOBJDUMP, "-sass", _C.__file__], capture_output=True, text=True, check=True).stdout
    funcs = split_functions(sass)
    for arch in ARCHS:
        for stem in ("fused_forward_kernel", "fused_backward_kernel"):
            names = [n for (a, n) in funcs if a == arch and stem in n]
            assert len(names) == INSTANCES[stem], (arch, stem, names)
            for tile in ("wide", "narrow"):
                found = [n for n in names if backward_tile(n) == tile]
                assert len(found) == (4 * len(OPS) if stem == "fused_backward_kernel" else 0), (arch, stem, found)
            for name in names:  # the extension's instance has the same step loop as the standalone build
                loop = step_loop_of(name, funcs[(arch, name)])
                proj = flags_tag(True, False) in name or flags_tag(True, True) in name
                gates = 3 if any(flags_tag(False, r, 3) in name for r in (False, True)) else 4
                wregs = stem == "fused_forward_kernel" and f"Li{gates}ELb1E" in name  # WREGS, the fifth flag
                assert loop.count(is_bar_sync) == design(stem, proj, op_of(name), gates=gates,
                                                         wregs=wregs)["bar_sync"], name
