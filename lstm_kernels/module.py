"""``FusedLSTM``: a drop-in ``torch.nn.LSTM`` whose recurrence runs on a fused backend.

Parameters have nn.LSTM's names, shapes, registration order and
initialisation, so state dicts load in both directions. ``forward`` accepts
what ``nn.LSTM.forward`` accepts (batched or unbatched tensors, batch_first,
``hx=None`` or ``(h0, c0)``, PackedSequence) and returns the same structure.

Per layer and direction the data path is: one GEMM for the input projection
of all steps, then :class:`~lstm_kernels.function.LSTMLayer` for the
recurrence. Reversed directions reverse each sequence within its own length.
On the CPU, ``backend="auto"`` runs torch's own LSTM kernel for the whole
module instead (:mod:`lstm_kernels.backends.native` says when and why).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import validation
from . import autotune
from .autotune import NATIVE, PathChoice
from .backends import RecurrenceCall, backend_from_env, check_backend_name, resolve_backend, serving_kernels
from .function import lstm_layer
from .backends import native
from .backends.native import exporting, native_path_reason, run_native
from .recompute import check_recompute, recompute_layer
from .onnx_export import exporting_to_onnx, onnx_lstm, packed_input_error, resets_export_error
from .sequences import pack_time_major, reverse_resets, reverse_time_major, unpack_to_time_major


class FusedLSTM(nn.Module):
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
        super().__init__()
        validation.check_constructor_args(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size)
        self.recompute = check_recompute(recompute)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = check_backend_name(backend)

        factory = {"device": device, "dtype": dtype}
        gate_size = 4 * hidden_size
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(self.num_directions):
                layer_input = input_size if layer == 0 else real_hidden * self.num_directions
                shapes = [("weight_ih", (gate_size, layer_input)), ("weight_hh", (gate_size, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                suffix = "_reverse" if direction == 1 else ""
                names = []
                for stem, shape in shapes:
                    name = f"{stem}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.flatten_parameters()
        self.reset_parameters()

    # ---- nn.LSTM compatibility -------------------------------------------------

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _dropout_active(self) -> bool:
        """Dropout between layers applies to this call (nn.LSTM: dropout > 0 in training mode)."""
        return self.dropout > 0 and self.training and self.num_layers > 1

    def _layer_params(self, k: int, weights: Optional[list] = None) -> dict:
        """Layer-direction ``k``'s parameters by stem: weight_ih, weight_hh (bias_ih, bias_hh, weight_hr);
        taken from ``weights`` (in ``_flat_weights`` order) where given, else the module's own."""
        names = self._all_weights[k]
        if weights is None:
            tensors = self.all_weights[k]
        else:
            start = sum(len(n) for n in self._all_weights[:k])
            tensors = weights[start:start + len(names)]
        return dict(zip((n.split("_l")[0] for n in names), tensors))

    def _param(self, name: str) -> torch.Tensor:
        """Parameter ``name`` as nn.LSTM sees it: from ``_parameters`` directly (nn.Module.__getattr__
        costs a few µs per call), else by getattr (a reparametrized weight, e.g. weight_norm,
        leaves ``_parameters`` and is computed on access)."""
        param = self._parameters.get(name)
        return param if param is not None else getattr(self, name)

    @property
    def _flat_weights(self) -> list[torch.Tensor]:
        return [self._param(name) for name in self._flat_weights_names]

    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "FusedLSTM cannot be compiled by torch.jit.script. For a graph of the model use "
            "torch.export.export(model, (x,)) (or torch.compile); for ONNX, torch.onnx.export(model, (x,))")

    def flatten_parameters(self) -> None:
        """As nn.LSTM's: on CUDA with cuDNN, the parameters become views of one contiguous buffer, so
        that torch's own kernel (lstm_kernels.backends.native, a candidate there) need not copy them on every
        call; the fused kernels read each parameter as before. Elsewhere, and where a parameter is
        reparametrized or shared, it does nothing (nn.LSTM's conditions)."""
        weights = self._flat_weights
        if not all(name in self._parameters for name in self._flat_weights_names):
            return
        first = weights[0]
        if not all(w.dtype == first.dtype and w.is_cuda and torch.backends.cudnn.is_acceptable(w) for w in weights):
            return
        if len({w.data_ptr() for w in weights}) != len(weights):
            return
        from torch.backends.cudnn import rnn as cudnn_rnn

        with torch.cuda.device_of(first), torch.no_grad():
            if torch._use_cudnn_rnn_flatten_weight():
                per_layer = (4 if self.bias else 2) + (1 if self.proj_size > 0 else 0)
                torch._cudnn_rnn_flatten_weight(
                    weights, per_layer, self.input_size, cudnn_rnn.get_cudnn_mode("LSTM"), self.hidden_size,
                    self.proj_size, self.num_layers, self.batch_first, bool(self.bidirectional))

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (``.to``, ``.cuda``, ``.half``, ...), then :meth:`flatten_parameters`, as nn.LSTM does."""
        result = super()._apply(fn, recurse)
        self.flatten_parameters()
        return result

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.recompute is not False:
            s += f", recompute={self.recompute!r}"
        return s

    @classmethod
    def from_torch(cls, lstm: nn.LSTM, backend: str = "auto") -> "FusedLSTM":
        """A FusedLSTM with the configuration and a copy of the weights of ``lstm``."""
        weight = lstm.weight_ih_l0
        fused = cls(**_config_of(lstm), device=weight.device, dtype=weight.dtype, backend=backend)
        fused.load_state_dict(lstm.state_dict())
        fused.train(lstm.training)
        return fused

    def to_torch(self) -> nn.LSTM:
        """An ``nn.LSTM`` with this module's configuration and a copy of its weights."""
        weight = self.weight_ih_l0
        lstm = nn.LSTM(**_config_of(self), device=weight.device, dtype=weight.dtype)
        lstm.load_state_dict(self.state_dict())
        lstm.train(self.training)
        return lstm

    def path_for(self, input, explain: bool = False):
        """What ``forward(input)`` runs: ``"native"`` (torch's own LSTM kernel for the whole module,
        see :mod:`lstm_kernels.backends.native`) or the name of the backend that serves every layer's
        recurrence. With ``explain``, a :class:`~lstm_kernels.autotune.PathChoice` (path, reason).
        On a GPU this may measure the candidates, as the first ``forward`` of the shape would."""
        if isinstance(input, PackedSequence):
            x, batch_sizes = input.data, input.batch_sizes
        else:
            x, batch_sizes = input, None
            if x.dim() == 2:
                x = x.unsqueeze(0 if self.batch_first else 1)
            if self.batch_first:
                x = x.transpose(0, 1)
        choice = self._choose_path(x, None, batch_sizes)
        return choice if explain else choice.path

    # ---- forward -----------------------------------------------------------------

    def _choose_path(self, x, hx, batch_sizes, resets=None) -> PathChoice:
        """The path of a call: torch's kernel for the whole module ("native") or one backend for every
        layer, and why. x is time-major [T, B, I] or a PackedSequence's data (with ``batch_sizes``);
        ``hx`` (or None: zeros) is what a measurement runs the candidates on; ``resets`` [T, B] or None."""
        why_not_native = self._native_path_reason(x, resets)
        if why_not_native is None and (native.taken_outright(x) or exporting()):
            return PathChoice(NATIVE, "torch's own LSTM kernel, nn.LSTM's, taken outright where no fused kernel "
                                      "runs (lstm_kernels.backends.native)" if not exporting()
                              else "an exported program holds the module as one op")
        if torch.compiler.is_compiling():
            from . import ops  # noqa: F401  (fills the backend registry: dynamo runs an import statement natively)

            if batch_sizes is not None:
                # A packed batch is data-dependent while dynamo traces: each layer's dispatch decides.
                return PathChoice(self.backend, "each layer's dispatch decides while torch.compile traces a packed input")
        call = self._recurrence_call(x, batch_sizes, resets)
        requested = backend_from_env(self.backend) if self.backend == "auto" else self.backend
        if requested != "auto" or call.batch == 0:
            chosen = resolve_backend(requested, call).name
            return PathChoice(chosen, f"backend {requested!r} is named" if requested != "auto" else "an empty batch")
        candidates = serving_kernels(call) + ([NATIVE] if why_not_native is None else [])
        if not candidates:
            chosen = resolve_backend("auto", call).name
            return PathChoice(chosen, f"no fused kernel serves this call, and torch's kernel is not taken: "
                                      f"{why_not_native}")
        if len(candidates) == 1:
            return PathChoice(candidates[0], "the only fast path that serves this call")
        if not autotune.enabled():
            return PathChoice(candidates[0], f"the first that serves, in the fixed order ({autotune.AUTOTUNE_ENV}=0)")
        key = self._bucket_fields(x, call, candidates)
        return autotune.choose(key, candidates, lambda path: self._timed_run(path, x, hx, batch_sizes, resets, call),
                               x.device)

    def _recurrence_call(self, x, batch_sizes, resets=None) -> RecurrenceCall:
        """The first layer's recurrence call for ``x`` (time-major, or packed data with ``batch_sizes``)."""
        packed = batch_sizes is not None
        steps, batch = (len(batch_sizes), int(batch_sizes[0])) if packed else (x.shape[0], x.shape[1])
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._flat_weights))
        return RecurrenceCall(
            seq_len=steps, batch=batch, hidden_size=self.hidden_size, state_size=self.proj_size or self.hidden_size,
            dtype=_autocast_dtype(x) or x.dtype, device=x.device, has_projection=self.proj_size > 0,
            variable_lengths=packed, needs_grad=needs_grad, has_resets=resets is not None)

    def _bucket_fields(self, x, call: RecurrenceCall, candidates) -> tuple:
        """The measured choice's bucket (lstm_kernels.autotune), as constants. While torch.compile
        traces, the batch may be symbolic: the bucket is then -1 (autotune.known_path: any batch)."""
        device = x.device
        tf32 = call.dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        cast = _autocast_dtype(x)
        sizes = (self.input_size, self.hidden_size, self.proj_size, self.num_layers, self.num_directions, self.bias)
        return (autotune.device_name(device), str(call.dtype), tf32, None if cast is None else str(cast), sizes,
                call.variable_lengths, call.has_resets, call.needs_grad,
                -1 if torch.compiler.is_compiling() else autotune.batch_bucket(call.batch), tuple(candidates))

    def _timed_run(self, path: str, x, hx, batch_sizes, resets, call: RecurrenceCall):
        """A function that runs this call's first steps once on ``path``: forward, and where the call
        needs gradients forward and backward to the parameters (``autograd.grad``: no ``.grad`` changes)."""
        steps = min(call.seq_len, autotune.TIMED_STEPS)
        if resets is not None:
            resets = resets[:steps]
        if batch_sizes is None:
            x = x[:steps].detach()
        else:
            batch_sizes = batch_sizes[:steps]
            x = x[:int(batch_sizes.sum())].detach()
        if hx is None:
            h_shape, c_shape = self._expected_state_shapes(call.batch)
            hx = (x.new_zeros(h_shape), x.new_zeros(c_shape))
        hx = tuple(s.detach() for s in hx)
        params = [p for p in self._flat_weights if p.requires_grad]

        def forward():
            with torch.no_grad():
                self._forward_on(path, x, hx, batch_sizes, resets)

        def forward_backward():
            output, h_n, c_n = self._forward_on(path, x, hx, batch_sizes, resets)
            loss = output.float().sum() + h_n.float().sum() + c_n.float().sum()
            torch.autograd.grad(loss, params, allow_unused=True)

        return forward_backward if call.needs_grad and params else forward

    def _forward_on(self, path: str, x, hx, batch_sizes, resets=None, weights: Optional[list] = None):
        """(output, h_n, c_n) of ``x`` (time-major, or packed data with ``batch_sizes``) on ``path``;
        ``weights`` (``_flat_weights`` order) replace the parameters on a backend's path."""
        if path == NATIVE:
            return run_native(self, x, hx, batch_sizes)
        if batch_sizes is not None:
            x = unpack_to_time_major(x, batch_sizes)
        output, h_n, c_n = self._run_layers(x, hx, batch_sizes, backend=path, weights=weights, resets=resets)
        return (output if batch_sizes is None else pack_time_major(output, batch_sizes)), h_n, c_n

    def _native_path_reason(self, x, resets=None) -> Optional[str]:
        """None when ``x`` runs through torch's own LSTM kernel for the whole module (lstm_kernels.backends.native)."""
        if resets is not None:
            return "resets inside the sequence (torch's kernel has none)"
        if self.recompute is not False and not exporting():
            return "recompute is asked for (the per-layer path keeps state checkpoints only)"
        return native_path_reason(self.backend, x, self._dropout_active)

    def _expected_state_shapes(self, batch: int) -> tuple[tuple, tuple]:
        layers = self.num_layers * self.num_directions
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (layers, batch, real_hidden), (layers, batch, self.hidden_size)

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

        h_shape, c_shape = self._expected_state_shapes(batch)
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
            output, h_n, c_n = onnx_lstm(self, x, hx, batch_sizes)
        else:
            path = self._choose_path(x, hx, batch_sizes, resets).path
            output, h_n, c_n = self._forward_on(path, x, hx, batch_sizes, resets)

        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
            return output, (h_n, c_n)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _run_layers(self, x, hx, batch_sizes, backend: Optional[str] = None, weights: Optional[list] = None,
                    resets=None):
        """All layers and directions over time-major ``x`` [T, B, I]; states [L*D, B, *].
        ``backend`` (default: the module's) serves every layer; ``weights`` replace the parameters;
        ``resets`` [T, B] bool or None, as forward takes them (time-major)."""
        h0_all, c0_all = hx
        cast = _autocast_dtype(x)
        if cast is not None:  # like nn.LSTM under autocast: everything in the autocast dtype
            x, h0_all, c0_all = x.to(cast), h0_all.to(cast), c0_all.to(cast)
        lengths = None if batch_sizes is None else _lengths_of(batch_sizes, x.shape[1])
        h_n, c_n = [], []
        layer_input = x
        direction_resets = (resets, None if resets is None or self.num_directions == 1 else reverse_resets(resets))
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                params = self._layer_params(k, weights)
                if cast is not None:
                    params = {name: p.to(cast) for name, p in params.items()}
                seq = layer_input if direction == 0 else reverse_time_major(layer_input, lengths)
                xg = F.linear(seq, params["weight_ih"], _combined_bias(params))
                layer_args = (xg, params["weight_hh"], h0_all[k], c0_all[k], params.get("weight_hr"), batch_sizes,
                              backend or self.backend)
                if self.recompute is False:
                    h_all, h_T, c_T = lstm_layer(*layer_args, resets=direction_resets[direction])
                else:
                    h_all, h_T, c_T = recompute_layer(*layer_args, segment=self.recompute,
                                                      resets=direction_resets[direction])
                outputs.append(h_all if direction == 0 else reverse_time_major(h_all, lengths))
                h_n.append(h_T)
                c_n.append(c_T)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, torch.stack(h_n), torch.stack(c_n)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast asks for on ``x``'s device, or None (off, or float64 input, which autocast leaves)."""
    device_type = x.device.type
    # is_autocast_available guards device types without autocast (meta); dynamo before torch 2.13
    # cannot trace it, and a traced call is on a device with autocast.
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
    if not available or not torch.is_autocast_enabled(device_type):
        return None
    if x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device_type)


def _combined_bias(params: dict) -> Optional[torch.Tensor]:
    if "bias_ih" not in params:
        return None
    return params["bias_ih"] + params["bias_hh"]


def _lengths_of(batch_sizes: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sequence lengths [B] (sorted order) from PackedSequence batch sizes."""
    rows = torch.arange(batch)
    return (batch_sizes.unsqueeze(1) > rows.unsqueeze(0)).sum(0)


def _config_of(lstm) -> dict:
    """The constructor arguments shared by nn.LSTM and FusedLSTM."""
    return dict(
        input_size=lstm.input_size,
        hidden_size=lstm.hidden_size,
        num_layers=lstm.num_layers,
        bias=lstm.bias,
        batch_first=lstm.batch_first,
        dropout=lstm.dropout,
        bidirectional=lstm.bidirectional,
        proj_size=lstm.proj_size,
    )
