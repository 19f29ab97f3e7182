"""torch's own LSTM (and GRU) kernel for the whole module: the CPU path of ``backend="auto"``, and on CUDA a candidate.

FusedGRU takes the same path with ``torch._VF.gru`` (nn.GRU's call); what follows holds for it too,
except under ``torch.compile``, where the GRU's kernel is traced as the aten op it is (no op of this
package wraps it yet: inductor may decompose it, so a compiled FusedGRU agrees with eager within the
tolerances, not to the bit).

On the CPU no fused kernel of this package runs (the Triton kernels need a GPU
or the interpreter), and the ``reference`` backend steps through time in
Python, several times slower than ``nn.LSTM``'s C++ loop (oneDNN for float32).
A user who swaps ``nn.LSTM`` for ``FusedLSTM`` must never get a slower model,
so ``backend="auto"`` on the CPU hands the whole module (all layers and
directions, packed or padded) to the same ATen op ``nn.LSTM`` calls,
``torch._VF.lstm``, with the module's own parameters. The result is bitwise
``nn.LSTM``'s.

On CUDA the same op runs cuDNN. There it is one candidate among the fused kernels: ``auto`` measures
them on the first call of a shape (lstm_kernels/autotune.py) or, with ``LSTM_KERNELS_AUTOTUNE=0``,
takes it only where no fused kernel serves (or passed verification). This is how FusedLSTM is
never slower than nn.LSTM on a GPU nobody has measured.

Every promise FusedLSTM makes holds on this path, which is why it is allowed
(tests/test_native_path.py checks each):

- outputs and every gradient equal nn.LSTM's (the same kernel);
- backward in eval mode, and double backward (``create_graph=True``): ATen's
  CPU LSTM is differentiable twice, oneDNN's float32 kernel included. cuDNN refuses a backward
  of a forward run in inference mode and has no double backward, so on CUDA a call that needs
  gradients runs cuDNN in training mode (with dropout 0 in eval: the same results) inside
  :class:`TorchKernelRNN`, whose backward is cuDNN's, except under ``create_graph=True``: then it
  recomputes the module on the ``reference`` backend and differentiates that (the gradients agree
  within the tolerances, not to the bit);
- determinism: the CPU kernels have no atomics; the same inputs give the same bits. cuDNN's RNN
  does not promise it, so on CUDA the path is not taken under
  ``torch.use_deterministic_algorithms(True)`` or ``torch.backends.cudnn.deterministic``;
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
always runs as asked), ``LSTM_KERNELS_BACKEND`` names one, the input is on neither
the CPU nor CUDA, on the CPU its dtype is not float32 or float64 (oneDNN's bf16/fp16 LSTM cannot
run on every CPU) or CPU autocast is on (same reason), torch.compile traces a module whose
inter-layer dropout is active (the recomputing backward would draw other dropout masks; the
per-layer path traces the dropout as its own op), on CUDA under deterministic algorithms, or on
CUDA with inter-layer dropout active (a double backward could not replay cuDNN's masks).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..cells import LSTM
from . import backend_from_env

#: The dtypes torch's CPU LSTM serves on every CPU.
NATIVE_DTYPES = (torch.float32, torch.float64)
#: The dtypes torch's CUDA LSTM serves.
NATIVE_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def native_path_reason(backend: str, x: torch.Tensor, dropout_active: bool = False) -> Optional[str]:
    """None when a FusedLSTM asked for ``backend`` may run ``x`` through torch's own LSTM kernel
    (on the CPU it then does; on CUDA it is a candidate, see the module docstring).

    ``dropout_active``: the module drops out between layers (dropout > 0 in training mode).
    Otherwise a short reason why the per-layer path runs instead.
    """
    if exporting():
        return None  # an exported program holds the model as one op, whatever backend runs it
    # This runs on every call: x.is_cpu, not x.device (which builds an object, a few µs).
    if backend != "auto" or backend_from_env() != "auto":
        return "a backend is named"
    if x.is_cuda:
        return _cuda_reason(x, dropout_active)
    if not x.is_cpu:
        return f"input on {x.device.type}, not the CPU or CUDA"
    if x.dtype not in NATIVE_DTYPES:
        return f"dtype {x.dtype} (torch's CPU LSTM serves float32 and float64 on every CPU)"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    if dropout_active and torch.compiler.is_compiling():
        return "torch.compile traces inter-layer dropout in training (the per-layer path keeps its masks)"
    return None


def taken_outright(x: Tensor) -> bool:
    """Where torch's kernel may serve ``x``, whether it serves without a measurement: on the CPU,
    where no fused kernel of this package runs (on CUDA it is one candidate of lstm_kernels.autotune)."""
    return x.is_cpu


def _cuda_reason(x: torch.Tensor, dropout_active: bool) -> Optional[str]:
    if x.dtype not in NATIVE_CUDA_DTYPES:
        return f"dtype {x.dtype} (torch's CUDA LSTM serves {', '.join(str(d) for d in NATIVE_CUDA_DTYPES)})"
    if torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic:
        return "deterministic algorithms are asked for, which cuDNN's RNN does not promise"
    if dropout_active:
        return "inter-layer dropout is active in training (a double backward could not replay cuDNN's masks)"
    return None


def exporting() -> bool:
    """torch.export is capturing: torch.compiler.is_exporting(), read as the flag it returns, because
    dynamo before torch 2.13 folds the function itself to True under any torch.compile."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def run_native(module, x: Tensor, hx, batch_sizes: Optional[Tensor]):
    """All layers and directions of ``module`` by ``torch._VF.lstm`` (FusedGRU: ``torch._VF.gru``).

    x: time-major [T, B, I], or a PackedSequence's data [sum(batch_sizes), I] when
    ``batch_sizes`` is given; hx the states in sorted order: (h0 [L*D, B, P], c0 [L*D, B, H]), the
    GRU's (h0 [L*D, B, H],). Returns (output [T, B, D*P] or packed data [sum(batch_sizes), D*P],
    *final states). Eager calls go to the kernel directly (autograd through it, double backward
    included); under torch.compile the LSTM's through the op ``lstm_kernels::native_lstm``.
    """
    weights = module._flat_weights
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *hx, *weights))
    # cuDNN differentiates only a forward run in training mode; with dropout 0 the modes agree.
    train = module.training or (needs_grad and x.is_cuda)
    config = (module.bias, module.num_layers, module.dropout if module.training else 0.0, train, module.bidirectional)
    if torch.compiler.is_compiling() and module.cell == LSTM:
        return native_lstm(x, hx[0], hx[1], weights, batch_sizes, *config)
    if needs_grad and differentiate_by_wrapper(x):
        return TorchKernelRNN.apply(module, x, batch_sizes, config, len(hx), *hx, *weights)
    return _vf_rnn(module.cell, x, hx, weights, batch_sizes, *config)


