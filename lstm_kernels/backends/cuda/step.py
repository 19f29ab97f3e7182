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

The GRU (``cell="gru"``; the kernels' template parameter GATES = 3): xg [T, B, 3H], w_hh [3H, H], no
c0 or c_T, the extension's ``gates=3`` and ``b_hn`` (a pointer, 0 without the bias); workspace
``act`` [T, B, 3H] (r, z, n) and hn [T, B, H] in ``c_all``'s place; the backward also takes the
forward's h0 and h_all (h_{t-1} of the update) and writes d_hn [T, B, H], the gradient of the
recurrent product's n rows, in dW_hr's place of the contract.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...cells import LSTM, gates
from . import extension
from .extension import ptr, resets_arg

#: The per-step kernels put batch tiles of 16 rows on gridDim.y, which is at most 65535.
MAX_BATCH = 65535 * 16


def _launch(direction: str, like: torch.Tensor, *tensors: Optional[torch.Tensor], sizes: tuple, mma: bool,
            resets: Optional[torch.Tensor], cell: dict) -> None:
    """``_C.step_<direction>(dtype code, *pointers, *sizes, stream, mma=, [resets=], [**cell])`` on torch's
    current stream of ``like``'s device; ``tensors`` are the entry's tensor arguments in order (None:
    null); ``cell`` the GRU's keywords (empty for the LSTM, whose call is as it always was)."""
    entry: Callable = getattr(extension._C, "step_" + direction)
    with torch.cuda.device(like.device):
        stream = torch.cuda.current_stream(like.device).cuda_stream
        entry(extension.dtype_codes()[like.dtype], *(ptr(t) for t in tensors), *sizes, stream, mma=mma,
              **resets_arg(resets), **cell)


def _contiguous(*tensors):
    return tuple(None if t is None else t.contiguous() for t in tensors)


def forward(xg, w_hh, h0, c0, needs_grad: bool, mma: bool, resets: Optional[torch.Tensor] = None, cell: str = LSTM,
            b_hn: Optional[torch.Tensor] = None):
    """h_all [T, B, H], h_T [B, H], c_T [B, H] (None for the GRU) and the workspace ((act, c_all) when
    ``needs_grad``, else ()). ``resets``: None or the uint8 mask of :func:`.extension.resets_mask`."""
    xg, w_hh, h0, c0, b_hn = _contiguous(xg, w_hh, h0, c0, b_hn)
    T, B, gate_rows = xg.shape
    H = gate_rows // gates(cell)
    dev, dt = xg.device, xg.dtype
    h_all = torch.empty((T, B, H), dtype=dt, device=dev)
    c_T = torch.empty((B, H), dtype=dt, device=dev) if cell == LSTM else None
    if needs_grad:
        act = torch.empty((T, B, gate_rows), dtype=torch.float32, device=dev)
        c_all = torch.empty((T, B, H), dtype=torch.float32, device=dev)
        c_work = None
    else:
        act = c_all = None
        c_work = torch.empty((B, H), dtype=torch.float32, device=dev)
    gru = {} if cell == LSTM else {"gates": gates(cell), "b_hn": ptr(b_hn)}
    _launch("forward", xg, xg, w_hh, h0, c0, h_all, c_T, act, c_all, c_work, sizes=(T, B, H), mma=mma, resets=resets,
            cell=gru)
    return h_all, h_all[-1].clone(), c_T, ((act, c_all) if needs_grad else ())


def backward(w_hh, c0, act, c_all, dh_all, dh_T, dc_T, mma: bool, resets: Optional[torch.Tensor] = None,
             cell: str = LSTM, h0: Optional[torch.Tensor] = None, h_all: Optional[torch.Tensor] = None):
    """dG [T, B, 4H], dh0 [B, H], dc0 [B, H] and None (no dW_hr: no projection here) from the forward's
    workspace (act, c_all) and the gradients of its outputs (dense, in the input dtype); the GRU's
    (c0 and dc_T None; its forward's h0 and h_all given): dG [T, B, 3H], dh0, None and d_hn [T, B, H]."""
    w_hh, c0, act, c_all, h0, h_all = _contiguous(w_hh, c0, act, c_all, h0, h_all)
    T, B, H = c_all.shape
    gate_rows = gates(cell) * H
    dev, dt = dh_all.device, dh_all.dtype
    dG = torch.empty((T, B, gate_rows), dtype=dt, device=dev)
    dh0 = torch.empty((B, H), dtype=dt, device=dev)
    dc0 = torch.empty((B, H), dtype=c0.dtype, device=dev) if cell == LSTM else None
    dg_work = torch.empty((2, B, gate_rows), dtype=torch.float32, device=dev)
    dc_work = torch.empty((B, H), dtype=torch.float32, device=dev)
    d_hn = None if cell == LSTM else torch.empty((T, B, H), dtype=dt, device=dev)
    gru = {} if cell == LSTM else {"gates": gates(cell), "h0": ptr(h0), "h_all": ptr(h_all), "d_hn": ptr(d_hn)}
    _launch("backward", dh_all, w_hh, c0, act, c_all, dh_all, dh_T, dc_T, dG, dh0, dc0, dg_work, dc_work,
            sizes=(T, B, H), mma=mma, resets=resets, cell=gru)
    return dG, dh0, dc0, d_hn
