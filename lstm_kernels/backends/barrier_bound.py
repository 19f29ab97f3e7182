"""How long a persistent kernel's grid barrier may wait before it gives up, and how the host learns
that one gave up, for both GPU backends.

Grid barriers spin on a counter in global memory; a barrier that never opens (a block that never
became resident, a kernel bug, a debugger that single-steps one block) would hang the process.
Every persistent launch of both backends therefore bounds its waits in time, read from the GPU's
clock (``%globaltimer``) only after a poll found the barrier closed: the bound is a runtime kernel
argument (:func:`barrier_timeout_ns`), so the binary verification proves is the binary that serves.
The first block to give up raises the launch's abort flag (every other block's waits then leave at
once: a stalled launch ends after one bound) and fills the device's error record (:data:`KERNELS`
code, step, block, nanoseconds waited).

How the host finds out, without synchronising a call:

- every device has one error record, ``int64 [4]`` in device memory (:func:`device_record`), that
  the kernels fill at their first give-up and only the host clears;
- after each persistent launch (:func:`after_launch`) the record is copied, non-blocking, into
  pinned host memory on the launch's stream, and a CUDA event is recorded after the copy;
- :func:`raise_if_gave_up` raises RuntimeError (naming the kernel, the step and the block, and
  saying that call's outputs are invalid) when one of those events has completed
  (``event.query()``, no sync) and its copy shows a give-up; it then clears the record. It runs at
  the start of every call of the ``cuda`` backend and of every launch helper of the ``triton``
  backend on that device, so a give-up surfaces at the device's next call (or the one after, if
  the copy has not landed yet); anyone may call it, e.g. after a ``torch.cuda.synchronize()``;
- under :func:`bounded_barriers` (verification, :func:`verification_bounds`) the launch waits for
  its own copy and raises at once: verification synchronises anyway.

The record is sticky (only the host clears it), so every later copy holds a give-up that an earlier
copy has missed: the host keeps only the newest few copies per device, and a launch replayed from a
CUDA graph (where nothing is copied or queried: capture records no copy, no event) is reported by
the next eager call on that device. A graph captured before any eager call on its device gets a
record of its own that nobody reads (its barriers still end after the bound).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import NamedTuple, Optional

import torch


#: Seconds a grid-barrier wait may last before the launch gives up, a float (default
#: :data:`DEFAULT_BARRIER_TIMEOUT_S`); ``0``: wait without bound (for a debugger that single-steps).
BARRIER_TIMEOUT_ENV = "LSTM_KERNELS_BARRIER_TIMEOUT"
DEFAULT_BARRIER_TIMEOUT_S = 10.0
#: The bound while a plan is verified: a proven kernel's barrier waits microseconds.
VERIFY_BARRIER_TIMEOUT_S = 2.0

#: The codes the kernels write into the record (index + 1), both backends: every kernel with a grid
#: barrier. A launch passes its code as a runtime argument (:func:`kernel_code`), so only this tuple
#: fixes the numbers; the host names the kernel from it (:func:`describe`).
KERNELS = (
    "cuda fused forward (persistent)",
    "cuda fused backward (persistent)",
    "triton forward (persistent, step budget)",
    "triton backward (persistent, step budget)",
)

#: The bound in seconds while :func:`bounded_barriers` is active; per thread and context, so one
#: verification bounds nobody else's calls.
_BOUND_S: contextvars.ContextVar = contextvars.ContextVar("lstm_kernels_barrier_bound_s", default=None)


def kernel_code(name: str) -> int:
    """The record code of the kernel called ``name`` in :data:`KERNELS`."""
    return KERNELS.index(name) + 1


@contextlib.contextmanager
def bounded_barriers(seconds: float):
    """Within the block (this thread and context), every grid-barrier wait gives up after
    ``seconds``, whatever LSTM_KERNELS_BARRIER_TIMEOUT says, and a launch whose wait gave up raises
    before it returns (its record is read back at once: a host sync)."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"bounded_barriers: expected a finite number of seconds > 0, got {seconds!r}")
    token = _BOUND_S.set(float(seconds))
    try:
        yield
    finally:
        _BOUND_S.reset(token)


def checks_at_once() -> bool:
    """Whether the calling context is inside :func:`bounded_barriers` (launches check their record
    before they return)."""
    return _BOUND_S.get() is not None


def barrier_timeout_s() -> float:
    """The bound of every grid-barrier wait in seconds (0: none): :func:`bounded_barriers`' where
    active, else LSTM_KERNELS_BARRIER_TIMEOUT, else the default; ValueError naming the variable on
    anything but a finite number >= 0."""
    bound = _BOUND_S.get()
    if bound is not None:
        return bound
    value = os.environ.get(BARRIER_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_BARRIER_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{BARRIER_TIMEOUT_ENV}={value!r}: expected seconds (a number; 0 = no bound)") from None
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"{BARRIER_TIMEOUT_ENV}={value!r}: expected a finite number of seconds >= 0")
    return seconds


