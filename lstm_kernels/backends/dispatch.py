"""The one dispatch point: the registry of backends and the choice of the one that serves a call.

Selection: ``backend="auto"`` walks :data:`AUTO_ORDER` and takes the first
backend whose :meth:`Backend.supports` returns None and whose plan, where it
must (:meth:`Backend.verify_on_first_use`), has passed verification on this
machine (lstm_kernels/verification.py); a named backend serves the call or
raises :class:`BackendUnsupportedError` naming why. The environment variable
``LSTM_KERNELS_BACKEND`` overrides ``"auto"``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..cells import TORCH_NAME
from .contract import Backend, BackendUnsupportedError, RecurrenceCall

ENV_VAR = "LSTM_KERNELS_BACKEND"
#: ENV_VAR as os.environ keys it internally (CPython: encoded), or None where that is not known.
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def backend_from_env(default: str = "auto") -> str:
    """The backend LSTM_KERNELS_BACKEND names ("" counts as unset), else ``default``.

    Read on every call, so that setting the variable takes effect at once. This runs on every
    forward: where the variable is unset, os.environ.get raises and catches a KeyError (about
    5 µs, measured in a FusedLSTM call of 120 µs), so look in the mapping os.environ keeps first.
    """
    data = getattr(os.environ, "_data", None)
    if _ENV_KEY is not None and isinstance(data, dict) and _ENV_KEY not in data:
        return default
    return os.environ.get(ENV_VAR) or default


_REGISTRY: dict[str, Backend] = {}
_BUILTINS_LOADED = False

#: ``verifier(backend, call, measure) -> None or why the backend failed`` (installed by
#: lstm_kernels.verification; None: nothing is verified); ``measure`` False: known verdicts only,
#: and a call of batch -1 asks for a failure known at any batch.
_verifier = None


def set_verifier(verifier) -> None:
    global _verifier
    _verifier = verifier


def _verification_failure(backend: Backend, call: RecurrenceCall) -> Optional[str]:
    """Why ``backend`` may not serve ``call`` after all: its plan failed verification on this machine.
    While torch.compile traces, only a verdict already known (this process, or the disk cache) counts:
    nothing runs during tracing, and the op's implementation verifies an unknown plan at its first run."""
    if _verifier is None:
        return None
    if not torch.compiler.is_compiling():
        return _verifier(backend, call, True)
    # A traced batch may be symbolic, and dynamo cannot tell that apart here: look up the plan at
    # any batch (batch -1), which the verifier answers with a failure known at any batch.
    return _known_failure(backend.name, (1, -1, call.hidden_size, call.state_size, call.dtype, call.device,
                                         call.has_projection, call.variable_lengths, call.needs_grad,
                                         call.has_resets, call.cell))


def trace_time_constant(fn):
    """``torch.compiler.assume_constant_result(fn)``: dynamo runs ``fn`` when it traces a call (its
    arguments constants) and keeps the result as a constant. Marked as that function marks it, so
    that importing this package does not import dynamo (which imports Triton before the
    interpreter can be chosen; tests/test_compile_fresh_process.py checks both)."""
    fn._dynamo_marked_constant = True
    return fn


@trace_time_constant
def _known_failure(name: str, call_fields: tuple) -> Optional[str]:
    """The verifier's known verdict for the call of ``call_fields`` (RecurrenceCall's, in order), run
    by dynamo at trace time (its file and JSON work cannot be traced) and kept as a constant."""
    return _verifier(get_backend(name), RecurrenceCall(*call_fields), False)


#: The order in which ``backend="auto"`` tries backends: fastest first, the
#: exact reference last (it serves everything).
AUTO_ORDER: tuple[str, ...] = ("cuda", "triton", "reference")


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def load_builtin_backends() -> None:
    """Import and register the built-in backends (once; the optional ones where they import).

    Dispatch calls this, and so does the import of :mod:`lstm_kernels.ops`: torch.compile cannot trace
    an import made by a call (``__import__`` is skipped by dynamo), but it runs an ``import`` statement
    natively, so the op path's first traced call finds the registry filled.
    """
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from . import reference  # noqa: F401  (registers itself)

    for optional in ("triton", "cuda"):
        try:
            __import__(f"{__package__}.{optional}")
        except ImportError:
            pass


def known_backends() -> tuple[str, ...]:
    load_builtin_backends()
    return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    load_builtin_backends()
    try:
        return _REGISTRY[name]
    except KeyError:
        choices = ", ".join(["auto", *AUTO_ORDER])
        raise ValueError(f"unknown LSTM backend {name!r}; choose one of: {choices}") from None


def available_backends() -> list[str]:
    """Names of the backends this machine can run, in ``auto`` order."""
    load_builtin_backends()
    return [n for n in AUTO_ORDER if n in _REGISTRY and _REGISTRY[n].unavailable_reason() is None]


def unavailable_backends() -> dict[str, str]:
    """Backends this machine cannot run, with the reason for each."""
    load_builtin_backends()
    reasons = {}
    for name in AUTO_ORDER:
        backend = _REGISTRY.get(name)
        if backend is None:
            reasons[name] = "not importable (its dependencies are missing)"
        else:
            why = backend.unavailable_reason()
            if why is not None:
                reasons[name] = why
    return reasons


def check_backend_name(name: str) -> str:
    """Validate a ``backend=`` argument early (at module construction)."""
    if name == "auto":
        return name
    get_backend(name)
    return name


def _refusal(backend: Backend, call: RecurrenceCall) -> Optional[str]:
    """Why ``backend`` cannot serve ``call``, or None."""
    why = backend.unavailable_reason()
    if why is None and call.has_resets and not backend.serves_resets:
        why = "it does not serve resets inside a sequence"
    if why is None and call.cell not in backend.cells:
        why = f"it does not serve the {TORCH_NAME[call.cell]} cell"
    return why or backend.supports(call) or _verification_failure(backend, call)


def _serves(backend: Optional[Backend], call: RecurrenceCall) -> bool:
    return backend is not None and _refusal(backend, call) is None


def serving_kernels(call: RecurrenceCall) -> list[str]:
    """The backends of :data:`AUTO_ORDER` before the reference that serve ``call`` (available,
    supported, verified on this machine where they must be), in that order."""
    load_builtin_backends()
    return [name for name in AUTO_ORDER[:-1] if _serves(_REGISTRY.get(name), call)]


def resolve_backend(requested: str, call: RecurrenceCall) -> Backend:
    """The one dispatch point: pick the backend that serves ``call``.

    An empty batch (B = 0, which nn.LSTM accepts) has nothing to compute: whatever
    backend is asked for, the reference's bookkeeping returns its empty results and
    gradients, so no kernel has to handle zero-sized launches.
    """
    requested = backend_from_env(requested) if requested == "auto" else requested
    if call.batch == 0:
        if requested != "auto":
            get_backend(requested)  # an unknown name still raises
        return get_backend("reference")
    if requested != "auto":
        backend = get_backend(requested)
        why = _refusal(backend, call)
        if why is not None:
            raise BackendUnsupportedError(f"LSTM backend {requested!r} cannot serve this call: {why}")
        return backend
    load_builtin_backends()
    for name in AUTO_ORDER:
        if _serves(_REGISTRY.get(name), call):
            return _REGISTRY[name]
    raise BackendUnsupportedError(f"no LSTM backend serves this call: {call}")
