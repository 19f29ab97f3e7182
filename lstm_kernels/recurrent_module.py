"""``RecurrentModule``: what FusedLSTM and FusedGRU share, with the cell as the parameter.

Both are drop-ins for their ``torch.nn`` module: parameters with nn's names, shapes, registration
order and initialisation; the path of a call (torch's own kernel for the whole module, or one
backend for every layer's recurrence, :mod:`lstm_kernels.autotune`); layers, directions, packing
and dropout. A subclass names its ``cell`` (lstm_kernels/cells.py) and supplies what differs:
the shapes of its states, one layer's recurrence (:meth:`_layer`) and ``forward``'s argument
handling, which follows its nn module's.

Internally the states of a call are a tuple, time-major: (h,) for the GRU, (h, c) for the LSTM,
each [num_layers * D, B, *]; :meth:`_forward_on` returns (output, *final states).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import autotune
from .autotune import NATIVE, PathChoice
from .backends import RecurrenceCall, backend_from_env, check_backend_name, resolve_backend, serving_kernels
from .backends import native
from .backends.native import exporting, native_path_reason, run_native
from .cells import HAS_CELL_STATE, LSTM, TORCH_NAME, gates
from .recompute import check_recompute
from .sequences import pack_time_major, reverse_resets, reverse_time_major, unpack_to_time_major
from . import validation


class RecurrentModule(nn.Module):
    """The machinery of a multi-layer recurrent module whose recurrence runs on a fused backend."""

    #: The recurrent cell, "lstm" or "gru" (lstm_kernels/cells.py).
    cell: str = LSTM

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bias: bool, batch_first: bool,
                 dropout: float, bidirectional: bool, proj_size: int, device, dtype, backend: str,
                 recompute) -> None:
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
        gate_size = gates(self.cell) * hidden_size
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

    # ---- the nn module's face ----------------------------------------------------------

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _dropout_active(self) -> bool:
        """Dropout between layers applies to this call (nn's: dropout > 0 in training mode)."""
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
        """Parameter ``name`` as the nn module sees it: from ``_parameters`` directly (nn.Module.__getattr__
        costs a few µs per call), else by getattr (a reparametrized weight, e.g. weight_norm,
        leaves ``_parameters`` and is computed on access)."""
        param = self._parameters.get(name)
        return param if param is not None else getattr(self, name)

    @property
    def _flat_weights(self) -> list[torch.Tensor]:
        return [self._param(name) for name in self._flat_weights_names]

    def reset_parameters(self) -> None:
        """nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script. For a graph of the model use "
            "torch.export.export(model, (x,)) (or torch.compile); for ONNX, torch.onnx.export(model, (x,))")

    def flatten_parameters(self) -> None:
        """As nn's: on CUDA with cuDNN, the parameters become views of one contiguous buffer, so
        that torch's own kernel (lstm_kernels.backends.native, a candidate there) need not copy them on every
        call; the fused kernels read each parameter as before. Elsewhere, and where a parameter is
        reparametrized or shared, it does nothing (nn's conditions)."""
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
                    weights, per_layer, self.input_size, cudnn_rnn.get_cudnn_mode(TORCH_NAME[self.cell]),
                    self.hidden_size, self.proj_size, self.num_layers, self.batch_first, bool(self.bidirectional))

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (``.to``, ``.cuda``, ``.half``, ...), then :meth:`flatten_parameters`, as nn's does."""
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
    def from_torch(cls, rnn: nn.Module, backend: str = "auto"):
        """A module of this class (FusedLSTM, FusedGRU) with the configuration and a copy of the
        weights of ``rnn`` (its nn module: nn.LSTM, nn.GRU)."""
        weight = rnn.weight_ih_l0
        fused = cls(**config_of(rnn, cls.cell), device=weight.device, dtype=weight.dtype, backend=backend)
        fused.load_state_dict(rnn.state_dict())
        fused.train(rnn.training)
        return fused

    def to_torch(self) -> nn.Module:
        """This module's nn module (nn.LSTM, nn.GRU) with its configuration and a copy of its weights."""
        weight = self.weight_ih_l0
        rnn = getattr(nn, TORCH_NAME[self.cell])(**config_of(self, self.cell), device=weight.device,
                                                 dtype=weight.dtype)
        rnn.load_state_dict(self.state_dict())
        rnn.train(self.training)
        return rnn

    def path_for(self, input, explain: bool = False):
        """What ``forward(input)`` runs: ``"native"`` (torch's own kernel for the whole module,
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

    # ---- the path of a call --------------------------------------------------------------

    def _choose_path(self, x, hx, batch_sizes, resets=None) -> PathChoice:
        """The path of a call: torch's kernel for the whole module ("native") or one backend for every
        layer, and why. x is time-major [T, B, I] or a PackedSequence's data (with ``batch_sizes``);
        ``hx`` (the states tuple, or None: zeros) is what a measurement runs the candidates on;
        ``resets`` [T, B] or None."""
        why_not_native = self._native_path_reason(x, resets)
        if why_not_native is None and (native.taken_outright(x) or exporting()):
            return PathChoice(NATIVE, f"torch's own {TORCH_NAME[self.cell]} kernel, nn's, taken outright where no "
                                      "fused kernel runs (lstm_kernels.backends.native)" if not exporting()
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
            dtype=autocast_dtype(x) or x.dtype, device=x.device, has_projection=self.proj_size > 0,
            variable_lengths=packed, needs_grad=needs_grad, has_resets=resets is not None, cell=self.cell)

    def _bucket_fields(self, x, call: RecurrenceCall, candidates) -> tuple:
        """The measured choice's bucket (lstm_kernels.autotune), as constants. While torch.compile
        traces, the batch may be symbolic: the bucket is then -1 (autotune.known_path: any batch)."""
        device = x.device
        tf32 = call.dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        cast = autocast_dtype(x)
        sizes = (self.input_size, self.hidden_size, self.proj_size, self.num_layers, self.num_directions, self.bias)
        if self.cell != LSTM:
            sizes += (self.cell,)
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
            hx = tuple(x.new_zeros(shape) for shape in self._state_shapes(call.batch))
        hx = tuple(s.detach() for s in hx)
        params = [p for p in self._flat_weights if p.requires_grad]

        def forward():
            with torch.no_grad():
                self._forward_on(path, x, hx, batch_sizes, resets)

        def forward_backward():
            loss = sum(t.float().sum() for t in self._forward_on(path, x, hx, batch_sizes, resets))
            torch.autograd.grad(loss, params, allow_unused=True)

        return forward_backward if call.needs_grad and params else forward

    def _forward_on(self, path: str, x, hx, batch_sizes, resets=None, weights: Optional[list] = None):
        """(output, *final states) of ``x`` (time-major, or packed data with ``batch_sizes``) on ``path``;
        ``hx`` the states tuple; ``weights`` (``_flat_weights`` order) replace the parameters on a
        backend's path."""
        if path == NATIVE:
            return run_native(self, x, hx, batch_sizes)
        if batch_sizes is not None:
            x = unpack_to_time_major(x, batch_sizes)
        output, *finals = self._run_layers(x, hx, batch_sizes, backend=path, weights=weights, resets=resets)
        return ((output if batch_sizes is None else pack_time_major(output, batch_sizes)), *finals)

    def _native_path_reason(self, x, resets=None) -> Optional[str]:
        """None when ``x`` runs through torch's own kernel for the whole module (lstm_kernels.backends.native)."""
        if resets is not None:
            return "resets inside the sequence (torch's kernel has none)"
        if self.recompute is not False and not exporting():
            return "recompute is asked for (the per-layer path keeps state checkpoints only)"
        return native_path_reason(self.backend, x, self._dropout_active)

    def _state_shapes(self, batch: int) -> tuple:
        """The shapes of the states tuple for a batch of ``batch``: h's [L*D, B, P], and the LSTM's c [L*D, B, H]."""
        layers = self.num_layers * self.num_directions
        h_shape = (layers, batch, self.proj_size or self.hidden_size)
        return (h_shape, (layers, batch, self.hidden_size)) if HAS_CELL_STATE[self.cell] else (h_shape,)

    # ---- the per-layer path ---------------------------------------------------------------

    def _run_layers(self, x, hx, batch_sizes, backend: Optional[str] = None, weights: Optional[list] = None,
                    resets=None):
        """All layers and directions over time-major ``x`` [T, B, I]; ``hx`` the states tuple, each
        [L*D, B, *]. ``backend`` (default: the module's) serves every layer; ``weights`` replace the
        parameters; ``resets`` [T, B] bool or None (time-major). Returns (output, *final states)."""
        cast = autocast_dtype(x)
        if cast is not None:  # like nn under autocast: everything in the autocast dtype
            x, hx = x.to(cast), tuple(s.to(cast) for s in hx)
        lengths = None if batch_sizes is None else _lengths_of(batch_sizes, x.shape[1])
        finals = [[] for _ in hx]
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
                h_all, layer_finals = self._layer(params, seq, tuple(s[k] for s in hx), batch_sizes,
                                                  backend or self.backend, direction_resets[direction])
                outputs.append(h_all if direction == 0 else reverse_time_major(h_all, lengths))
                for kept, final in zip(finals, layer_finals):
                    kept.append(final)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return (layer_input, *(torch.stack(kept) for kept in finals))

    def _layer(self, params: dict, seq, states: tuple, batch_sizes, backend: str, resets):
        """One layer and direction over time-major ``seq``: (h_all [T, B, P], final states tuple)."""
        raise NotImplementedError

    # ---- forward's layouts -----------------------------------------------------------------

    def _run(self, x, states: tuple, batch_sizes, resets):
        """(output, *final states) of a time-major or packed call, on the path chosen for it."""
        path = self._choose_path(x, states, batch_sizes, resets).path
        return self._forward_on(path, x, states, batch_sizes, resets)

    def _in_input_layout(self, output, finals: tuple, packed_input, is_batched: bool):
        """(output, finals) of :meth:`_run` in the layout of the call's input: ``packed_input`` the
        PackedSequence given (its order restored), else batch_first and unbatched as given."""
        if packed_input is not None:
            _, batch_sizes, sorted_indices, unsorted_indices = packed_input
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                finals = tuple(f.index_select(1, unsorted_indices) for f in finals)
            return output, finals
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            finals = tuple(f.squeeze(1) for f in finals)
        return output, finals


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
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


def config_of(rnn: nn.Module, cell: str) -> dict:
    """The constructor arguments an nn module of ``cell`` shares with its fused module (the LSTM's
    proj_size besides the common ones)."""
    names = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"]
    if cell == LSTM:
        names.append("proj_size")
    return {name: getattr(rnn, name) for name in names}


def _lengths_of(batch_sizes: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sequence lengths [B] (sorted order) from PackedSequence batch sizes."""
    rows = torch.arange(batch)
    return (batch_sizes.unsqueeze(1) > rows.unsqueeze(0)).sum(0)
