"""The implementations compared, each built from the same ``nn.LSTM`` (same weights).

A provider turns the sweep's base ``nn.LSTM`` into a module whose
``forward(x [T, B, I]) -> output [T, B, D*H]`` is what gets timed. A GRU config (``--cell gru``)
builds from an ``nn.GRU`` instead: the rows below then name nn.GRU and FusedGRU (the impl names
stay, "nn.LSTM" being the torch baseline), and flashrnn and the recompute providers, which serve
the LSTM only, skip it.

    nn.LSTM           torch.nn.LSTM (cuDNN on a GPU): the baseline of speedup_vs_cudnn
    nn.LSTM-compile   torch.compile(nn.LSTM) (dynamo graph-breaks around RNN modules by default)
    fused-auto        FusedLSTM() as a user gets it (backend="auto": on the CPU torch's own kernel)
    fused-auto-compile  torch.compile(FusedLSTM(), fullgraph=True): one graph (on the CPU torch's
                      own kernel behind the op lstm_kernels::native_lstm)
    fused-reference   FusedLSTM(backend="reference")
    fused-triton      FusedLSTM(backend="triton")
    fused-cuda        FusedLSTM(backend="cuda")
    fused-<backend>-recompute  the same with recompute=True (lstm_kernels/recompute.py: state checkpoints
                      every ceil(sqrt(T)) steps instead of the backend's saved activations), for
                      backend auto (on the CPU: the reference, since recompute leaves torch's own
                      kernel), reference, triton and cuda
    flashrnn          FlashRNN's fused CUDA LSTM (PyPI ``flashrnn``), when installed; the input
                      projection x @ W_ihᵀ is included so that it does the same work

In a config with resets (``reset_rate`` > 0: the ``resets`` case, episodes ending inside a
rollout) every module meets the same resets [T, B] (configs.reset_pattern). nn.LSTM has none, so
it runs what its users do today: each row cut into its episodes, the pieces packed into one
PackedSequence (sorted by length), run from zero states, and scattered back into [T, B, H]; the
FusedLSTM providers pass ``resets=``; the others cannot serve such a config.

A provider that cannot run on this machine says why (``unavailable_reason``);
one that cannot serve a config raises (e.g. ``BackendUnsupportedError``) and
the sweep records a skip.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import lstm_kernels
from lstm_kernels import FusedGRU, FusedLSTM

from .configs import Config, reset_pattern

BASELINE = "nn.LSTM"


class Provider:
    name = ""

    def unavailable_reason(self, device: str) -> Optional[str]:
        return None

    def build(self, base: nn.LSTM, cfg: Config) -> nn.Module:
        raise NotImplementedError


class TorchLSTM(Provider):
    name = BASELINE

    def build(self, base, cfg):
        resets = reset_pattern(cfg, base.weight_ih_l0.device)
        if resets is not None:
            return _SplitAtResets(_copy_lstm(base), resets)
        return _OutputOnly(_copy_lstm(base))


def fused_from_torch(base: nn.Module, **kwargs) -> nn.Module:
    """FusedGRU or FusedLSTM, by ``base``'s class, with its weights."""
    return (FusedGRU if isinstance(base, nn.GRU) else FusedLSTM).from_torch(base, **kwargs)


def _lstm_only(provider: Provider, cfg: Config) -> None:
    if cfg.cell != "lstm":
        raise NotImplementedError(f"{provider.name} serves the LSTM only")


def _no_resets(provider: Provider, cfg: Config) -> None:
    if cfg.reset_rate:
        raise NotImplementedError(f"{provider.name} does not serve resets inside a sequence")


class CompiledTorchLSTM(Provider):
    name = "nn.LSTM-compile"

    def build(self, base, cfg):
        _no_resets(self, cfg)
        torch._dynamo.reset()  # a fresh cache per config: no silent fallback after the recompile limit
        module = _OutputOnly(_copy_lstm(base))
        module.forward = torch.compile(module.forward, dynamic=False)
        return module


class CompiledFused(Provider):
    name = "fused-auto-compile"

    def build(self, base, cfg):
        _no_resets(self, cfg)
        torch._dynamo.reset()
        module = _OutputOnly(fused_from_torch(base))
        module.forward = torch.compile(module.forward, fullgraph=True, dynamic=False)
        return module


class Fused(Provider):
    def __init__(self, backend: str, recompute: bool = False):
        self.backend = backend
        self.recompute = recompute
        self.name = f"fused-{backend}" + ("-recompute" if recompute else "")

    def unavailable_reason(self, device):
        if self.backend == "auto":
            return None
        if self.backend in lstm_kernels.available_backends():
            if self.backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                return "the Triton backend runs on the CPU only under TRITON_INTERPRET=1"
            return None
        why = lstm_kernels.unavailable_backends().get(self.backend, "not available")
        return f"backend {self.backend!r} unavailable: {why}"

    def build(self, base, cfg):
        if self.recompute:
            _lstm_only(self, cfg)
        fused = fused_from_torch(base, backend=self.backend)
        fused.recompute = self.recompute
        return _OutputOnly(fused, reset_pattern(cfg, base.weight_ih_l0.device))


