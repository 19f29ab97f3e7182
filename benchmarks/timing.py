"""Timing: CUDA-event and CPU timers, rotated inputs, statistics, peak memory, the budget.

Every repetition is timed on its own (a pair of CUDA events on the current
stream, or ``time.perf_counter`` around a synchronous call on the CPU), after
``warmup`` untimed calls. Inputs are rotated: ``n`` pre-allocated input sets
are cycled so that consecutive calls do not find their input in the L2 cache.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

#: Rotate through enough input sets to cover this many bytes (2x an H100's 50 MB L2).
ROTATION_BYTES = 100 * 2**20
MAX_ROTATION = 8


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty list")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Stats:
    """Median, 10th and 90th percentile of per-repetition times in ms."""
    return Stats(percentile(times_ms, 50), percentile(times_ms, 10), percentile(times_ms, 90), len(times_ms))


def rotation_count(bytes_per_set: int) -> int:
    """How many input sets to cycle: enough to cover ROTATION_BYTES, 2..MAX_ROTATION."""
    if bytes_per_set <= 0:
        return 2
    return max(2, min(MAX_ROTATION, math.ceil(ROTATION_BYTES / bytes_per_set)))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(
    run: Callable[[int], None],
    reps: int,
    device: str,
    prepare: Optional[Callable[[int], None]] = None,
    start_index: int = 0,
) -> list[float]:
    """Per-repetition times in ms of ``run(i)`` for i = start_index .. start_index+reps-1.

    ``prepare(i)`` runs before each repetition, outside the timed region
    (e.g. setting gradients to None). On CUDA the times come from events, so
    they include GPU idle time caused by slow launches, as a user would see.
    """
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize()
        for k in range(reps):
            i = start_index + k
            if prepare is not None:
                prepare(i)
            starts[k].record()
            run(i)
            ends[k].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for k in range(reps):
        i = start_index + k
        if prepare is not None:
            prepare(i)
        t0 = time.perf_counter()
        run(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_paired(
    run: Callable[[int], None],
    baseline: Callable[[int], None],
    reps: int,
    prepare: Optional[Callable[[int], None]] = None,
    prepare_baseline: Optional[Callable[[int], None]] = None,
    start_index: int = 0,
) -> tuple[list[float], list[float]]:
    """CPU: per-repetition times in ms of ``run(i)`` and ``baseline(i)``, interleaved.

    Each repetition times both, in alternating order, so that load from other
    processes, frequency changes and cache state fall on both alike: their ratio
    stays honest on a busy machine where back-to-back blocks of repetitions drift.
    """
    times, base_times = [], []
    for k in range(reps):
        i = start_index + k
        pair = ((run, prepare, times), (baseline, prepare_baseline, base_times))
        for fn, prep, out in pair if k % 2 == 0 else pair[::-1]:
            if prep is not None:
                prep(i)
            t0 = time.perf_counter()
            fn(i)
            out.append((time.perf_counter() - t0) * 1e3)
    return times, base_times


def keep_cpu_allocations() -> Optional[str]:
    """CPU: ask glibc's malloc to keep freed memory (no mmap per large block, no trim).

    By default every gradient buffer over 128 KiB is a fresh mmap, so a repetition pays page
    faults or not depending on what the previous one freed; that lands on whichever implementation
    happens to allocate first, and moved paired nn.LSTM ratios of identical kernels by up to 30%
    (H=128, B=8, T=16, fwd_bwd). Both implementations run under the same setting. Returns a
    description for the results' metadata, or None where malloc is not glibc's.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if mallopt(m_mmap_threshold, 32 << 20) != 1 or mallopt(m_trim_threshold, 1 << 30) != 1:
        return None
    return "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB"


class PeakMemory:
    """Extra device memory at the peak of the calls inside the ``with`` block, in MiB (None on the CPU).

    max_memory_allocated() after a reset, minus what was allocated on entry
    (weights, inputs): activations saved for backward, workspaces, outputs and
    gradients of one call, since each repetition frees the previous one's.
    """

    def __init__(self, device: str):
        self.device = device
        self.mb: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda" and exc[0] is None:
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20


def warm_up(run: Callable[[int], None], warmup: int, device: str, prepare: Optional[Callable[[int], None]] = None, slow_s: float = 0.1) -> list[float]:
    """Untimed-for-the-result calls (the first may compile); returns their times in ms.

    Stops after two calls when a call takes longer than ``slow_s``: a big
    config needs no more to be warm, and the budget is better spent on reps.
    """
    times: list[float] = []
    for i in range(max(1, warmup)):
        times += time_calls(run, 1, device, prepare, start_index=i)
        if i >= 1 and times[-1] / 1e3 > slow_s:
            break
    return times


class Budget:
    """Shares a wall-clock budget so that only the biggest measurements get fewer reps.

    Water-filling: each measurement needs about ``need`` seconds for its
    warm-up and minimum reps (a cost-model estimate, rescaled by how the
    measurements so far compared with their estimates). When the remaining
    budget cannot cover every remaining need, all measurements may use up to
    one common ``cap`` chosen so that the capped needs add up to the budget:
    small ones are untouched, the biggest are cut to the cap. ``reps_for``
    then turns a share into repetitions: ``min_reps`` (more, up to
    ``max_reps``, for calls cheaper than ``cheap_s`` in all), fewer (down to
    ``floor_reps``) only when the share is too small, and 0 (skip) when even
    ``floor_reps`` calls would take more than four times the share.
    """

    def __init__(self, total_s: Optional[float], min_reps: int = 20, max_reps: int = 100, floor_reps: int = 5, cheap_s: float = 0.1):
        self.total_s = total_s
        self.min_reps = min_reps
        self.max_reps = max(max_reps, min_reps)
        self.floor_reps = min(floor_reps, min_reps)
        self.cheap_s = cheap_s
        self.start = time.perf_counter()
        self._estimated = 0.0
        self._actual = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return math.inf if self.total_s is None else self.total_s - self.elapsed()

    def exhausted(self) -> bool:
        return self.remaining() <= 0

    def calibrate(self, estimated_s: float, actual_s: float) -> None:
        """Record how long a measurement took against its estimate."""
        self._estimated += estimated_s
        self._actual += actual_s

    @property
    def scale(self) -> float:
        """Actual / estimated time of the measurements so far (1 before any)."""
        return self._actual / self._estimated if self._estimated > 0 else 1.0

    def cap(self, remaining_needs: Sequence[float]) -> float:
        """The most seconds one measurement may use now (inf when everything fits)."""
        left = self.remaining()
        if math.isinf(left):
            return math.inf
        needs = sorted(n * self.scale for n in remaining_needs)
        used = 0.0
        for k, need in enumerate(needs):
            if used + need * (len(needs) - k) >= left:
                return max(0.0, left - used) / (len(needs) - k)
            used += need
        return math.inf

    def reps_for(self, call_s: float, share_s: float) -> tuple[int, bool]:
        """(repetitions, reduced_by_budget) for one call taking ``call_s`` seconds, within ``share_s``."""
        call_s = max(call_s, 1e-7)
        reps = self.min_reps
        if call_s * self.min_reps < self.cheap_s:
            reps = min(self.max_reps, max(self.min_reps, int(self.cheap_s / call_s)))
        if call_s * reps > share_s:
            if call_s * self.floor_reps > 4 * max(share_s, 0.0):
                return 0, True  # too slow to measure within the budget at all
            fit = int(share_s / call_s)
            if fit >= self.min_reps:
                return fit, False
            return max(self.floor_reps, fit), True
        return reps, False
