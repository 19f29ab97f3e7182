"""The Triton kernels compiled for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter runs the kernels' Python, not Triton's compiler: code that the
interpreter accepts can still fail to compile (a type the MLIR lowering refuses, a
layout, a loop-carried value). Here the launch helpers (``lstm_forward`` /
``lstm_backward``) run their whole host path on meta tensors with the kernels replaced by
recorders (tests/triton/launch_capture.py), as on a GPU of the architecture (its SM count
and shared memory); every launch they make, step and persistent, is specialised by
Triton's own JIT binder (16-byte pointer alignment, integers divisible by 16,
do_not_specialize, the launch options) and compiled ahead of time to a cubin with the
ptxas that ships in the triton wheel: the kernel that runs, not a look-alike. The
compiled kernels are checked to fit the architecture's shared memory per block and not to
spill to local memory (the cubin's resource usage, from the wheel's cuobjdump; with Triton 3.6, within
its known deviation: tests/triton_compiler.py). The
persistent kernels' own structural checks (MMA counts, barriers, the plans' shapes) are in
tests/test_triton_step_budget.py.

Runs without TRITON_INTERPRET (under it ``@triton.jit`` gives interpreted functions).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") == "1", reason="compiles the kernels; not under TRITON_INTERPRET=1"
)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from lstm_kernels.backends import known_backends  # noqa: E402

known_backends()
from lstm_kernels.backends import triton as triton_backend  # noqa: E402
from lstm_kernels.backends.triton import config as kernels  # noqa: E402
from lstm_kernels.backends.triton import persistent  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton"))
import launch_capture  # noqa: E402  (tests/triton/launch_capture.py)
from triton_compiler import spill_bytes_allowed  # noqa: E402  (tests/triton_compiler.py)

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, RTX 30xx,
#: L4 / RTX 40xx, H100.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
#: SMs of a GPU of the architecture (A100, A10, L4, H100): how many programs a persistent launch gets.
SMS = {80: 108, 86: 72, 89: 58, 90: 132}
ARCHS = list(MAX_SHARED)


def budget_of(arch: int) -> int:
    """``resident_budget`` of a GPU of this architecture (the rule of persistent)."""
    return min(persistent.RESIDENT_BYTES, MAX_SHARED[arch] - persistent.RESIDENT_MARGIN)


def target_of(arch: int):
    return GPUTarget("cuda", arch, 32)


def as_on_gpu(monkeypatch, arch: int) -> None:
    """Make the launch helpers configure launches as on a GPU of ``arch`` (SMs, shared memory)."""
    monkeypatch.setattr(persistent, "co_resident_programs", lambda device: SMS[arch])
    monkeypatch.setattr(persistent, "resident_budget", lambda device: budget_of(arch))


def record(monkeypatch, arch, T, B, H, dtype, proj=0, variant="step", cell="lstm"):
    """(forward launches, backward launches) of one forward + backward of ``cell`` through the launch
    helpers ("persistent": the persistent kernels where their plan fits on the architecture, else the
    step kernels; float32 without TF32, torch's default, is the step kernels')."""
    as_on_gpu(monkeypatch, arch)
    fw, bw = launch_capture.record_launches(monkeypatch)
    launch_capture.run_host_path(launch_capture.meta_case(T, B, H, dtype, proj=proj, cell=cell), variant)
    return fw.launches, bw.launches


def distinct(launches, arch):
    """One launch per JIT specialisation (what the JIT compiles), in launch order."""
    backend = make_backend(target_of(arch))
    seen = {}
    for launch in launches:
        seen.setdefault(launch_capture.specialization_key(launch, backend), launch)
    return list(seen.values())


def compile_launch(launch, arch: int):
    """Compile what Triton's JIT compiles for ``launch`` on ``sm_<arch>``: the same signature,
    constexprs, specialisation attributes and options."""
    backend = make_backend(target_of(arch))
    try:
        signature, constexprs, attrs, options = launch_capture.jit_compile_inputs(launch, backend)
    except launch_capture.JitApiUnsupported as err:
        if triton_backend.MIN_TRITON <= triton_backend._version_tuple(triton.__version__) < (3, 10):
            raise  # a Triton setup.py declares: the kernels it runs must be checked, not skipped
        pytest.skip(f"triton {triton.__version__}: the JIT's specialisation API is not the known one ({err})")
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target_of(arch), options=options.__dict__)


def assert_fits(compiled, arch: int, what: str, tmp_path) -> None:
    """Within the architecture's shared memory per block, and no spills to local memory."""
    shared = compiled.metadata.shared
    assert shared <= MAX_SHARED[arch], f"{what}: {shared} bytes of shared memory > {MAX_SHARED[arch]} on sm_{arch}"
    spilled = spilled_bytes(compiled.asm["cubin"], tmp_path)
    assert spilled <= spill_bytes_allowed(compiled.metadata.name), (
        f"{what} ({compiled.metadata.name}) spills {spilled} bytes to local memory (tests/triton_compiler.py)")


