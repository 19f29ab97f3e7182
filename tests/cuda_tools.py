"""Where the CUDA toolkit's command-line tools are, for the tests that compile kernels and read SASS."""
from __future__ import annotations

import os
import shutil
from typing import Optional


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