class FlashRNN(Provider):
    name = "flashrnn"

    def unavailable_reason(self, device):
        if device != "cuda":
            return "flashrnn needs a CUDA GPU"
        if importlib.util.find_spec("flashrnn") is None:
            return "flashrnn is not installed (pip install flashrnn)"
        return None

    def build(self, base, cfg):
        _no_resets(self, cfg)
        _lstm_only(self, cfg)
        if cfg.layers != 1 or cfg.bidirectional:
            raise NotImplementedError("the flashrnn provider covers one unidirectional layer only")
        return _FlashRNNLSTM(base, cfg)


def _copy_lstm(base: nn.Module) -> nn.Module:
    """A copy with its own weights, flattened into one buffer as cuDNN wants (no per-call copy)."""
    lstm = copy.deepcopy(base)
    lstm.flatten_parameters()
    return lstm


class _OutputOnly(nn.Module):
    """Wraps an LSTM module so that forward returns the output sequence only (given ``resets``:
    a FusedLSTM called with them)."""

    def __init__(self, lstm: nn.Module, resets: Optional[torch.Tensor] = None):
        super().__init__()
        self.lstm = lstm
        self.resets = resets

    def forward(self, x):
        if self.resets is None:
            return self.lstm(x)[0]
        return self.lstm(x, resets=self.resets)[0]


class _SplitAtResets(nn.Module):
    """nn.LSTM over a batch with resets, as its users run it: every row cut into its episodes at the
    resets, the pieces packed (PackedSequence), run from zero states, and put back in place."""

    def __init__(self, lstm: nn.LSTM, resets: torch.Tensor):
        super().__init__()
        self.lstm = lstm
        T, B = resets.shape
        cpu = resets.cpu()
        self.pieces = []  # (row, start, end)
        for b in range(B):
            cuts = [0] + [t for t in range(1, T) if cpu[t, b]] + [T]
            self.pieces += [(b, start, end) for start, end in zip(cuts[:-1], cuts[1:])]

    def forward(self, x):  # x [T, B, I] -> [T, B, D*H]
        sequences = [x[start:end, b] for b, start, end in self.pieces]
        packed = nn.utils.rnn.pack_sequence(sequences, enforce_sorted=False)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0])  # [L_max, pieces, D*H]
        rows = [out[:end - start, k] for k, (b, start, end) in enumerate(self.pieces)]
        by_row: dict = {}
        for (b, _, _), row in zip(self.pieces, rows):
            by_row.setdefault(b, []).append(row)
        return torch.stack([torch.cat(by_row[b], dim=0) for b in range(x.shape[1])], dim=1)


class _FlashRNNLSTM(nn.Module):
    """One LSTM layer on flashrnn with nn.LSTM's weights (gate order i, f, g, o in both).

    flashrnn layouts (one head, D = H): Wx [B, T, 4, 1, H], R [4, 1, H(out), H(in)],
    b [4, 1, H], output states [2 (h, c), B, T, 1, H].
    """

    def __init__(self, base: nn.LSTM, cfg: Config):
        super().__init__()
        from flashrnn import flashrnn

        self._flashrnn = flashrnn
        H = cfg.H
        self.dtype_name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.dtype]
        with torch.no_grad():
            self.weight_ih = nn.Parameter(base.weight_ih_l0.detach().clone())
            self.R = nn.Parameter(base.weight_hh_l0.detach().reshape(4, 1, H, H).clone())
            self.b = nn.Parameter((base.bias_ih_l0 + base.bias_hh_l0).detach().reshape(4, 1, H).clone())

    def forward(self, x):  # x [T, B, I] -> [T, B, H]
        T, B, _ = x.shape
        wx = F.linear(x.transpose(0, 1), self.weight_ih).reshape(B, T, 4, 1, -1)
        states, _ = self._flashrnn(wx, self.R, self.b, function="lstm", backend="cuda_fused", dtype=self.dtype_name)
        return states[0].reshape(B, T, -1).transpose(0, 1)


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (TorchLSTM(), CompiledTorchLSTM(), Fused("auto"), CompiledFused(), Fused("reference"), Fused("triton"),
              Fused("cuda"), FlashRNN(), Fused("auto", recompute=True), Fused("reference", recompute=True),
              Fused("triton", recompute=True), Fused("cuda", recompute=True))
}


def default_impls(device: str) -> list[str]:
    """What ``python -m benchmarks`` measures when --impl is not given."""
    if device == "cuda":
        names = [BASELINE, "nn.LSTM-compile", "fused-auto", "fused-auto-compile", "fused-cuda", "fused-triton",
                 "fused-reference", "flashrnn", "fused-cuda-recompute", "fused-triton-recompute"]
        return [n for n in names if n == BASELINE or PROVIDERS[n].unavailable_reason(device) is None]
    return [BASELINE, "fused-auto", "fused-auto-compile", "fused-reference", "fused-auto-recompute"]