def differentiate_by_wrapper(x: Tensor) -> bool:
    """Whether torch's kernel for ``x``'s device lacks a double backward (cuDNN's), so that
    :class:`TorchKernelRNN` must wrap it."""
    return x.is_cuda


class TorchKernelRNN(torch.autograd.Function):
    """torch's LSTM or GRU kernel for the whole module, with a double backward where the kernel has none.

    forward(module, x, batch_sizes, config, n_states, *states, *weights) -> (output, *final states),
    as :func:`run_native`. The forward runs the kernel with autograd on over detached copies of the
    inputs and keeps that graph; the backward differentiates it (cuDNN's own backward). Under
    ``create_graph=True`` it instead runs the module again on the ``reference`` backend (which is
    differentiable twice) on the saved inputs and differentiates that, so the gradients it returns
    are themselves differentiable. Only served without active dropout (native_path_reason), so
    that recomputation is the same function.
    """

    @staticmethod
    def forward(ctx, module, x, batch_sizes, config, n_states, *states_and_weights):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in (x, *states_and_weights)]
            outputs = _vf_rnn(module.cell, leaves[0], leaves[1:1 + n_states], leaves[1 + n_states:], batch_sizes,
                              *config)
        ctx.module = module
        ctx.batch_sizes = batch_sizes
        ctx.n_states = n_states
        ctx.inner = (leaves, outputs)
        ctx.save_for_backward(x, *states_and_weights)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        leaves, outputs = ctx.inner
        wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
        grad_outputs = [torch.zeros_like(o) if g is None else g for g, o in zip(grad_outputs, outputs)]
        if torch.is_grad_enabled():  # create_graph: gradients that are differentiable themselves
            saved, n = ctx.saved_tensors, ctx.n_states
            with torch.enable_grad():
                outputs = ctx.module._forward_on("reference", saved[0], saved[1:1 + n], ctx.batch_sizes,
                                                 weights=saved[1 + n:])
            inputs = [saved[i] for i in wanted]
            grads = torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=True, allow_unused=True)
        else:  # the kernel's own backward; kept for a second backward of the outer graph (retain_graph)
            grads = torch.autograd.grad(outputs, [leaves[i] for i in wanted], grad_outputs, retain_graph=True,
                                        allow_unused=True)
        result = [None] * len(leaves)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, result[0], None, None, None, *result[1:])


def _vf_rnn(cell, x, states, weights, batch_sizes, has_biases, num_layers, dropout, train, bidirectional):
    """``torch._VF.lstm`` (``cell`` "lstm", states (h0, c0)) or ``torch._VF.gru`` ("gru", states (h0,)) in
    its padded or its packed form (nn's own call)."""
    args = (weights, has_biases, num_layers, dropout, train, bidirectional)
    kernel, hx = (torch._VF.lstm, tuple(states)) if cell == LSTM else (torch._VF.gru, states[0])
    if batch_sizes is None:
        return kernel(x, hx, *args, False)
    return kernel(x, batch_sizes, hx, *args)


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
    """torch's LSTM kernel as one graph node: the arguments and results of :func:`run_native`."""
    with torch.no_grad():
        return _vf_rnn(LSTM, x, (h0, c0), weights, batch_sizes, has_biases, num_layers, dropout, train, bidirectional)


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
        outputs = _vf_rnn(LSTM, leaves[0], leaves[1:3], leaves[3:], batch_sizes, has_biases, num_layers, dropout,
                          train, bidirectional)
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
