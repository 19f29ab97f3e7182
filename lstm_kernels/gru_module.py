"""``FusedGRU``: a drop-in ``torch.nn.GRU`` on the same machinery as FusedLSTM.

Parameters have nn.GRU's names, shapes, registration order and initialisation, so state dicts load
in both directions; ``forward`` accepts what ``nn.GRU.forward`` accepts (batched or unbatched
tensors, batch_first, ``hx=None`` or h_0, PackedSequence sorted or not) and returns
``(output, h_n)``. The equations are nn.GRU's, gates r, z, n in that order:

    r = σ(W_ir x + b_ir + W_hr h + b_hr)        z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 − z) ⊙ n + z ⊙ h

Per layer and direction: one GEMM for the input projection of all steps, xg = x W_ihᵀ + b_ih +
[b_hr, b_hz, 0] (the recurrent biases of r and z fold in; b_hn cannot, since r scales it), then
:func:`~lstm_kernels.function.gru_layer`. On the CPU ``backend="auto"`` runs torch's own GRU
kernel for the whole module (:mod:`lstm_kernels.backends.native`); on CUDA, where no fused kernel
of this package serves the GRU yet, torch's kernel (cuDNN) is the path ``auto`` takes. The
``reference`` backend serves every call, float64 and double backward included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from . import validation
from .cells import GRU
from .function import gru_layer
from .onnx_export import exporting_to_onnx, onnx_recurrence, packed_input_error, resets_export_error
from .recurrent_module import RecurrentModule


class FusedGRU(RecurrentModule):
    """Applies a multi-layer GRU to an input sequence, like ``torch.nn.GRU``.

    Args: those of ``torch.nn.GRU`` (input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None), plus
    ``backend``: ``"auto"`` (default; ``LSTM_KERNELS_BACKEND`` can override it) or a backend name
    from :func:`lstm_kernels.available_backends` that serves the GRU.

    Shapes, with D = 2 if bidirectional else 1: input [T, B, input_size] ([B, T, input_size] if
    batch_first, [T, input_size] unbatched, or a PackedSequence); h_0 [num_layers*D, B, hidden_size]
    ([num_layers*D, hidden_size] unbatched). Returns (output [T, B, D*hidden_size], h_n).
    """

    cell = GRU

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
                         device, dtype, backend, recompute=False)

    def forward(self, input, hx=None, resets=None):
        """Runs the GRU over ``input``, like ``nn.GRU.forward``.

        Args:
            input: [T, B, input_size] ([B, T, input_size] with batch_first), unbatched
                [T, input_size], or a PackedSequence (sorted or not).
            hx: None (zeros) or h_0 [num_layers * D, B, hidden_size] ([num_layers * D, hidden_size]
                for unbatched input).
            resets: as :meth:`FusedLSTM.forward <lstm_kernels.FusedLSTM.forward>`: None, or a bool
                tensor [B, T] with batch_first, else [T, B] ([T] unbatched): where True, that row's
                state restarts from zero at step t. Not with a PackedSequence (ValueError).

        Returns:
            (output, h_n): output [T, B, D * hidden_size] ([B, T, ...] with batch_first, [T, ...]
            unbatched, or a PackedSequence); h_n shaped as h_0, the state after each sequence's
            last valid step.

        Raises what nn.GRU raises for the same bad input (the same exception types).
        """
        packed = isinstance(input, PackedSequence)
        if packed and exporting_to_onnx():
            raise packed_input_error(GRU)
        weight = self._param("weight_ih_l0")
        is_batched = True
        if packed:
            if resets is not None:
                validation.check_resets(resets, input.data, self.batch_first, True, packed=True)
            x, batch_sizes, sorted_indices, _ = input
            if hx is not None and sorted_indices is not None:
                hx = hx.index_select(1, sorted_indices)
            batch = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            x = input.transpose(0, 1) if self.batch_first else input
            batch_sizes, batch = None, x.shape[1]
        validation.check_input(x, weight, self.input_size, packed=packed)
        if not packed:
            if resets is not None:
                resets = validation.check_resets(resets, input, self.batch_first, is_batched, packed=False)
            validation.check_sequence_length(x)
        (h_shape,) = self._state_shapes(batch)
        if hx is None:
            hx = torch.zeros(h_shape, dtype=x.dtype, device=x.device)
        else:
            validation.check_gru_hidden(hx, h_shape, x)
        if exporting_to_onnx():
            if resets is not None:
                raise resets_export_error(GRU)
            output, h_n = onnx_recurrence(self, x, (hx,), batch_sizes)
        else:
            output, h_n = self._run(x, (hx,), batch_sizes, resets)
        output, (h_n,) = self._in_input_layout(output, (h_n,), input if packed else None, is_batched)
        return output, h_n

    def _layer(self, params: dict, seq, states: tuple, batch_sizes, backend: str, resets):
        """One layer and direction: xg = seq @ W_ihᵀ + b_ih + [b_hr, b_hz, 0] in one GEMM, then
        :func:`gru_layer` with b_hn. -> (h_all, (h_T,))."""
        bias, b_hn = None, None
        if "bias_ih" in params:
            b_hh = params["bias_hh"]
            b_hn = b_hh[2 * self.hidden_size:]
            bias = params["bias_ih"] + F.pad(b_hh[:2 * self.hidden_size], (0, self.hidden_size))
        xg = F.linear(seq, params["weight_ih"], bias)
        h_all, h_T = gru_layer(xg, params["weight_hh"], states[0], b_hn, batch_sizes, backend, resets)
        return h_all, (h_T,)
