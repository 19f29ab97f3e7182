"""Where the fused kernels read the GPU clock, in their compiled code (csrc/fused/fused_forward.cu,
csrc/fused/fused_backward.cu, every instance, sm_80 and sm_90, nvcc -O3, cuobjdump -sass; no GPU needed).

The grid wait (fused_common.cuh's grid_wait) polls its counter with an acquire load, votes across
the warp (VOTE.ALL) and branches; only after a closed poll does it call barrier_gives_up
(barrier_wait.cuh), which loads the launch's abort flag, reads %globaltimer (nvcc emits
``CS2R Rn, SR_GLOBALTIMERLO`` on sm_80 and sm_90, or ``S2R``/``S2UR`` of SR_GLOBALTIMER*) and may
claim the flag and the record (ATOMG.E.CAS). On the control-flow graph of each kernel (every branch,
BRA.DIV / BRA.CONV divergence stubs, CALL to their targets and on; RET ends a path: an
over-approximation of the paths, so "unreachable" is sound), with a poll being a STRONG.GPU load
followed by VOTE.ALL and its vote branch the first predicated BRA after the vote, this proves:

- every slow-path instruction (clock read, abort-flag load: a STRONG.GPU load that is not a poll,
  CAS) is unreachable from the kernel's entry without passing a poll;
- none lies between a poll and its vote branch;
- of the vote branch's two successors, exactly one (the retry side) reaches a slow-path instruction
  before the next poll, and that side leads back to the same poll without any tensor-core (HMMA)
  instruction: it is the retry loop of a closed barrier. The other side (the barrier found open)
  reaches no clock read, abort-flag load or CAS before the next poll;
- every kernel has at least one poll and one clock read (the bound is compiled in).

The tagged exchange's wait (fused_common.cuh's tagged_fetch, in the forward's taggable instances)
is held to the same properties, its vote (VOTE.ANY into a predicate, over the words whose tag is
still old, or the BRA.DIV stub before it) taking the poll's place; its loads (LDG.E.128.STRONG.GPU,
the step's operands) are not slow-path instructions. A forward kernel has tagged loads exactly when
it has a tagged vote. The backward has no tagged exchange (no tagged vote in any instance); its
128-bit strong loads are the wide and the narrow backward's operand loads (fused_common.cuh's
load_cg_16, ld.global.cg.v4.u32 of dG_{t+1}, which SASS writes as LDG.E.128.STRONG.GPU like the tagged
ones): not polls, not slow-path instructions, and present exactly in those instances (TILE = BWD_WIDE or
BWD_NARROW).

So a wait whose first poll finds the barrier open executes no clock read, and none of
barrier_gives_up's memory traffic, until the next wait's poll. Not proven: which way the vote's
predicate goes at run time (the retry side is told apart structurally: it loops back to the poll
without the step's MMA work), the cost of the open path's remaining instructions (the branch, the
register moves that set up ``since``, any register pressure the slow path adds).
test_the_check_catches_a_clock_on_the_fast_path compiles the forward with a clock read moved to
the top of every wait, with barrier_gives_up asked before the vote, and with the tagged wait's
give-up asked before its vote, and shows the check fails for each.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections import deque
from pathlib import Path

import pytest

from cuda_tools import CUOBJDUMP, NVCC, is_loaded_backward, is_tagged_load, is_tagged_vote

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")


pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump")

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P\w+\s+")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")


def functions(sass: str) -> dict:
    """{function name: [(address, text)]} of one cubin's cuobjdump -sass."""
    return {block.split("\n", 1)[0].strip(): [(int(a, 16), t.strip()) for a, t in _INSTR.findall(block)]
            for block in re.split(r"\n\s*Function : ", sass)[1:]}


def _op(text: str) -> str:
    return _PRED.sub("", text).split()[0] if text else ""


def is_clock(t: str) -> bool:
    return "SR_GLOBALTIMER" in t


def is_strong_load(t: str) -> bool:
    return _op(t).startswith("LDG") and "STRONG.GPU" in t


def is_cas(t: str) -> bool:
    return _op(t).startswith("ATOM") and ".CAS" in t


def is_hmma(t: str) -> bool:
    return _op(t).startswith("HMMA")


