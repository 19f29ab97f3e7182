"""Where the CUDA toolkit's command-line tools are, for the tests that compile kernels and read SASS."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def find_tool(name: str) -> Optional[str]:
    """``name`` (nvcc, cuobjdump, ...) on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin, or the copy
    Triton ships; None where none is found."""
    found = shutil.which(name)
    if found:
        return found
    for base in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        path = os.path.join(base, "bin", name)
        if os.path.exists(path):
            return path
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


NVCC, CUOBJDUMP = find_tool("nvcc"), find_tool("cuobjdump")


def compile_cubins(sources, archs, out_dir: Path, csrc: Path = CSRC) -> tuple[list, str]:
    """Compile each of ``sources`` (paths below ``csrc``, by default the package's csrc/; a test's
    mutant copy otherwise) for each of ``archs`` ("sm_80", ...) to a cubin in ``out_dir`` (-O3, C++17,
    ``csrc`` on the include path, as the extension's build); returns ([(arch, cuobjdump -sass text)],
    the -res-usage text of them all)."""
    listings, usage = [], ""
    for src in sources:
        for arch in archs:
            cubin = out_dir / f"{Path(src).name}.{arch}.cubin"
            subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", f"-I{csrc}", str(csrc / src),
                            "-o", str(cubin)], check=True)
            listings.append((arch, subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True,
                                                  check=True).stdout))
            usage += subprocess.run([CUOBJDUMP, "-res-usage", str(cubin)], capture_output=True, text=True,
                                    check=True).stdout
    return listings, usage


# ---- the tagged exchange in SASS (csrc/fused/fused_common.cuh, "the tagged exchange") --------------


def is_tagged_load(t: str) -> bool:
    """The tagged exchange's operand load, ld.relaxed.gpu.v2.u64 (two tagged words of h_{t-1}):
    LDG.E.128.STRONG.GPU."""
    return re.search(r"\bLDG\.", t) is not None and ".128" in t and "STRONG.GPU" in t


def is_wide_operand_load(t: str) -> bool:
    """The wide and the narrow backward's operand load (fused_common.cuh's load_cg_16, ld.global.cg.v4.u32: 16
    bytes of dG_{t+1} straight into MMA fragment registers), which SASS writes as the tagged exchange's is
    written: LDG.E.128.STRONG.GPU. The two are told apart by kernel: the forward's 128-bit strong loads are the
    tagged exchange's, the backward's are the wide and narrow backward's operand loads (is_loaded_backward)."""
    return is_tagged_load(t)


def backward_tile(name: str):
    """The tile ("ring", "wide", "narrow": the names of the Python mirror's BWD_TILES, whose codes are
    fused_plan.cuh's) of the kernel ``name`` (mangled) if it is an instance of fused_backward_kernel<Op, PROJ,
    RESETS, GATES, TILE> (its flags end ``...Li<GATES>ELi<TILE>E``), else None."""
    from lstm_kernels.backends.cuda.fused import BWD_TILES

    m = re.search(r"Lb[01]ELb[01]ELi\dELi(\d)E", name) if "fused_backward_kernel" in name else None
    return {code: tile for tile, code in BWD_TILES.items()}[int(m.group(1))] if m else None


def is_loaded_backward(name: str) -> bool:
    """Whether the kernel ``name`` is an instance of the wide or the narrow backward (dG loaded straight into MMA
    fragments by 16-byte loads)."""
    return backward_tile(name) in ("wide", "narrow")


def is_tagged_vote(t: str) -> bool:
    """The tagged wait's vote: __any_sync over the words still pending, VOTE.ANY into a predicate (a
    ballot, VOTE.ANY into a register, is something else)."""
    return re.search(r"\bVOTE\.ANY\s+!?P\d", t) is not None


# ---- the cell's activations in SASS (csrc/common/cell.cuh) ----------------------------------------

#: The argument of a fast activation: x times -log2(e) (sigmoid) or -2 log2(e) (tanh), an FMUL by an
#: immediate, which MUFU.EX2 then takes. The precise activations (expf's FFMA range reduction, tanhf's
#: polynomial) have none.
_FAST_ARGUMENT = re.compile(r"\bFMUL\S*\s+R\d+,\s*R\d+,\s*-(1\.44269502|2\.88539004)")


#: The activations of one cell per step, (direction, gates) -> how many: the LSTM's forward i, f, g, o and
#: tanh(c_t), its backward tanh(c_t) (the gates' activations are saved); the GRU's forward r, z, n, its
#: backward none. Each is one MUFU.EX2 and one MUFU.RCP with the fast activations.
ACTIVATIONS_PER_CELL = {("forward", 4): 5, ("backward", 4): 1, ("forward", 3): 3, ("backward", 3): 0}


def is_fast_activation_argument(t: str) -> bool:
    """A FastActivations argument: FMUL by -log2(e) or -2 log2(e) (one per sigmoid or tanh)."""
    return _FAST_ARGUMENT.search(t) is not None
