"""What machine and software a result came from: device, driver, versions, commit (for the benchmark
files and the check command's report)."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """Short commit hash, with '-dirty' when the tree has changes; 'unknown' outside git."""
    env = os.environ.get("LSTM_KERNELS_COMMIT")
    if env:
        return env
    sha = _run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT)
    if not sha:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return sha + ("-dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {cpu_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """A file-system-friendly form of a device name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "device"


def driver_version(device: str) -> str:
    if device != "cuda":
        return "n/a"
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001  (any import failure means "not installed")
        return "not installed"


def collect(device: str) -> dict[str, str]:
    """The header of every result file, as ordered key -> value."""
    import lstm_kernels

    info = {
        "device": device_name(device),
        "driver": driver_version(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "n/a",
        "cudnn": str(torch.backends.cudnn.version()) if device == "cuda" else "n/a",
        "commit": git_commit(),
        "python": platform.python_version(),
        "lstm_kernels": getattr(lstm_kernels, "__version__", "?"),
        "backends": ",".join(lstm_kernels.available_backends()),
        "tf32": "on" if torch.backends.cuda.matmul.allow_tf32 else "off",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        info["capability"] = f"sm_{major}{minor}"
    return info


def header_lines(info: dict[str, str]) -> list[str]:
    """Two human lines: the machine, then the software."""
    first = f"device: {info['device']} | driver: {info['driver']}" + (
        f" | {info['capability']}" if "capability" in info else ""
    )
    second = (
        f"torch {info['torch']} | triton {info['triton']} | CUDA {info['cuda']} | cuDNN {info['cudnn']}"
        f" | commit {info['commit']} | tf32 {info['tf32']} | {info['date']}"
    )
    return [first, second]
