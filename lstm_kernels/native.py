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
- ``torch.export``: under export the module is always this one op (any device, any backend named:
  an exported program holds the model, not a kernel choice). ``torch.onnx.export`` takes
  lstm_kernels/onnx_export.py's ONNX ``LSTM`` nodes instead.
- ``torch.compile``: while dynamo traces, the same kernel runs behind the custom
  op ``lstm_kernels::native_lstm`` (one opaque node with a fake implementation),
  so ``fullgraph=True`` holds and a compiled model runs the kernel eager runs.
  Its backward is the op ``lstm_kernels::native_lstm_backward``, which runs the
  kernel's forward again with autograd on and differentiates it: a compiled
  training step pays one more forward of the recurrence than eager does (torch
  exposes no backward of the CPU LSTM that takes saved state; the benchmark
  suite's ``compile`` configuration measures the cost).

It is not taken (the per-layer path and its backends run instead) when:
a backend is named (``backend="reference"`` is the float64-capable oracle and
always runs as asked), ``LSTM_KERNELS_BACKEND`` names one, the input is not on
the CPU, its dtype is not float32 or float64 (oneDNN's bf16/fp16 LSTM cannot run
on every CPU), CPU autocast is on (same reason), or torch.compile traces a module
whose inter-layer dropout is active (the recomputing backward would draw other
dropout masks; the per-layer path traces the dropout as its own op).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import backend_from_env

#: The dtypes torch's CPU LSTM serves on every CPU.
NATIVE_DTYPES = (torch.float32, torch.float64)


def native_path_reason(backend: str, x: torch.Tensor, dropout_active: bool = False) -> Optional[str]:
    """None when a FusedLSTM asked for ``backend`` may run ``x`` through torch's own CPU LSTM.

    ``dropout_active``: the module drops out between layers (dropout > 0 in training mode).
    Otherwise a short reason why the per-layer path runs instead.
    """
    if exporting():
        return None  # an exported program holds the model as one op, whatever backend runs it
    # This runs on every call: x.is_cpu, not x.device (which builds an object, a few µs).
    if backend != "auto" or backend_from_env() != "auto":
        return "a backend is named"
    if not x.is_cpu:
        return f"input on {x.device.type}, not the CPU"
    if x.dtype not in NATIVE_DTYPES:
        return f"dtype {x.dtype} (torch's CPU LSTM serves float32 and float64 on every CPU)"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    if dropout_active and torch.compiler.is_compiling():
        return "torch.compile traces inter-layer dropout in training (the per-layer path keeps its masks)"
    return None


def exporting() -> bool:
    """torch.export is capturing: torch.compiler.is_exporting(), read as the flag it returns, because
    dynamo before torch 2.13 folds the function itself to True under any torch.compile."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def run_native(module, x: Tensor, hx, batch_sizes: Optional[Tensor]):
    """All layers and directions of ``module`` by ``torch._VF.lstm``.

    x: time-major [T, B, I], or a PackedSequence's data [sum(batch_sizes), I] when
    ``batch_sizes`` is given; hx = (h0 [L*D, B, P], c0 [L*D, B, H]) in sorted order.
    Returns (output [T, B, D*P] or packed data [sum(batch_sizes), D*P], h_n, c_n).
    Eager calls go to the kernel directly (autograd through it, double backward included);
    under torch.compile through the op ``lstm_kernels::native_lstm``.
    """
    config = (module.bias, module.num_layers, module.dropout, module.training, module.bidirectional)
    if torch.compiler.is_compiling():
        return native_lstm(x, hx[0], hx[1], module._flat_weights, batch_sizes, *config)
    return _vf_lstm(x, hx[0], hx[1], module._flat_weights, batch_sizes, *config)


def _vf_lstm(x, h0, c0, weights, batch_sizes, has_biases, num_layers, dropout, train, bidirectional):
    """``torch._VF.lstm`` in its padded or its packed form (nn.LSTM's own call)."""
    args = (weights, has_biases, num_layers, dropout, train, bidirectional)
    if batch_sizes is None:
        return torch._VF.lstm(x, (h0, c0), *args, False)
    return torch._VF.lstm(x, batch_sizes, (h0, c0), *args)


@torch.library.custom_op("lstm_kernels::native_lstm", mutates_args=())
def native_lstm(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[Tensor],
    batch_sizes: Optional[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """torch's CPU LSTM as one graph node: the arguments and results of :func:`run_native`."""
    with torch.no_grad():
        return _vf_lstm(x, h0, c0, weights, batch_sizes, has_biases, num_layers, dropout, train, bidirectional)


@native_lstm.register_fake
def _native_lstm_fake(x, h0, c0, weights, batch_sizes, has_biases, num_layers, dropout, train, bidirectional):
    directions = 2 if bidirectional else 1
    return x.new_empty((*x.shape[:-1], directions * h0.shape[-1])), torch.empty_like(h0), torch.empty_like(c0)


@torch.library.custom_op("lstm_kernels::native_lstm_backward", mutates_args=())
def native_lstm_backward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[Tensor],
    batch_sizes: Optional[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    d_output: Tensor,
    d_h_n: Tensor,
    d_c_n: Tensor,
) -> list[Tensor]:
    """Gradients [dx, dh0, dc0, *dweights] of ``native_lstm``: its forward again, differentiated.

    An op's implementation runs below autograd (its dispatch key excluded); the recomputation
    includes it again for its own graph, as torch.utils.checkpoint does for its recomputation.
    """
    with torch.enable_grad(), torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False):
        leaves = [t.detach().requires_grad_(True) for t in (x, h0, c0, *weights)]
        outputs = _vf_lstm(*leaves[:3], leaves[3:], batch_sizes, has_biases, num_layers, dropout, train,
                           bidirectional)
        grads = torch.autograd.grad(outputs, leaves, (d_output, d_h_n, d_c_n), allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


@native_lstm_backward.register_fake
def _native_lstm_backward_fake(x, h0, c0, weights, *_):
    return [torch.empty_like(t) for t in (x, h0, c0, *weights)]


def _setup_context(ctx, inputs, output):
    x, h0, c0, weights, batch_sizes, *config = inputs
    ctx.batch_sizes = batch_sizes
    ctx.config = config
    ctx.output_shape = output[0].shape
    ctx.save_for_backward(x, h0, c0, *weights)


def _backward(ctx, d_output, d_h_n, d_c_n):
    x, h0, c0, *weights = ctx.saved_tensors
    grads_out = [torch.zeros(shape, dtype=x.dtype) if g is None else g
                 for g, shape in ((d_output, ctx.output_shape), (d_h_n, h0.shape), (d_c_n, c0.shape))]
    dx, dh0, dc0, *dweights = native_lstm_backward(x, h0, c0, weights, ctx.batch_sizes, *ctx.config, *grads_out)
    return dx, dh0, dc0, dweights, None, None, None, None, None, None


native_lstm.register_autograd(_backward, setup_context=_setup_context)
