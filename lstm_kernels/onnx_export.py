"""FusedLSTM and FusedGRU under ``torch.onnx.export`` (the dynamo exporter): ONNX ``LSTM`` and ``GRU``
nodes, as nn.LSTM and nn.GRU export.

While the exporter traces (``torch.onnx.is_in_onnx_export()`` and torch.export capturing),
FusedLSTM.forward runs :func:`onnx_recurrence` instead of a kernel: one ONNX ``LSTM`` node per layer,
both directions in one node, written with ``torch.onnx.ops.symbolic_multi_out`` (the exporter
turns it into the ONNX op; nothing needs registering beforehand), and the layout around it in
ordinary torch ops: PyTorch's gate blocks i, f, g, o reordered into ONNX's i, o, f, c; W = W_ih,
R = W_hh, B = [b_ih, b_hh]; the initial states sliced per layer; Y [T, D, B, H] turned into the
next layer's input [T, B, D*H]; Y_h and Y_c concatenated into h_n and c_n. FusedGRU the same with
ONNX ``GRU`` nodes: PyTorch's r, z, n reordered into ONNX's z, r, h, and ``linear_before_reset=1``
(r scales W_hn h + b_hn, PyTorch's equation; ONNX's default applies r before the product).

ONNX's LSTM and GRU cannot express a projection (proj_size) or PyTorch's packed batch sizes: those raise
:class:`torch.onnx.errors.OnnxExporterError` naming the limit. Dropout between layers is a
training-time operation and is not exported, as for nn.LSTM. The TorchScript-based exporter
(``dynamo=False``) traces torch's own ``aten::lstm`` instead (the CPU native path), as before.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends.native import exporting
from .cells import GRU, LSTM, TORCH_NAME

#: PyTorch's gate blocks in ONNX's order: the LSTM's (i, f, g, o) as (i, o, f, c), the GRU's (r, z, n)
#: as (z, r, h).
ONNX_GATE_ORDER = {LSTM: (0, 3, 1, 2), GRU: (1, 0, 2)}
#: The attributes of each cell's node beyond hidden_size, direction and layout.
ONNX_CELL_ATTRIBUTES = {LSTM: {}, GRU: {"linear_before_reset": 1}}
#: The ONNX opset whose LSTM and GRU these nodes are (LSTM-14, GRU-14: with the ``layout`` attribute).
LSTM_OPSET = 14


def exporting_to_onnx() -> bool:
    """The dynamo-based ONNX exporter is capturing the model (with torch.export, non-strict or strict:
    the TorchScript-based exporter does neither). Under strict capture dynamo reads
    torch.onnx.is_in_onnx_export() as False, so the exporter's own flag is read too."""
    if not (exporting() or torch.compiler.is_compiling()):
        return False  # eager calls: two cheap flag reads
    return torch.onnx.is_in_onnx_export() or _onnx_exporter_flag()


def _onnx_exporter_flag() -> bool:
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:
        return False
    return bool(getattr(_flags, "_is_onnx_exporting", False))


def packed_input_error(cell: str = LSTM) -> Exception:
    return torch.onnx.errors.OnnxExporterError(
        f"lstm_kernels: a PackedSequence input cannot be exported to ONNX (ONNX's {TORCH_NAME[cell]} takes "
        "per-sequence lengths, not PyTorch's packed batch sizes): export with a padded tensor input")


def resets_export_error(cell: str = LSTM) -> Exception:
    return torch.onnx.errors.OnnxExporterError(
        f"lstm_kernels: resets inside a sequence cannot be exported to ONNX (ONNX's {TORCH_NAME[cell]} restarts "
        "no state within a sequence): export without resets, or run the segments separately")


def _onnx_gates(weight: Tensor, cell: str) -> Tensor:
    """[gates*H, ...] in PyTorch's gate order -> ONNX's (ONNX_GATE_ORDER)."""
    order = ONNX_GATE_ORDER[cell]
    blocks = weight.chunk(len(order), dim=0)
    return torch.cat([blocks[k] for k in order], dim=0)


def onnx_recurrence(module, x: Tensor, hx: tuple, batch_sizes: Optional[Tensor]):
    """All layers and directions of ``module`` (a FusedLSTM or a FusedGRU) as ONNX LSTM or GRU nodes.

    x [T, B, I] (time-major), hx the states tuple ((h0, c0) or (h0,), each [L*D, B, H]); returns
    (output [T, B, D*H], *final states) in the same order."""
    cell = module.cell
    if module.proj_size > 0:
        raise torch.onnx.errors.OnnxExporterError(
            "lstm_kernels: FusedLSTM with proj_size > 0 cannot be exported to ONNX: ONNX's LSTM operator has no "
            "projection (torch.export.export serves it)")
    if batch_sizes is not None:
        raise packed_input_error(cell)
    directions, hidden = module.num_directions, module.hidden_size
    T, B = x.shape[0], x.shape[1]
    layer_input, finals = x, [[] for _ in hx]
    state_shape = [directions, B, hidden]
    for layer in range(module.num_layers):
        params = [module._layer_params(layer * directions + d) for d in range(directions)]
        w = torch.stack([_onnx_gates(p["weight_ih"], cell) for p in params])
        r = torch.stack([_onnx_gates(p["weight_hh"], cell) for p in params])
        b = (torch.stack([torch.cat([_onnx_gates(p["bias_ih"], cell), _onnx_gates(p["bias_hh"], cell)])
                          for p in params]) if module.bias else None)
        states = slice(layer * directions, (layer + 1) * directions)
        y, *y_states = torch.onnx.ops.symbolic_multi_out(
            TORCH_NAME[cell], [layer_input, w, r, b, None, *(s[states] for s in hx)],
            dict(hidden_size=hidden, direction="bidirectional" if directions == 2 else "forward", layout=0,
                 **ONNX_CELL_ATTRIBUTES[cell]),
            dtypes=(x.dtype,) * (1 + len(hx)), shapes=([T, directions, B, hidden], *([state_shape] * len(hx))),
            version=LSTM_OPSET)
        layer_input = y.permute(0, 2, 1, 3).reshape(T, B, directions * hidden)
        for kept, y_s in zip(finals, y_states):
            kept.append(y_s)
    return (layer_input, *(torch.cat(kept) for kept in finals))
