"""The Triton kernels compiled for real GPUs (sm_80, sm_90) on a machine without one.

The interpreter runs the kernels' Python, not Triton's compiler: code that the
interpreter accepts can still fail to compile (a type the MLIR lowering refuses, a
layout, a loop-carried value). Here every specialization the launch helpers use is
compiled ahead of time to a cubin with the ptxas that ships in the triton wheel, and
the resident-W_hh kernels at the largest slice ``resident_weights`` admits are checked
to fit the architecture's shared memory per block and not to spill to local memory (the
cubin's resource usage, from the wheel's cuobjdump).

Runs without TRITON_INTERPRET (under it ``@triton.jit`` gives interpreted functions).
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") == "1", reason="compiles the kernels; not under TRITON_INTERPRET=1"
)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lstm_kernels.backends import known_backends  # noqa: E402

known_backends()
from lstm_kernels.backends import triton_kernels as kernels  # noqa: E402
from lstm_kernels.backends.triton_backward import _lstm_bw_kernel  # noqa: E402
from lstm_kernels.backends.triton_forward import _lstm_fw_kernel  # noqa: E402

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
SCALARS = {"t_begin", "n_steps", "B"}
#: Shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, RTX 30xx,
#: L4 / RTX 40xx, H100.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = list(MAX_SHARED)


def budget_of(arch: int) -> int:
    """``resident_budget`` of a GPU of this architecture (the rule of triton_kernels)."""
    return min(kernels.RESIDENT_BYTES, MAX_SHARED[arch] - kernels.RESIDENT_MARGIN)


def compile_cubin(fn, pointer_types: dict, constants: dict, num_warps: int, arch: int):
    """Compile ``fn`` for ``sm_<arch>``; pointers not named in ``pointer_types`` are fp32."""
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in SCALARS:
            signature[name] = "i32"
        else:
            signature[name] = pointer_types.get(name, "*fp32")
    source = ASTSource(fn, signature, constexprs=constants)
    # launched as the persistent variant is: cooperatively (every specialization here has USE_BARRIER)
    options = dict(num_warps=num_warps, launch_cooperative_grid=True)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def assert_fits(compiled, arch: int, what: str, tmp_path) -> None:
    """Within the architecture's shared memory per block, and no spills to local memory."""
    shared = compiled.metadata.shared
    assert shared <= MAX_SHARED[arch], f"{what}: {shared} bytes of shared memory > {MAX_SHARED[arch]} on sm_{arch}"
    assert local_memory_bytes(compiled.asm["cubin"], tmp_path) == 0, f"{what} spills to local memory"


def local_memory_bytes(cubin: bytes, tmp_path) -> int:
    """LOCAL (spill) bytes of the cubin's kernel, from ``cuobjdump -res-usage``."""
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-res-usage", str(path)], capture_output=True,
                         text=True, check=True).stdout
    match = re.search(r"LOCAL:(\d+)", out)
    assert match, out
    return int(match.group(1))


def forward_constants(H, P, B, dtype, has_proj, resident, cfg=None):
    cfg = cfg or kernels.launch_config(max(H, P), B, dtype)
    k1, k2 = kernels.split_k(P)
    fw_prec, other_prec = kernels.dot_precisions(dtype)
    return dict(H=H, P=P, HAS_PROJ=has_proj, RUN_CELL=True, RUN_PROJ=True, STORE_WS=True, USE_BARRIER=True,
                W_RESIDENT=resident, BLOCK_B=cfg["BLOCK_B"], BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K"],
                K1=k1, K2=k2, DOT_PRECISION=fw_prec, DOT_DTYPE=kernels.forward_dot_dtype(dtype),
                PROJ_PRECISION=other_prec), (kernels.RESIDENT_WARPS if resident else cfg["num_warps"])


def backward_constants(H, P, B, dtype, has_proj, resident, cfg=None):
    cfg = cfg or kernels.launch_config(max(H, P), B, dtype)
    k1, k2 = kernels.split_k(4 * H)
    return dict(H=H, P=P, HAS_PROJ=has_proj, RUN_DH=True, RUN_CELL=True, USE_BARRIER=True, W_RESIDENT=resident,
                BLOCK_B=cfg["BLOCK_B"], BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K"], K1=k1, K2=k2,
                DOT_PRECISION=kernels.dot_precisions(dtype)[1]), (
        kernels.RESIDENT_WARPS if resident else cfg["num_warps"])


