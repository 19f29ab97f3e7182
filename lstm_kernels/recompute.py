"""Recompute mode: a layer's recurrence that keeps state checkpoints for its backward, not activations.

``FusedLSTM(..., recompute=True)`` (or ``recompute=k``) runs each layer and direction through
:func:`recompute_layer` instead of :func:`lstm_kernels.function.lstm_layer`. Same arguments, same
results: xg [T, B, 4H], w_hh [4H, P], h0 [B, P], c0 [B, H], w_hr [P, H] or None, batch_sizes [T]
or None -> h_all [T, B, P], h_T [B, P], c_T [B, H].

How. The T steps are cut into S = ceil(T / k) segments of k steps (the last may be shorter);
``segment=True`` takes k = ceil(sqrt(T)). The forward runs the backend segment by segment and keeps,
at each of the S - 1 inner boundaries, the cell state c [B, H]; the hidden state entering step s is
h_all[s - 1], an output already (zeros in the rows of a PackedSequence that have ended, which no
later step reads). The backward
walks the segments in reverse: it runs the backend forward again on the segment (from its
checkpoint, with ``needs_grad=True``, so the backend makes its workspace for those k steps only),
then the backend backward with the dh, dc carried from the segment after it; dW_hh is one GEMM over
the whole dG, by :func:`lstm_kernels.layer_calls.layer_backward`'s own code.

Memory kept for the backward, per layer and direction, with s = the input's bytes per element
and s_c = the bytes of the cell state's compute dtype (4 for 16-bit inputs, else s):

    normal mode:  xg T*B*4H*s  +  h_all T*B*P*s  +  the backend's workspace
                  (triton and cuda: 4 * T*B*(4H + H), + 4 * T*B*H with a projection; reference: none)
    recompute:    xg T*B*4H*s  +  h_all T*B*P*s  +  the checkpoints (S - 1)*B*H*s_c
    while the backward runs, one segment's workspace (k steps) at a time.

With k = sqrt(T) the checkpoints cost sqrt(T)*B*H. The reference keeps no workspace in the normal
mode (its backward recomputes the whole sequence at once), so there recompute keeps the checkpoints
more, and in exchange bounds its backward's transient activations (seven [B, H] tensors per step)
to k steps instead of T. The forward also runs each segment with ``needs_grad=True`` and drops the
workspace at once: the kernels are then the very ones the normal mode runs and that dispatch
verified for this call (verification is per needs_grad), so the checkpoints are the normal mode's
states bit for bit; the price is one segment's workspace, briefly.

Numerics: every output and gradient is bitwise the normal mode's (``recompute=False``) on the
same backend, with two stated exceptions:

- dW_hr (``proj_size > 0``, S > 1): the backend sums dh_t^T m_t over its steps; here it sums per
  segment, then the S partial sums (in the compute dtype, rounded once to w_hr's dtype). Equal up
  to the order of a float sum, not bitwise. dW_hr does not feed any other gradient.
- float16/bfloat16 with S > 1: the cell state is fp32 inside every backend, but the contract hands
  c_T, dh0 and dc0 back in the dtype of h0 and c0. A 16-bit checkpoint or carried gradient would
  round the recurrence every k steps (a numerics change), so checkpoints and carries are kept in
  fp32 and passed back as the next segment's h0/c0 and dh_T/dc_T in fp32. The reference accepts
  states in its compute dtype and returns them alike, so it is bitwise there; the ``triton`` and
  ``cuda`` backends take only input-dtype states, so 16-bit recompute with more than one segment
  raises :class:`~lstm_kernels.BackendUnsupportedError` on them (float32 is served, and a single
  segment, k >= T, is served everywhere). A backend that takes states in its compute dtype says so
  with the class attribute ``state_in_compute_dtype = True``.

Which backends: ``reference`` (float64, float32, bfloat16, float16) and ``triton`` (float32; checked
under ``TRITON_INTERPRET=1``) are checked bitwise by the tests; the ``cuda`` backend follows the
same rule (float32) but has not run on a GPU yet.

Resets inside the sequence (``resets`` [T, B], as ``lstm_layer`` takes them) go to the backend with
each segment, its steps of them: a reset at a segment's first step is the backend's to apply, as in
the normal mode, so the results stay bitwise the normal mode's.

Other paths:

- no gradient needed (``torch.no_grad()``, or no input requires grad), an empty batch (B = 0) or
  T = 0: exactly ``lstm_layer`` (nothing is kept, so there is nothing to recompute).
- double backward (``create_graph=True``): on a backend whose backward is differentiable (the
  reference) the backward runs unsegmented, as the normal mode's does, so the first derivatives
  are the normal mode's bit for bit, dW_hr included, and so are the second, but for the part of
  d(dW_hr) that comes back through h_all into this node's own (segmented) backward: the dW_hr
  exception above. Other backends raise, as the normal mode does.
- ``torch.compile``: the custom op ``lstm_kernels::recompute_recurrence`` (with its backward
  ``lstm_kernels::recompute_recurrence_backward``) runs the same code as one opaque node; k is
  fixed when the graph is traced (T is specialised), and a call that needs no gradient takes the
  normal op ``lstm_kernels::recurrence``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .backends import Backend, BackendUnsupportedError, RecurrenceCall, RecurrenceInputs, get_backend
from .backends.reference import ReferenceBackend, compute_dtype
from .function import lstm_layer
from .layer_calls import check_workspace, layer_backward, select_backend, with_resets
from .validation import check_layer_shapes


def check_recompute(recompute):
    """``FusedLSTM``'s ``recompute`` argument: False, True, or a segment length (int >= 1), returned as given
    (an integer type such as numpy's as a Python int). TypeError for another type, ValueError for an int < 1."""
    if isinstance(recompute, bool):
        return recompute
    if not isinstance(recompute, numbers.Integral):
        raise TypeError(f"recompute should be False, True or a segment length (an int >= 1), got "
                        f"{type(recompute).__name__}: {recompute!r}")
    if recompute < 1:
        raise ValueError(f"recompute should be False, True or a segment length >= 1, got: {recompute!r}")
    return int(recompute)


def segment_length(seq_len: int, segment) -> int:
    """Steps per segment: ``segment`` itself when an int, ceil(sqrt(T)) when True (at least 1)."""
    segment = check_recompute(segment)
    if segment is False:
        raise ValueError("recompute_layer needs segment=True or a segment length >= 1, got False")
    if segment is True:
        return math.isqrt(seq_len - 1) + 1 if seq_len > 1 else 1
    return segment


def segment_bounds(seq_len: int, k: int) -> list[tuple[int, int]]:
    """[(start, end)] of the segments of k steps covering [0, T); the last one may be shorter."""
    return [(s, min(s + k, seq_len)) for s in range(0, seq_len, k)]


def takes_compute_dtype_state(impl: Backend) -> bool:
    """Whether ``impl`` accepts h0/c0 and dh_T/dc_T in its compute dtype (fp32 for 16-bit inputs) and
    returns c_T, dh0, dc0 in the dtype of the h0/c0 it was given (the reference does, by construction)."""
    return bool(getattr(impl, "state_in_compute_dtype", type(impl) is ReferenceBackend))


def state_dtype(impl: Backend, dtype: torch.dtype, seq_len: int, k: int) -> torch.dtype:
    """The dtype of the checkpoints and carried gradients: the compute dtype, which must reach the
    backend exactly. Raises BackendUnsupportedError where that would change numerics (see above)."""
    acc = compute_dtype(dtype)
    if acc == dtype or seq_len <= k:
        return dtype
    if takes_compute_dtype_state(impl):
        return acc
    raise BackendUnsupportedError(
        f"recompute mode with {dtype} input and {math.ceil(seq_len / k)} segments cannot run on the {impl.name!r} "
        f"backend: it takes and returns the state between segments in {dtype} while its cell state is {acc}, "
        "which would round the recurrence at every checkpoint. Use float32, a segment length >= T, "
        "backend='reference', or recompute=False")


def _rows(batch_sizes: Optional[Tensor], s: int, e: int) -> Optional[Tensor]:
    return None if batch_sizes is None else batch_sizes[s:e]


def _resets_of(resets: Optional[Tensor], s: int, e: int) -> dict:
    """The keyword that hands steps [s, e) of ``resets`` to a backend (none without resets)."""
    return with_resets(None if resets is None else resets[s:e])


def forward_segments(impl: Backend, inputs: RecurrenceInputs, k: int, dtype_of_state: torch.dtype, resets=None):
    """The recurrence segment by segment. Returns (h_all [T, B, P], h_T [B, P], c_T [B, H],
    checkpoints [S - 1, B, H] in ``dtype_of_state``: the cell state entering segments 1 .. S-1).
    ``resets`` [T, B] or None: each segment's steps of it go to the backend with the segment."""
    xg, w_hh, h0, c0, w_hr, batch_sizes = inputs
    T, B = xg.shape[0], xg.shape[1]
    bounds = segment_bounds(T, k)
    if len(bounds) == 1:
        h_all, h_T, c_T, _ = impl.forward(*inputs, True, **with_resets(resets))
        return h_all, h_T, c_T, c0.new_empty((0, B, c0.shape[1]), dtype=dtype_of_state)
    h_all, checkpoints = None, []
    h, c = h0, c0.to(dtype_of_state)
    for s, e in bounds:
        h_seg, h, c, _ = impl.forward(xg[s:e], w_hh, h, c, w_hr, _rows(batch_sizes, s, e), True,
                                      **_resets_of(resets, s, e))
        if h_all is None:
            h_all = h_seg.new_empty((T, *h_seg.shape[1:]))
        h_all[s:e].copy_(h_seg)
        if e < T:
            checkpoints.append(c)
    return h_all, h.to(h0.dtype), c.to(c0.dtype), torch.stack(checkpoints)


def backward_segments(impl: Backend, inputs: RecurrenceInputs, h_all, checkpoints, k: int, dh_all, dh_T, dc_T,
                      resets=None):
    """The backend's (dG [T, B, 4H], dh0, dc0, dW_hr or None) for the whole call, segment by segment
    in reverse, each segment's forward run again from its checkpoint for its workspace."""
    xg, w_hh, h0, c0, w_hr, batch_sizes = inputs
    T = xg.shape[0]
    bounds = segment_bounds(T, k)
    if len(bounds) == 1:
        outputs = impl.forward(*inputs, True, **with_resets(resets))
        workspace = check_workspace(impl, outputs[3], inputs, outputs[:3])
        return impl.backward(inputs, h_all, workspace, dh_all, dh_T, dc_T, **with_resets(resets))
    acc = compute_dtype(xg.dtype)
    # A backend that takes states in the compute dtype sums its dW_hr there too when w_hr comes so (same
    # values, so the same recurrence): the partial sums are then not rounded to 16 bits one by one.
    w_hr_seg = w_hr if w_hr is None or checkpoints.dtype == w_hr.dtype else w_hr.to(checkpoints.dtype)
    dG, dw_hr = None, None
    dh, dc = dh_T, dc_T
    for idx in reversed(range(len(bounds))):
        s, e = bounds[idx]
        if idx == 0:
            h_s, c_s = h0, c0
        else:
            # h_all[s - 1] is the state entering step s, but for the rows of a PackedSequence that ended
            # before s (zeros there): the contract leaves such rows out of every step, so their state
            # reaches only h_T, which the backward does not use.
            # A fresh tensor, as the normal mode's state entering step s is: a CPU BLAS may round a product
            # by its operand's alignment (MKL on AVX-512 does), and a row of h_all is not aligned alike.
            h_s, c_s = h_all[s - 1].to(checkpoints.dtype, copy=True), checkpoints[idx - 1]
        segment = RecurrenceInputs(xg[s:e], w_hh, h_s, c_s, w_hr_seg, _rows(batch_sizes, s, e))
        outputs = impl.forward(*segment, True, **_resets_of(resets, s, e))
        workspace = check_workspace(impl, outputs[3], segment, outputs[:3])
        del outputs
        dG_s, dh, dc, dw_hr_s = impl.backward(segment, h_all[s:e], workspace, dh_all[s:e], dh, dc,
                                              **_resets_of(resets, s, e))
        del workspace
        if dG is None:
            dG = dG_s.new_empty((T, *dG_s.shape[1:]))
        dG[s:e].copy_(dG_s)
        if dw_hr_s is not None:
            dw_hr = dw_hr_s.to(acc) if dw_hr is None else dw_hr + dw_hr_s.to(acc)
    return dG, dh, dc, None if dw_hr is None else dw_hr.to(w_hr.dtype)


class _Computed:
    """Hands already computed recurrence gradients to ``layer_backward`` (which then adds dW_hh)."""

    def __init__(self, name: str, grads):
        self.name, self.grads = name, grads

    def backward(self, *args, **kwargs):
        return self.grads


def _differentiable_backward(impl: Backend, inputs: RecurrenceInputs, h_all, dh_all, dh_T, dc_T, need_dw_hh,
                             resets=None):
    """Backward under create_graph=True: unsegmented, as the normal mode's, so that it is differentiable."""
    if not impl.differentiable_backward:
        raise RuntimeError(
            f"double backward through FusedLSTM is not supported by the {impl.name!r} "
            "backend; use backend='reference' for higher-order gradients"
        )
    workspace = impl.forward(*inputs, True, **with_resets(resets))[3] if impl.workspace_spec(inputs.call(True)) else ()
    return layer_backward(impl, inputs, h_all, tuple(workspace), dh_all, dh_T, dc_T, need_dw_hh, resets)


class RecomputeLayer(torch.autograd.Function):
    """One layer's recurrence in recompute mode (eager). ``impl``, ``k`` and the checkpoints' dtype
    are decided by :func:`recompute_layer`."""

    @staticmethod
    def forward(ctx, xg, w_hh, h0, c0, w_hr, batch_sizes, impl: Backend, k: int, dtype_of_state: torch.dtype,
                resets=None):
        inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes)
        h_all, h_T, c_T, checkpoints = forward_segments(impl, inputs, k, dtype_of_state, resets)
        ctx.impl, ctx.k, ctx.batch_sizes, ctx.resets = impl, k, batch_sizes, resets
        ctx.save_for_backward(xg, w_hh, h0, c0, w_hr, h_all, checkpoints)
        return h_all, h_T, c_T

    @staticmethod
    def backward(ctx, dh_all, dh_T, dc_T):
        xg, w_hh, h0, c0, w_hr, h_all, checkpoints = ctx.saved_tensors
        inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, ctx.batch_sizes)
        need_dw_hh = ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            grads = _differentiable_backward(ctx.impl, inputs, h_all, dh_all, dh_T, dc_T, need_dw_hh, ctx.resets)
        else:
            computed = backward_segments(ctx.impl, inputs, h_all, checkpoints, ctx.k, dh_all, dh_T, dc_T, ctx.resets)
            grads = layer_backward(_Computed(ctx.impl.name, computed), inputs, h_all, (), dh_all, dh_T, dc_T,
                                   need_dw_hh, ctx.resets)
        dxg, dw_hh, dh0, dc0, dw_hr = grads
        return dxg, dw_hh, dh0, dc0, dw_hr if w_hr is not None else None, None, None, None, None, None


