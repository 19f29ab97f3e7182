"""``python -m lstm_kernels check``: runs what this machine can run, writes its report, and fails
when a backend fails its verification."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fake_backends
from lstm_kernels import check, verification

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")))


def test_check_on_this_machine_passes_and_writes_its_report(tmp_path):
    """As a user runs it, in a process of its own (on a CPU it turns the Triton interpreter on itself)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "lstm_kernels", "check", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (tmp_path / "check.md").read_text()
    assert report.startswith("# lstm_kernels check") and "device:" in report and "torch " in report
    assert "**passed: all" in report
    rows = _rows(tmp_path / "check.csv")
    verified = {(r["backend"], r["variant"], r["dtype"]) for r in rows if r["kind"] == "verify"}
    assert {("reference", "-", d) for d in ("fp32", "bf16", "fp16")} <= verified
    assert not any(d == "tf32" for _, _, d in verified), "TF32 is a GPU's: a CPU verifies fp32 only"
    assert ("native", "-", "fp32") in verified
    if "triton" in proc.stdout.split("available:")[1].split(";")[0]:
        assert {("triton", v, "fp16") for v in ("step", "persistent")} <= verified
    gru = {(r["backend"], r["dtype"]) for r in rows if r["kind"] == "verify" and r["shape"].startswith("GRU")
           and not r["detail"].startswith("not served")}
    assert {("reference", d) for d in ("fp32", "bf16", "fp16")} <= gru, "the GRU's calls are verified too"
    timed = {r["backend"]: r for r in rows if r["kind"] == "time"}
    assert float(timed["native"]["fwd_us_per_step"]) > 0 and float(timed["native"]["nn_lstm_fwd_us_per_step"]) > 0
    assert all(r["ok"] == "True" for r in rows)


def test_check_fails_when_a_backend_fails_verification(tmp_path, monkeypatch):
    monkeypatch.setenv(verification.CACHE_DIR_ENV, str(tmp_path / "cache"))
    fake_backends.install()
    try:
        status = check.run_check(tmp_path, backends=["reference", "wrong"], quick=True, timing=False)
    finally:
        fake_backends.uninstall()
    assert status == 1
    report = (tmp_path / "check.md").read_text()
    assert "**FAILED:" in report and "| wrong | - | fp32 |" in report and "FAIL: h_all" in report


@pytest.mark.parametrize("was", [False, True])
def test_tf32_rows_run_with_torchs_tf32_flag_and_fp32_rows_without(was):
    """The "tf32" rows are float32 with torch.backends.cuda.matmul.allow_tf32 on, the "fp32" rows with it off
    (whatever it was), the 16-bit rows as it was; it is restored afterwards."""
    import torch

    flag = torch.backends.cuda.matmul
    saved = flag.allow_tf32
    try:
        flag.allow_tf32 = was
        seen = {}
        for name in check.DTYPES:
            with check.matmul_precision(name):
                seen[name] = flag.allow_tf32
            assert flag.allow_tf32 is was
        assert seen == {"fp32": False, "tf32": True, "bf16": was, "fp16": was}
        assert check.DTYPES["tf32"] is check.DTYPES["fp32"] is torch.float32
    finally:
        flag.allow_tf32 = saved


def test_usage_without_a_command():
    proc = subprocess.run([sys.executable, "-m", "lstm_kernels"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2 and "check" in proc.stdout


def test_console_script_is_installed_with_the_package():
    script = Path(sys.executable).with_name("lstm-kernels")
    if not script.exists():
        pytest.skip("the package is not installed in this interpreter's environment (console scripts)")
    proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "check" in proc.stdout
