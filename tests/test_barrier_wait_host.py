"""csrc/fused/barrier_wait.cuh's give-up logic (barrier_gives_up, the time bound of every CUDA grid-barrier
wait) compiled for the host with g++ (tests/cuda_host/barrier_wait_check.cpp), with a fake clock
that the check advances, and the header's count of clock reads. Proven on the CPU:

- a wait whose first poll finds the barrier open reads no clock and touches nothing (in the check's
  wait loop, a copy of the kernels' loop structure: poll, then barrier_gives_up only when closed);
- a wait that never opens gives up at its first closed poll more than the bound after its first
  closed poll (not before: exactly the bound does not give up), raises the launch's abort flag and
  fills the record once: kernel code, step, block, time waited;
- every other wait of that launch then leaves at its first closed poll without reading the clock,
  and the record keeps the first give-up (a later launch, before the host clears the record, does
  not overwrite it; after clearing, the next give-up names itself);
- no bound (timeout 0) or no watch (state null): closed polls read no clock and never give up;
- on threads (blocks) sharing one arrival counter: a working barrier passes every generation with
  no give-up; one that can never open ends in every block, with one record naming one block.

Not proven here: the GPU's own loop (fused_common.cuh's grid_wait: its vote and sleep), the memory
model of the device atomics, or %globaltimer (tests/test_barrier_wait_sass.py checks the compiled
loop; the GPU tests run it). test_each_check_catches_its_mutant shows each of these checks fails on
a header with the matching bug.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler")
HEADER = ROOT / "csrc" / "fused" / "barrier_wait.cuh"


def run_check(out_dir: Path, include_dir: Path = ROOT / "csrc") -> dict:
    exe = out_dir / "barrier_wait_check"
    subprocess.run([CXX, "-std=c++17", "-O1", "-pthread", f"-I{include_dir}",
                    str(ROOT / "tests/cuda_host/barrier_wait_check.cpp"), "-o", str(exe)], check=True)
    return json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60).stdout)


def failures(r: dict) -> list:
    """The properties (module docstring) that the observations ``r`` break; [] when all hold."""
    bad = []
    never, other = r["never"], r["other"]
    bound, tick = never["bound"], never["tick"]

    def check(ok, what):
        if not ok:
            bad.append(what)

    check(r["open"] == {"passed": 1, "polls": 0, "clock_reads": 0, "flag": 0}, f"open barrier: {r['open']}")
    # closed polls 1..n: the first takes the start, each later one reads the clock once (tick ns later)
    # until one is more than `bound` after the start: n = bound // tick + 2
    closed = bound // tick + 2
    check(not never["passed"] and never["polls"] + 1 == closed and never["clock_reads"] == closed,
          f"never-open wait: gave up after {never['polls'] + 1} closed polls, {never['clock_reads']} clock reads "
          f"(expected {closed})")
    check(never["flag"] == 1, "the abort flag is not up after a give-up")
    check(never["record"] == [3, 7, 5, bound + tick], f"record {never['record']} != [3, 7, 5, {bound + tick}]")
    check(not other["passed"] and other["polls"] == 0 and other["clock_reads"] == 0,
          f"another wait of the launch did not leave at its first closed poll without the clock: {other}")
    check(other["record"] == never["record"], f"another block rewrote the record: {other['record']}")
    check(not other["later_passed"] and other["later_flag"] == 1 and other["later_clock_reads"] == closed,
          f"a later launch did not give up after its own bound: {other}")
    check(other["later_record"] == never["record"], f"a later launch overwrote the record: {other['later_record']}")
    check(other["cleared_record"] == [4, 2, 1, bound + tick], f"after clearing: {other['cleared_record']}")
    check(r["boundary"] == {"first": 0, "at_bound": 0, "past_bound": 1, "waited": bound + 1},
          f"boundary: {r['boundary']}")
    for name in ("unbounded", "unwatched"):
        check(r[name]["clock_reads"] == 0 and r[name]["polls"] == 1000 and r[name].get("flag", 0) == 0,
              f"{name}: {r[name]}")
    t_open, t_never = r["threads_open"], r["threads_never"]
    check(t_open["passed"] == t_open["blocks"] * t_open["generations"] and t_open["gave_up"] == 0
          and t_open["hung"] == 0 and t_open["flag"] == 0 and t_open["record"] == [0, 0, 0, 0],
          f"working barrier on threads: {t_open}")
    check(t_never["passed"] == 0 and t_never["gave_up"] == t_never["blocks"] and t_never["hung"] == 0
          and t_never["flag"] == 1
          and t_never["record"][:2] == [5, 0] and 0 <= t_never["record"][2] < t_never["blocks"]
          and t_never["record"][3] > 1000 * bound, f"never-open barrier on threads: {t_never}")
    return bad


def test_barrier_wait_gives_up_as_designed(tmp_path):
    r = run_check(tmp_path)
    assert failures(r) == [], json.dumps(r, indent=1)


#: (name, text in csrc/fused/barrier_wait.cuh, its replacement): a bug each, and what must catch it.
MUTANTS = [
    ("clock read first", "  if (w.state == nullptr) return false;\n",
     "  (void)now_ns();\n  if (w.state == nullptr) return false;\n"),
    ("abort flag ignored", "  if (load_acquire(w.state + 1) != 0ull) return true;  // another block gave up\n", ""),
    ("every give-up records", "if (claim(w.state + 1) && w.record != nullptr && claim_record(w.record, w.kernel))",
     "if ((claim(w.state + 1), true) && w.record != nullptr && (claim_record(w.record, w.kernel), true))"),
    ("start never kept", "  if (*since < 0) {", "  if (true) {"),
    ("gives up at the bound", "if (now - *since <= w.timeout_ns) return false;", "if (now - *since < w.timeout_ns) return false;"),
]


@pytest.mark.parametrize("name, old, new", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_each_check_catches_its_mutant(tmp_path, name, old, new):
    text = HEADER.read_text()
    assert text.count(old) == 1, f"mutant {name!r}: its text is no longer in {HEADER.name}; update MUTANTS"
    include = tmp_path / "csrc"
    (include / "fused").mkdir(parents=True)
    (include / "fused" / HEADER.name).write_text(text.replace(old, new))
    assert failures(run_check(tmp_path, include)), f"mutant {name!r} passes every check"
