"""Which kernels serve a call: the variant choice, the fallbacks, and the entry points
``lstm_forward`` / ``lstm_backward`` the backend calls.

    variant       runs
    "persistent"  the persistent kernels (:mod:`.persistent`) where their plan serves the call, else
                  the per-step kernels (:mod:`.step_forward` / :mod:`.step_backward`). Under
                  TRITON_INTERPRET=1 the persistent kernels run in their steps mode (one launch per
                  step and phase, no grid barrier: the interpreter runs programs one after another).
    "step"        the per-step kernels.
    "auto"        "persistent" on a GPU, "step" under the interpreter; the environment variable
                  LSTM_KERNELS_TRITON_VARIANT may name a variant instead.
Forward and backward choose separately (their plans differ), so a call may run the persistent
forward and the per-step backward; ``LAST_KERNELS`` says what ran ("step_budget" or "step").

A persistent launch is cooperative: when the driver refuses it at run time (MPS or green contexts
limiting SMs, another process holding SMs), ``auto`` runs the per-step kernels instead
(``run_with_fallback``, with a RuntimeWarning) and a named "persistent" raises: a refusal means the
machine cannot run what was asked. A plan that does not fit is known before any launch; there a
named "persistent" runs the per-step kernels too, as a persistent call that did not fit always
did (LAST_KERNELS records "step").
"""
from __future__ import annotations

import warnings

import torch

from ...cells import LSTM, cell_args, gates
from .. import barrier_bound
from . import persistent
from .config import device_guard, interpreting, record_kernel, requested_variant
from .step_backward import step_backward
from .step_forward import step_forward


def choose_variant(variant: str, device: torch.device) -> str:
    """Resolve "auto" (or the environment variable) to "step" or "persistent": auto is persistent on a
    GPU and step under the interpreter (where the persistent kernels run one launch per step too)."""
    variant = requested_variant(variant)
    if variant != "auto":
        return variant
    return "persistent" if device.type == "cuda" and not interpreting() else "step"


def auto_requested(variant: str) -> bool:
    """Whether ``variant`` leaves the choice to the backend ("auto", and the environment variable
    does not name a variant either)."""
    return requested_variant(variant) == "auto"


def cooperative_launch_refused(err: BaseException) -> bool:
    """Whether ``err`` is the driver refusing a cooperative launch at run time (too many blocks to
    be co-resident: MPS or green contexts limiting SMs, another process holding SMs, or no
    cooperative launch in this context), as Triton's launcher reports it: a RuntimeError
    "Triton Error [CUDA]: <cuGetErrorString>" from cuLaunchKernelEx
    (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: "too many blocks in cooperative launch";
    CUDA_ERROR_NOT_SUPPORTED: "operation not supported")."""
    msg = str(err)
    return isinstance(err, RuntimeError) and "Triton Error [CUDA]" in msg and (
        "cooperative launch" in msg or "operation not supported" in msg
    )


def run_with_fallback(variant: str, chosen: str, run):
    """``run(chosen)``; when ``auto`` chose "persistent" and the driver refuses the cooperative
    launch, ``run("step")`` instead. A named variant still raises."""
    if chosen == "persistent" and auto_requested(variant):
        try:
            return run("persistent")
        except RuntimeError as err:
            if not cooperative_launch_refused(err):
                raise
            warnings.warn(f"lstm_kernels: the persistent Triton kernel's cooperative launch was refused ({err}); "
                          "running the per-step variant", RuntimeWarning, stacklevel=4)
            return run("step")
    return run(chosen)


def _serve(direction: str, variant: str, device: torch.device, plan, persistent_run, step_run):
    """Run ``direction`` with the kernels ``variant`` resolves to on ``device``: ``persistent_run(cfg)``
    with the plan ``plan()`` where the variant is persistent and the plan serves the call, else
    ``step_run()``; under the device guard, after raising an earlier launch's give-up."""
    chosen = choose_variant(variant, device)
    cfg = plan() if chosen == "persistent" else None
    if isinstance(cfg, str):  # the persistent kernels' plan does not fit: the per-step kernels serve
        chosen = "step"

    def run(kernels: str):
        record_kernel(direction, "step_budget" if kernels == "persistent" else "step")
        return persistent_run(cfg) if kernels == "persistent" else step_run()

    with device_guard(device):
        barrier_bound.raise_if_gave_up(device)  # an earlier call's persistent launch gave up
        return run_with_fallback(variant, chosen, run)


def lstm_forward(xg, w_hh, h0, c0, w_hr=None, batch_sizes=None, store_workspace=True, variant="auto", resets=None,
                 cell=LSTM, b_hn=None):
    """Forward recurrence. xg [T, B, 4H], w_hh [4H, P], h0 [B, P], c0 [B, H], w_hr [P, H] or None,
    resets [T, B] bool on xg's device or None (a row where True starts that step from zero state);
    the GRU (``cell="gru"``): xg [T, B, 3H], w_hh [3H, H], c0 and w_hr None, b_hn [H] or None.

    All in one dtype. Returns h_all [T, B, P], h_T [B, P], c_T [B, H] fp32 (None for the GRU), and
    the workspace (gates [T, B, 4H], c_all [T, B, H] (+ m_all [T, B, H] with a projection), all fp32;
    the GRU's in :func:`.step_forward.step_forward`) or () when not ``store_workspace``; the same
    from either kernel set. The kernels run on xg's device, on its current stream.
    """
    T, B, gate_rows = xg.shape
    H, P = gate_rows // gates(cell), w_hh.shape[1]
    args = (xg, w_hh, h0, c0, w_hr, batch_sizes, store_workspace)
    return _serve(
        "forward", variant, xg.device,
        lambda: persistent.forward_plan(B, H, P, xg.dtype, xg.device, w_hr is not None, cell=cell),
        lambda cfg: persistent.persistent_forward(*args, cfg=cfg, resets=resets, **cell_args(cell, b_hn)),
        lambda: step_forward(*args, resets=resets, cell=cell, b_hn=b_hn),
    )


def lstm_backward(xg, w_hh, c0, w_hr, workspace, dh_all, dh_T, dc_T, batch_sizes=None, variant="auto", resets=None,
                  cell=LSTM, h0=None, h_all=None):
    """Backward recurrence from the forward workspace (see ``lstm_forward``), with the forward's
    ``resets`` [T, B] bool or None; the GRU's also takes the forward's h0 and h_all.

    Returns dG [T, B, 4H] in xg's dtype, dh0 [B, P] fp32, dc0 [B, H] fp32, and
    dW_hr [P, H] fp32 (one GEMM over the steps) or None without a projection; the GRU's: dG
    [T, B, 3H], dh0, None and d_hn [T, B, H]. Variants, fallback and device as in ``lstm_forward``.
    """
    T, B, gate_rows = xg.shape
    H, P = gate_rows // gates(cell), w_hh.shape[1]
    args = (xg, w_hh, c0, w_hr, workspace, dh_all, dh_T, dc_T, batch_sizes)
    return _serve(
        "backward", variant, xg.device,
        lambda: persistent.backward_plan(B, H, P, xg.dtype, xg.device, w_hr is not None, cell=cell),
        lambda cfg: persistent.persistent_backward(*args, cfg=cfg, resets=resets, cell=cell, h0=h0, h_all=h_all),
        lambda: step_backward(*args, resets=resets, cell=cell, h0=h0, h_all=h_all),
    )
