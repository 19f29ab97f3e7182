"""The ``cuda`` backend: hand-written CUDA kernels of ``csrc/``, bound by pybind11 as ``lstm_kernels._C``.

The extension takes device pointers, sizes, a dtype code and the CUDA stream as Python ints (no
libtorch); this package validates the call, makes inputs contiguous, allocates every output and
scratch buffer with torch and passes ``torch.cuda.current_stream().cuda_stream``.

Two kernel families, one design each:

- the fused kernels (``csrc/fused/``; host side :mod:`.fused`), built to the budget of one step:
  on tensor cores with fp32 accumulation (float16 and bfloat16 on mma.sync m16n8k16; float32 on
  m16n8k8 tf32, rounded to tf32 only where torch allows TF32, else at fp32 accuracy by "3xTF32"),
  W_hh resident in shared memory over ceil(H/8) x ceil(B/16) blocks, gate rows interleaved so the
  cell runs on the accumulators, h_{t-1} (backward: dG_{t+1} in the storage dtype) copied once per
  step with cp.async, a light grid barrier (release-add, acquire-poll) bounded in time. They serve
  every call they fit: projections (``proj_size``: two half-steps per step; dW_hr by one GEMM of
  the saved dh_t and m_t), variable lengths (``batch_sizes``: a step touches only its active rows)
  and resets. One persistent (cooperative) launch where the grid is co-resident (``_C.fused_plan``),
  else the same code one launch per (half-)step, with the same bits. They cannot serve H beyond
  their shared memory (checked per direction: the largest H served is 2240 forward and 2408
  backward in 16 bits, 1120 and 1204 in float32 on sm_90's 227 KB; 1536, 1384, 768 and 692 on
  sm_80's 163 KB), nor ``LSTM_KERNELS_CUDA_MMA=0`` (they run on tensor cores only).
- the per-step kernels (``csrc/step/``; host side :mod:`.step`): one launch per time step, W_hh
  read from global memory / L2, the recurrent matmul on tensor cores (wmma) or, with
  ``LSTM_KERNELS_CUDA_MMA=0`` or float32 without TF32 allowed, plain fp32 FMA. They are the fallback
  where the fused kernels cannot serve a call. They serve resets, not projections or variable lengths.

Which kernel serves a call: ``LSTM_KERNELS_CUDA_VARIANT`` (:mod:`.variants`), per direction
(:func:`.fused.fused_mode`):

- ``fused`` (default) and ``auto`` (the same): the fused kernels, persistent where their grid is
  co-resident, else one launch per (half-)step; where they cannot serve the call, the per-step
  kernels. A cooperative launch the runtime refuses although the plan allowed it (MPS, MIG, green
  contexts, SMs held elsewhere: ``_C.CooperativeLaunchRefused``) runs again one launch per
  (half-)step, and that (device, direction, dtype, B, H, P) key stays so for the process
  (:func:`refused_cooperative_launches`).
- ``persistent``: the fused kernels' persistent launch only. :meth:`CudaBackend.supports` declines a
  call the fused kernels cannot serve (naming why); a grid that is not co-resident, or a cooperative
  launch the runtime refuses, raises RuntimeError.
- ``step``: the per-step kernels; a projected or packed call, which only the fused kernels serve,
  runs them one launch per (half-)step.

A projected or packed call the fused kernels cannot serve is declined by :meth:`CudaBackend.supports`
whatever the variant (never a kernel that ignores W_hr or batch_sizes).

Availability (:mod:`.extension`): the extension links its own CUDA runtime statically, so besides
torch seeing a GPU, the backend asks that runtime (``_C.runtime_status``, once per process); a
driver older than the nvcc that built it makes the backend unavailable with that reason, and
``auto`` moves on.

Grid barriers: every persistent launch bounds its grid-barrier waits in time
(``LSTM_KERNELS_BARRIER_TIMEOUT``, seconds, default 10; 0: no bound), reading the GPU's clock only
after a poll found the barrier closed. A launch whose wait gave up ends early and leaves a record
(:mod:`..barrier_bound`); nothing synchronises the call: the record's copy is queued after the
launch, and the next call on that device raises a RuntimeError naming the kernel, the step and the
block (verification raises at once).

Resets inside a sequence (``resets`` [T, B] bool on xg's device, passed to the kernels as uint8):
served by both families in every launch mode (each kernel's instance with resets is a template
instance of its own; the one without is unchanged).

The GRU (``cell="gru"``): the fused kernels' instances with 3 gate rows (``csrc/fused/``: the
forward's r, z rows as the LSTM's i, f and its n rows a transposed product; the backward over 3H
with the carry dh z in a register) and the per-step kernels, the cell a template parameter
(:mod:`.step`); as for the LSTM, packed GRU calls are the fused kernels' alone.

Dimension names: T steps, B batch, H hidden units, P = proj_size or H. Gate order along 4H: i, f, g,
o. Workspace kept for backward: the activated gates ``act`` [T, B, 4H] fp32 and the cell states
``c_all`` [T, B, H] fp32 (backward recomputes only tanh(c_t)).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch

from ...cells import GRU, LSTM, cell_args, gates
from .. import Backend, RecurrenceCall, RecurrenceInputs, barrier_bound, register
from ..barrier_bound import BARRIER_TIMEOUT_ENV  # noqa: F401  (the bound's switch, shared with the triton backend)
from . import extension, fused, step
from .extension import NO_GPU, NOT_BUILT, resets_mask, runtime_status, runtime_unavailable_reason  # noqa: F401
from .fused import (  # noqa: F401
    fused_persistent_possible, fused_tf32, fused_unserved_reason, refused_cooperative_launches,
)
from .variants import (  # noqa: F401
    BACKWARD_ENV, BACKWARDS, DEFAULT_VARIANT, EXCHANGE_ENV, FUSED_CANDIDATES, MMA_ENV, VARIANT_ENV, VARIANTS,
    WEIGHTS_ENV, fused_backward_tile, fused_exchange_tagged, fused_weights_in_registers, requested_variant,
    tensor_cores_requested, use_tensor_cores,
)

_INT32_MAX = 2**31 - 1


def _grad_or_zeros(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if g is None:
        return torch.zeros_like(like)
    return g.to(like.dtype).contiguous()


class CudaBackend(Backend):
    name = "cuda"
    differentiable_backward = False
    serves_resets = True
    cells = (LSTM, GRU)  # the GRU: the fused kernels' instances with 3 gate rows, and the per-step kernels
    #: How the last forward and backward were launched: "persistent" (one cooperative launch of the fused
    #: kernels) or "step" (one launch per (half-)step, of either family); for tests and benchmarks.
    last_forward_variant: Optional[str] = None
    last_backward_variant: Optional[str] = None
    #: Whether the last forward and backward ran their matmuls on tensor cores.
    last_forward_mma: Optional[bool] = None
    last_backward_mma: Optional[bool] = None
    #: Which kernels ran: "fused" (csrc/fused/), "wmma" or "fma" (the per-step kernels of csrc/step/).
    last_forward_kernel: Optional[str] = None
    last_backward_kernel: Optional[str] = None

    def verify_on_first_use(self, call: RecurrenceCall) -> bool:
        return call.device.type == "cuda"

    def plan_signature(self, call: RecurrenceCall) -> tuple:
        return (requested_variant(), use_tensor_cores(call.dtype),
                *(("weights in registers",) if fused_weights_in_registers() else ()),
                *(("tagged exchange",) if fused_exchange_tagged() else ()),
                *((fused_backward_tile() + " backward",) if fused_backward_tile() != "ring" else ()))

    def unavailable_reason(self) -> Optional[str]:
        return extension.unavailable_reason()

    def supports(self, call: RecurrenceCall) -> Optional[str]:
        if call.device.type != "cuda":
            return f"{call.device.type} tensors are not served (CUDA only)"
        if call.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"dtype {call.dtype} is not served (float32, bfloat16 and float16 are)"
        if call.has_projection or call.variable_lengths:
            why = fused_unserved_reason(call)
            if why is not None:
                what = "proj_size > 0" if call.has_projection else "variable lengths (PackedSequence)"
                return f"{what} is served by the fused kernels only, and {why}"
        elif requested_variant() == "persistent":
            why = fused_unserved_reason(call)
            if why is not None:
                return f"{VARIANT_ENV}=persistent runs the fused kernels only, and {why}"
        if call.seq_len < 1 or call.batch < 1 or call.hidden_size < 1:
            return "empty input (T, B and H must be >= 1)"
        if call.batch * gates(call.cell) * call.hidden_size > _INT32_MAX:
            return f"B * {gates(call.cell)}H does not fit in int32"
        if call.batch > step.MAX_BATCH:
            return f"batch {call.batch} is larger than the kernels' grid allows ({step.MAX_BATCH})"
        return None

    def workspace_spec(self, call: RecurrenceCall):
        if not call.needs_grad:
            return ()
        T, B, H = call.seq_len, call.batch, call.hidden_size
        return (((T, B, gates(call.cell) * H), torch.float32), ((T, B, H), torch.float32))

    def _check(self, xg, w_hh, h0, c0, w_hr=None, b_hn=None):
        T, B, gate_rows = xg.shape
        G = gates(RecurrenceInputs(xg, w_hh, h0, c0, w_hr, None).cell)
        H = gate_rows // G
        P = H if w_hr is None else w_hr.shape[0]
        if (gate_rows != G * H or w_hh.shape != (G * H, P) or h0.shape != (B, P)
                or (c0 is not None and c0.shape != (B, H)) or (w_hr is not None and w_hr.shape != (P, H))
                or (b_hn is not None and b_hn.shape != (H,))):
            raise ValueError(
                f"cuda backend: bad shapes xg {tuple(xg.shape)}, w_hh {tuple(w_hh.shape)}, h0 {tuple(h0.shape)}"
                + ("" if c0 is None else f", c0 {tuple(c0.shape)}")
                + ("" if w_hr is None else f", w_hr {tuple(w_hr.shape)}")
                + ("" if b_hn is None else f", b_hn {tuple(b_hn.shape)}")
            )
        for name, t in (("w_hh", w_hh), ("h0", h0), ("c0", c0), ("w_hr", w_hr), ("b_hn", b_hn)):
            if t is None:
                continue
            if t.dtype != xg.dtype:
                raise TypeError(f"cuda backend: {name} is {t.dtype}, xg is {xg.dtype}; one dtype expected")
            if t.device != xg.device:
                raise ValueError(f"cuda backend: {name} is on {t.device}, xg on {xg.device}")
        return T, B, H

    def _run(self, direction: str, call: RecurrenceCall, mask: Optional[torch.Tensor], fused_fn: Optional[Callable],
             fused_args: tuple, step_fn: Callable, step_args: tuple, step_kwargs: Optional[dict] = None):
        """One direction of a call: the fused kernels where :func:`.fused.fused_mode` says they serve it,
        else the per-step kernels (with ``step_kwargs``: the GRU's); records which kernels ran and how
        (``last_<direction>_*``)."""
        mode = fused.fused_mode(call, direction)
        if mode is not None:
            out, persistent = fused.run_fused(fused_fn, direction, call, mode, call.device, *fused_args, resets=mask)
            kernel, variant, mma = "fused", ("persistent" if persistent else "step"), True
        else:
            mma = use_tensor_cores(call.dtype)
            out = step_fn(*step_args, mma=mma, resets=mask, **(step_kwargs or {}))
            kernel, variant = ("wmma" if mma else "fma"), "step"
        setattr(self, f"last_{direction}_kernel", kernel)
        setattr(self, f"last_{direction}_variant", variant)
        setattr(self, f"last_{direction}_mma", mma)
        return out

    def forward(self, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad: bool, resets=None, cell=LSTM, b_hn=None):
        cell = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes).cell
        call = RecurrenceCall.of(xg, w_hh, w_hr, batch_sizes, needs_grad, resets, cell)
        why = self.unavailable_reason() or self.supports(call)
        if why is not None:
            raise RuntimeError(f"cuda backend: {why}")
        T, B, H = self._check(xg, w_hh, h0, c0, w_hr, b_hn)
        mask = resets_mask(resets, T, B, xg.device)
        barrier_bound.raise_if_gave_up(xg.device)
        cell_kwargs = cell_args(cell, b_hn)
        return self._run("forward", call, mask, functools.partial(fused.forward, **cell_kwargs),
                         (xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad), step.forward, (xg, w_hh, h0, c0, needs_grad),
                         cell_kwargs)

    def backward(self, inputs: RecurrenceInputs, h_all, workspace, dh_all, dh_T, dc_T, resets=None, cell=LSTM,
                 b_hn=None):
        xg, w_hh, h0, c0, w_hr, batch_sizes = inputs
        if len(workspace) != 2:
            raise RuntimeError("cuda backend: backward needs the workspace of a forward run with needs_grad=True")
        T, B, H = self._check(xg, w_hh, h0, c0, w_hr)
        mask = resets_mask(resets, T, B, xg.device)
        barrier_bound.raise_if_gave_up(xg.device)
        act, c_all = (w.contiguous() for w in workspace)
        w_hh = w_hh.contiguous()
        dh_all, dh_T = _grad_or_zeros(dh_all, h_all), _grad_or_zeros(dh_T, h0)
        call = dataclasses.replace(inputs.call(), has_resets=mask is not None)
        if inputs.cell == GRU:
            gru_args = dict(cell=GRU, h0=h0, h_all=h_all)
            return self._run("backward", call, mask, functools.partial(fused.backward, **gru_args),
                             (w_hh, None, act, c_all, None, dh_all, dh_T, None, batch_sizes), step.backward,
                             (w_hh, None, act, c_all, dh_all, dh_T, None), gru_args)
        c0 = c0.contiguous()
        dc_T = _grad_or_zeros(dc_T, c0)
        return self._run("backward", call, mask,
                         fused.backward, (w_hh, c0, act, c_all, w_hr, dh_all, dh_T, dc_T, batch_sizes),
                         step.backward, (w_hh, c0, act, c_all, dh_all, dh_T, dc_T))


register(CudaBackend())
