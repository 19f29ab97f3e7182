"""scripts/gpu_checks.sh sanitize, run on the CPU with stubs: a stub ``compute-sanitizer`` first
on PATH and a stub python (PYTHON=...), so that the script's own logic is what is tested:

- a sanitizer that reports errors (exit 1) makes the stage fail, even when only one tool does,
  and every tool still runs;
- a clean run passes;
- the sanitized process gets PYTORCH_NO_CUDA_MEMORY_CACHING=1 and runs tests/sanitize_cuda.py
  on both backends; the four tools are memcheck, racecheck, synccheck and initcheck;
- tests/sanitize_cuda.py's CUDA configurations cover every fused variant and each sets all of
  their variables.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_checks.sh"
TOOLS = ["memcheck", "racecheck", "synccheck", "initcheck"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# compute-sanitizer stub: records its tool, runs the program after its options, and exits 1
# (errors found) for the tools listed in STUB_FAIL_TOOLS, else with the program's status.
SANITIZER = """#!/usr/bin/env bash
tool=""
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do
  [ "$1" = "--tool" ] && tool="$2"
  shift 2
done
echo "$tool" >> "$STUB_LOG/sanitizer_tools"
"$@"
rc=$?
for t in $STUB_FAIL_TOOLS; do
  if [ "$t" = "$tool" ]; then echo "========= ERROR SUMMARY: 1 error"; exit 1; fi
done
exit $rc
"""

# python stub: the script's probes (-c ...) succeed silently; a run of tests/sanitize_cuda.py
# records its arguments and the allocator switch it sees.
PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then exit 0; fi
echo "args: $*" >> "$STUB_LOG/python_runs"
echo "PYTORCH_NO_CUDA_MEMORY_CACHING=${PYTORCH_NO_CUDA_MEMORY_CACHING:-unset}" >> "$STUB_LOG/python_runs"
exit "${STUB_PY_RC:-0}"
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def run_sanitize(tmp_path: Path, fail_tools: str = "", py_rc: int = 0, tools: tuple = (), stage: str = "sanitize"):
    bin_dir, log_dir, out_dir = tmp_path / "bin", tmp_path / "log", tmp_path / "out"
    for d in (bin_dir, log_dir, out_dir):
        d.mkdir(exist_ok=True)
    _write_exe(bin_dir / "compute-sanitizer", SANITIZER)
    _write_exe(bin_dir / "python-stub", PYTHON)
    env = dict(os.environ)
    env.pop("PYTORCH_NO_CUDA_MEMORY_CACHING", None)
    env.pop("SANITIZE_BACKENDS", None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=str(bin_dir / "python-stub"),
        OUT=str(out_dir),
        STUB_LOG=str(log_dir),
        STUB_FAIL_TOOLS=fail_tools,
        STUB_PY_RC=str(py_rc),
    )
    proc = subprocess.run(["bash", str(SCRIPT), stage, *tools], env=env, capture_output=True, text=True,
                          timeout=120)
    ran = (log_dir / "sanitizer_tools").read_text().split() if (log_dir / "sanitizer_tools").exists() else []
    runs = (log_dir / "python_runs").read_text() if (log_dir / "python_runs").exists() else ""
    return proc, ran, runs, out_dir


def test_clean_run_passes_and_runs_four_tools_without_the_caching_allocator(tmp_path):
    proc, ran, runs, out = run_sanitize(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ran == TOOLS
    assert runs.count("tests/sanitize_cuda.py --backend cuda --backend triton") == 4, runs
    assert runs.count("PYTORCH_NO_CUDA_MEMORY_CACHING=1") == 4, runs
    for tool in TOOLS:
        assert "exit: 0" in (out / f"sanitize_{tool}.log").read_text()


@pytest.mark.parametrize("fail_tools", ["memcheck", "initcheck", "racecheck synccheck"])
def test_a_tool_reporting_errors_fails_the_stage_after_running_every_tool(tmp_path, fail_tools):
    proc, ran, runs, out = run_sanitize(tmp_path, fail_tools=fail_tools)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert ran == TOOLS, "every tool runs even after one failed"
    for tool in fail_tools.split():
        assert "exit: 1" in (out / f"sanitize_{tool}.log").read_text()
        assert tool in proc.stderr
    for tool in set(TOOLS) - set(fail_tools.split()):
        assert "exit: 0" in (out / f"sanitize_{tool}.log").read_text()


def test_a_failing_driver_script_fails_the_stage(tmp_path):
    """tests/sanitize_cuda.py failing (non-finite result, unavailable backend) fails the stage too."""
    proc, ran, _, _ = run_sanitize(tmp_path, py_rc=1)
    assert proc.returncode != 0
    assert ran == TOOLS


def test_named_tools_only(tmp_path):
    proc, ran, _, _ = run_sanitize(tmp_path, fail_tools="memcheck", tools=("racecheck",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ran == ["racecheck"]


@pytest.mark.parametrize("py_rc", [0, 1])
def test_test_stage_fails_when_the_tests_fail(tmp_path, py_rc):
    """The test stage (build, gpu tests, Triton tests) exits with failure when pytest fails."""
    proc, _, runs, _ = run_sanitize(tmp_path, py_rc=py_rc, stage="test")
    assert "-m pytest -q -m gpu tests" in runs and "-m pytest -q tests/triton" in runs, runs
    assert (proc.returncode != 0) == bool(py_rc), proc.stdout + proc.stderr


@pytest.mark.parametrize("py_rc", [0, 1])
def test_check_stage_runs_the_check_command_and_keeps_its_status(tmp_path, py_rc):
    proc, _, runs, out = run_sanitize(tmp_path, py_rc=py_rc, stage="check")
    assert f"-m lstm_kernels check --out {out}/check" in runs, runs
    assert (proc.returncode != 0) == bool(py_rc), proc.stdout + proc.stderr
    assert f"exit: {py_rc}" in (out / "check.log").read_text()


# ncu stub: records its arguments, exits 1 for the implementation named in STUB_FAIL_IMPL, else 0.
NCU = """#!/usr/bin/env bash
echo "ncu $*" >> "$STUB_LOG/ncu_runs"
case "$*" in *"--nvtx-include $STUB_FAIL_IMPL/"*) [ -n "$STUB_FAIL_IMPL" ] && exit 1 ;; esac
exit 0
"""
# python stub for the profile stage: the implementations' list comes from the real driver.
PROFILE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then exit 0; fi
case "$*" in *--list*) exec "$REAL_PYTHON" "$@" ;; esac
echo "args: $*" >> "$STUB_LOG/python_runs"
"""


