"""The recurrent cells the package serves, and what each one's shapes follow from.

A cell is named by a string everywhere ("lstm", "gru"): in :class:`~lstm_kernels.backends.RecurrenceCall`,
in a backend's ``cells``, in the modules. What differs between the cells:

- LSTM: 4 gate rows per unit (i, f, g, o), a cell state c beside h, an optional projection; its
  recurrent bias folds into the input projection's.
- GRU: 3 gate rows per unit (r, z, n), no cell state, no projection; the recurrent bias of the n
  gate stays apart from the input's, since r scales it: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)).
"""
from __future__ import annotations

LSTM = "lstm"
GRU = "gru"

#: Gate rows per hidden unit.
GATES = {LSTM: 4, GRU: 3}
#: Whether the cell carries a cell state c beside h.
HAS_CELL_STATE = {LSTM: True, GRU: False}
#: The name torch uses (nn.LSTM / nn.GRU, cuDNN's RNN mode, the prefix of nn's error messages).
TORCH_NAME = {LSTM: "LSTM", GRU: "GRU"}


def cell_args(cell: str, b_hn=None) -> dict:
    """The keyword arguments that tell a backend (or a kernel launch) the cell: none for the LSTM (so
    that what serves only the LSTM is called exactly as before), ``cell`` and ``b_hn`` for the GRU."""
    return {} if cell == LSTM else {"cell": cell, "b_hn": b_hn}


def gates(cell: str) -> int:
    """Gate rows per hidden unit of ``cell``; ValueError for a cell the package does not know."""
    try:
        return GATES[cell]
    except KeyError:
        raise ValueError(f"unknown recurrent cell {cell!r}; choose one of {sorted(GATES)}") from None
