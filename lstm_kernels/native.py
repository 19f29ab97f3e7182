"""The CPU path of ``backend="auto"``: torch's own LSTM kernel for the whole module.

On the CPU no fused kernel of this package runs (the Triton kernels need a GPU
or the interpreter), and the ``reference`` backend steps through time in
Python, several times slower than ``nn.LSTM``'s C++ loop (oneDNN for float32).
A user who swaps ``nn.LSTM`` for ``FusedLSTM`` must never get a slower model,
so ``backend="auto"`` on the CPU hands the whole module (all layers and
directions, packed or padded) to the same ATen op ``nn.LSTM`` calls,
``torch._VF.lstm``, with the module's own parameters. The result is bitwise
``nn.LSTM``'s.

Every promise FusedLSTM makes holds on this path, which is why it is allowed
(tests/test_native_path.py checks each):

- outputs and every gradient equal nn.LSTM's (the same kernel);
- backward in eval mode, and double backward (``create_graph=True``): ATen's
  CPU LSTM is differentiable twice, oneDNN's float32 kernel included;
- determinism: the CPU kernels have no atomics; the same inputs give the same bits;
- ``torch.compile``: while dynamo traces, this path is not taken, so a compiled
  model still holds one ``lstm_kernels::recurrence`` op per layer and direction.

It is not taken (the per-layer path and its backends run instead) when:
a backend is named (``backend="reference"`` is the float64-capable oracle and
always runs as asked), ``LSTM_KERNELS_BACKEND`` names one, the input is not on
the CPU, its dtype is not float32 or float64 (oneDNN's bf16/fp16 LSTM cannot run
on every CPU), CPU autocast is on (same reason), or torch.compile is tracing.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import backend_from_env

#: The dtypes torch's CPU LSTM serves on every CPU.
NATIVE_DTYPES = (torch.float32, torch.float64)


def native_path_reason(backend: str, x: torch.Tensor) -> Optional[str]:
    """None when a FusedLSTM asked for ``backend`` may run ``x`` through torch's own CPU LSTM.

    Otherwise a short reason why the per-layer path runs instead.
    """
    # This runs on every call: x.is_cpu, not x.device (which builds an object, a few µs).
    if backend != "auto" or backend_from_env() != "auto":
        return "a backend is named"
    if not x.is_cpu:
        return f"input on {x.device.type}, not the CPU"
    if x.dtype not in NATIVE_DTYPES:
        return f"dtype {x.dtype} (torch's CPU LSTM serves float32 and float64 on every CPU)"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing (the graph keeps lstm_kernels::recurrence)"
    return None


def run_native(module, x: torch.Tensor, hx, batch_sizes: Optional[torch.Tensor]):
    """All layers and directions of ``module`` by ``torch._VF.lstm``.

    x: time-major [T, B, I], or a PackedSequence's data [sum(batch_sizes), I] when
    ``batch_sizes`` is given; hx = (h0 [L*D, B, P], c0 [L*D, B, H]) in sorted order.
    Returns (output [T, B, D*P] or packed data [sum(batch_sizes), D*P], h_n, c_n).
    """
    weights = module._flat_weights
    args = (weights, module.bias, module.num_layers, module.dropout, module.training, module.bidirectional)
    if batch_sizes is None:
        output, h_n, c_n = torch._VF.lstm(x, hx, *args, False)
    else:
        output, h_n, c_n = torch._VF.lstm(x, batch_sizes, hx, *args)
    return output, h_n, c_n