class Cfg:
    """Instruction-level control flow of one kernel (see the module docstring)."""

    def __init__(self, instrs):
        self.instrs = instrs
        self.index = {a: i for i, (a, _) in enumerate(instrs)}
        self.succ = []
        for i, (a, t) in enumerate(instrs):
            op, nxt = _op(t), ([i + 1] if i + 1 < len(instrs) else [])
            predicated = _PRED.match(t) is not None
            if op.startswith(("BRX", "JMX", "JMP")):
                raise AssertionError(f"indirect or absolute jump at {a:#x}: {t} (the check cannot follow it)")
            if op.startswith("BRA") or op.startswith("CALL"):
                target = [self.index[int(_TARGET.search(t).group(1), 16)]]
                conditional = predicated or op != "BRA" or op.startswith("CALL")
                self.succ.append(target + (nxt if conditional else []))
            elif op.startswith("RET") or (op == "EXIT" and not predicated):
                self.succ.append([])
            else:
                self.succ.append(nxt)

    def reach(self, starts, stop) -> set:
        """Instructions reachable from ``starts`` (included) without passing an instruction in ``stop``
        (those reached are included, not passed)."""
        seen, todo = set(starts), deque(starts)
        while todo:
            i = todo.popleft()
            if i in stop and i not in starts:
                continue
            for j in self.succ[i]:
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen


def _vote_branch(cfg: Cfg, vote: int):
    """The first predicated BRA (BRA.DIV / BRA.CONV skipped) within a few instructions after ``vote``."""
    for j in range(vote + 1, min(vote + 8, len(cfg.instrs))):
        u = cfg.instrs[j][1]
        if _op(u).startswith("BRA") and _op(u) not in ("BRA.DIV", "BRA.CONV"):
            return j if _PRED.match(u) else None
        if _op(u) == "EXIT":
            return None
    return None


def polls_of(cfg: Cfg) -> dict:
    """{poll index: vote branch index}: a STRONG.GPU load (not an operand load) whose straight line
    reaches VOTE.ALL (past a BRA.DIV) and then a predicated BRA; and a tagged wait's vote with the
    first predicated BRA after it. The tagged wait's poll is its vote, or the BRA.DIV just before it
    (whose out-of-line stub votes and returns to the branch): the tagged words were loaded before it,
    as the step's operands."""
    out = {}
    for i, (_, t) in enumerate(cfg.instrs):
        if is_tagged_vote(t):
            branch = _vote_branch(cfg, i)
            if branch is not None:
                out[i - 1 if i and _op(cfg.instrs[i - 1][1]) == "BRA.DIV" else i] = branch
            continue
        if not is_strong_load(t) or is_operand_load(t):
            continue
        voted = False
        for j in range(i + 1, min(i + 24, len(cfg.instrs))):
            u = cfg.instrs[j][1]
            if "VOTE.ALL" in u:
                voted = True
            elif _op(u).startswith("BRA") and _op(u) not in ("BRA.DIV", "BRA.CONV"):
                if voted and _PRED.match(u):
                    out[i] = j
                break
            elif _op(u) == "EXIT" or is_strong_load(u):
                break
    return out


def is_operand_load(t: str) -> bool:
    """A 128-bit strong load of the step's operands: the forward's tagged exchange or the wide and narrow
    backward's dG_{t+1} (cuda_tools.is_wide_operand_load), one SASS form, told apart by kernel
    (fast_path_violations)."""
    return is_tagged_load(t)


def fast_path_violations(name: str, instrs) -> list:
    """What breaks the module docstring's properties in one kernel; [] when they hold."""
    cfg = Cfg(instrs)
    polls = polls_of(cfg)
    slow = {i for i, (_, t) in enumerate(instrs)
            if is_clock(t) or is_cas(t) or (is_strong_load(t) and not is_operand_load(t) and i not in polls)}
    clocks = {i for i, (_, t) in enumerate(instrs) if is_clock(t)}
    hmma = {i for i, (_, t) in enumerate(instrs) if is_hmma(t)}
    where = lambda idx: ", ".join(f"{instrs[i][0]:#x} {instrs[i][1]}" for i in sorted(idx)[:4])  # noqa: E731
    bad = []
    if not polls or not clocks:
        return [f"{name}: {len(polls)} polls, {len(clocks)} clock reads (expected both)"]
    operand_loads = any(is_operand_load(t) for _, t in instrs)
    tagged_votes = [i for i, (_, t) in enumerate(instrs) if is_tagged_vote(t)]
    if "fused_backward_kernel" in name:  # no tagged exchange; the wide and narrow instances' operand loads
        if tagged_votes:
            bad.append(f"{name}: a tagged vote in the backward")
        if operand_loads != is_loaded_backward(name):
            bad.append(f"{name}: " + ("128-bit strong loads in a ring instance" if operand_loads
                                      else "a wide or narrow instance without its operand loads"))
    elif operand_loads != bool(tagged_votes):
        bad.append(f"{name}: " + ("tagged loads without a tagged vote" if operand_loads
                                  else "a tagged vote without tagged loads"))
    from_entry = cfg.reach([0], set(polls)) & slow
    if from_entry:
        bad.append(f"{name}: reached from the entry without a poll: {where(from_entry)}")
    for p, b in polls.items():
        between = cfg.reach([p], set(polls) | {b}) - cfg.reach([b], set(polls)) - {p}
        if between & slow:
            bad.append(f"{name}: between the poll at {instrs[p][0]:#x} and its vote branch: {where(between & slow)}")
        sides = {}
        for s in cfg.succ[b]:
            region = cfg.reach([s], set(polls))
            sides[s] = (region & slow, p in cfg.reach([s], set(polls) | hmma))
        with_slow = [s for s, (found, _) in sides.items() if found]
        if len(sides) != 2 or len(with_slow) != 1:
            bad.append(f"{name}: the vote branch at {instrs[b][0]:#x} of the poll at {instrs[p][0]:#x}: "
                       f"{len(with_slow)} of {len(sides)} successors reach the slow path before the next poll "
                       f"({'; '.join(where(f) for f, _ in sides.values())})")
        elif not sides[with_slow[0]][1]:
            bad.append(f"{name}: the side of the vote branch at {instrs[b][0]:#x} that reaches the slow path does "
                       "not loop back to its poll without HMMA: it is not the retry of a closed barrier")
    covered = set().union(*(cfg.reach([p], set(polls)) for p in polls)) & clocks
    if clocks - covered:
        bad.append(f"{name}: clock reads after no poll: {where(clocks - covered)}")
    return bad


