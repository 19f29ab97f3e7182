"""Tests of the triton backend: on the CPU under TRITON_INTERPRET=1, on a GPU when there is one.

Run them as ``TRITON_INTERPRET=1 pytest -q tests/triton`` on a machine without a GPU
(the variable must be set before triton is imported, so it is not set here: setting it
would also make ``backend="auto"`` pick the interpreted kernels in every other test).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

# tests/utils.py (REL_TOL, assert_rel_close) and tests/test_module_parity.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    try:
        import triton  # noqa: F401
    except ImportError:
        reason = "triton is not installed"
    else:
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        reason = None if (interpreting or torch.cuda.is_available()) else (
            "needs a CUDA GPU or TRITON_INTERPRET=1 (e.g. `TRITON_INTERPRET=1 pytest tests/triton`)"
        )
    if reason is None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
