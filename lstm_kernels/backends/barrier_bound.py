"""How long a persistent kernel's grid barrier may wait before it gives up, for both GPU backends.

Grid barriers spin on a counter in global memory; a barrier that never opens (a block that never
became resident, a kernel bug) would hang the process. This module holds the bound the launch
code passes to the kernels and the context in which verification bounds them.
"""
from __future__ import annotations

import contextlib
import contextvars
import os


#: Debug switch of both GPU backends: the number of polls after which a persistent kernel's grid
#: barrier gives up and the call raises (e.g. 100000000); 0 or unset: wait without bound.
BARRIER_TIMEOUT_ENV = "LSTM_KERNELS_BARRIER_TIMEOUT"


#: Polls every grid barrier gives up after while :func:`bounded_barriers` is active (verification);
#: per thread and context, so one verification bounds nobody else's calls.
_BOUNDED_POLLS: contextvars.ContextVar = contextvars.ContextVar("lstm_kernels_bounded_polls", default=None)


@contextlib.contextmanager
def bounded_barriers(polls: int):
    """Within the block (this thread and context), every persistent kernel's grid barrier gives up
    after ``polls`` polls and the call raises, whatever LSTM_KERNELS_BARRIER_TIMEOUT says
    (verification runs unproven kernels)."""
    token = _BOUNDED_POLLS.set(polls)
    try:
        yield
    finally:
        _BOUNDED_POLLS.reset(token)


def barrier_spin_limit() -> int:
    """LSTM_KERNELS_BARRIER_TIMEOUT as a number of polls (0: off); ValueError on anything else."""
    bounded = _BOUNDED_POLLS.get()
    if bounded is not None:
        return bounded
    value = os.environ.get(BARRIER_TIMEOUT_ENV, "").strip() or "0"
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{BARRIER_TIMEOUT_ENV}={value!r}: expected a number of polls (0 = no bound)") from None
    if limit < 0 or limit >= 2**31:
        raise ValueError(f"{BARRIER_TIMEOUT_ENV}={value!r}: expected 0 <= polls < 2**31")
    return limit


#: Polls after which a grid barrier gives up while a plan is verified.
VERIFY_BARRIER_POLLS = 1 << 24


def verification_bounds():
    """The context in which verification runs an unproven plan: every grid barrier bounded."""
    return bounded_barriers(VERIFY_BARRIER_POLLS)

