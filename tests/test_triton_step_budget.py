"""The budget of one step, guarded on a CPU: the persistent kernels compiled for sm_80 / sm_90.

DESIGN.md, "The budget of one step", and issue 12. The kernels of
lstm_kernels/backends/triton/persistent*.py are compiled ahead of time with the JIT's own
specialisation (pointers 16-byte aligned, ints divisible by 16 marked so, as
triton/runtime/jit.py does for a launch) and the wheel's ptxas, and their TTGIR / PTX / SASS
are read for what the GPU will run per step:
  (a) MMA instructions per warp per step == the ideal for the tile (no warp repeats another's
      MMA): sum over the step's dots of M x N x K / (instruction m x n x k) / num_warps, with
      the instruction shape read from the SASS mnemonic (HMMA.16816: m16n8k16, HMMA.1688: m16n8k8);
  (b) no load of W_hh (nor W_hr) from global memory inside the step loop, and no copy of it
      into shared memory there (traced through the TTGIR def-use chains to the pointer argument);
  (c) grid-barrier arrivals (release atomics) per step: 1, or 2 with a projection; no atomic on a
      scalar in the step loop (Triton lowers one with a block barrier before it, and one after it
      where its result is used: the barrier's atomics and polls are inline PTX instead, issue 21);
  (d) shared memory within the architecture's limit, no spills (cuobjdump: LOCAL and STACK 0);
  (e) per step, as designed (the kernels' docstrings): one cross-warp sum per recurrent product,
      one block barrier per grid barrier (its arrive; the wait's threads poll each for itself),
      and at most one layout
      conversion per cross-warp sum (its result into the cell's layout) plus, in the forward,
      four (the gate split and the layouts of the h / c stores);
  (e') exponentials per step (tensor math.exp, one per sigmoid or tanh): 2 in the forward (one
      sigmoid over all the gates, the g rows' tanh taken from it as 2 sigmoid(2x) - 1, and tanh c;
      the GRU's r, z and n), 1 in the LSTM backward (tanh c), 0 in the GRU's;
  (f) the plans' shapes (units and batch rows per program, warps, programs) at the flagship and
      two other shapes are the design's, so that a plan that regressed (to fewer warps, say)
      cannot match an ideal computed from its own configuration; and the exchange's L2 reads per
      step from the plan at the flagship are the docstrings' figures (2.4 MB forward, 4.7 MB
      backward).
Each check has a mutant here (a kernel compiled with one deliberate fault, or a plan rule
broken) that it must catch. These are structural counts, a CPU proxy for speed, not a
measurement (``pytest -s`` prints them).
`make test` runs these with the newest Triton setup.py declares (3.9) and the oldest (3.6, with
torch 2.11 in test-torch). Every check holds with both but the forward's exponentials and layout
conversions and (d)'s spills, which only 3.9 lays out as designed: with 3.6 they are reported as
expected failures naming the counts, within each kernel's known deviation (tests/triton_compiler.py).

Runs without TRITON_INTERPRET (under it ``@triton.jit`` gives interpreted functions).
"""
from __future__ import annotations

import os
import re
import subprocess
from functools import partial

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") == "1", reason="compiles the kernels; not under TRITON_INTERPRET=1"
)

from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lstm_kernels.backends import known_backends  # noqa: E402

known_backends()
from lstm_kernels.backends.triton import config as kernels  # noqa: E402
from lstm_kernels.backends.triton import persistent as tp  # noqa: E402
from lstm_kernels.backends.triton.persistent_backward import _lstm_pbw_kernel  # noqa: E402
from lstm_kernels.backends.triton.persistent_forward import _lstm_pfw_kernel  # noqa: E402
from triton_compiler import LAYOUTS_AS_DESIGNED, known_deviation  # noqa: E402  (tests/triton_compiler.py)

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
#: Shared memory one block may opt in to: A100, H100.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
SMS = {80: 108, 90: 132}
#: (B, H, P): the flagship shape and two others (a projection with odd sizes; a larger batch).
SHAPES = {"B16_H768": (16, 768, 768), "B5_H100_P40": (5, 100, 40), "B64_H256": (64, 256, 256)}


# ----------------------------------------------------------------------------- compiling


def compile_kernel(fn, constants: dict, typed: dict, ints: dict, num_warps: int, arch: int, maxnreg=None):
    """Compile ``fn`` for sm_<arch> as a launch would: pointers (``*_ptr``; fp32 unless named in
    ``typed``) 16-byte aligned, int arguments (values in ``ints``) marked divisible by 16 when
    they are (BaseBackend.get_int_specialization / parse_attr, the JIT's own rule)."""
    maxnreg = constants.get("maxnreg", maxnreg)
    constants = {k: v for k, v in constants.items() if k not in ("num_warps", "maxnreg")}
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = typed.get(name, "*i64" if name == "rec_ptr" else "*fp32")
            attrs[(index,)] = BaseBackend.parse_attr("D")
        elif name in kernels.BARRIER_RUNTIME_ARGS:  # never specialised, as the kernels declare them
            signature[name] = "i64" if name == "timeout_ns" else "i32"
        else:
            signature[name] = "i32"
            spec = BaseBackend.get_int_specialization(ints[name], align=True)
            if spec:
                attrs[(index,)] = BaseBackend.parse_attr(spec)
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    options = dict(num_warps=num_warps, launch_cooperative_grid=True, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name, *args, data: bytes, tmp_path) -> str:
    path = tmp_path / "kernel.cubin"
    path.write_bytes(data)
    return subprocess.run([os.path.join(NVIDIA_BIN, name), *args, str(path)], capture_output=True, text=True,
                          check=True).stdout


# ----------------------------------------------------------------------------- reading TTGIR


