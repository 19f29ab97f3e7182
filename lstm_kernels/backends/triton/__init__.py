"""The ``triton`` backend: the LSTM recurrence as fused Triton kernels.

Runs on CUDA GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (for tests; the interpreter runs
programs one after another and is slow).

Which kernels serve a call (:mod:`.launch`):
  * the persistent kernels (:mod:`.persistent`, kernels in :mod:`.persistent_forward` /
    :mod:`.persistent_backward`): one launch for the forward and one for the backward, each
    program owning one tile for all steps with its W_hh slice in registers, K split over warps,
    one grid barrier per step. They serve every "persistent" call ("auto" on a GPU) whose plan
    fits: at most one program per SM, the resident weights within the register and shared-memory
    budget, fp32 only with TF32.
  * the per-step kernels (:mod:`.step_forward` / :mod:`.step_backward`): one launch per step and
    phase, W_hh streamed from L2. The fallback where the persistent plan does not fit (or the
    driver refuses the cooperative launch under "auto"), the "step" variant, and the correctness
    anchor the persistent kernels are compared with.
Shared by both: :mod:`.config` (variant names, tl.dot numerics, buffers, reset words, barrier
arguments) and :mod:`.device_helpers` (tanh, the grid barrier, reset flags, tile helpers).
``TritonBackend.variant`` ("auto" by default) or the environment variable
``LSTM_KERNELS_TRITON_VARIANT`` picks the variant; ``last_forward_kernel`` /
``last_backward_kernel`` say which kernels ran ("step_budget" or "step").

Dimension names: T steps, B batch, H hidden, P = proj_size or H.
Gate order along 4H: i, f, g, o (PyTorch's).

What forward saves for backward (the workspace, the same from both kernel sets): the activated
gates i, f, g, o [T, B, 4H] and the cell states c_t [T, B, H], both fp32, and with a projection
m_t = o * tanh(c_t) [T, B, H] fp32 (for dW_hr = sum_t dh_t^T m_t, one GEMM). Backward then needs no
matmul other than the recurrent dG_t @ W_hh and no transcendental other than
tanh(c_t): recomputing the gates would add a second forward recurrence (a
sequential h_{t-1} @ W_hh^T per step) to every backward, which costs more time
than the 20 bytes per (t, b, unit) of memory it would save. With
``needs_grad=False`` nothing is saved.

Numerics match the reference backend: fp32 accumulation and fp32 cell state;
h_t rounded to the input dtype every step; c_T returned in the input dtype;
fp32 uses tf32 only when ``torch.backends.cuda.matmul.allow_tf32`` is True (the persistent
backward exchanges dG in the input dtype: ``persistent.persistent_backward``).
Deterministic: no atomics accumulate anything (the only atomic is the grid
barrier counter of the persistent kernels); every output element is written by
one program in a fixed order.

The GRU (``cell="gru"``): both kernel sets, their cell the constexpr GATES (3 gate rows r, z, n;
:mod:`.step_forward`, :mod:`.persistent_forward` and their backwards; the cells' gradient
arithmetic shared in :mod:`.cell_grads`). Its workspace is r, z, n [T, B, 3H] and
hn = h_{t-1} W_hn^T + b_hn [T, B, H] (in c_all's place), fp32, from either forward.

Resets inside a sequence (``resets``, the contract's) are served by both kernel sets: a
compile-time switch of the kernels (HAS_RESETS; without resets they compile as before) masks
the state where it enters a step and the gradients where they leave it (:mod:`.config`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

import triton  # ImportError here keeps the backend unregistered

from ...cells import GRU, LSTM, cell_args, gates
from .. import Backend, RecurrenceCall, RecurrenceInputs, register
from .config import LAST_KERNELS, VARIANT_ENV, VARIANTS, interpreting
from .launch import lstm_backward, lstm_forward

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The oldest Triton served (setup.py declares triton>=3.6,<3.10): the one torch 2.11, the oldest torch
#: served, pins, and the oldest whose compiled kernels CI checks (tests/test_triton_aot.py,
#: tests/test_triton_step_budget.py). Triton 3.3 does not compile the persistent forward (its frontend
#: refuses a chained `and` of constexprs).
MIN_TRITON = (3, 6)


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


#: Kernel offsets are int32: every tensor ([T, B, 4H], [T, B, P], W_hh [4H, P]) must index below 2**31.
_MAX_ELEMENTS = 2**31 - 1


class TritonBackend(Backend):
    name = "triton"
    differentiable_backward = False
    serves_resets = True
    cells = (LSTM, GRU)  # the GRU: persistent or per-step kernels, as the LSTM

    def __init__(self, variant: str = "auto"):
        if variant not in VARIANTS:
            raise ValueError(f"unknown Triton LSTM variant {variant!r}; choose one of {VARIANTS}")
        #: "auto", "step" or "persistent" (see :mod:`.launch`); "auto" also consults LSTM_KERNELS_TRITON_VARIANT.
        self.variant = variant

    @property
    def last_forward_kernel(self) -> Optional[str]:
        """What the last forward ran: "step_budget" (the persistent kernels) or "step" (any TritonBackend)."""
        return LAST_KERNELS["forward"]

    @property
    def last_backward_kernel(self) -> Optional[str]:
        return LAST_KERNELS["backward"]

    def verify_on_first_use(self, call: RecurrenceCall) -> bool:
        return call.device.type == "cuda"

    def plan_signature(self, call: RecurrenceCall) -> tuple:
        return (self.variant, os.environ.get(VARIANT_ENV, "auto") or "auto")

    def unavailable_reason(self) -> Optional[str]:
        if _version_tuple(triton.__version__) < MIN_TRITON:
            return (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))} "
                    "(pip install 'triton>=3.6,<3.10')")
        if torch.cuda.is_available() or interpreting():
            return None
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"

    def supports(self, call: RecurrenceCall) -> Optional[str]:
        if call.dtype not in _DTYPES:
            return f"dtype {call.dtype} is not served (float32, bfloat16 and float16 are)"
        if interpreting():
            if call.device.type != "cpu":
                return f"{call.device.type} tensors are not served under TRITON_INTERPRET=1 (CPU only)"
        elif call.device.type != "cuda":
            return f"{call.device.type} tensors are not served (CUDA only; CPU needs TRITON_INTERPRET=1)"
        if call.seq_len < 1 or call.batch < 1 or call.hidden_size < 1:
            return "empty sequence, batch or hidden size"
        T, B, H, P = call.seq_len, call.batch, call.hidden_size, call.state_size
        if max(T * B * 4 * H, T * B * P, 4 * H * P) > _MAX_ELEMENTS:  # 4H: the GRU's 3H is within
            return "T * B * 4H, T * B * P or 4H * P is too large for the kernels' int32 offsets"
        return None

    def workspace_spec(self, call: RecurrenceCall):
        if not call.needs_grad:
            return ()
        T, B, H = call.seq_len, call.batch, call.hidden_size
        spec = (((T, B, gates(call.cell) * H), torch.float32), ((T, B, H), torch.float32))
        return spec + ((((T, B, H), torch.float32),) if call.has_projection else ())

    def forward(self, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad: bool, resets=None, cell=LSTM, b_hn=None):
        _check_dtypes(xg, w_hh, h0, c0, w_hr, b_hn)
        h_all, h_T, c_T, workspace = lstm_forward(
            xg, w_hh, h0, c0, w_hr, batch_sizes, store_workspace=needs_grad, variant=self.variant, resets=resets,
            **cell_args(cell, b_hn),
        )
        return h_all, h_T, None if c_T is None else c_T.to(c0.dtype), workspace

    def backward(self, inputs: RecurrenceInputs, h_all, workspace, dh_all, dh_T, dc_T, resets=None, cell=LSTM,
                 b_hn=None):
        xg, w_hh, h0, c0, w_hr, batch_sizes = inputs
        if len(workspace) != (3 if w_hr is not None else 2):
            raise RuntimeError("triton backward needs the workspace of a forward run with needs_grad=True")
        dG, dh0, dc0, extra = lstm_backward(
            xg, w_hh, c0, w_hr, workspace, dh_all, dh_T, dc_T, batch_sizes, variant=self.variant, resets=resets,
            **({} if inputs.cell == LSTM else dict(cell=GRU, h0=h0, h_all=h_all)),
        )
        if inputs.cell == GRU:
            return dG, dh0.to(h0.dtype), None, extra  # extra: d_hn (contract.py)
        return dG, dh0.to(h0.dtype), dc0.to(c0.dtype), None if extra is None else extra.to(w_hr.dtype)


def _check_dtypes(xg, w_hh, h0, c0, w_hr, b_hn=None) -> None:
    """The kernels compute in xg's dtype; a mismatch would change numerics, so it is an error."""
    for name, t in (("w_hh", w_hh), ("h0", h0), ("c0", c0), ("w_hr", w_hr), ("b_hn", b_hn)):
        if t is not None and t.dtype != xg.dtype:
            raise TypeError(f"triton backend: {name} is {t.dtype} but xg is {xg.dtype}; cast them alike")


register(TritonBackend())
