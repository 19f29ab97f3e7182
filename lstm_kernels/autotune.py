"""The measured choice: which path serves a FusedLSTM call on a GPU, decided by timing on this machine.

On a GPU more than one path can serve a call exactly: the ``cuda`` and ``triton`` backends (each
verified before first use, lstm_kernels/verification.py) and torch's own kernel for the whole
module (cuDNN, lstm_kernels/backends/native.py). Which is fastest depends on the GPU, the dtype and the
shape, and nobody can measure every GPU beforehand. So ``backend="auto"``, on the first call of a
*shape bucket*, times every candidate that serves the call, as cuDNN's benchmark mode and Triton's
autotuner do, and keeps the fastest:

- the bucket: the device (name and capability), dtype and TF32 setting, the autocast dtype, the
  module's sizes (input, hidden, projection, layers, directions, bias), packed or padded, resets
  inside the sequence or not, whether gradients are needed, and the batch rounded up to a power of two. Not the sequence length: a
  training loop over sequences of varying length pays once per batch bucket;
- the run: the module on the call's own input, its first :data:`TIMED_STEPS` steps, forward, and
  forward plus backward where the call needs gradients (``torch.autograd.grad`` to the parameters,
  so nobody's ``.grad`` changes), :data:`WARMUP` warm-up and :data:`REPS` timed runs, CUDA events,
  the median; the random state is restored afterwards (dropout draws nothing the user would see);
- the choice is remembered in the process and on disk (``choices.json`` in the cache directory,
  under the environment key verification uses), so later processes skip the timing.

Nothing is timed while torch.compile traces or during CUDA graph capture. During capture a choice
already made for the bucket (this process, or on disk) is taken; while dynamo traces, whose batch
may be symbolic, the path every measured batch bucket of the same sizes chose; else the fixed order. ``LSTM_KERNELS_AUTOTUNE=0`` gives the
fixed order everywhere: the first verified fused backend in ``AUTO_ORDER``, torch's kernel where
none serves. :meth:`FusedLSTM.path_for` says what was chosen and why.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .backends import trace_time_constant
from .disk_cache import DiskCache

AUTOTUNE_ENV = "LSTM_KERNELS_AUTOTUNE"
CACHE_FILE = "choices.json"
#: The path name of torch's own kernel for the whole module.
NATIVE = "native"
#: Steps of the call's input a candidate is timed on (at most the call's own).
TIMED_STEPS = 64
WARMUP = 1
REPS = 5


class PathChoice(NamedTuple):
    """What serves a call: ``path`` ("native" or a backend name) and, in words, why."""

    path: str
    reason: str


class Measured(NamedTuple):
    """A measured choice: the fastest path and every candidate's median time in ms."""

    path: str
    times_ms: dict


def enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"


def batch_bucket(batch: int) -> int:
    """The batch rounded up to a power of two."""
    return 1 << max(0, int(batch) - 1).bit_length()


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = WARMUP, reps: int = REPS) -> float:
    """The median wall time of ``fn()`` in ms: CUDA events on a GPU, the clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timer(path: str, run: Callable[[], object], device: torch.device) -> float:
    """The time in ms of candidate ``path`` (``run`` runs it once): :func:`median_ms`. Tests inject
    their own timings here."""
    return median_ms(run, device)


def _decode(value) -> Measured:
    path, times = value
    if not isinstance(path, str) or not isinstance(times, dict):
        raise TypeError("not a measured choice")
    return Measured(path, {str(k): float(v) for k, v in times.items()})


_CHOICES: dict = {}  # bucket key -> Measured (this process)
_DISK = DiskCache(CACHE_FILE, decode=_decode, encode=list)


_KEY_NAMES = ("device", "dtype", "tf32", "autocast", "module", "packed", "resets", "needs_grad", "batch_bucket",
              "candidates")


@functools.lru_cache(maxsize=4096)
def bucket_key(fields: tuple) -> str:
    """The JSON key of a bucket (``fields`` as FusedLSTM._bucket_fields builds them; built once per bucket,
    not per call)."""
    return json.dumps(dict(zip(_KEY_NAMES, fields)), sort_keys=True)


_DEVICE_NAMES: dict = {}


@trace_time_constant
def device_name(device: torch.device) -> str:
    """The device as verification keys its plans (``verification.device_description``: "<name>
    sm_<major><minor>" of a CUDA device, else its type), asked once per device and process."""
    name = _DEVICE_NAMES.get(device)
    if name is None:
        from .verification import device_description

        name = _DEVICE_NAMES[device] = device_description(device)
    return name


def known(key: str) -> Optional[Measured]:
    """The choice made for ``key`` (this process, else the cache file), or None."""
    measured = _CHOICES.get(key)
    if measured is None:
        from .verification import environment_key

        measured = _DISK.get(environment_key(), key)
        if measured is not None:
            _CHOICES[key] = measured
    return measured


@trace_time_constant
def known_path(key_fields: tuple) -> str:
    """The path measured fastest for the bucket of ``key_fields`` whose batch bucket is -1 (torch.compile
    traces a batch that may be symbolic): the one path every measured batch bucket of that key chose,
    or "" (none measured, or they disagree). Run by dynamo at trace time and kept as a constant."""
    from .verification import environment_key

    wanted = json.loads(bucket_key(key_fields))
    wanted.pop("batch_bucket")
    paths = set()
    for key, measured in {**_DISK.entries(environment_key()), **_CHOICES}.items():
        fields = json.loads(key)
        fields.pop("batch_bucket", None)
        if fields == wanted:
            paths.add(measured.path)
    return paths.pop() if len(paths) == 1 else ""


def choose(key_fields: tuple, candidates: Sequence[str], run: Callable[[str], Callable[[], object]],
           device: torch.device) -> PathChoice:
    """The path among ``candidates`` (in fixed order, two or more) that serves the bucket of
    ``key_fields``: the known choice, else the fastest measured now (``run(path)`` gives a function
    that runs the call once on ``path``), else, where nothing may be timed, the first."""
    if torch.compiler.is_compiling():
        path = known_path(key_fields)
        if path in candidates:
            return PathChoice(path, "the fastest measured on this machine at every batch measured for these sizes")
        return PathChoice(candidates[0], "the first in the fixed order: nothing is timed while torch.compile "
                                         "traces, and this bucket has not been measured")
    key = bucket_key(key_fields)
    measured = known(key)
    if measured is None or measured.path not in candidates:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return PathChoice(candidates[0], "the first in the fixed order: nothing is timed during CUDA graph "
                                             "capture (an eager call before capturing measures the bucket)")
        measured = measure(candidates, run, device)
        _CHOICES[key] = measured
        from .verification import environment, environment_key

        _DISK.put(environment_key(), environment(), key, measured)
    times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in measured.times_ms.items())
    return PathChoice(measured.path, f"the fastest measured on this machine for this bucket ({times})")


def measure(candidates: Sequence[str], run: Callable[[str], Callable[[], object]], device: torch.device) -> Measured:
    """Time each candidate with :data:`timer`; the fastest wins (the first on a tie)."""
    devices = [device] if device.type == "cuda" else []
    times = {}
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        for path in candidates:
            times[path] = float(timer(path, run(path), device))
    fastest = min(candidates, key=lambda p: times[p])
    return Measured(fastest, times)


def clear(disk: bool = False) -> None:
    """Forget this process's choices (and, with ``disk``, the cache file's)."""
    _CHOICES.clear()
    _DISK.clear(disk)
