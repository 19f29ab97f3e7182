"""``FusedLSTM``: a drop-in ``torch.nn.LSTM`` whose recurrence runs on a fused backend.

Parameters have nn.LSTM's names, shapes, registration order and
initialisation, so state dicts load in both directions. ``forward`` accepts
what ``nn.LSTM.forward`` accepts (batched or unbatched tensors, batch_first,
``hx=None`` or ``(h0, c0)``, PackedSequence) and returns the same structure.

Per layer and direction the data path is: one GEMM for the input projection
of all steps, then :class:`~lstm_kernels.function.LSTMLayer` for the
recurrence. Reversed directions reverse each sequence within its own length.
On the CPU, ``backend="auto"`` runs torch's own LSTM kernel for the whole
module instead (:mod:`lstm_kernels.backends.native` says when and why). What FusedLSTM shares
with FusedGRU is in :mod:`lstm_kernels.recurrent_module`.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from . import validation
from .cells import LSTM
from .function import lstm_layer
from .recompute import recompute_layer
from .onnx_export import exporting_to_onnx, onnx_recurrence, packed_input_error, resets_export_error
from .recurrent_module import RecurrentModule


class FusedLSTM(RecurrentModule):
    """Applies a multi-layer LSTM to an input sequence, like ``torch.nn.LSTM``.

    Args: those of ``torch.nn.LSTM`` (input_size, hidden_size, num_layers=1,
    bias=True, batch_first=False, dropout=0.0, bidirectional=False,
    proj_size=0, device=None, dtype=None), plus ``backend``: ``"auto"``
    (default; the environment variable ``LSTM_KERNELS_BACKEND`` can override
    it) or a backend name from :func:`lstm_kernels.available_backends`, and
    ``recompute``: False (default), True, or a segment length in steps: keep only
    checkpoints of the state for the backward and recompute each segment's gate
    activations there (:mod:`lstm_kernels.recompute`), for memory.

    Shapes, with D = 2 if bidirectional else 1 and P = proj_size or hidden_size:
    input [T, B, input_size] ([B, T, input_size] if batch_first, [T, input_size]
    unbatched, or a PackedSequence); h_0 [num_layers*D, B, P]; c_0
    [num_layers*D, B, hidden_size]. Returns (output [T, B, D*P], (h_n, c_n)).
    """

    cell = LSTM

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        backend: str = "auto",
        recompute=False,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
                         device, dtype, backend, recompute)

    def forward(self, input, hx=None, resets=None):
        """Runs the LSTM over ``input``, like ``nn.LSTM.forward``.

        Args:
            input: [T, B, input_size] ([B, T, input_size] with batch_first), unbatched
                [T, input_size], or a PackedSequence (sorted or not).
            hx: None (zeros) or a tuple (h_0, c_0): h_0 [num_layers * D, B, P], c_0
                [num_layers * D, B, hidden_size] (without the B axis for unbatched input),
                D = 2 if bidirectional else 1, P = proj_size or hidden_size.
            resets: None, or a bool tensor [B, T] with batch_first, else [T, B] ([T] unbatched),
                on the input's device: where True, that row's state restarts at step t, as if the
                sequence were cut between t - 1 and t and each piece run on its own from zero
                states (the first piece from ``hx``). In every layer; no value or gradient crosses
                a cut. A reversed direction starts from its ``hx`` at the end and from zeros after
                each cut it crosses. Not with a PackedSequence (ValueError).

        Returns:
            (output, (h_n, c_n)): output [T, B, D * P] ([B, T, D * P] with batch_first,
            [T, D * P] unbatched, or a PackedSequence); h_n and c_n shaped as h_0 and c_0,
            the states after each sequence's last valid step.

        Raises what nn.LSTM raises for the same bad input (the same exception types).
        """
        states = None
        packed = isinstance(input, PackedSequence)
        weight = self._param("weight_ih_l0")
        if packed:
            if resets is not None:
                validation.check_resets(resets, input.data, self.batch_first, True, packed=True)
            if exporting_to_onnx():
                raise packed_input_error()
            data, batch_sizes, sorted_indices, unsorted_indices = input
            validation.check_input(data, weight, self.input_size, packed=True)
            x = data
            batch = int(batch_sizes[0])
            if hx is not None:
                if sorted_indices is None:  # nn.LSTM hands hx straight to its kernel, which checks it first
                    validation.check_hx_container(hx)
                states = validation.split_hx(hx)
                if sorted_indices is not None:
                    states = tuple(s.index_select(1, sorted_indices) for s in states)
                validation.check_packed_state_rank(states)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            states = validation.split_hx(hx)
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
                if states is not None:
                    validation.check_unbatched_hx(states, is_batched=False)
                    states = (states[0].unsqueeze(1), states[1].unsqueeze(1))
            elif states is not None:
                validation.check_unbatched_hx(states, is_batched=True)
            validation.check_input(input, weight, self.input_size, packed=False)
            if resets is not None:
                resets = validation.check_resets(resets, input, self.batch_first, is_batched, packed=False)
            x = input.transpose(0, 1) if self.batch_first else input
            validation.check_sequence_length(x)
            batch_sizes = None
            batch = x.shape[1]

        h_shape, c_shape = self._state_shapes(batch)
        if states is None:
            zeros = {"dtype": x.dtype, "device": x.device}
            states = (torch.zeros(h_shape, **zeros), torch.zeros(c_shape, **zeros))
        else:
            validation.check_hidden(states, h_shape, c_shape, x)
            if not packed and is_batched:  # what nn.LSTM's kernel call refuses; an unbatched hx was
                validation.check_hx_container(hx)  # rebuilt into a pair, a packed one checked above
        hx = states

        if exporting_to_onnx():
            if resets is not None:
                raise resets_export_error()
            output, *finals = onnx_recurrence(self, x, hx, batch_sizes)
        else:
            output, *finals = self._run(x, hx, batch_sizes, resets)
        return self._in_input_layout(output, tuple(finals), input if packed else None, packed or is_batched)

    def _layer(self, params: dict, seq, states: tuple, batch_sizes, backend: str, resets):
        """One layer and direction: xg = seq @ W_ihᵀ + (b_ih + b_hh) in one GEMM, then its recurrence
        (:func:`lstm_layer`, or :func:`recompute_layer` in recompute mode). -> (h_all, (h_T, c_T))."""
        bias = None if "bias_ih" not in params else params["bias_ih"] + params["bias_hh"]
        xg = F.linear(seq, params["weight_ih"], bias)
        layer_args = (xg, params["weight_hh"], *states, params.get("weight_hr"), batch_sizes, backend)
        if self.recompute is False:
            h_all, h_T, c_T = lstm_layer(*layer_args, resets=resets)
        else:
            h_all, h_T, c_T = recompute_layer(*layer_args, segment=self.recompute, resets=resets)
        return h_all, (h_T, c_T)