def step_loop(ttgir: str) -> list[str]:
    """The lines of the kernel's outermost scf.while (the step loop), both regions."""
    lines = ttgir.splitlines()
    start = next(i for i, line in enumerate(lines) if "scf.while" in line)
    depth, body = 0, []
    for line in lines[start:]:
        body.append(line)
        depth += line.count("{") - line.count("}")
        if depth == 0 and len(body) > 1:
            return body
    raise AssertionError("unterminated scf.while")


_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*(.*)$")


def _definitions(ttgir: str) -> dict:
    """SSA value -> the text of its defining op (operands are the %names in it)."""
    defs = {}
    for line in ttgir.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = m.group(2).split(" loc(")[0]
    return defs


def derives_from(value: str, arg: str, defs: dict, seen=None) -> bool:
    """Whether ``value`` is computed (through any op) from the function argument ``arg``."""
    seen = set() if seen is None else seen
    if value == arg:
        return True
    if value in seen or value not in defs:
        return False
    seen.add(value)
    return any(derives_from(v, arg, defs, seen) for v in re.findall(r"%[\w.]+", defs[value]))


def ops_in_loop_from(ttgir: str, op: str, arg: str) -> int:
    """Ops ``op`` (tt.load, ttg.local_alloc, ...) inside the step loop whose operand derives from ``arg``."""
    defs = _definitions(ttgir)
    count = 0
    for line in step_loop(ttgir):
        operands = re.findall(r"%[\w.]+", line.split(f" {op} ", 1)[1]) if f" {op} " in line else []
        count += bool(operands) and derives_from(operands[0], arg, defs)
    return count


#: TTGIR ops that read global memory: plain loads, and what the pipeliner turns them into (cp.async, TMA).
GLOBAL_LOADS = ("tt.load", "ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local",
                "tt.descriptor_load")


def grid_arrivals_per_step(ttgir: str) -> int:
    """Release adds in the step loop: Triton's atomic, or the inline PTX of device_helpers' arrival."""
    return sum("tt.atomic_rmw add, release" in line or ("elementwise_inline_asm" in line and "red.release" in line)
               for line in step_loop(ttgir))


def scalar_atomics_per_step(ttgir: str) -> int:
    """Triton atomics in the step loop (each a scalar in these kernels: lowered with block barriers)."""
    return sum(bool(re.search(r"\btt\.atomic_(rmw|cas)\b", line)) for line in step_loop(ttgir))


def layout_exchanges_per_step(ttgir: str) -> int:
    """Layout conversions and reductions in the step loop (each may pass through shared memory)."""
    return sum(("ttg.convert_layout" in line) or ('"tt.reduce"' in line) for line in step_loop(ttgir))


def cross_warp_sums_per_step(ttgir: str) -> int:
    return sum('"tt.reduce"' in line for line in step_loop(ttgir))


def layout_conversions_per_step(ttgir: str) -> int:
    return sum("ttg.convert_layout" in line for line in step_loop(ttgir))


def exponentials_per_step(ttgir: str) -> int:
    """Tensor exponentials in the step loop (math.exp / math.exp2: one MUFU.EX2 per element each): a
    sigmoid or a tanh costs one."""
    return sum(bool(re.search(r"=\s*math\.exp2?\b", line)) for line in step_loop(ttgir))


def block_barriers_per_step(ttgir: str) -> int:
    """Block-wide barriers (bar.sync) the step loop passes: tl.debug_barrier and the barriers inside
    the grid barrier's halves."""
    return sum(bool(re.search(r"\b(ttg|gpu)\.barrier\b", line)) for line in step_loop(ttgir))


# ----------------------------------------------------------------------------- reading SASS / PTX


def mma_per_warp(sass: str) -> dict:
    """Tensor-core instructions in the kernel by shape, e.g. {(16, 8, 16): 24}. In the new kernels the
    step loop is not unrolled, has no inner loop and holds every dot, so this is the per-warp count
    of one step (a kernel with a k-loop inside the step executes its body once per trip)."""
    counts = {}
    for mnemonic in re.findall(r"\bHMMA\.(\d+)", sass):
        shape = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}[mnemonic]
        counts[shape] = counts.get(shape, 0) + 1
    assert "HGMMA" not in sass, "wgmma: count it by its own instruction shape"
    return counts


def resources(compiled, tmp_path) -> dict:
    out = _tool("cuobjdump", "-res-usage", data=compiled.asm["cubin"], tmp_path=tmp_path)
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()} | {"shared": compiled.metadata.shared}


def ideal_mma(dots, shape, num_warps: int) -> float:
    """Per warp: sum of M x N x K over the step's ``dots`` on that instruction shape (M padded to
    the instruction's m), split evenly over the warps."""
    m, n, k = shape
    return sum(max(M, m) * max(N, n) * K for M, N, K in dots) / (m * n * k) / num_warps


def report(kernel, arch, dtype, shape_id, compiled, tmp_path, w_args):
    ttgir = compiled.asm["ttgir"]
    sass = _tool("cuobjdump", "-sass", data=compiled.asm["cubin"], tmp_path=tmp_path)
    counts = dict(
        mma_per_warp=mma_per_warp(sass),
        w_global_loads_in_loop=sum(ops_in_loop_from(ttgir, op, a) for a in w_args for op in GLOBAL_LOADS),
        w_smem_copies_in_loop=sum(ops_in_loop_from(ttgir, "ttg.local_alloc", a) for a in w_args),
        w_smem_reads_in_loop=sum(ops_in_loop_from(ttgir, "ttg.local_load", a) for a in w_args),
        grid_arrivals=grid_arrivals_per_step(ttgir),
        scalar_atomics=scalar_atomics_per_step(ttgir),
        layout_exchanges=layout_exchanges_per_step(ttgir),
        cross_warp_sums=cross_warp_sums_per_step(ttgir),
        layout_conversions=layout_conversions_per_step(ttgir),
        block_barriers=block_barriers_per_step(ttgir),
        exponentials=exponentials_per_step(ttgir),
        bar_sync_ptx=len(re.findall(r"\bbar\.sync|\bbarrier\.sync", compiled.asm["ptx"])),
        warps=compiled.metadata.num_warps,
        **resources(compiled, tmp_path),
    )
    print(f"\n[step budget] {kernel} sm_{arch} {dtype} {shape_id}: {counts}")
    return counts


