"""The wheel a user installs: license, type marker, declared versions, and no stale extension."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_without_cuda_carries_license_types_and_the_tested_torch_range(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "lstm_kernels", source / "lstm_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json"))
    env = {**os.environ, "LSTM_KERNELS_SKIP_CUDA": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("lstm_kernels-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "lstm_kernels/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    assert "lstm_kernels/_build_info.json" in names
    assert not any(Path(n).name.startswith("_C.") for n in names), names
    assert "BSD-3-Clause" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires and "<2.16" in requires[0] and ">=2.11" in requires[0], requires
