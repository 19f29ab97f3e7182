"""The CUDA extension ``lstm_kernels._C`` as the backend sees it: the import, whether its own CUDA
runtime can run kernels here, and the argument helpers every launch uses (dtype codes, device
pointers as Python ints, the resets mask).

The extension links its CUDA runtime statically: besides torch seeing a GPU, the backend asks that
runtime (``_C.runtime_status``, once per process per binding); a driver older than the nvcc that
built it (``cudaErrorInsufficientDriver``) makes the backend unavailable with that reason.

Every other module of the backend reads the extension as ``extension._C`` at call time, so a test
swaps it in one place.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ...build_info import build_info

try:
    from ... import _C
except ImportError:  # built without nvcc (or LSTM_KERNELS_SKIP_CUDA=1)
    _C = None

NOT_BUILT = "the CUDA extension lstm_kernels._C is not built (install with nvcc on PATH or CUDA_HOME set)"
NO_GPU = "no CUDA GPU"


@functools.lru_cache(maxsize=None)
def _runtime_status_of(ext) -> tuple:
    return tuple(ext.runtime_status())


def runtime_status() -> tuple:
    """(error code, message or None, device count, runtime version, driver version) of the extension's
    own CUDA runtime, asked once per process (see ``_C.runtime_status``)."""
    return _runtime_status_of(_C)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def runtime_unavailable_reason() -> Optional[str]:
    """Why the extension's CUDA runtime cannot run kernels here (cached), or None."""
    code, message, count, runtime, driver = runtime_status()
    versions = f"extension built with CUDA {_cuda_version(runtime)}, driver supports CUDA {_cuda_version(driver)}"
    if code != 0:
        return f"the extension's CUDA runtime cannot use the GPU: {message} ({versions})"
    if count < 1:
        return f"the extension's CUDA runtime sees no device ({versions})"
    return None


def unavailable_reason() -> Optional[str]:
    """Why the backend cannot run here: the extension is not built (with the build's own reason), torch
    sees no GPU, or the extension's runtime cannot use it; None where it can."""
    if _C is None:
        recorded = (build_info() or {}).get("reason")
        return f"{NOT_BUILT}; the build says: {recorded}" if recorded else NOT_BUILT
    if not torch.cuda.is_available():
        return NO_GPU
    return runtime_unavailable_reason()


def dtype_codes() -> dict:
    """torch dtype -> the per-step kernels' dtype code (csrc/step/static_switch.h); {} without the extension."""
    if _C is None:
        return {}
    return {torch.float32: _C.DTYPE_FLOAT32, torch.float16: _C.DTYPE_FLOAT16, torch.bfloat16: _C.DTYPE_BFLOAT16}


def ptr(t: Optional[torch.Tensor]) -> int:
    """A tensor's device pointer as the extension takes it (0 for None: a null pointer)."""
    return 0 if t is None else t.data_ptr()


def resets_mask(resets: Optional[torch.Tensor], T: int, B: int, device: torch.device) -> Optional[torch.Tensor]:
    """``resets`` [T, B] bool on ``device`` as the kernels read it: contiguous uint8 (the same bytes), or None."""
    if resets is None:
        return None
    if resets.dtype != torch.bool:
        raise TypeError(f"cuda backend: resets must be a bool tensor, got {resets.dtype}")
    if tuple(resets.shape) != (T, B):
        raise ValueError(f"cuda backend: resets has shape {tuple(resets.shape)}, expected (T, B) = ({T}, {B})")
    if resets.device != device:
        raise ValueError(f"cuda backend: resets is on {resets.device}, xg on {device}")
    return resets.contiguous().view(torch.uint8)


def resets_arg(resets: Optional[torch.Tensor]) -> dict:
    """An entry's ``resets`` keyword: absent without resets (so that call is as it always was), else the
    mask's pointer."""
    return {} if resets is None else {"resets": resets.data_ptr()}