def assert_fits(counts, arch, what):
    assert counts["shared"] <= MAX_SHARED[arch], f"{what}: {counts['shared']} B of shared memory on sm_{arch}"


def spill_problems(counts, what, slack: dict = None) -> list:
    """(d): no local memory (registers spilled) in the cubin; ``slack``: KNOWN_DEVIATION's bytes allowed."""
    spilled, allowed = counts["LOCAL"] + counts["STACK"], (slack or {}).get("spill_bytes", 0)
    return [] if spilled <= allowed else [f"{what} spills: LOCAL {counts['LOCAL']}, STACK {counts['STACK']} bytes"]


def assert_compiler_choices(kind: str, *checks):
    """The counts that the compiler's layout and register choices decide (the forward's exponentials and
    layout conversions, spills) of the kernel ``kind`` (a key of tests/triton_compiler.py's KNOWN_DEVIATION).
    ``checks``: functions of a slack (a dict of the deviation's keys; none: the design) that return the
    problems found. With the Triton they were designed on (LAYOUTS_AS_DESIGNED) none is allowed; with an older
    one, problems within the kernel's known deviation are reported as an expected failure that names each count
    (the test passes where there are none), and problems beyond it fail. Called last, after every check that
    holds with either Triton."""
    found = [p for check in checks for p in check()]
    if not found:
        return
    if LAYOUTS_AS_DESIGNED:
        raise AssertionError("; ".join(found))
    beyond = [p for check in checks for p in check(known_deviation(kind))]
    assert not beyond, f"Triton {triton.__version__}, beyond its known deviation: " + "; ".join(beyond)
    pytest.xfail(f"Triton {triton.__version__}'s layout choices: " + "; ".join(found))


def assert_ideal_mma(counts, dots_by_shape, what):
    got = counts["mma_per_warp"]
    assert set(got) == set(dots_by_shape), f"{what}: MMA shapes {got} != {set(dots_by_shape)}"
    for shape, dots in dots_by_shape.items():
        ideal = ideal_mma(dots, shape, counts["warps"])
        assert got[shape] == ideal, f"{what}: {got[shape]} MMA {shape} per warp per step, ideal {ideal}"


def assert_designed_step(counts, has_proj: bool, forward: bool, what: str):
    """(c) and (e): the grid barriers, cross-warp sums, block barriers and layout conversions per step."""
    products = 2 if has_proj else 1  # h W_hh^T (dG W_hh), and m W_hr^T (dh W_hr) with a projection
    assert counts["grid_arrivals"] == products, f"{what}: {counts['grid_arrivals']} grid arrivals per step"
    assert counts["cross_warp_sums"] == products, f"{what}: {counts['cross_warp_sums']} cross-warp sums per step"
    assert counts["block_barriers"] == counts["grid_arrivals"], (
        f"{what}: {counts['block_barriers']} block barriers per step, designed 1 per grid barrier")
    assert counts["scalar_atomics"] == 0, f"{what}: {counts['scalar_atomics']} scalar atomics (block barriers) per step"
    if not forward:  # the backward's conversions (the sums into the cell's layout) hold with either Triton
        problems = layout_problems(counts, has_proj, False, what)
        assert not problems, "; ".join(problems)


def layout_problems(counts, has_proj: bool, forward: bool, what: str, slack: dict = None) -> list:
    """(e) and (e'): at most one layout conversion per cross-warp sum (plus four in the forward: the gate
    split and the layouts of the h / c stores); in the forward, one sigmoid over all the gates (the g rows'
    tanh taken from it) and one tanh of c: 2 exponentials. ``slack``: KNOWN_DEVIATION's more allowed."""
    return _conversion_and_exponential_problems(counts, (2 if has_proj else 1) + (4 if forward else 0),
                                                2 if forward else None, what, slack)


def _conversion_and_exponential_problems(counts, conversions: int, exponentials, what: str, slack: dict) -> list:
    """Layout conversions per step beyond ``conversions``, exponentials other than ``exponentials`` (None: not
    checked), each with ``slack``'s more allowed."""
    slack, problems = slack or {}, []
    if counts["layout_conversions"] > conversions + slack.get("conversions", 0):
        problems.append(f"{what}: {counts['layout_conversions']} layout conversions per step, designed at most "
                        f"{conversions}")
    if exponentials is not None and not (
            exponentials <= counts["exponentials"] <= exponentials + slack.get("exponentials", 0)):
        problems.append(f"{what}: {counts['exponentials']} exponentials per step, designed {exponentials}")
    return problems


def _instr(dtype, precision):
    return (16, 8, 16) if dtype != torch.float32 or precision is None else (16, 8, 8)


# ----------------------------------------------------------------------------- the new kernels


def budget_of(arch: int) -> int:
    """``resident_budget`` of a GPU of this architecture."""
    return min(tp.RESIDENT_BYTES, MAX_SHARED[arch] - tp.RESIDENT_MARGIN)