def pointer_types(dtype, names):
    return {name: PTR[dtype] for name in names} | {"bs_ptr": "*i32", "bar_ptr": "*i32"}


FW_TYPED = ("xg_ptr", "w_ptr", "w_hr_ptr", "h_buf_ptr", "h_all_ptr")
BW_TYPED = ("w_ptr", "w_hr_ptr", "dh_all_ptr", "dh_last_ptr", "c0_ptr", "dg_ptr")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(768, 768, 16, False), (100, 40, 3, True), (1024, 1024, 256, False)],
                         ids=["H768_B16", "H100_P40_B3", "H1024_B256"])
def test_streamed_kernels_compile(shape, dtype, arch, tmp_path):
    H, P, B, has_proj = shape
    consts, warps = forward_constants(H, P, B, dtype, has_proj, resident=False)
    assert_fits(compile_cubin(_lstm_fw_kernel, pointer_types(dtype, FW_TYPED), consts, warps, arch), arch,
                "forward", tmp_path)
    consts, warps = backward_constants(H, P, B, dtype, has_proj, resident=False)
    assert_fits(compile_cubin(_lstm_bw_kernel, pointer_types(dtype, BW_TYPED), consts, warps, arch), arch,
                "backward", tmp_path)


def largest_admitted(on_chip_bytes, budget: int) -> int:
    """The largest power of two n >= 16 for which ``on_chip_bytes(n)`` is within ``budget``."""
    n = 16
    while kernels.resident_weights("persistent", 1, 1, on_chip_bytes(2 * n), budget):
        n *= 2
    assert kernels.resident_weights("persistent", 1, 1, on_chip_bytes(n), budget)
    return n


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("B", [1, 64])
def test_resident_kernels_at_the_budget_fit_on_chip(B, dtype, arch, tmp_path):
    cfg = kernels.launch_config(1024, B, dtype)
    P = largest_admitted(lambda p: kernels.forward_resident_bytes(p, cfg, dtype), budget_of(arch))
    consts, warps = forward_constants(P, P, B, dtype, False, resident=True)
    compiled = compile_cubin(_lstm_fw_kernel, pointer_types(dtype, FW_TYPED), consts, warps, arch)
    assert_fits(compiled, arch, f"forward with a resident P = {P} slice", tmp_path)

    H = largest_admitted(lambda h: kernels.backward_resident_bytes(h, cfg), budget_of(arch))
    consts, warps = backward_constants(H, H, B, dtype, False, resident=True)
    compiled = compile_cubin(_lstm_bw_kernel, pointer_types(dtype, BW_TYPED), consts, warps, arch)
    assert_fits(compiled, arch, f"backward with a resident 4H = {4 * H} slice", tmp_path)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_flagship_shape_keeps_w_hh_resident(dtype, arch, tmp_path):
    """B = 16, H = 768 (cuDNN's persistent-kernel showcase): the persistent forward on a 132-SM
    GPU narrows its tiles to 16 units so that each of its 48 programs keeps its W_hh slice on
    chip (512 + 256 rows, unpadded), and that kernel fits."""
    H, B = 768, 16
    cfg = kernels.launch_config(H, B, dtype)
    narrow = kernels.persistent_config(cfg, H, B, lambda c: kernels.forward_resident_bytes(H, c, dtype),
                                       budget_of(arch), 132)
    assert narrow["BLOCK_H"] == 16 and kernels.num_tiles(H, B, narrow) == 48
    assert kernels.split_k(H) == (512, 256)
    consts, warps = forward_constants(H, H, B, dtype, False, resident=True, cfg=narrow)
    compiled = compile_cubin(_lstm_fw_kernel, pointer_types(dtype, FW_TYPED), consts, warps, arch)
    assert_fits(compiled, arch, "forward, B = 16, H = 768, resident", tmp_path)