def spilled_bytes(cubin: bytes, tmp_path) -> int:
    """LOCAL and STACK (spill) bytes of the cubin's kernel, from ``cuobjdump -res-usage``."""
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-res-usage", str(path)], capture_output=True,
                         text=True, check=True).stdout
    match = re.search(r"STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    assert match, out
    return int(match.group(1)) + int(match.group(2))


SHAPES = {  # (T, B, H, proj): the flagship; odd sizes with a projection; more tiles than one wave
    "H768_B16": (5, 16, 768, 0),
    "H100_P40_B3": (5, 3, 100, 40),
    "H1024_B256": (5, 256, 1024, 0),
}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("variant", ["step", "persistent"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_launched_kernels_compile(shape, variant, dtype, arch, tmp_path, monkeypatch):
    """Every kernel the launch helpers launch, forward and backward, each phase."""
    fw, bw = record(monkeypatch, arch, *shape[:3], dtype, proj=shape[3], variant=variant)
    for what, launches in (("forward", fw), ("backward", bw)):
        assert launches, f"{what}: no launch recorded"
        for launch in distinct(launches, arch):
            phases = {k: v for k, v in launch.kwargs.items() if k.startswith("RUN_") or k.endswith("_PHASE")}
            assert_fits(compile_launch(launch, arch), arch, f"{what} {variant} {phases}", tmp_path)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_step_cells_divide_correctly_rounded_only_at_float32_accuracy(dtype, tf32, cell, set_tf32, monkeypatch):
    """The cells' sigmoids in the per-step kernels: a correctly rounded division (div.rn.f32) in float32
    without TF32, tl.sigmoid's approximate one (div.full.f32) everywhere else (device_helpers._sigmoid, the
    CUDA kernels' policy: csrc/common/cell.cuh). The GRU's backward divides nowhere."""
    set_tf32(tf32)
    fw, bw = record(monkeypatch, 90, 5, 16, 64, dtype, variant="step", cell=cell)
    precise = dtype == torch.float32 and not tf32
    wanted = 0
    for launch in distinct(fw + bw, 90):
        ptx = compile_launch(launch, 90).asm["ptx"]
        rounded, approximate = ptx.count("div.rn.f32"), ptx.count("div.full.f32")
        assert (approximate if precise else rounded) == 0, (launch.kernel, rounded, approximate)
        wanted += rounded if precise else approximate
    assert wanted > 0, "no sigmoid's division in the cell"


def hmma_count(compiled, tmp_path) -> int:
    """HMMA instructions in the cubin's SASS (a static count: a loop body counts once)."""
    path = tmp_path / "kernel.cubin"
    path.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-sass", str(path)], capture_output=True,
                          text=True, check=True).stdout
    return len(re.findall(r"\bHMMA\.", sass))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gru_launches_compile_with_three_gates_of_mma(dtype, arch, tmp_path, monkeypatch):
    """The GRU's launches compile and fit, forward and backward, under "persistent" (one persistent
    launch per direction, GATES = 3) and "step"; and, a structural count, the GRU's per-step forward issues 3/4 of the LSTM's MMAs per
    k-step (three gates' products, none for a fourth)."""
    T, B, H = 3, SHAPES["H768_B16"][1], SHAPES["H768_B16"][2]
    launches = {}
    for variant in ("persistent", "step"):
        as_on_gpu(monkeypatch, arch)
        fw, bw = launch_capture.record_launches(monkeypatch)
        launch_capture.run_host_path(launch_capture.meta_case(T, B, H, dtype, cell="gru"), variant)
        launches[variant] = {"forward": list(fw.launches), "backward": list(bw.launches)}
        for what, recorded in launches[variant].items():
            assert recorded and all(launch.kwargs["GATES"] == 3 for launch in recorded), (variant, what)
            for launch in distinct(recorded, arch):
                assert_fits(compile_launch(launch, arch), arch, f"GRU {variant} {what}", tmp_path)
    for what, recorded in launches["persistent"].items():
        assert len(recorded) == 1 and "launch_cooperative_grid" in recorded[0].kwargs, f"one persistent {what}"
    assert len(launches["step"]["backward"]) == T + 1, "the per-step backward: T steps and dh0"
    lstm_fw = record(monkeypatch, arch, T, B, H, dtype, variant="step")[0]
    gru_mma = hmma_count(compile_launch(launches["step"]["forward"][0], arch), tmp_path)
    lstm_mma = hmma_count(compile_launch(lstm_fw[0], arch), tmp_path)
    assert gru_mma > 0 and 4 * gru_mma == 3 * lstm_mma, f"GRU forward {gru_mma} MMAs, LSTM {lstm_mma}"


@pytest.mark.parametrize("proj", [0, 20], ids=["no_proj", "proj20"])
def test_step_variant_compiles_each_phase_once(proj, monkeypatch):
    """The step variant launches each phase once per step with a new step index; those are not
    specialised (do_not_specialize), so each phase is one JIT compilation for all T steps, not
    three (t = 0 and the multiples of 16, t = 1, the rest)."""
    fw, bw = record(monkeypatch, 90, 40, 16, 64, torch.float16, proj=proj)
    phases = 2 if proj else 1
    assert len(fw) == 40 * phases and len(distinct(fw, 90)) == phases
    assert len(bw) == 41 + 40 * (phases - 1) and len(distinct(bw, 90)) == phases
    for launch in fw + bw:  # the step index is a plain i32 argument, not specialised
        signature, _, attrs, _ = launch_capture.jit_compile_inputs(launch, make_backend(target_of(90)))
        index = {name: i for i, name in enumerate(signature)}
        assert signature["t"] == "i32" and not attrs.get((index["t"],))


def test_jit_specialises_pointers_as_a_launch_does(monkeypatch):
    """The compile inputs carry the JIT's alignment attributes: 16-byte-aligned tensors are marked
    divisible by 16, a tensor that starts 4 bytes into its storage is not (the AOT compile of the
    streamed kernels would otherwise miss the cp.async pipeline the JIT builds)."""
    fw, _ = record(monkeypatch, 90, 3, 16, 64, torch.float32)
    launch = fw[0]
    backend = make_backend(target_of(90))
    signature, _, attrs, _ = launch_capture.jit_compile_inputs(launch, backend)
    xg = list(signature).index("xg_ptr")
    assert ["tt.divisibility", 16] in [list(a) for a in attrs.get((xg,), [])], attrs
    shifted = torch.empty(1 + launch.args[0].numel(), dtype=torch.float32, device="meta")[1:]
    args = (shifted.view_as(launch.args[0]),) + launch.args[1:]
    _, _, attrs, _ = launch_capture.jit_compile_inputs(launch_capture.Launch(launch.kernel, launch.grid, args,
                                                                             launch.kwargs), backend)
    assert not attrs.get((xg,)), attrs


def persistent_launch(launches):
    [launch] = [x for x in launches if "launch_cooperative_grid" in x.kwargs]
    return launch


@pytest.mark.parametrize("arch", [80, 90])
def test_flagship_shape_runs_the_persistent_kernels(arch, tmp_path, monkeypatch):
    """B = 16, H = 768 (cuDNN's persistent-kernel showcase), fp16: a persistent call launches the
    persistent kernels once each, the forward in 96 programs of 8 units and the backward in 48 of 16
    (both architectures have more SMs), and the forward, as launched, fits."""
    fw, bw = record(monkeypatch, arch, 3, 16, 768, torch.float16, variant="persistent")
    for what, launches, kernel, programs in (("forward", fw, persistent._lstm_pfw_kernel.kernel, 96),
                                             ("backward", bw, persistent._lstm_pbw_kernel.kernel, 48)):
        launch = persistent_launch(launches)
        assert len(launches) == 1 and launch.kernel is kernel and launch.grid == (programs,), (what, launch.grid)
        assert launch.kwargs["launch_cooperative_grid"] and launch.kwargs["USE_BARRIER"], what
    assert_fits(compile_launch(persistent_launch(fw), arch), arch, "forward, B = 16, H = 768", tmp_path)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("proj", [0, 40], ids=["no_proj", "proj40"])
def test_every_bound_runs_one_binary_with_the_time_bounded_spin(proj, arch, tmp_path, monkeypatch):
    """The persistent kernels bound their spin in time by default: the bound (seconds, passed in ns)
    is a runtime argument, so a launch with another bound (0: none) runs the same binary; it has the
    acquire poll, the GPU-clock read and the compare-and-swap that records a give-up."""
    monkeypatch.setattr(persistent.barrier_bound, "after_launch", lambda *args: None)  # the host's look at the record
    ptx = {}
    for seconds in ("0", "10", "0.5"):
        monkeypatch.setenv(kernels.BARRIER_TIMEOUT_ENV, seconds)
        fw, bw = record(monkeypatch, arch, 3, 16, 100, torch.float16, proj=proj, variant="persistent")
        for what, launch in (("forward", persistent_launch(fw)), ("backward", persistent_launch(bw))):
            assert launch.grid[0] > 1 and launch.kwargs["USE_BARRIER"], what
            assert "SPIN_LIMIT" not in launch.kwargs, what
            compiled = compile_launch(launch, arch)
            assert_fits(compiled, arch, f"{what} with a bound of {seconds} s", tmp_path)
            ptx[what, seconds] = compiled.asm["ptx"]
    for what in ("forward", "backward"):
        assert ptx[what, "0"] == ptx[what, "10"] == ptx[what, "0.5"], f"{what}: the bound changed the binary"
        for needle in (".acquire.", "%globaltimer", ".cas."):
            assert needle in ptx[what, "10"], f"{what}: no {needle} in the bounded spin"
