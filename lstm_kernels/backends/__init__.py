"""The backends of the LSTM recurrence: the contract (:mod:`.contract`), the dispatch that picks
the one that serves a call (:mod:`.dispatch`), and one module or subpackage per implementation:

- :mod:`.reference`: the float64-exact loop in torch ops, the oracle; serves every call.
- :mod:`.native`: torch's own LSTM kernel (cuDNN on CUDA) for a whole module.
- :mod:`.cuda`: the hand-written CUDA kernels of ``csrc/`` (the extension ``lstm_kernels._C``).
- :mod:`.triton`: the Triton kernels.

:mod:`.barrier_bound` is what the persistent kernels of both GPU backends share: the time bound on
their grid barriers and how a give-up reaches the host; :mod:`.device_rows` the active rows of a
packed call on the device.
"""
from __future__ import annotations

from .barrier_bound import (  # noqa: F401
    BARRIER_TIMEOUT_ENV, DEFAULT_BARRIER_TIMEOUT_S, barrier_timeout_ns, barrier_timeout_s, bounded_barriers,
    verification_bounds,
)
from .contract import (  # noqa: F401
    Backend, BackendUnsupportedError, RecurrenceCall, RecurrenceInputs, WorkspaceSpec,
)
from .dispatch import (  # noqa: F401
    _REGISTRY, AUTO_ORDER, ENV_VAR, _known_failure, _refusal, _verification_failure, available_backends,
    backend_from_env, check_backend_name, get_backend, known_backends, load_builtin_backends, register,
    resolve_backend, serving_kernels, set_verifier, trace_time_constant, unavailable_backends,
)

__all__ = [
    "AUTO_ORDER",
    "Backend",
    "BARRIER_TIMEOUT_ENV",
    "BackendUnsupportedError",
    "ENV_VAR",
    "RecurrenceCall",
    "RecurrenceInputs",
    "WorkspaceSpec",
    "available_backends",
    "backend_from_env",
    "DEFAULT_BARRIER_TIMEOUT_S",
    "barrier_timeout_ns",
    "barrier_timeout_s",
    "bounded_barriers",
    "verification_bounds",
    "check_backend_name",
    "get_backend",
    "known_backends",
    "load_builtin_backends",
    "register",
    "resolve_backend",
    "serving_kernels",
    "set_verifier",
    "unavailable_backends",
]