def barrier_timeout_ns() -> int:
    """:func:`barrier_timeout_s` in nanoseconds, the kernels' runtime argument (0: no bound; a
    positive bound is at least 1 ns, at most 2**62)."""
    seconds = barrier_timeout_s()
    return 0 if seconds == 0 else max(1, min(round(seconds * 1e9), 2**62))


def verification_bounds():
    """The context in which verification runs an unproven plan: every grid-barrier wait bounded by
    :data:`VERIFY_BARRIER_TIMEOUT_S`, and a give-up raised by the launch itself."""
    return bounded_barriers(VERIFY_BARRIER_TIMEOUT_S)


# ---- the error record and the host's look at it ---------------------------------------------

#: Copies in flight kept per device; older ones are dropped (the record is sticky: a newer copy
#: holds whatever an older one would have shown).
MAX_PENDING = 4


class _Copy(NamedTuple):
    event: object  # has .query() -> bool: the copy has landed
    host: torch.Tensor  # int64 [4], the record as copied


_RECORDS: dict = {}  # device -> int64 [4] record on that device
_PENDING: dict = {}  # device -> [_Copy], oldest first


def _key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _capturing(device: torch.device) -> bool:
    """Whether nothing may be copied or queried: CUDA-graph capture (or a meta device: nothing runs)."""
    device = torch.device(device)
    return device.type == "meta" or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def device_record(device: torch.device) -> torch.Tensor:
    """The device's error record (int64 [4]: kernel code, step, block, ns waited; zero: no give-up),
    allocated on first use. Under CUDA-graph capture before any eager use, a fresh record of the
    graph's own that nobody reads."""
    device = _key(device)
    record = _RECORDS.get(device)
    if record is None:
        record = torch.zeros(4, dtype=torch.int64, device=device)
        if _capturing(device):
            return record
        _RECORDS[device] = record
    return record


def launch_state(device: torch.device, slots: int = 2) -> torch.Tensor:
    """A launch's zeroed barrier state (int64 [slots] for the CUDA kernels: arrivals, gave up)."""
    return torch.zeros(slots, dtype=torch.int64, device=device)


class _Landed:
    """The event of a record that needs no copy (a CPU record: the Triton interpreter's)."""

    @staticmethod
    def query() -> bool:
        return True

    @staticmethod
    def synchronize() -> None:
        pass


def _copy_back(record: torch.Tensor) -> _Copy:
    if record.device.type != "cuda":
        return _Copy(_Landed(), record.clone())
    host = torch.empty(4, dtype=torch.int64, pin_memory=True)
    host.copy_(record, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(record.device))
    return _Copy(event, host)


def after_launch(device: torch.device, record: torch.Tensor) -> None:
    """After a persistent launch on ``device`` (on its current stream): queue the copy of
    ``record`` back to the host, or, inside :func:`bounded_barriers`, wait for it and raise at once.
    Nothing under CUDA-graph capture."""
    if _capturing(device):
        return
    device = _key(device)
    copy = _copy_back(record)
    if checks_at_once():
        copy.event.synchronize()
        _raise_on(device, [copy])
        return
    pending = _PENDING.setdefault(device, [])
    pending.append(copy)
    del pending[:-MAX_PENDING]


def raise_if_gave_up(device: torch.device) -> None:
    """Raise RuntimeError when a copy of ``device``'s record that has landed (``event.query()``, no
    sync) shows that a grid-barrier wait gave up; then clear the record. Nothing under capture."""
    if _capturing(device):
        return
    device = _key(device)
    pending = _PENDING.get(device)
    if pending:
        landed = [c for c in pending if c.event.query()]
        pending[:] = [c for c in pending if c not in landed]
        _raise_on(device, landed)


def _raise_on(device: torch.device, copies: list) -> None:
    for copy in copies:
        code, step, block, waited_ns = (int(v) for v in copy.host.tolist())
        if code:
            _PENDING.pop(device, None)
            record = _RECORDS.get(device)
            if record is not None:
                record.zero_()
            raise RuntimeError(describe(device, code, step, block, waited_ns))


def describe(device, code: int, step: int, block: int, waited_ns: int) -> str:
    """The message of a give-up record."""
    kernel = KERNELS[code - 1] if 1 <= code <= len(KERNELS) else f"unknown kernel (code {code})"
    return (f"lstm_kernels: a grid barrier of the {kernel} kernel on {device} gave up after waiting "
            f"{waited_ns / 1e9:.3g} s (block {block}, waiting after step {step}) "
            f"[the bound: {BARRIER_TIMEOUT_ENV}, seconds]: the outputs of the call that launched it are "
            "invalid (the launch ended early). The grid barrier or the co-residency of its blocks is broken.")


def reset(device: Optional[torch.device] = None) -> None:
    """Forget the pending copies (of ``device``, or every device) and clear the records."""
    for dev in [_key(device)] if device is not None else list(_RECORDS):
        _PENDING.pop(dev, None)
        if dev in _RECORDS:
            _RECORDS[dev].zero_()