def forward_build(B, H, P, dtype, arch, kernel=_lstm_pfw_kernel, has_resets=False, cell="lstm"):
    has_proj = P != H
    cfg = tp.forward_plan(B, H, P, dtype, torch.device("cuda"), has_proj, programs=SMS[arch], budget=budget_of(arch),
                          cell=cell)
    assert isinstance(cfg, dict), cfg
    consts = tp.forward_constants(H, P, dtype, cfg, has_proj, store_workspace=True, use_barrier=True,
                                  has_resets=has_resets, cell=cell)
    typed = {n: PTR[dtype] for n in ("xg_ptr", "w_ptr", "w_hr_ptr", "w_n_ptr", "b_hn_ptr", "h_buf_ptr", "h_all_ptr")}
    typed |= {"bs_ptr": "*i32", "bar_ptr": "*i32", "rst_ptr": "*i8"}
    compiled = compile_kernel(kernel, consts, typed, dict(t_begin=0, n_steps=1024, B=B), cfg["num_warps"], arch)
    # 16-bit operands: m16n8k16; fp32 (served with tf32 only): m16n8k8. The GRU: its r, z rows and its
    # n rows, two dots of 2U and U rows
    K, U = consts["K1"] + consts["K2"], cfg["BLOCK_H"]
    rows = [4 * U] if cell == "lstm" else [2 * U, U]
    dots = {(16, 8, 16) if dtype != torch.float32 else (16, 8, 8): [(m, cfg["BLOCK_B"], K) for m in rows]}
    if has_proj:  # m (fp32) @ W_hr^T in tf32
        dots.setdefault((16, 8, 8), []).append((cfg["BLOCK_P"], cfg["BLOCK_B"], consts["KH1"] + consts["KH2"]))
    return cfg, compiled, dots


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_persistent_forward_step_budget(shape, dtype, arch, tmp_path):
    B, H, P = shape
    cfg, compiled, dots = forward_build(B, H, P, dtype, arch)
    counts = report("forward (new)", arch, dtype, f"B{B}_H{H}_P{P} {cfg}", compiled, tmp_path, ("%w_ptr", "%w_hr_ptr"))
    what = f"persistent forward sm_{arch} {dtype} B={B} H={H} P={P}"
    assert_ideal_mma(counts, dots, what)
    assert counts["w_global_loads_in_loop"] == 0 and counts["w_smem_copies_in_loop"] == 0, what
    assert_designed_step(counts, P != H, True, what)
    assert_fits(counts, arch, what)
    if (B, H) == (16, 768):  # the flagship: nearly all SMs busy
        assert cfg["programs"] >= 0.7 * SMS[arch], cfg
    assert_compiler_choices("lstm forward", partial(layout_problems, counts, P != H, True, what),
                            partial(spill_problems, counts, what))


#: The GRU forward's layout conversions per step, at most: the forward's rule (one per cross-warp sum,
#: two here, plus four: the gate split and the h stores) for its two sums.
GRU_CONVERSIONS = 2 + 4


def assert_designed_gru_step(counts, dots, what):
    """The GRU forward's step as designed (see test_persistent_gru_forward_step_budget)."""
    assert_ideal_mma(counts, dots, what)
    assert counts["w_global_loads_in_loop"] == 0 and counts["w_smem_copies_in_loop"] == 0, f"{what}: W in the loop"
    assert counts["grid_arrivals"] == 1, f"{what}: {counts['grid_arrivals']} grid arrivals per step"
    assert counts["cross_warp_sums"] == 2, f"{what}: {counts['cross_warp_sums']} cross-warp sums, one per dot"
    assert counts["block_barriers"] == 1, f"{what}: {counts['block_barriers']} block barriers per step"
    assert counts["scalar_atomics"] == 0, f"{what}: {counts['scalar_atomics']} scalar atomics (block barriers) per step"


def gru_layout_problems(counts, what, slack: dict = None) -> list:
    """The GRU forward's layout conversions (GRU_CONVERSIONS) and exponentials (r, z; n: 2) per step."""
    return _conversion_and_exponential_problems(counts, GRU_CONVERSIONS, 2, what, slack)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", [SHAPES["B16_H768"], SHAPES["B64_H256"]], ids=["B16_H768", "B64_H256"])
def test_persistent_gru_forward_step_budget(shape, dtype, arch, tmp_path):
    """The GRU's instance of the persistent forward (GATES = 3): MMA per warp at the ideal for its 3U
    rows (two dots, 2U and U rows, U >= 16: no padded MMA row), no W from global memory in the loop,
    one grid barrier per step, one cross-warp sum per dot, the layout conversions of GRU_CONVERSIONS."""
    B, H, P = shape
    cfg, compiled, dots = forward_build(B, H, P, dtype, arch, cell="gru")
    counts = report("gru forward", arch, dtype, f"B{B}_H{H} {cfg}", compiled, tmp_path,
                    ("%w_ptr", "%w_n_ptr"))
    what = f"persistent GRU forward sm_{arch} {dtype} B={B} H={H}"
    assert cfg["BLOCK_H"] >= 16, cfg
    assert_designed_gru_step(counts, dots, what)
    assert_fits(counts, arch, what)
    assert_compiler_choices("gru forward", partial(gru_layout_problems, counts, what),
                            partial(spill_problems, counts, what))


def backward_build(B, H, P, dtype, arch, kernel=_lstm_pbw_kernel, has_resets=False, cell="lstm"):
    has_proj = P != H
    cfg = tp.backward_plan(B, H, P, dtype, torch.device("cuda"), has_proj, programs=SMS[arch], budget=budget_of(arch),
                           cell=cell)
    assert isinstance(cfg, dict), cfg
    consts = tp.backward_constants(H, P, dtype, cfg, has_proj, use_barrier=True, has_resets=has_resets, cell=cell)
    typed = {n: PTR[dtype] for n in ("w_ptr", "w_hr_ptr", "dh_all_ptr", "dh_last_ptr", "c0_ptr", "dg_ptr",
                                     "dg_buf_ptr", "h_all_ptr", "d_hn_ptr")}
    typed |= {"bs_ptr": "*i32", "bar_ptr": "*i32", "rst_ptr": "*i8"}
    compiled = compile_kernel(kernel, consts, typed, dict(t_begin=1023, n_steps=1025, B=B), cfg["num_warps"], arch)
    K = sum(consts[k] for k in ("K1", "K2", "K3", "K4"))
    dots = {(16, 8, 16): [(cfg["BLOCK_H"], cfg["BLOCK_B"], K)]}
    if has_proj:  # dh (fp32) @ W_hr in tf32 for 16-bit inputs
        dots[(16, 8, 8)] = [(cfg["BLOCK_H"], cfg["BLOCK_B"], consts["KP1"] + consts["KP2"])]
    return cfg, compiled, dots


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_persistent_backward_step_budget(shape, dtype, arch, tmp_path):
    B, H, P = shape
    cfg, compiled, dots = backward_build(B, H, P, dtype, arch)
    counts = report("backward (new)", arch, dtype, f"B{B}_H{H}_P{P} {cfg}", compiled, tmp_path,
                    ("%w_ptr", "%w_hr_ptr"))
    what = f"persistent backward sm_{arch} {dtype} B={B} H={H} P={P}"
    assert_ideal_mma(counts, dots, what)
    assert counts["w_global_loads_in_loop"] == 0 and counts["w_smem_copies_in_loop"] == 0, what
    assert_designed_step(counts, P != H, False, what)
    assert counts["exponentials"] == 1, f"{what}: {counts['exponentials']} exponentials per step, designed 1 (tanh c)"
    assert_fits(counts, arch, what)
    if (B, H) == (16, 768):  # no MMA row padded with zeros: each program's dG read serves 16 real rows
        assert cfg["UNITS"] == cfg["BLOCK_H"], cfg
    assert_compiler_choices("persistent backward", partial(spill_problems, counts, what))