def recompute_layer(xg, w_hh, h0, c0, w_hr=None, batch_sizes=None, backend: str = "auto", segment=True, resets=None):
    """:func:`lstm_kernels.function.lstm_layer` in recompute mode: same arguments and results.

    Args: those of ``lstm_layer`` (time-major; H = hidden size, P = proj_size or H): xg [T, B, 4H],
    w_hh [4H, P], h0 [B, P], c0 [B, H], w_hr [P, H] or None, batch_sizes [T] int64 on the CPU
    (non-increasing) or None, backend "auto" or a backend name, resets [T, B] bool or None (as
    ``lstm_layer`` takes them); and ``segment``: True (k = ceil(sqrt(T)) steps per segment) or a
    segment length k >= 1.

    Returns (h_all [T, B, P], h_T [B, P], c_T [B, H]), bitwise the normal mode's; so are the
    gradients except dW_hr with more than one segment (see the module docstring). Raises TypeError or
    ValueError for a bad ``segment`` (as :func:`check_recompute`; False too), RuntimeError for a wrong
    shape (as ``lstm_layer``), and
    BackendUnsupportedError for 16-bit input with more than one segment on a backend that takes
    states in the input dtype only.
    """
    if torch.compiler.is_compiling():
        return _compiled(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, segment, resets)
    check_layer_shapes(xg, w_hh, h0, c0, w_hr, batch_sizes, resets)
    T, B = xg.shape[0], xg.shape[1]
    k = segment_length(T, segment)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xg, w_hh, h0, c0, w_hr))
    if not needs_grad or T == 0 or B == 0:
        return lstm_layer(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, resets)
    impl = select_backend(xg, w_hh, w_hr, batch_sizes, True, backend, resets)
    return RecomputeLayer.apply(xg, w_hh, h0, c0, w_hr, batch_sizes, impl, k, state_dtype(impl, xg.dtype, T, k),
                                resets)


