"""Whether this installation was built with the CUDA extension, and why not.

The build (setup.py) writes ``_build_info.json`` next to where ``lstm_kernels._C`` goes. ``python -m
lstm_kernels.build_info`` prints one line about it; ``make install`` runs it, so the answer is on
screen after every install (pip hides a build's own output unless run with ``-v``).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional

_INFO_FILE = Path(__file__).resolve().parent / "_build_info.json"


def build_info() -> Optional[dict]:
    """What the build recorded: ``{"cuda_extension": bool, ...}``, or None (built by other means)."""
    try:
        return json.loads(_INFO_FILE.read_text())
    except (OSError, ValueError):
        return None


def cuda_build_summary() -> str:
    """One line: was the CUDA extension built, loadable, and if not, why."""
    try:
        importlib.import_module(f"{__package__}._C")
    except ImportError as error:
        loaded, why_not_loaded = False, str(error)
    else:
        loaded, why_not_loaded = True, ""
    info = build_info() or {}
    if loaded:
        where = f" for CUDA architectures {info['architectures']}" if "architectures" in info else ""
        return f"lstm_kernels: the CUDA backend is built{where} (it runs where a CUDA GPU is present)"
    if info.get("cuda_extension") is False:
        return f"lstm_kernels: built without the CUDA backend: {info.get('reason', 'no reason recorded')}"
    return f"lstm_kernels: the CUDA extension lstm_kernels._C does not load: {why_not_loaded}"


if __name__ == "__main__":
    print(cuda_build_summary())
