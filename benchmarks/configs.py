"""The sweep grid: which shapes, dtypes, cells, implementations and passes are measured.

A :class:`Config` is one problem (T, B, H, I, layers, direction, dtype, cell); a
:class:`Measurement` is one (config, implementation, pass) triple, which is
one CSV row. :func:`build_plan` turns the command-line filters into the list
of measurements, ordered cheapest first so that a time budget running out
costs the biggest configurations, never the small ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "fwd_bwd")
#: The recurrent cells (``--cell``): each config runs against torch's module of its cell (nn.LSTM, nn.GRU).
CELLS = ("lstm", "gru")

#: The full sweep (issue 6), for a GPU.
GPU_GRID = dict(T=(16, 128, 512, 1024), B=(1, 8, 16, 64, 256), H=(256, 512, 768, 1024), dtype=("fp32", "bf16", "fp16"))
#: The 2-layer bidirectional case is measured on a slice of the grid only.
GPU_BIDIR = dict(B=(16, 64), H=(512,))
#: ``--quick`` on a GPU: a corner of each axis.
GPU_QUICK = dict(T=(128, 1024), B=(8, 64), H=(512, 1024), dtype=("bf16", "fp32"))

#: A CPU sweep that finishes in well under two minutes on two cores.
CPU_GRID = dict(T=(16, 64), B=(1, 8), H=(64, 128), dtype=("fp32",))
CPU_BIDIR = dict(B=(8,), H=(64,))
CPU_QUICK = dict(T=(16,), B=(1, 8), H=(64,), dtype=("fp32",))

#: Cases: name -> (num_layers, bidirectional).
CASES = {"single": (1, False), "bidir": (2, True), "resets": (1, False)}
#: The ``resets`` case, as TorchRL measures its kernels: episodes end inside the rollout, at this
#: fraction of (step, row) pairs, on its own grid (replaced by an axis given explicitly).
RESET_RATE = 0.03
GPU_RESETS = dict(T=(128,), B=(128,), H=(256,))
CPU_RESETS = dict(T=(64,), B=(16,), H=(64,))


@dataclass(frozen=True)
class Config:
    T: int
    B: int
    H: int
    I: int  # noqa: E741  (input size; the spec's column name)
    layers: int
    bidirectional: bool
    dtype: str  # a key of DTYPES
    reset_rate: float = 0.0  # the fraction of (step, row) pairs where a row's state restarts
    cell: str = "lstm"  # a key of CELLS

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def label(self) -> str:
        case = f" L{self.layers}{'bi' if self.bidirectional else ''}" if (self.layers, self.bidirectional) != (1, False) else ""
        if self.reset_rate:
            case += f" resets {self.reset_rate:.0%}"
        cell = " GRU" if self.cell == "gru" else ""
        return f"{self.dtype}{cell} T={self.T} B={self.B} H={self.H}{case}"


@dataclass(frozen=True)
class Measurement:
    config: Config
    impl: str
    pass_: str  # "fwd" or "fwd_bwd"


def cudnn_persistent_eligible(cfg: Config) -> bool:
    """Shapes for which cuDNN has a persistent (weights-in-registers) LSTM kernel.

    fp16, one layer, one direction, H and I multiples of 128 with H <= 1024,
    B a multiple of 8 up to 128. PyTorch's heuristic (aten/src/ATen/native/
    cudnn/RNN.cpp) only *picks* it on compute capability 7.x GPUs, so on an
    H100 this column marks the shapes, not the algorithm that ran.
    """
    return (
        cfg.dtype == "fp16"
        and cfg.cell == "lstm"
        and cfg.layers == 1
        and not cfg.bidirectional
        and cfg.H % 128 == 0
        and cfg.H <= 1024
        and cfg.I % 128 == 0
        and cfg.B % 8 == 0
        and cfg.B <= 128
    )


def parse_ints(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    values = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def parse_names(text: Optional[str], choices: Optional[Iterable[str]] = None) -> Optional[tuple[str, ...]]:
    if text is None:
        return None
    values = tuple(v for v in str(text).replace(" ", "").split(",") if v)
    if choices is not None:
        bad = [v for v in values if v not in choices]
        if bad:
            raise ValueError(f"unknown value(s) {bad}; choose from {sorted(choices)}")
    return values


def default_limits(impl: str, cfg: Config, device: str) -> Optional[str]:
    """Why the *default* sweep leaves out (impl, cfg), or None to keep it.

    These only apply when the implementation was not named with ``--impl``;
    they keep the full GPU sweep inside its time budget:
    - fused-reference (a Python loop, the oracle, not a contender): T <= 128, H = 512;
    - nn.LSTM-compile (torch.compile graph-breaks around nn.LSTM, and each new
      shape recompiles): bf16, one layer, H = 512, B in {8, 64};
    - flashrnn (compiles a CUDA kernel per shape on first use): bf16, H = 768,
      B = 16, one layer;
    - fused-auto-compile (each shape compiles anew): on a GPU as nn.LSTM-compile; on the CPU
      H = 64, B = 8, T = 64 (one layer and the bidirectional case);
    - fused-cuda-recompute, fused-triton-recompute (memory, where long sequences matter; 16-bit
      with several segments is refused by those backends): fp32, H = 512, B in {16, 64}, T >= 512.
    """
    if impl == "fused-auto-compile" and device != "cuda" and not (cfg.H == 64 and cfg.B == 8 and cfg.T == 64):
        return "default CPU sweep runs fused-auto-compile at T=64, B=8, H=64 only"
    if device != "cuda":
        return None
    if impl in ("fused-cuda-recompute", "fused-triton-recompute") and not (
            cfg.dtype == "fp32" and cfg.H == 512 and cfg.B in (16, 64) and cfg.T >= 512):
        return "default GPU sweep runs the recompute providers at fp32, H=512, B in {16,64}, T >= 512 only"
    if impl == "fused-auto-compile":
        impl = "nn.LSTM-compile"
    if impl == "fused-reference" and not (cfg.T <= 128 and cfg.H == 512):
        return "default GPU sweep runs fused-reference at T <= 128, H = 512 only"
    if impl == "nn.LSTM-compile" and not (cfg.dtype == "bf16" and cfg.layers == 1 and cfg.H == 512 and cfg.B in (8, 64)):
        return "default GPU sweep runs nn.LSTM-compile at bf16, 1 layer, H=512, B in {8,64} only"
    if impl == "flashrnn" and not (cfg.dtype == "bf16" and cfg.H == 768 and cfg.B == 16 and cfg.layers == 1):
        return "default GPU sweep runs flashrnn at bf16, H=768, B=16 only"
    return None


def build_configs(
    device: str,
    T: Optional[Sequence[int]] = None,
    B: Optional[Sequence[int]] = None,
    H: Optional[Sequence[int]] = None,
    dtype: Optional[Sequence[str]] = None,
    cases: Optional[Sequence[str]] = None,
    layers: Optional[int] = None,
    bidirectional: Optional[bool] = None,
    quick: bool = False,
    cells: Optional[Sequence[str]] = None,
) -> list[Config]:
    """The configs of a sweep on ``device`` ("cpu" or "cuda"), after the filters; ``cells`` (default
    the LSTM only) repeats every config per cell.

    An axis given explicitly replaces the grid's values (the bidirectional
    case then uses it too). ``layers``/``bidirectional`` define one custom
    case and replace ``cases``.
    """
    on_gpu = device == "cuda"
    grid = dict(GPU_QUICK if quick else GPU_GRID) if on_gpu else dict(CPU_QUICK if quick else CPU_GRID)
    bidir_grid = GPU_BIDIR if on_gpu else CPU_BIDIR
    Ts = tuple(T) if T else grid["T"]
    Bs = tuple(B) if B else grid["B"]
    Hs = tuple(H) if H else grid["H"]
    dtypes = tuple(dtype) if dtype else grid["dtype"]

    if layers is not None or bidirectional is not None:
        names = ("custom",)
    else:
        names = tuple(cases) if cases else (("single",) if quick else ("single", "bidir", "resets"))

    configs = []
    for name in names:
        n_layers, bidir = (layers or 1, bool(bidirectional)) if name == "custom" else CASES[name]
        case_T, case_B, case_H, rate = Ts, Bs, Hs, 0.0
        if name == "bidir":
            case_B = Bs if B else tuple(b for b in Bs if b in bidir_grid["B"]) or bidir_grid["B"][:1]
            case_H = Hs if H else tuple(h for h in Hs if h in bidir_grid["H"]) or bidir_grid["H"][:1]
        elif name == "resets":
            reset_grid = GPU_RESETS if on_gpu else CPU_RESETS
            case_T, case_B, case_H = (tuple(T) if T else reset_grid["T"], tuple(B) if B else reset_grid["B"],
                                      tuple(H) if H else reset_grid["H"])
            rate = RESET_RATE
        for cell in tuple(cells) if cells else ("lstm",):
            for dt in dtypes:
                for h in case_H:
                    for b in case_B:
                        for t in case_T:
                            configs.append(Config(T=t, B=b, H=h, I=h, layers=n_layers, bidirectional=bidir, dtype=dt,
                                                  reset_rate=rate, cell=cell))
    return configs


def reset_pattern(cfg: Config, device) -> "torch.Tensor | None":
    """The resets [T, B] bool of a config (None without resets): each (step, row) with probability
    ``cfg.reset_rate``, from a fixed seed, so every implementation meets the same episodes."""
    if not cfg.reset_rate:
        return None
    gen = torch.Generator().manual_seed(2)
    return (torch.rand(cfg.T, cfg.B, generator=gen) < cfg.reset_rate).to(device)


def estimate_seconds(m: Measurement, device: str) -> float:
    """A rough model of one call's time: per-step latency plus recurrent FLOPs.

    Used to order the sweep and to share the time budget; the budget itself
    is enforced on measured times.
    """
    c = m.config
    gate_rows = (3 if c.cell == "gru" else 4) * c.H
    flops_step = 2.0 * c.B * c.H * gate_rows  # recurrent GEMM per step
    flops_in = 2.0 * c.B * c.I * gate_rows  # input projection per step (parallel)
    # the reference's Python loop: named, and what recompute runs on the CPU under "auto"
    python_loop = m.impl in ("fused-reference", "fused-reference-recompute") or (
        device != "cuda" and m.impl == "fused-auto-recompute")
    if device == "cuda":
        rate = 30e12 if c.dtype == "fp32" else 150e12
        latency = 120e-6 if python_loop else {"flashrnn": 6e-6}.get(m.impl, 8e-6)
    else:
        rate = 20e9
        latency = 100e-6 if python_loop else 10e-6
    per_step = latency + (flops_step + flops_in) / rate
    seconds = c.T * per_step * c.layers * c.directions
    backward = 4.0 if m.impl.endswith("-recompute") else 3.0  # recompute runs the forward once more
    return seconds * (backward if m.pass_ == "fwd_bwd" else 1.0)
