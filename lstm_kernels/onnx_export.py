"""FusedLSTM under ``torch.onnx.export`` (the dynamo exporter): ONNX ``LSTM`` nodes, as nn.LSTM exports.

While the exporter traces (``torch.onnx.is_in_onnx_export()`` and torch.export capturing),
FusedLSTM.forward runs :func:`onnx_lstm` instead of a kernel: one ONNX ``LSTM`` node per layer,
both directions in one node, written with ``torch.onnx.ops.symbolic_multi_out`` (the exporter
turns it into the ONNX op; nothing needs registering beforehand), and the layout around it in
ordinary torch ops: PyTorch's gate blocks i, f, g, o reordered into ONNX's i, o, f, c; W = W_ih,
R = W_hh, B = [b_ih, b_hh]; the initial states sliced per layer; Y [T, D, B, H] turned into the
next layer's input [T, B, D*H]; Y_h and Y_c concatenated into h_n and c_n.

ONNX's LSTM cannot express a projection (proj_size) or PyTorch's packed batch sizes: those raise
:class:`torch.onnx.errors.OnnxExporterError` naming the limit. Dropout between layers is a
training-time operation and is not exported, as for nn.LSTM. The TorchScript-based exporter
(``dynamo=False``) traces torch's own ``aten::lstm`` instead (the CPU native path), as before.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends.native import exporting

#: PyTorch's gate blocks (i, f, g, o) in ONNX's order (i, o, f, c).
ONNX_GATE_ORDER = (0, 3, 1, 2)
#: The ONNX opset whose LSTM these nodes are (LSTM-14: with the ``layout`` attribute).
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


def packed_input_error() -> Exception:
    return torch.onnx.errors.OnnxExporterError(
        "lstm_kernels: a PackedSequence input cannot be exported to ONNX (ONNX's LSTM takes per-sequence "
        "lengths, not PyTorch's packed batch sizes): export with a padded tensor input")


def resets_export_error() -> Exception:
    return torch.onnx.errors.OnnxExporterError(
        "lstm_kernels: resets inside a sequence cannot be exported to ONNX (ONNX's LSTM restarts no state "
        "within a sequence): export without resets, or run the segments separately")


def _onnx_gates(weight: Tensor) -> Tensor:
    """[4H, ...] in PyTorch's gate order -> ONNX's (i, o, f, c)."""
    blocks = weight.chunk(4, dim=0)
    return torch.cat([blocks[k] for k in ONNX_GATE_ORDER], dim=0)


def onnx_lstm(module, x: Tensor, hx: tuple, batch_sizes: Optional[Tensor]):
    """All layers and directions of ``module`` as ONNX LSTM nodes.

    x [T, B, I] (time-major), hx = (h0, c0) [L*D, B, H]; returns (output [T, B, D*H], h_n, c_n)."""
    if module.proj_size > 0:
        raise torch.onnx.errors.OnnxExporterError(
            "lstm_kernels: FusedLSTM with proj_size > 0 cannot be exported to ONNX: ONNX's LSTM operator has no "
            "projection (torch.export.export serves it)")
    if batch_sizes is not None:
        raise packed_input_error()
    h0_all, c0_all = hx
    directions, hidden = module.num_directions, module.hidden_size
    T, B = x.shape[0], x.shape[1]
    layer_input, h_n, c_n = x, [], []
    for layer in range(module.num_layers):
        params = [module._layer_params(layer * directions + d) for d in range(directions)]
        w = torch.stack([_onnx_gates(p["weight_ih"]) for p in params])
        r = torch.stack([_onnx_gates(p["weight_hh"]) for p in params])
        b = (torch.stack([torch.cat([_onnx_gates(p["bias_ih"]), _onnx_gates(p["bias_hh"])]) for p in params])
             if module.bias else None)
        states = slice(layer * directions, (layer + 1) * directions)
        y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
            "LSTM", [layer_input, w, r, b, None, h0_all[states], c0_all[states]],
            dict(hidden_size=hidden, direction="bidirectional" if directions == 2 else "forward", layout=0),
            dtypes=(x.dtype, x.dtype, x.dtype), shapes=([T, directions, B, hidden], [directions, B, hidden],
                                                         [directions, B, hidden]), version=LSTM_OPSET)
        layer_input = y.permute(0, 2, 1, 3).reshape(T, B, directions * hidden)
        h_n.append(y_h)
        c_n.append(y_c)
    return layer_input, torch.cat(h_n), torch.cat(c_n)
