"""Random recurrence calls and a forward+backward runner, shared by the triton tests (CPU and GPU)."""
from __future__ import annotations

import torch

from lstm_kernels.backends import RecurrenceInputs


def make_case(T, B, H, dtype, device, seed=0, lengths=None, proj=0):
    """Random recurrence inputs and upstream gradients in ``dtype`` on ``device`` (nn.LSTM-like scales).

    ``lengths`` (per row, non-increasing is not required) gives PackedSequence-style batch sizes.
    """
    gen = torch.Generator().manual_seed(seed)
    P = proj or H

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    batch_sizes = None
    if lengths is not None:
        lengths = torch.as_tensor(lengths)
        batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(T)], dtype=torch.int64)
    return dict(
        xg=rnd(T, B, 4 * H, scale=0.7), w_hh=rnd(4 * H, P, scale=P ** -0.5), h0=rnd(B, P, scale=0.5), c0=rnd(B, H),
        w_hr=rnd(P, H, scale=H ** -0.5) if proj else None,
        batch_sizes=batch_sizes, dh_all=rnd(T, B, P), dh_T=rnd(B, P), dc_T=rnd(B, H),
    )


def run(backend, case, dtype=None):
    """Forward then backward of ``backend`` on ``case`` (cast to ``dtype`` if given).

    Returns ({h_all, h_T, c_T, dG, dh0, dc0[, dW_hr]}, workspace).
    """
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    xg, w_hh, h0, c0, w_hr = (cast(case[n]) for n in ("xg", "w_hh", "h0", "c0", "w_hr"))
    bs = case["batch_sizes"]
    h_all, h_T, c_T, ws = backend.forward(xg, w_hh, h0, c0, w_hr, bs, True)
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, bs)
    grads_out = (cast(case["dh_all"]), cast(case["dh_T"]), cast(case["dc_T"]))
    dG, dh0, dc0, dw_hr = backend.backward(inputs, h_all, ws, *grads_out)
    out = dict(h_all=h_all, h_T=h_T, c_T=c_T, dG=dG, dh0=dh0, dc0=dc0)
    if w_hr is None:
        assert dw_hr is None
    else:
        out["dW_hr"] = dw_hr
    return out, ws
