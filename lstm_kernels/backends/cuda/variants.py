"""The switches of the ``cuda`` backend, read from the environment on every call.

``LSTM_KERNELS_CUDA_VARIANT`` (:data:`VARIANT_ENV`): which kernels serve a call and how they are
launched (the package docstring, :mod:`lstm_kernels.backends.cuda`, says what each value means):
``fused`` (the default), ``auto`` (the same as ``fused``), ``persistent`` or ``step``.

``LSTM_KERNELS_CUDA_MMA`` (:data:`MMA_ENV`, default 1): the recurrent matmuls on tensor cores. The
fused kernels run only on tensor cores, so ``0`` leaves every call the fused kernels would serve to
the per-step kernels' fp32 FMA path.
"""
from __future__ import annotations

import os

import torch

VARIANT_ENV = "LSTM_KERNELS_CUDA_VARIANT"
#: The fused kernels where they serve the call, else the per-step kernels.
DEFAULT_VARIANT = "fused"
VARIANTS = ("fused", "step", "persistent", "auto")

MMA_ENV = "LSTM_KERNELS_CUDA_MMA"


def requested_variant() -> str:
    """``LSTM_KERNELS_CUDA_VARIANT`` (default :data:`DEFAULT_VARIANT`); ValueError naming it otherwise."""
    v = os.environ.get(VARIANT_ENV, DEFAULT_VARIANT)
    if v not in VARIANTS:
        raise ValueError(f"{VARIANT_ENV}={v!r}; choose one of {', '.join(VARIANTS)}")
    return v


def tensor_cores_requested() -> bool:
    """``LSTM_KERNELS_CUDA_MMA`` (default 1): the recurrent matmuls on tensor cores."""
    v = os.environ.get(MMA_ENV, "1")
    if v not in ("0", "1"):
        raise ValueError(f"{MMA_ENV}={v!r}; choose 0 or 1")
    return v == "1"


def use_tensor_cores(dtype: torch.dtype) -> bool:
    """Whether the per-step kernels run a call's matmuls on tensor cores (wmma): the switch, and for
    float32 torch's TF32 flag (``torch.backends.cuda.matmul.allow_tf32``); otherwise fp32 FMA."""
    if not tensor_cores_requested():
        return False
    return dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
