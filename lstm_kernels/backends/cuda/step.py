"""The per-step kernels (``csrc/step/step_forward.cu``, ``csrc/step/step_backward.cu``), host side:
the outputs and scratch they write, and their launch (``_C.step_forward`` / ``_C.step_backward``:
one launch per time step, and one more for the backward's dh0).

They are the fallback where the fused kernels cannot serve a call: H beyond the fused blocks'
shared memory, ``LSTM_KERNELS_CUDA_MMA=0`` (plain fp32 FMA), or ``LSTM_KERNELS_CUDA_VARIANT=step``.
W_hh is read from global memory / L2 every step, in 16 x 16 (batch row x unit) tiles of 256
threads; the recurrent matmul runs on tensor cores (wmma, fp32 accumulation) where ``mma`` is set:
the forward h_{t-1} W_hh^T on fp16/bf16 operands (products exact in fp32) or tf32 for float32 (asked
for only where torch allows TF32), the backward dG_{t+1} W_hh on tf32 (dG is fp32 and is rounded to
tf32; 16-bit W_hh is exact in tf32); otherwise fp32 FMA, so float32 is exact fp32. They serve resets;
not projections or variable lengths (only the fused kernels do).

Workspace kept for backward: the activated gates ``act`` [T, B, 4H] fp32 and the cell states
``c_all`` [T, B, H] fp32 (the backward recomputes only tanh(c_t)); the fused kernels keep the same.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import extension
from .extension import ptr, resets_arg

#: The per-step kernels put batch tiles of 16 rows on gridDim.y, which is at most 65535.
MAX_BATCH = 65535 * 16


def _launch(direction: str, like: torch.Tensor, *tensors: Optional[torch.Tensor], sizes: tuple, mma: bool,
            resets: Optional[torch.Tensor]) -> None:
    """``_C.step_<direction>(dtype code, *pointers, *sizes, stream, mma=, [resets=])`` on torch's current
    stream of ``like``'s device; ``tensors`` are the entry's tensor arguments in order (None: null)."""
    entry: Callable = getattr(extension._C, "step_" + direction)
    with torch.cuda.device(like.device):
        stream = torch.cuda.current_stream(like.device).cuda_stream
        entry(extension.dtype_codes()[like.dtype], *(ptr(t) for t in tensors), *sizes, stream, mma=mma,
              **resets_arg(resets))


def forward(xg, w_hh, h0, c0, needs_grad: bool, mma: bool, resets: Optional[torch.Tensor] = None):
    """h_all [T, B, H], h_T [B, H], c_T [B, H] and the workspace ((act, c_all) when ``needs_grad``, else
    ()). ``resets``: None or the uint8 mask of :func:`.extension.resets_mask`."""
    xg, w_hh, h0, c0 = (t.contiguous() for t in (xg, w_hh, h0, c0))
    T, B, H4 = xg.shape
    H = H4 // 4
    dev, dt = xg.device, xg.dtype
    h_all = torch.empty((T, B, H), dtype=dt, device=dev)
    c_T = torch.empty((B, H), dtype=dt, device=dev)
    if needs_grad:
        act = torch.empty((T, B, 4 * H), dtype=torch.float32, device=dev)
        c_all = torch.empty((T, B, H), dtype=torch.float32, device=dev)
        c_work = None
    else:
        act = c_all = None
        c_work = torch.empty((B, H), dtype=torch.float32, device=dev)
    _launch("forward", xg, xg, w_hh, h0, c0, h_all, c_T, act, c_all, c_work, sizes=(T, B, H), mma=mma, resets=resets)
    return h_all, h_all[-1].clone(), c_T, ((act, c_all) if needs_grad else ())


def backward(w_hh, c0, act, c_all, dh_all, dh_T, dc_T, mma: bool, resets: Optional[torch.Tensor] = None):
    """dG [T, B, 4H], dh0 [B, H], dc0 [B, H] and None (no dW_hr: no projection here) from the forward's
    workspace (act, c_all) and the gradients of its outputs (dense, in the input dtype)."""
    w_hh, c0, act, c_all = (t.contiguous() for t in (w_hh, c0, act, c_all))
    T, B, H = c_all.shape
    dev, dt = dh_all.device, dh_all.dtype
    dG = torch.empty((T, B, 4 * H), dtype=dt, device=dev)
    dh0 = torch.empty((B, H), dtype=dt, device=dev)
    dc0 = torch.empty((B, H), dtype=c0.dtype, device=dev)
    dg_work = torch.empty((2, B, 4 * H), dtype=torch.float32, device=dev)
    dc_work = torch.empty((B, H), dtype=torch.float32, device=dev)
    _launch("backward", dh_all, w_hh, c0, act, c_all, dh_all, dh_T, dc_T, dG, dh0, dc0, dg_work, dc_work,
            sizes=(T, B, H), mma=mma, resets=resets)
    return dG, dh0, dc0, None