# ---- torch.compile -----------------------------------------------------------------------------


@torch.library.custom_op("lstm_kernels::recompute_recurrence", mutates_args=())
def recompute_recurrence(
    xg: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor],
    backend: str,
    segment: int,
    resets: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (h_all [T, B, P], h_T [B, P], c_T [B, H], checkpoints [S - 1, B, H]); ``backend`` resolved."""
    from . import ops  # not at import: it loads the backends (Triton reads TRITON_INTERPRET then)

    impl = get_backend(backend)
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes)
    ops._check_verified(impl, RecurrenceCall.of(xg, w_hh, w_hr, batch_sizes, True, resets))
    dtype_of_state = state_dtype(impl, xg.dtype, xg.shape[0], segment)
    h_all, h_T, c_T, checkpoints = forward_segments(impl, inputs, segment, dtype_of_state, resets)
    h_T = ops._unaliased(h_T, (*inputs[:5], h_all))
    c_T = ops._unaliased(c_T, (*inputs[:5], h_all, h_T))
    return h_all, h_T, c_T, checkpoints


@recompute_recurrence.register_fake
def _recompute_recurrence_fake(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, segment, resets):
    T, B, _ = xg.shape
    inner = (T + segment - 1) // segment - 1
    dtype = state_dtype(get_backend(backend), xg.dtype, T, segment)
    checkpoints = c0.new_empty((inner, B, c0.shape[1]), dtype=dtype)
    return xg.new_empty((T, B, h0.shape[1])), torch.empty_like(h0), torch.empty_like(c0), checkpoints


@torch.library.custom_op("lstm_kernels::recompute_recurrence_backward", mutates_args=())
def recompute_recurrence_backward(
    xg: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor],
    h_all: Tensor,
    checkpoints: Tensor,
    dh_all: Tensor,
    dh_T: Tensor,
    dc_T: Tensor,
    backend: str,
    segment: int,
    resets: Optional[Tensor],
) -> list[Tensor]:
    """-> [dG [T, B, 4H], dh0 [B, P], dc0 [B, H]] (+ [dW_hr [P, H]] with a projection)."""
    from . import ops

    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, batch_sizes)
    dG, dh0, dc0, dw_hr = backward_segments(get_backend(backend), inputs, h_all, checkpoints, segment, dh_all, dh_T,
                                            dc_T, resets)
    grads = [dG, dh0, dc0] + ([] if w_hr is None else [dw_hr])
    kept = (*inputs[:5], h_all, checkpoints, dh_all, dh_T, dc_T)
    return [ops._unaliased(g, kept) for g in grads]


@recompute_recurrence_backward.register_fake
def _recompute_recurrence_backward_fake(xg, w_hh, h0, c0, w_hr, batch_sizes, h_all, checkpoints, dh_all, dh_T, dc_T,
                                        backend, segment, resets):
    grads = [torch.empty_like(xg), torch.empty_like(h0), torch.empty_like(c0)]
    return grads + ([] if w_hr is None else [torch.empty_like(w_hr)])


def _setup_context(ctx, inputs, output):
    xg, w_hh, h0, c0, w_hr, batch_sizes, backend, segment, resets = inputs
    h_all, _, _, checkpoints = output
    ctx.backend, ctx.segment, ctx.batch_sizes, ctx.resets = backend, segment, batch_sizes, resets
    ctx.save_for_backward(xg, w_hh, h0, c0, w_hr, h_all, checkpoints)


def _backward(ctx, dh_all, dh_T, dc_T, _dcheckpoints):
    xg, w_hh, h0, c0, w_hr, h_all, checkpoints = ctx.saved_tensors
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, ctx.batch_sizes)
    grads = recompute_recurrence_backward(*inputs, h_all, checkpoints, dh_all, dh_T, dc_T, ctx.backend,
                                          ctx.segment, ctx.resets)
    computed = (*grads, None) if w_hr is None else tuple(grads)
    dxg, dw_hh, dh0, dc0, dw_hr = layer_backward(
        _Computed(ctx.backend, computed), inputs, h_all, (), dh_all, dh_T, dc_T, need_dw_hh=True, resets=ctx.resets
    )
    return dxg, dw_hh, dh0, dc0, dw_hr, None, None, None, None


recompute_recurrence.register_autograd(_backward, setup_context=_setup_context)


def _compiled(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, segment, resets):
    """``recompute_layer`` while torch.compile traces: the op above, or the normal op without gradients."""
    from . import ops

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xg, w_hh, h0, c0, w_hr))
    if not needs_grad or xg.shape[1] == 0:
        return ops.recurrence_with_grad(xg, w_hh, h0, c0, w_hr, batch_sizes, backend, resets)
    T = int(xg.shape[0])  # k follows from T: the graph is specialised to it
    k = segment_length(T, segment)
    impl = select_backend(xg, w_hh, w_hr, batch_sizes, True, backend, resets)
    state_dtype(impl, xg.dtype, T, k)  # raise while tracing, not at the first run
    h_all, h_T, c_T, _ = recompute_recurrence(xg, w_hh, h0, c0, w_hr, batch_sizes, impl.name, k, resets)
    return h_all, h_T, c_T