def assert_designed_gru_backward_step(counts, dots, ttgir, what):
    """The GRU backward's step as designed (see test_persistent_gru_backward_step_budget)."""
    assert_ideal_mma(counts, dots, what)
    assert counts["w_global_loads_in_loop"] == 0 and counts["w_smem_copies_in_loop"] == 0, f"{what}: W in the loop"
    assert_designed_step(counts, False, False, what)
    carry_loads = loads_from(ttgir, "%dc_ptr", in_loop=True)
    assert carry_loads == 0, f"{what}: {carry_loads} loads of the carry in the step loop, designed in registers"
    assert counts["exponentials"] == 0, f"{what}: {counts['exponentials']} exponentials per step (the saved r, z, n)"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", [SHAPES["B16_H768"], SHAPES["B64_H256"]], ids=["B16_H768", "B64_H256"])
def test_persistent_gru_backward_step_budget(shape, dtype, arch, tmp_path):
    """The GRU's instance of the persistent backward (GATES = 3): K = 3H in pieces that pad no MMA
    (2304 = 1024 + 1024 + 256 at the flagship: 36 per warp per step, 3/4 of the LSTM's 48), no W
    from global memory in the loop, one grid barrier, one cross-warp sum, at most one layout
    conversion per step, the carry dh z in registers (no load of it in the loop), the LSTM's
    programs."""
    B, H, P = shape
    cfg, compiled, dots = backward_build(B, H, P, dtype, arch, cell="gru")
    counts = report("gru backward", arch, dtype, f"B{B}_H{H} {cfg}", compiled, tmp_path, ("%w_ptr",))
    what = f"persistent GRU backward sm_{arch} {dtype} B={B} H={H}"
    assert sum(cfg["PIECES"]) == 3 * H, cfg  # powers of two cover 3H at these shapes: nothing padded
    assert_designed_gru_backward_step(counts, dots, compiled.asm["ttgir"], what)
    assert_fits(counts, arch, what)
    lstm_cfg = tp.backward_plan(B, H, P, dtype, torch.device("cuda"), False, programs=SMS[arch],
                                budget=budget_of(arch))
    assert cfg["programs"] == lstm_cfg["programs"], (cfg, lstm_cfg)
    assert_compiler_choices("persistent backward", partial(spill_problems, counts, what))


def loads_from(ttgir: str, arg: str, in_loop: bool) -> int:
    """Global loads whose address derives from the argument ``arg``: in the step loop, or anywhere."""
    if in_loop:
        return sum(ops_in_loop_from(ttgir, op, arg) for op in GLOBAL_LOADS)
    defs = _definitions(ttgir)
    return sum(derives_from(re.findall(r"%[\w.]+", line.split(f" {op} ", 1)[1])[0], arg, defs)
               for line in ttgir.splitlines() for op in GLOBAL_LOADS if f" {op} " in line)


#: What the step-budget counts of a kernel with resets may differ in from the same kernel without.
RESET_FREE_COUNTS = ("mma_per_warp", "w_global_loads_in_loop", "w_smem_copies_in_loop", "w_smem_reads_in_loop",
                     "grid_arrivals", "cross_warp_sums", "block_barriers", "layout_conversions", "exponentials",
                     "warps")


@pytest.mark.parametrize("build, shape, cell", [
    (build, SHAPES[shape_id], "lstm") for build in (forward_build, backward_build) for shape_id in ("B16_H768", "B5_H100_P40")
] + [(backward_build, SHAPES["B16_H768"], "gru")], ids=["forward-B16_H768", "forward-B5_H100_P40", "backward-B16_H768",
                                                      "backward-B5_H100_P40", "gru_backward-B16_H768"])
def test_resets_cost_one_flag_load_per_step(build, shape, cell, tmp_path):
    """Without resets (HAS_RESETS=False) the kernels read nothing of the resets argument, so they are the
    kernels the budget tests above check; with resets the step loop gains one load of the tile's flags
    and nothing that the budget counts (MMAs, W_hh traffic, grid and block barriers, cross-warp sums,
    layout conversions), within the architecture's shared memory and without spills. The LSTM's
    kernels, and the GRU's instance of the backward."""
    B, H, P = shape
    _, without, _ = build(B, H, P, torch.float16, 90, cell=cell)
    _, with_resets, dots = build(B, H, P, torch.float16, 90, has_resets=True, cell=cell)
    assert loads_from(without.asm["ttgir"], "%rst_ptr", in_loop=False) == 0
    assert loads_from(with_resets.asm["ttgir"], "%rst_ptr", in_loop=True) == 1
    args = ("%w_ptr", "%w_hr_ptr")
    kind = ("forward" if build is forward_build else "backward") + f" {cell}"
    plain = report(f"{kind} (no resets)", 90, torch.float16, f"B{B}_H{H}_P{P}", without, tmp_path, args)
    counts = report(f"{kind} (resets)", 90, torch.float16, f"B{B}_H{H}_P{P}", with_resets, tmp_path, args)
    assert {k: counts[k] for k in RESET_FREE_COUNTS} == {k: plain[k] for k in RESET_FREE_COUNTS}
    forward = build is forward_build
    assert_designed_step(counts, P != H, forward, f"{kind} with resets")
    assert_fits(counts, 90, f"{kind} with resets")
    checks = [partial(layout_problems, counts, P != H, True, f"{kind} with resets")] if forward else []
    assert_compiler_choices("lstm forward" if forward else "persistent backward", *checks,
                            partial(spill_problems, counts, f"{kind} with resets"))


