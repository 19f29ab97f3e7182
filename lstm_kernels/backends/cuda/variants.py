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
launch (16-bit types up to H = 1024 and tf32 up to H = 768 at B = 16; elsewhere, and for float32 at fp32
accuracy, ``shared`` serves). Each is a kernel instance of its own: the register path's slots take registers
enough for one block per SM, where ``shared`` fits two where shared memory allows. Both are verified before
first use under their own plan; the default stays ``shared`` until a GPU has measured both.

``LSTM_KERNELS_CUDA_FUSED_EXCHANGE`` (:data:`EXCHANGE_ENV`, default ``counter``): how the fused forward's
blocks hand h_t to each other. ``counter``: h_t stored to an exchange buffer, then a grid barrier (one
release-add per block, acquire-polled). ``tagged``: each 8-byte word of h_t carries its step's tag, and a
block waits by reading its operands until their tags are current, with no barrier and no fence
(csrc/fused/fused_common.cuh, "the tagged exchange"). It reads the words straight into MMA fragments,
so it implies ``registers``, and serves the LSTM without projection in 16 bits where every warp's part
of W fits the registers; elsewhere ``counter`` serves. Verified under its own plan, like the weights.

``LSTM_KERNELS_CUDA_FUSED_BACKWARD`` (:data:`BACKWARD_ENV`, default ``ring``): the fused backward's blocks and
how they read dG_{t+1}. ``ring``: blocks of 8 units x 16 batch rows, each warp streaming its k range through a
ring in shared memory. ``wide``: blocks of 16 units x 16 rows (half the blocks, so half the L2 reads of the
exchange), each warp loading its k range straight into MMA fragments, with the same bits
(csrc/fused/fused_plan.cuh, "the wide backward"). ``narrow``: blocks of 16 units x 8 rows with W^T and dG^T as
the MMA's A and B operands, so each block reads half the wide block's dG and each warp issues half its MMAs,
from the wide exchange's layout (fused_plan.cuh, "the narrow backward"). Both serve calls without projection
where their block's shared memory fits (on an H100 the LSTM up to H = 1744 wide and 1776 narrow in 16 bits,
872 and 888 in float); elsewhere ``ring`` serves. Each is verified under its own plan, like the weights.

:data:`FUSED_CANDIDATES` names the fused kernels' variants that ``python -m lstm_kernels check`` and the
flagship profile measure side by side, with the environment that selects each.
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


EXCHANGE_ENV = "LSTM_KERNELS_CUDA_FUSED_EXCHANGE"
EXCHANGES = ("counter", "tagged")


BACKWARD_ENV = "LSTM_KERNELS_CUDA_FUSED_BACKWARD"
BACKWARDS = ("ring", "wide", "narrow")

#: label -> the environment that selects that variant of the fused kernels (persistent where co-resident).
FUSED_CANDIDATES = {
    "fused": {VARIANT_ENV: "fused", WEIGHTS_ENV: "shared", EXCHANGE_ENV: "counter", BACKWARD_ENV: "ring"},
    "fused+registers": {VARIANT_ENV: "fused", WEIGHTS_ENV: "registers", EXCHANGE_ENV: "counter", BACKWARD_ENV: "ring"},
    "fused+tagged": {VARIANT_ENV: "fused", WEIGHTS_ENV: "registers", EXCHANGE_ENV: "tagged", BACKWARD_ENV: "ring"},
    "fused+wide": {VARIANT_ENV: "fused", WEIGHTS_ENV: "shared", EXCHANGE_ENV: "counter", BACKWARD_ENV: "wide"},
    "fused+narrow": {VARIANT_ENV: "fused", WEIGHTS_ENV: "shared", EXCHANGE_ENV: "counter", BACKWARD_ENV: "narrow"},
}


def _choice(env: str, choices: tuple) -> str:
    v = os.environ.get(env, choices[0])
    if v not in choices:
        raise ValueError(f"{env}={v!r}; choose one of {', '.join(choices)}")
    return v


def fused_exchange_tagged() -> bool:
    """``LSTM_KERNELS_CUDA_FUSED_EXCHANGE`` (default ``counter``) is ``tagged``; ValueError naming it for
    another value."""
    return _choice(EXCHANGE_ENV, EXCHANGES) == "tagged"


def fused_backward_tile() -> str:
    """``LSTM_KERNELS_CUDA_FUSED_BACKWARD`` (default ``ring``): one of :data:`BACKWARDS`; ValueError naming it for
    another value."""
    return _choice(BACKWARD_ENV, BACKWARDS)


def fused_weights_in_registers() -> bool:
    """``LSTM_KERNELS_CUDA_FUSED_WEIGHTS`` (default ``shared``) is ``registers``, or the tagged exchange,
    which implies it, is asked for; ValueError naming the variable for another value."""
    return _choice(WEIGHTS_ENV, WEIGHTS) == "registers" or fused_exchange_tagged()


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