@pytest.mark.parametrize("fail_impl", ["", "cuda-fused-registers"])
def test_profile_stage_runs_ncu_once_per_implementation_on_its_nvtx_range(tmp_path, fail_impl):
    """scripts/gpu_checks.sh profile: one ncu run per implementation of benchmarks/profile_flagship.py, each
    limited to that implementation's NVTX range and running the driver for it alone, its CSV in
    $OUT/profile; an ncu failure fails the stage after every implementation ran."""
    import sys

    from benchmarks.profile_flagship import RUNS

    bin_dir, log_dir, out_dir = tmp_path / "bin", tmp_path / "log", tmp_path / "out"
    for d in (bin_dir, log_dir, out_dir):
        d.mkdir()
    _write_exe(bin_dir / "ncu", NCU)
    _write_exe(bin_dir / "python-stub", PROFILE_PYTHON)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHON=str(bin_dir / "python-stub"), REAL_PYTHON=sys.executable, OUT=str(out_dir), STUB_LOG=str(log_dir), STUB_FAIL_IMPL=fail_impl,
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(SCRIPT), "profile", "--T", "8"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    ncu_runs = (log_dir / "ncu_runs").read_text().splitlines()
    assert len(ncu_runs) == len(RUNS), ncu_runs
    for impl, run in zip(RUNS, ncu_runs):
        assert f"--nvtx-include {impl}/" in run and f"-m benchmarks.profile_flagship --impl {impl} --T 8" in run, run
        assert (out_dir / "profile" / f"{impl}.csv").exists()
    assert (proc.returncode != 0) == bool(fail_impl), proc.stdout + proc.stderr
    if fail_impl:
        assert fail_impl in proc.stderr


def test_sanitized_cuda_configurations_cover_every_fused_variant_and_set_all_its_variables():
    """tests/sanitize_cuda.py runs every fused variant that check times (W in registers and the tagged
    exchange in 16 bits only), and each CUDA configuration sets every variable a fused variant reads,
    so no configuration runs under the one before it (os.environ is updated, not replaced)."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import sanitize_cuda
    finally:
        sys.path.pop(0)
    from lstm_kernels.backends.cuda.variants import FUSED_CANDIDATES

    configs = {label: env for label, env, _ in sanitize_cuda.configurations("cuda")}
    keys = set().union(*FUSED_CANDIDATES.values())
    for label, env in configs.items():
        assert keys <= set(env), f"{label} leaves {sorted(keys - set(env))} to the previous configuration"
    for name, env in FUSED_CANDIDATES.items():
        label = "cuda/fused/fp32" if name == "fused" else f"cuda/{name}"
        assert {k: configs[label][k] for k in env} == env, label
        if name != "fused":
            assert torch.float32 not in sanitize_cuda._dtypes(label)
    assert configs["cuda/persistent"][sanitize_cuda.CUDA_VARIANT_ENV] == "persistent"