def clock_reads(ttgir: str) -> tuple:
    """(%globaltimer reads in the step loop, of which outside any scf.if nested in it): the wait's
    slow path is the scf.if of a first poll that found the barrier closed."""
    lines = step_loop(ttgir)
    total = outside = 0
    depth = 0  # scf.if regions open inside the step loop
    for line in lines:
        if "%globaltimer" in line:
            total += 1
            outside += depth == 0
        if "scf.if" in line and line.rstrip().endswith("{"):
            depth += 1
        elif line.strip().startswith("}") and depth and not line.strip().startswith("} else"):
            depth -= 1
    return total, outside


@pytest.mark.parametrize("build", [forward_build, backward_build], ids=["forward", "backward"])
@pytest.mark.parametrize("shape", [SHAPES["B16_H768"], SHAPES["B5_H100_P40"]], ids=["B16_H768", "B5_H100_P40"])
def test_the_served_kernel_bounds_its_waits_at_run_time(build, shape, tmp_path):
    """The bound is a runtime argument (i64, never specialised), so verification proves the binary
    that serves; the clock (%globaltimer) is read only inside the slow path of each wait, two
    reads per wait (its start, and each later closed poll); one arrival per step without a
    projection, no local memory."""
    kernel = _lstm_pfw_kernel if build is forward_build else _lstm_pbw_kernel
    params = {p.name: p for p in kernel.params}
    assert not params["timeout_ns"].is_constexpr and params["timeout_ns"].annotation_type == "i64"
    assert params["timeout_ns"].do_not_specialize and params["kernel_code"].do_not_specialize
    B, H, P = shape
    _, compiled, _ = build(B, H, P, torch.float16, 90)
    waits = grid_arrivals_per_step(compiled.asm["ttgir"])
    assert waits == (2 if P != H else 1)
    total, outside = clock_reads(compiled.asm["ttgir"])
    print(f"\n[step budget] {kernel.__name__} B={B} H={H} P={P}: clock reads in the step loop {total}, outside the slow path "
          f"{outside}, waits {waits}")
    assert total == 2 * waits and outside == 0, (total, outside, waits)
    assert "%globaltimer" in compiled.asm["ptx"]
    assert resources(compiled, tmp_path)["LOCAL"] == 0


@pytest.mark.parametrize("arch", [80, 90])
def test_fp32_is_served_with_tf32_only(arch, tmp_path, set_tf32):
    """fp32 without tf32 (torch's default) would run the dot on FMA units and spill: the plans refuse it
    with a reason (the step kernels serve it). With tf32 allowed the forward fits at the flagship
    shape; the backward's fp32 slice does not fit the register budget there and says so."""
    cuda = torch.device("cuda")
    set_tf32(False)
    for plan in (tp.forward_plan, tp.backward_plan):
        reason = plan(16, 768, 768, torch.float32, cuda, False, programs=SMS[arch], budget=budget_of(arch))
        assert isinstance(reason, str) and "tf32" in reason, reason
    set_tf32(True)
    cfg, compiled, dots = forward_build(16, 768, 768, torch.float32, arch)
    counts = report("forward (new)", arch, torch.float32, f"B16_H768 tf32 {cfg}", compiled, tmp_path, ("%w_ptr",))
    assert_ideal_mma(counts, dots, f"fp32 (tf32) forward sm_{arch}")
    assert counts["w_global_loads_in_loop"] == 0 and counts["grid_arrivals"] == 1
    assert_fits(counts, arch, f"fp32 (tf32) forward sm_{arch}")
    assert_compiler_choices("lstm forward", partial(spill_problems, counts, f"fp32 (tf32) forward sm_{arch}"))
    reason = tp.backward_plan(16, 768, 768, torch.float32, cuda, False, programs=SMS[arch], budget=budget_of(arch))
    assert isinstance(reason, str) and "registers" in reason, reason


# ----------------------------------------------------------------------------- (f) the plans' shapes

#: The plans the design gives (persistent.forward_plan / backward_plan docstrings), on sm_90
#: (132 SMs): BB = B padded up to 64 rows; U = the fewest units per program (4, 8, 16, 32) whose
#: tiles fit one per SM; warps = K slices = min(8, shortest K / 16) (backward: K = 4H, and P).
#:   flagship B16 H768: forward U = 4 gives 192 tiles > 132, so U = 8: 96 programs of 8 warps;
#:                      backward 16 units (16 MMA rows, none padded) x 16 rows: 48 programs of 8 warps.
#:   B64 H256:          forward U = 4: 64 programs of 8 warps; backward 16 units: 16 programs.
#:   B5 H100 P40:       K = P = 40 gives 2 slices of 16: 2 warps; forward U = 4: 25 programs;
#:                      backward 16 units: 7 programs.
DESIGNED_PLANS = {
    "B16_H768": dict(forward=dict(BLOCK_H=8, BLOCK_B=16, num_warps=8, programs=96),
                     backward=dict(UNITS=16, BLOCK_B=16, num_warps=8, programs=48)),
    "B64_H256": dict(forward=dict(BLOCK_H=4, BLOCK_B=64, num_warps=8, programs=64),
                     backward=dict(UNITS=16, BLOCK_B=64, num_warps=8, programs=16)),
    "B5_H100_P40": dict(forward=dict(BLOCK_H=4, BLOCK_B=16, num_warps=2, programs=25),
                        backward=dict(UNITS=16, BLOCK_B=16, num_warps=2, programs=7)),
}


