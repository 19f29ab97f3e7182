"""The backend contract: what a backend of the LSTM recurrence takes, returns and promises.

A backend runs the *recurrence* of one LSTM layer in one direction on an input
that is already projected (``xg = x @ W_ih^T + b``), time-major:

    xg          [T, B, 4H]   gate pre-activations from the input, order i, f, g, o
    w_hh        [4H, P]      recurrent weight (P = proj_size or H)
    h0          [B, P]       initial hidden state
    c0          [B, H]       initial cell state
    w_hr        [P, H]       projection weight, or None when proj_size == 0
    batch_sizes [T] int64 on the CPU, non-increasing (PackedSequence's), or None:
                step t updates rows [0, batch_sizes[t]) only; the other rows
                keep their state and get zeros in h_all

    resets      [T, B] bool on xg's device, or None: where True, that row starts step t from
                zero state (h_{t-1} = 0, c_{t-1} = 0), so no value or gradient crosses the reset.
                Only backends with ``serves_resets`` get it, as the keyword ``resets``, and only
                when it is not None: dispatch moves past the others.

    forward(xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad[, resets=])
        -> h_all [T, B, P], h_T [B, P], c_T [B, H], workspace
    backward(inputs, h_all, workspace, dh_all [T, B, P], dh_T [B, P], dc_T [B, H][, resets=])
        -> dG [T, B, 4H] (gradients of the gate pre-activations),
           dh0 [B, P], dc0 [B, H], dW_hr [P, H] or None

The GRU (``cell="gru"``; lstm_kernels/cells.py) runs through the same two calls with its own
shapes: xg [T, B, 3H] in the order r, z, n, holding both biases of r and z and the input's of n;
w_hh [3H, H]; h0 [B, H]; no cell state and no projection (c0, w_hr, c_T, dc_T, dc0 and dW_hr are
None); and the keyword ``b_hn`` [H] or None, the recurrent bias of n, which r scales. Only backends
whose ``cells`` name the GRU get it, with the keywords ``cell="gru", b_hn=``; dispatch moves past
the others. backward returns dG (again the gradient of xg), dh0, None, and in dW_hr's place
d_hn [T, B, H]: the gradient of the n rows of the recurrent product (h_{t-1} W_hnᵀ + b_hn), which
is r ⊙ dG_n and differs from dG's n rows; from it the layer forms dW_hh and db_hn
(lstm_kernels/layer_calls.py).

``workspace`` is a tuple of tensors that forward creates for its backward
(saved gate activations, cell states, ...); it is the backend's choice and may
be empty (a backward that recomputes). It never holds an input or an output:
LSTMLayer already keeps those and hands them back to backward as ``inputs``
(a :class:`RecurrenceInputs`) and ``h_all``. Anything else backward needs must
follow from the shapes and devices of those tensors, so that the
``torch.library`` op of :mod:`lstm_kernels.ops` can carry a backward across a
compiled graph. :meth:`Backend.workspace_spec` states the workspace's shapes
and dtypes without running the kernel (the op's fake implementation).

Numerics: h in the input dtype; the cell state and all accumulation in fp32
(float64 stays float64). ``c_T`` is returned in the input dtype, like nn.LSTM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ..cells import GRU, LSTM, gates


class BackendUnsupportedError(RuntimeError):
    """A named backend cannot serve a call (wrong device, dtype, size, ...)."""


@dataclass(frozen=True)
class RecurrenceCall:
    """Everything a backend needs to decide whether it can serve a call."""

    seq_len: int  # T
    batch: int  # B
    hidden_size: int  # H
    state_size: int  # P = proj_size or H
    dtype: torch.dtype
    device: torch.device
    has_projection: bool
    variable_lengths: bool
    needs_grad: bool
    has_resets: bool = False
    cell: str = LSTM  # "lstm" or "gru" (lstm_kernels/cells.py)

    @classmethod
    def of(cls, xg, w_hh, w_hr, batch_sizes, needs_grad: bool, resets=None, cell: str = LSTM) -> "RecurrenceCall":
        T, B, gate_rows = xg.shape
        return cls(
            seq_len=T,
            batch=B,
            hidden_size=gate_rows // gates(cell),
            state_size=w_hh.shape[1],
            dtype=xg.dtype,
            device=xg.device,
            has_projection=w_hr is not None,
            variable_lengths=batch_sizes is not None,
            needs_grad=needs_grad,
            has_resets=resets is not None,
            cell=cell,
        )


class RecurrenceInputs(NamedTuple):
    """The tensors of one recurrence call, as backward gets them back."""

    xg: torch.Tensor  # [T, B, 4H] (GRU: [T, B, 3H])
    w_hh: torch.Tensor  # [4H, P] (GRU: [3H, H])
    h0: torch.Tensor  # [B, P]
    c0: Optional[torch.Tensor]  # [B, H]; None for the GRU, which has no cell state
    w_hr: Optional[torch.Tensor]  # [P, H] or None
    batch_sizes: Optional[torch.Tensor]  # [T] int64 on the CPU, or None

    @property
    def cell(self) -> str:
        """The cell of the call: the GRU's has no cell state."""
        return LSTM if self.c0 is not None else GRU

    def call(self, needs_grad: bool = True) -> RecurrenceCall:
        return RecurrenceCall.of(self.xg, self.w_hh, self.w_hr, self.batch_sizes, needs_grad, cell=self.cell)


#: (shape, dtype) of one workspace tensor.
WorkspaceSpec = tuple[tuple[int, ...], torch.dtype]


class Backend:
    """Base class of a backend. Subclasses set ``name`` and implement the rest."""

    name: str = ""
    #: True when ``backward`` is made of differentiable torch ops, so a second
    #: derivative (create_graph=True) flows through it.
    differentiable_backward: bool = False
    #: True when forward and backward take ``resets`` (resets inside a sequence).
    serves_resets: bool = False
    #: The cells whose recurrence the backend runs (lstm_kernels/cells.py); the GRU's calls come
    #: with the keywords ``cell="gru", b_hn=``.
    cells: tuple[str, ...] = (LSTM,)

    def unavailable_reason(self) -> Optional[str]:
        """None when this machine can run the backend, else why not."""
        return None

    def verify_on_first_use(self, call: RecurrenceCall) -> bool:
        """Whether ``call``'s plan must prove itself before it serves (lstm_kernels.verification):
        True for kernels that run on a GPU, which nobody can test on every GPU beforehand."""
        return False

    def plan_signature(self, call: RecurrenceCall) -> tuple:
        """What, beyond the call's sizes and dtype, decides the kernel that serves it (variant and
        precision switches): part of the key a verification verdict is cached under."""
        return ()

    def supports(self, call: RecurrenceCall) -> Optional[str]:
        """None when the backend serves ``call`` exactly, else a short reason."""
        raise NotImplementedError

    def workspace_spec(self, call: RecurrenceCall) -> tuple[WorkspaceSpec, ...]:
        """Shapes and dtypes of the workspace ``forward`` returns for ``call`` (on the call's device)."""
        return ()

    def forward(self, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad: bool):
        """-> (h_all, h_T, c_T, workspace); see the module docstring."""
        raise NotImplementedError

    def backward(self, inputs: RecurrenceInputs, h_all, workspace, dh_all, dh_T, dc_T):
        """-> (dG, dh0, dc0, dW_hr or None); see the module docstring."""
        raise NotImplementedError
