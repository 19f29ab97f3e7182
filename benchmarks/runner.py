"""The sweep: for each config, build every provider from one ``nn.LSTM`` and time each pass.

Robust by construction: a provider that fails on a config (unsupported,
out of memory, anything) becomes a ``skipped`` result with the reason, and
the sweep goes on. A CUDA error that leaves the context unusable skips the
rest of the sweep (with that reason) instead of crashing, so the results so
far are still written.
"""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from lstm_kernels import BackendUnsupportedError

from . import configs as cfgs
from .configs import Config, Measurement
from .memory import saved_tensor_bytes
from .providers import BASELINE, PROVIDERS
from .timing import Budget, PeakMemory, Stats, rotation_count, summarize, time_calls, time_paired, warm_up

SKIPPED = "skipped"
OK = "ok"


@dataclass
class Result:
    measurement: Measurement
    status: str  # OK or SKIPPED
    note: str = ""
    stats: Optional[Stats] = None
    peak_mem_mb: Optional[float] = None
    #: CPU only: median ms of the baseline timed interleaved with this measurement (time_paired)
    paired_baseline_ms: Optional[float] = None
    #: fwd_bwd only: MiB the forward saves for the backward, beyond parameters and input (memory.py)
    saved_mb: Optional[float] = None

    @property
    def config(self) -> Config:
        return self.measurement.config


def plan(
    configs: Sequence[Config],
    impls: Sequence[str],
    passes: Sequence[str],
    device: str,
    explicit_impls: bool,
) -> tuple[list[Measurement], list[Result]]:
    """The measurements to run, and the ones skipped up front (unavailable providers)."""
    todo, skipped = [], []
    for cfg in configs:
        for impl in impls:
            if not explicit_impls and cfgs.default_limits(impl, cfg, device):
                continue
            provider = PROVIDERS[impl]
            why = provider.unavailable_reason(device)
            for pass_ in passes:
                m = Measurement(cfg, impl, pass_)
                if why is not None:
                    skipped.append(Result(m, SKIPPED, why))
                else:
                    todo.append(m)
    return todo, skipped


def tensor_device(device: str) -> str:
    """Where tensors are allocated for ``device`` (a seam for tests that fake CUDA on the CPU)."""
    return device


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _cuda_healthy() -> Optional[str]:
    try:
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001  (any error here means the context is gone)
        return _short_error(exc)


class Inputs:
    """Rotated input sets for one config: x [T, B, I] (requires grad) and a grad_output [T, B, D*H]."""

    def __init__(self, cfg: Config, device: str):
        dt = cfg.torch_dtype
        out_features = cfg.directions * cfg.H
        per_set = cfg.T * cfg.B * (cfg.I + out_features) * torch.finfo(dt).bits // 8
        n = rotation_count(per_set)
        gen = torch.Generator(device=device).manual_seed(1)
        opts = dict(generator=gen, device=device, dtype=dt)
        self.xs = [torch.randn(cfg.T, cfg.B, cfg.I, **opts).requires_grad_(True) for _ in range(n)]
        self.grads = [torch.randn(cfg.T, cfg.B, out_features, **opts) for _ in range(n)]
        self.n = n


def make_runner(module: nn.Module, inputs: Inputs, pass_: str) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """(prepare(i), run(i)) for one pass; prepare is untimed."""
    if pass_ == "fwd":
        module.eval()

        def prepare(i):
            pass

        def run(i):
            with torch.no_grad():
                module(inputs.xs[i % inputs.n])

        return prepare, run

    module.train()

    def prepare(i):
        module.zero_grad(set_to_none=True)
        inputs.xs[i % inputs.n].grad = None

    def run(i):
        out = module(inputs.xs[i % inputs.n])
        out.backward(inputs.grads[i % inputs.n])

    return prepare, run


def run_sweep(
    measurements: Sequence[Measurement],
    device: str,
    warmup: int = 3,
    min_reps: int = 20,
    max_reps: int = 100,
    budget_s: Optional[float] = None,
    progress: bool = True,
    on_config_done: Optional[Callable[[list[Result]], None]] = None,
) -> list[Result]:
    """Run ``measurements``, cheapest config first, within ``budget_s`` seconds of wall time."""
    from tqdm import tqdm

    by_config: dict[Config, list[Measurement]] = {}
    for m in measurements:
        by_config.setdefault(m.config, []).append(m)
    warmup = max(1, warmup)
    # seconds one measurement needs by the cost model: warm-up plus the minimum reps
    need = {m: cfgs.estimate_seconds(m, device) * (warmup + min_reps) for m in measurements}
    order = sorted(by_config, key=lambda c: sum(need[m] for m in by_config[c]))

    budget = Budget(budget_s, min_reps=min_reps, max_reps=max_reps)
    results: list[Result] = []
    broken: Optional[str] = None
    bar = tqdm(
        total=len(measurements), disable=not progress, unit="run", dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,
    )  # fmt: skip
    try:
        for k, cfg in enumerate(order):
            group = sorted(by_config[cfg], key=lambda m: (m.impl != BASELINE, m.impl, m.pass_))
            if broken or budget.exhausted():
                why = f"CUDA context unusable after an earlier error ({broken})" if broken else "time budget exhausted"
                results.extend(Result(m, SKIPPED, why) for m in group)
                bar.update(len(group))
                continue
            bar.set_postfix_str(cfg.label(), refresh=False)
            share = budget.cap([need[m] for c in order[k:] for m in by_config[c]])
            group_results, broken = _run_config(cfg, group, device, warmup, budget, share, need, bar)
            results.extend(group_results)
            if on_config_done is not None:
                on_config_done(results)
    finally:
        bar.close()
    return results