def plan_of(direction: str, B: int, H: int, P: int, dtype=torch.float16, arch: int = 90):
    plan = tp.forward_plan if direction == "forward" else tp.backward_plan
    return plan(B, H, P, dtype, torch.device("cuda"), P != H, programs=SMS[arch], budget=budget_of(arch))


def assert_designed_plan(shape_id: str, direction: str, what: str = ""):
    cfg = plan_of(direction, *SHAPES[shape_id])
    assert isinstance(cfg, dict), cfg
    designed = DESIGNED_PLANS[shape_id][direction]
    got = {k: cfg[k] for k in designed}
    assert got == designed, f"{what}{direction} plan at {shape_id}: {got}, designed {designed}"


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_plans_have_the_designed_shape(shape_id, direction):
    assert_designed_plan(shape_id, direction)


def exchange_mb_per_step(direction: str, B: int, H: int, P: int, elem: int = 2) -> float:
    """From the plan: what all programs together read from L2 per step for the exchange, in MB: each
    program reads the whole h_{t-1} [BB, P] (forward) or dG_{t+1} [BB, 4H] (backward) of its batch tile."""
    cfg = plan_of(direction, B, H, P)
    row = P if direction == "forward" else 4 * H
    return cfg["programs"] * min(cfg["BLOCK_B"], B) * row * elem / 1e6


@pytest.mark.parametrize("direction, mb, where", [
    ("forward", 2.4, None), ("backward", 4.7, "persistent_backward.py")])
def test_exchange_l2_bytes_per_step_from_the_plan(direction, mb, where):
    """The exchange's L2 traffic per step at the flagship (issue 21): 16-unit backward programs halve the
    dG_{t+1} broadcast, and the kernel's docstring states the figure."""
    got = exchange_mb_per_step(direction, *SHAPES["B16_H768"])
    print(f"\n{direction}: {got:.2f} MB of L2 reads per step")
    assert round(got, 1) == mb, got
    if where:
        source = open(os.path.join(os.path.dirname(tp.__file__), where)).read()
        assert f"{mb} MB" in source, "the docstring no longer states the figure"


def test_exchange_bytes_check_catches_more_programs(monkeypatch):
    """A backward plan rule that allows 8 units per program (96 programs, as before issue 21) reads dG_{t+1}
    twice as often: the figure moves."""
    monkeypatch.setattr(tp, "BACKWARD_UNIT_BLOCKS", (8, 16, 32))
    got = exchange_mb_per_step("backward", *SHAPES["B16_H768"])
    assert round(got, 1) != 4.7, got


def test_mutant_plan_with_fewer_warps_is_caught(monkeypatch):
    """A plan rule broken (K split over at most 4 warps): its kernels would still match an ideal
    computed from their own configuration, so the plan's shape is checked against the design."""
    monkeypatch.setattr(tp, "MAX_K_SPLIT", 4)
    monkeypatch.setattr(tp, "k_split", lambda *extents, most=4: min(4, _k_split(*extents, most=most)))
    with pytest.raises(AssertionError, match="designed"):
        assert_designed_plan("B16_H768", "forward")


_k_split = tp.k_split


# ----------------------------------------------------------------------------- mutants of the kernels


def mutant_kernel(module, kernel_name: str, old: str, new: str, tmp_path):
    """``kernel_name`` of ``module`` compiled from a copy of its source with ``old`` replaced by ``new``."""
    import importlib.util
    import inspect

    source = inspect.getsource(module)
    assert source.count(old) == 1, f"the mutation site {old!r} is not unique in {module.__name__}"
    source = re.sub(r"^from \.(\w+) import", r"from lstm_kernels.backends.triton.\1 import", source.replace(old, new),
                    flags=re.M)  # the copy is no module of the package: its relative imports made absolute
    path = tmp_path / f"mutant_{module.__name__.rsplit('.', 1)[-1]}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mutated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutated)
    return getattr(mutated, kernel_name)


SUM_SITE = "            acc = tl.sum(acc, axis=0)  # [GR, BB] fp32\n"
ARRIVE_SITE = "        arrivals = _step_arrive(bar_ptr, arrivals, USE_BARRIER)\n        # between arrive and wait"
DOT_SITE = "            acc = tl.dot(w1, h_t1, input_precision=DOT_PRECISION)\n"
FORWARD_MUTANTS = {
    # one more block barrier in the step
    "extra_block_barrier": (SUM_SITE, SUM_SITE + "            tl.debug_barrier()\n", "block barriers"),
    # the cross-warp sum done twice over halves of the partial sums
    "extra_cross_warp_sum": (SUM_SITE, "            acc = tl.sum(acc * 0.25, axis=0) + tl.sum(acc * 0.75, axis=0)\n",
                             "cross-warp sums"),
    # the recurrent MMA issued twice (a warp repeating work)
    "repeated_mma": (DOT_SITE, "            acc = 0.0 * tl.dot(w1, h_t1, input_precision=DOT_PRECISION)\n"
                               "            acc += tl.dot(w1, h_t1, input_precision=DOT_PRECISION)\n", "MMA"),
    # the former arrival: Triton's atomic on a scalar, which passes a block barrier of its own
    "scalar_atomic_arrival": (ARRIVE_SITE, "        arrivals += 1\n        tl.debug_barrier()\n"
                                           "        tl.atomic_add(bar_ptr, 1, sem=\"release\", scope=\"gpu\")\n"
                                           "        # between arrive and wait",
                              "scalar atomics"),
    # the gates' tanh and sigmoid each computed over all the gates, then selected (twice the exponentials)
    "tanh_and_sigmoid_over_all_gates": ("                act = _activate(pre, is_g)  # [4U, BB]: i; f; g; o activated\n",
                                        "                act = tl.where(is_g, _tanh(pre, False), tl.sigmoid(pre))\n",
                                        "exponentials"),
    # W_hh read from global memory inside the step loop
    "w_loaded_in_loop": (DOT_SITE, "            acc = tl.dot(_load_w_split(w_ptr, u * GR, GR, 0, K1, KS, P, DOT_DTYPE),\n"
                                   "                         h_t1, input_precision=DOT_PRECISION)\n", "W_hh"),
}


