"""The switches of the ``cuda`` backend, read from the environment on every call.

``LSTM_KERNELS_CUDA_VARIANT`` (:data:`VARIANT_ENV`): which kernels serve a call and how they are
launched (the package docstring, :mod:`lstm_kernels.backends.cuda`, says what each value means):
``fused`` (the default), ``auto`` (the same as ``fused``), ``persistent`` or ``step``.

``LSTM_KERNELS_CUDA_MMA`` (:data:`MMA_ENV`, default 1): the recurrent matmuls on tensor cores. The
fused kernels run only on tensor cores, so ``0`` leaves every call the fused kernels would serve to
the per-step kernels' fp32 FMA path.

``LSTM_KERNELS_CUDA_FUSED_WEIGHTS`` (:data:`WEIGHTS_ENV`, default ``shared``): where the fused forward
keeps its resident W_hh slice during the step loop. ``shared``: in shared memory, read by ldmatrix every
step. ``registers``: each warp's part as MMA register fragments, read from shared memory once per
launch (16-bit types, H up to 1024 at B = 16; elsewhere ``shared`` serves). Both are verified before
first use under their own plan; the default stays ``shared`` until a GPU has measured both.
"""
from __future__ import annotations

import os

import torch

VARIANT_ENV = "LSTM_KERNELS_CUDA_VARIANT"
#: The fused kernels where they serve the call, else the per-step kernels.
DEFAULT_VARIANT = "fused"
VARIANTS = ("fused", "step", "persistent", "auto")

MMA_ENV = "LSTM_KERNELS_CUDA_MMA"


WEIGHTS_ENV = "LSTM_KERNELS_CUDA_FUSED_WEIGHTS"
WEIGHTS = ("shared", "registers")


def fused_weights_in_registers() -> bool:
    """``LSTM_KERNELS_CUDA_FUSED_WEIGHTS`` (default ``shared``) is ``registers``; ValueError naming it
    for another value."""
    v = os.environ.get(WEIGHTS_ENV, WEIGHTS[0])
    if v not in WEIGHTS:
        raise ValueError(f"{WEIGHTS_ENV}={v!r}; choose one of {', '.join(WEIGHTS)}")
    return v == "registers"


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