def _run_config(cfg, group, device, warmup, budget, share, need, bar):
    """All measurements of one config. Returns (results, broken_reason or None)."""
    results = []
    broken = None
    try:
        torch.manual_seed(0)
        where = tensor_device(device)
        torch_module = nn.GRU if cfg.cell == "gru" else nn.LSTM
        base = torch_module(cfg.I, cfg.H, cfg.layers, bidirectional=cfg.bidirectional, device=where,
                            dtype=cfg.torch_dtype)
        inputs = Inputs(cfg, where)
    except Exception as exc:  # noqa: BLE001  (e.g. OOM allocating inputs: skip the config)
        why = _short_error(exc)
        del exc
        _free(device)
        return [Result(m, SKIPPED, f"setup failed: {why}") for m in group], (_cuda_healthy() if device == "cuda" else None)

    modules: dict[str, object] = {}  # impl -> module, or the reason it failed to build
    for m in group:
        bar.update(1)
        if broken is not None:
            results.append(Result(m, SKIPPED, f"CUDA context unusable after an earlier error ({broken})"))
            continue
        if budget.exhausted():
            results.append(Result(m, SKIPPED, "time budget exhausted"))
            continue
        t0 = time.perf_counter()
        error, cheap_error = None, False
        try:
            if m.impl not in modules:
                try:
                    modules[m.impl] = PROVIDERS[m.impl].build(base, cfg)
                except Exception as exc:  # noqa: BLE001
                    modules[m.impl] = f"build failed: {_short_error(exc)}"
            module = modules[m.impl]
            if isinstance(module, str):
                error = module
            else:
                # On the CPU the baseline is timed again, interleaved with each implementation.
                pair = modules.get(BASELINE) if device == "cpu" and m.impl != BASELINE else None
                pair = None if isinstance(pair, str) else pair
                results.append(_measure(m, module, inputs, device, warmup, budget, share, pair))
        except Exception as exc:  # noqa: BLE001  (one provider failing must not stop the sweep)
            error = _short_error(exc)
            cheap_error = isinstance(exc, BackendUnsupportedError)  # refused up front: nothing to clean up
        if error is not None:  # outside the except block, so the traceback's tensors are already freed
            results.append(Result(m, SKIPPED, error))
            if not cheap_error:
                _free(device)
                if device == "cuda":
                    broken = _cuda_healthy()
        budget.calibrate(need[m], time.perf_counter() - t0)
    del modules, base, inputs
    _free(device)
    return results, broken


def _measure(m, module, inputs, device, warmup, budget, share, baseline_module=None) -> Result:
    """Time one measurement; with ``baseline_module`` (CPU) the baseline is timed interleaved with it."""
    t0 = time.perf_counter()
    prepare, run = make_runner(module, inputs, m.pass_)
    warm = warm_up(run, warmup, device, prepare)
    call_s = warm[-1] / 1e3
    if budget.exhausted():
        return Result(m, SKIPPED, "time budget exhausted")
    reps, reduced = budget.reps_for(call_s, share - (time.perf_counter() - t0))
    if reps == 0:
        return Result(m, SKIPPED, f"one call takes {call_s:.3g} s: too slow for the time budget")
    note = f"reps reduced to {reps} by the time budget" if reduced else ""
    if baseline_module is not None:
        prepare_base, run_base = make_runner(baseline_module, inputs, m.pass_)
        warm_up(run_base, warmup, device, prepare_base)
        times, base_times = time_paired(run, run_base, reps, prepare, prepare_base, start_index=len(warm))
        result = Result(m, OK, note, summarize(times), None, summarize(base_times).median_ms)
    else:
        prepare(len(warm))
        with PeakMemory(device) as peak:
            times = time_calls(run, reps, device, prepare, start_index=len(warm))
        result = Result(m, OK, note, summarize(times), peak.mb)
    if m.pass_ == "fwd_bwd":
        result.saved_mb, why = measure_saved_mb(module, inputs)
        if why:
            result.note = "; ".join(filter(None, (result.note, why)))
    return result


def measure_saved_mb(module: nn.Module, inputs: Inputs) -> tuple[Optional[float], str]:
    """(MiB one training forward saves for its backward beyond the parameters and the input, or None
    and why not), by saved_tensors_hooks, on an untimed call after the timed ones."""
    x = inputs.xs[0]
    module.train()
    try:
        with torch.enable_grad():
            saved, out = saved_tensor_bytes(lambda: module(x), exclude=[*module.parameters(), x])
        del out
    except Exception as exc:  # noqa: BLE001  (the timing stands without it)
        return None, f"saved bytes not measured: {_short_error(exc)}"
    return saved / 2**20, ""


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001  (a broken context is reported elsewhere)
            pass