GRU_DOT_SITE = "                acc_n = tl.dot(wn1, h_t1, input_precision=DOT_PRECISION)\n"
#: The GRU instance's own sites: its n rows' dot.
GRU_FORWARD_MUTANTS = {
    # W_n read from global memory inside the step loop
    "w_n_loaded_in_loop": (
        GRU_DOT_SITE,
        "                acc_n = tl.dot(_load_w_split(w_n_ptr, u * BLOCK_H, BLOCK_H, 0, K1, KS, P, DOT_DTYPE),\n"
        "                               h_t1, input_precision=DOT_PRECISION)\n", "W in the loop"),
    # the n rows' MMA issued twice
    "repeated_n_mma": (
        GRU_DOT_SITE,
        "                acc_n = 0.0 * tl.dot(wn1, h_t1, input_precision=DOT_PRECISION)\n"
        "                acc_n += tl.dot(wn1, h_t1, input_precision=DOT_PRECISION)\n", "MMA"),
}


GRU_CARRY_SITE = "                dh += dc_reg\n"
GRU_LAST_DOT_SITE = (
    "                acc = tl.dot(w3, _load_t_split(dg_next, ba, ba < n_next, K1 + K2, K3, KS, GH, DOT_DTYPE), acc,\n"
    "                             input_precision=DOT_PRECISION)\n")
#: The GRU backward's sites: its carry, and its last piece of K (256 of 2304 at the flagship).
GRU_BACKWARD_MUTANTS = {
    # the carry dh z round-tripped through global memory every step instead of kept in registers
    "carry_from_global": (GRU_CARRY_SITE,
                          "                dh += tl.load(dc_ptr + state, mask=a_in, other=0.0) + 0.0 * dc_reg\n",
                          "carry"),
    # the last piece's MMA issued twice
    "repeated_last_piece": (GRU_LAST_DOT_SITE, GRU_LAST_DOT_SITE + GRU_LAST_DOT_SITE, "MMA"),
    # the last piece of W_hh read from global memory in the loop
    "w_piece_loaded_in_loop": (
        GRU_LAST_DOT_SITE,
        "                acc = tl.dot(_load_rows_split(w_ptr, va * UNITS, BLOCK_H, n_rows, K1 + K2, K3, KS, GH, DOT_DTYPE),\n"
        "                             _load_t_split(dg_next, ba, ba < n_next, K1 + K2, K3, KS, GH, DOT_DTYPE), acc,\n"
        "                             input_precision=DOT_PRECISION)\n", "W in the loop"),
}


@pytest.mark.parametrize("mutant", list(GRU_BACKWARD_MUTANTS))
def test_gru_backward_checks_catch_a_mutant(mutant, tmp_path):
    """Each structural check of the GRU backward fails on its kernel with the fault it guards against."""
    from lstm_kernels.backends.triton import persistent_backward

    old, new, caught_by = GRU_BACKWARD_MUTANTS[mutant]
    kernel = mutant_kernel(persistent_backward, "_lstm_pbw_kernel", old, new, tmp_path)
    B, H, P = SHAPES["B16_H768"]
    _, compiled, dots = backward_build(B, H, P, torch.float16, 90, kernel=kernel, cell="gru")
    counts = report(f"gru backward (mutant {mutant})", 90, torch.float16, "B16_H768", compiled, tmp_path, ("%w_ptr",))
    with pytest.raises(AssertionError) as failure:
        assert_designed_gru_backward_step(counts, dots, compiled.asm["ttgir"], "mutant")
    assert caught_by in str(failure.value), failure.value


@pytest.mark.parametrize("cell, mutant",
                         [("lstm", m) for m in FORWARD_MUTANTS] + [("gru", m) for m in GRU_FORWARD_MUTANTS])
def test_forward_checks_catch_a_mutant(cell, mutant, tmp_path):
    """Each structural check fails on a forward kernel (the LSTM's or the GRU's instance) with the
    fault it guards against."""
    from lstm_kernels.backends.triton import persistent_forward

    old, new, caught_by = (FORWARD_MUTANTS | GRU_FORWARD_MUTANTS)[mutant]
    kernel = mutant_kernel(persistent_forward, "_lstm_pfw_kernel", old, new, tmp_path)
    B, H, P = SHAPES["B16_H768"]
    _, compiled, dots = forward_build(B, H, P, torch.float16, 90, kernel=kernel, cell=cell)
    counts = report(f"{cell} forward (mutant {mutant})", 90, torch.float16, "B16_H768", compiled, tmp_path,
                    ("%w_ptr", "%w_n_ptr"))
    with pytest.raises(AssertionError) as failure:  # a check of the layouts last (an xfail with Triton 3.6)
        if cell == "gru":
            assert_designed_gru_step(counts, dots, "mutant")
            assert_compiler_choices("gru forward", partial(gru_layout_problems, counts, "mutant"))
        else:
            assert_ideal_mma(counts, dots, "mutant")
            assert counts["w_global_loads_in_loop"] == 0 and counts["w_smem_copies_in_loop"] == 0, (
                "mutant: W_hh in the loop")
            assert_designed_step(counts, False, True, "mutant")
            assert_compiler_choices("lstm forward", partial(layout_problems, counts, False, True, "mutant"))
    assert caught_by in str(failure.value), failure.value
