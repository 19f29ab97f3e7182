"""Which activations each CUDA per-step kernel runs, read from its SASS (sm_80, sm_90), without a GPU.

csrc/common/cell.cuh gives the cell two policies: FastActivations (sigmoid and tanh from ex2.approx and
rcp.approx) for kernels whose operands are 16-bit or tf32, and PreciseActivations (expf, division,
tanhf) for float32 accuracy, whose tolerance the fast ones would not keep with a margin
(tests/test_cell_error_budget.py). The per-step kernels (csrc/step/) choose by their template
parameters: float storage without tensor cores (MMA false) is float32 accuracy. Here every instance
is checked for its policy by the fast formula's mark, an FMUL of the argument by -log2 e or -2 log2 e
(one per activation; the precise functions have none): a kernel at float32 accuracy that ran the fast
activations would break the package's float32 tolerance silently. The fused kernels' instances are
checked in tests/test_cuda_step_budget.py.
"""
from __future__ import annotations

import re
import shutil

import pytest

from cuda_tools import ACTIVATIONS_PER_CELL, CSRC, CUOBJDUMP, NVCC, compile_cubins, is_fast_activation_argument

pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump")

ARCHS = ("sm_80", "sm_90")
SOURCES = ("step/step_forward.cu", "step/step_backward.cu")
_INSTANCE = re.compile(r"(forward|backward)_step_kernelI(6__half|13__nv_bfloat16|f)Li(\d)ELb(\d)ELb(\d)E")


def instances(listings) -> list:
    """[(direction, storage, gates, mma, fast arguments)] of every step kernel instance in the listings."""
    found = []
    for _, sass in listings:
        for block in sass.split("Function : ")[1:]:
            name = block.split("\n", 1)[0].strip()
            m = _INSTANCE.search(name)
            assert m, name
            direction, storage, gates, mma, _ = m.groups()
            fast = sum(is_fast_activation_argument(line) for line in block.splitlines())
            found.append((direction, {"6__half": "fp16", "13__nv_bfloat16": "bf16", "f": "float"}[storage],
                          int(gates), mma == "1", fast))
    return found


def policy_problems(found: list) -> list:
    """Instances whose activations are not their policy's: float without MMA precise, all others fast."""
    problems = []
    for direction, storage, gates, mma, fast in found:
        precise = storage == "float" and not mma
        want = 0 if precise else ACTIVATIONS_PER_CELL[direction, gates]
        if fast != want:
            problems.append(f"{direction} {storage} gates={gates} mma={mma}: {fast} fast activations, want {want}")
    return problems


@pytest.fixture(scope="module")
def step_listings(tmp_path_factory):
    listings, _ = compile_cubins(SOURCES, ARCHS, tmp_path_factory.mktemp("step_cubins"))
    return listings


def test_every_step_kernel_runs_its_policys_activations(step_listings):
    found = instances(step_listings)
    # every (direction, storage, cell, mma) of both architectures, with and without resets
    assert len(found) == 2 * 3 * 2 * 2 * 2 * len(ARCHS), len(found)
    print("\n" + "\n".join(f"{d} {s} gates={g} mma={m}: {f}" for d, s, g, m, f in sorted(set(found))))
    assert not policy_problems(found), policy_problems(found)


def test_the_check_sees_float32_accuracy_on_the_fast_activations(tmp_path):
    """A forward whose policy condition is turned around (float with MMA precise, without fast) fails."""
    csrc = tmp_path / "csrc"
    shutil.copytree(CSRC, csrc)
    path = csrc / "step" / "step_forward.cu"
    text = path.read_text()
    site = "using Act = ActivationsFor<std::is_same<T, float>::value && !MMA>;"
    assert text.count(site) == 1, "the mutated site is gone"
    path.write_text(text.replace(site, "using Act = ActivationsFor<std::is_same<T, float>::value && MMA>;"))
    listings, _ = compile_cubins(["step/step_forward.cu"], ("sm_90",), tmp_path, csrc=csrc)
    problems = policy_problems(instances(listings))
    print(f"\n{problems}")
    assert any("float" in p and "mma=False" in p for p in problems), problems