def compile_sass(src: Path, arch: str, out: Path, include: Path = ROOT / "csrc") -> dict:
    cubin = out / f"{src.stem}.{arch}.cubin"
    subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", f"-I{include}", str(src), "-o", str(cubin)],
                   check=True)
    return functions(subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True,
                                    check=True).stdout)


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    out = tmp_path_factory.mktemp("barrier_sass")
    return {(arch, src): compile_sass(ROOT / "csrc" / "fused" / f"{src}.cu", arch, out)
            for arch in ARCHS for src in ("fused_forward", "fused_backward")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", ["fused_forward", "fused_backward"])
def test_clock_is_read_only_after_a_closed_poll(sass, arch, src):
    funcs = {n: f for n, f in sass[(arch, src)].items() if "kernel" in n}
    assert funcs, f"no kernel in {src} for {arch}"
    bad = [v for name, instrs in funcs.items() for v in fast_path_violations(name, instrs)]
    assert bad == [], "\n".join(bad[:10])


#: (name, text in fused_common.cuh's grid_wait or tagged_fetch, its replacement): a clock read on the fast path.
MUTANTS = [
    ("clock at every wait's start", "  long long since = -1;\n  bool ok = true;\n",
     "  long long since = watch.timeout_ns > 0 ? barrier::now_ns() : -1;\n  bool ok = true;\n"),
    ("asked before the vote",
     "    if (__all_sync(0xffffffffu, (int)(v - target) >= 0)) break;\n    int give_up = 0;\n"
     "    if (lane == 0) give_up = barrier::barrier_gives_up(watch, &since, step, blockIdx.y * gridDim.x + blockIdx.x);\n",
     "    int give_up = 0;\n"
     "    if (lane == 0) give_up = barrier::barrier_gives_up(watch, &since, step, blockIdx.y * gridDim.x + blockIdx.x);\n"
     "    if (__all_sync(0xffffffffu, (int)(v - target) >= 0)) break;\n"),
    ("tagged wait asks before its vote",
     "    if (!__any_sync(0xffffffffu, pending != 0)) break;\n    if (round % TAGGED_ROUNDS_PER_CHECK == 0) {\n"
     "      int give_up = 0;\n"
     "      if (lane == 0) give_up = barrier::barrier_gives_up(watch, &since, step, blockIdx.y * gridDim.x + blockIdx.x);\n"
     "      if (__shfl_sync(0xffffffffu, give_up, 0)) return false;\n    }\n",
     "    if (round % TAGGED_ROUNDS_PER_CHECK == 0) {\n"
     "      int give_up = 0;\n"
     "      if (lane == 0) give_up = barrier::barrier_gives_up(watch, &since, step, blockIdx.y * gridDim.x + blockIdx.x);\n"
     "      if (__shfl_sync(0xffffffffu, give_up, 0)) return false;\n    }\n"
     "    if (!__any_sync(0xffffffffu, pending != 0)) break;\n"),
]


@pytest.mark.parametrize("name, old, new", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_the_check_catches_a_clock_on_the_fast_path(tmp_path, name, old, new):
    include = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", include)
    header = include / "fused" / "fused_common.cuh"
    text = header.read_text()
    assert text.count(old) == 1, f"mutant {name!r}: its text is no longer in fused_common.cuh; update MUTANTS"
    header.write_text(text.replace(old, new))
    funcs = compile_sass(include / "fused" / "fused_forward.cu", "sm_90", tmp_path, include)
    bad = [v for n, instrs in funcs.items() if "kernel" in n for v in fast_path_violations(n, instrs)]
    assert bad, f"mutant {name!r} passes the check"
