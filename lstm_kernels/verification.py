"""Verification before first use: a kernel proves itself on this machine before it serves.

Nobody can test the GPU kernels on every GPU they will meet. So the first time a process meets a
*plan* of a backend that asks for it (:meth:`Backend.verify_on_first_use`: the GPU backends on a
GPU), dispatch runs that plan on a short prefix of the call and compares it with the reference:

- the plan: backend, its :meth:`Backend.plan_signature` (variant and precision switches), dtype,
  TF32 setting, H, P, projection, variable lengths, resets inside the sequence, the batch size (the kernels' tiles and grids
  follow the exact B), whether gradients are needed (inference and training compile different
  kernels), and the device's name and compute capability;
- the run: :data:`VERIFY_STEPS` steps (at most the call's T) at the call's B, H and P, with its
  projection and variable lengths, forward and (where the call needs gradients) backward, against
  the reference backend in float64 on the same rounded inputs, autocast off, with the tolerances of
  :mod:`lstm_kernels.tolerances` (at least twice the reference's own error in that dtype), under
  :func:`~lstm_kernels.backends.barrier_bound.verification_bounds`, so that a kernel whose grid barrier never opens raises instead of
  hanging, and fails;
- the verdict is remembered in the process and, where it is a measured one, on disk
  (``verdicts.json`` in :func:`cache_dir`), under a key of the environment: package, torch, Triton
  and driver versions and a hash of the kernel sources (the backends' Python files, the CUDA
  extension, and this verifier and its tolerances), so that an upgrade verifies again and later
  processes skip what an earlier one proved. A run that raised (out of memory, a refused launch,
  a barrier that gave up) is a failed verdict for this process only.

A failed plan gives one warning per process naming the plan and the largest error; ``auto`` takes
the next backend (ending at the reference) and a named backend raises
:class:`BackendUnsupportedError`. ``LSTM_KERNELS_VERIFY=0`` turns verification off. Inside CUDA
graph capture nothing can be verified (it launches and synchronises): an unverified plan met there
raises, asking for one eager call first (PyTorch's capture documentation asks for that warm-up).
While torch.compile traces, dispatch runs nothing but consults the verdicts already known (this
process's, the cache file's), so ``auto`` compiles around a plan known to fail; an unknown plan is
verified by the op ``lstm_kernels::recurrence`` at its first run, which raises if it fails (a
compiled graph cannot switch kernels).

The binary verification runs is the one that serves: the barrier bound is a runtime argument of
every kernel (lstm_kernels/backends/barrier_bound.py). Limit: a kernel fault that breaks the CUDA
context (an illegal address) ends the process, which no verification can turn into a fallback.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from . import __version__
from .backends import Backend, RecurrenceCall, RecurrenceInputs, get_backend, verification_bounds, set_verifier
from .cells import GRU, LSTM, cell_args, gates
from .layer_calls import with_resets
from .disk_cache import CACHE_DIR_ENV, DiskCache, cache_dir  # noqa: F401  (part of this module's face)
from .tolerances import REL_TOL, mismatch, rel_error

VERIFY_ENV = "LSTM_KERNELS_VERIFY"
CACHE_FILE = "verdicts.json"
#: Steps of the prefix a plan is verified on.
VERIFY_STEPS = 6


class Verdict(NamedTuple):
    ok: bool
    max_error: float  # the largest norm-relative error against float64 (inf: the run raised)
    detail: str  # what was compared, or what went wrong


def enabled() -> bool:
    return os.environ.get(VERIFY_ENV, "1").strip() != "0"


def device_description(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def tf32_in_use(call: RecurrenceCall) -> bool:
    return call.dtype == torch.float32 and call.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32


def _plan_fields(backend: Backend, call: RecurrenceCall) -> tuple:
    return (backend.name, tuple(backend.plan_signature(call)), call.dtype, tf32_in_use(call), call.hidden_size,
            call.state_size, call.has_projection, call.variable_lengths, call.batch, call.needs_grad, call.device,
            call.has_resets, call.cell)


_KEYS: dict = {}  # _plan_fields -> plan_key: the JSON is built once per plan, not per call


def plan_key(backend: Backend, call: RecurrenceCall) -> str:
    fields = _plan_fields(backend, call)
    key = _KEYS.get(fields)
    if key is None:
        key = _KEYS[fields] = json.dumps(dict(
            backend=backend.name, plan=list(fields[1]), dtype=str(call.dtype).replace("torch.", ""),
            tf32=fields[3], H=call.hidden_size, P=call.state_size, projection=call.has_projection,
            variable_lengths=call.variable_lengths, batch=call.batch, needs_grad=call.needs_grad,
            device=device_description(call.device), **({"resets": True} if call.has_resets else {}),
            **({"cell": call.cell} if call.cell != LSTM else {})),
            sort_keys=True)
    return key


@functools.lru_cache(maxsize=None)
def kernel_source_hash() -> str:
    """sha256 of the backends' Python sources and the CUDA extension, as installed."""
    return sources_hash(Path(__file__).resolve().parent)


def sources_hash(root: Path) -> str:
    """sha256 of what a verdict of the package at ``root`` depends on: every Python source under
    backends/ (its subpackages too: the cuda and triton backends' plans and kernels), the extension
    (_C*), and the verifier itself (verification.py, tolerances.py), each named by its path under root."""
    digest = hashlib.sha256()
    verifier = [root / "verification.py", root / "tolerances.py"]
    for path in sorted((root / "backends").rglob("*.py")) + sorted(root.glob("_C*")) + verifier:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def environment(package_version: str = __version__, kernels: Optional[str] = None) -> dict:
    """What a verdict depends on besides the plan."""
    try:
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:  # noqa: BLE001 - not installed, or no metadata
        triton_version = None
    driver = None
    if torch.cuda.is_available() and hasattr(torch._C, "_cuda_getDriverVersion"):
        driver = torch._C._cuda_getDriverVersion()
    return dict(package=package_version, torch=torch.__version__, triton=triton_version, driver=driver,
                kernels=kernel_source_hash() if kernels is None else kernels)


def environment_key(env: Optional[dict] = None) -> str:
    env = environment() if env is None else env
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]


# ---- the verdicts: in the process, and on disk ------------------------------------------------

_VERDICTS: dict = {}  # plan key -> Verdict (this process)
_WARNED: set = set()


def _decode_verdict(value) -> Verdict:
    ok, max_error, detail = value
    return Verdict(bool(ok), float(max_error), str(detail))


_DISK = DiskCache(CACHE_FILE, decode=_decode_verdict, encode=list)


def clear(disk: bool = False) -> None:
    """Forget this process's verdicts (and, with ``disk``, the cache file's)."""
    _VERDICTS.clear()
    _WARNED.clear()
    _KEYS.clear()
    _DISK.clear(disk)


# ---- running a plan on a prefix ---------------------------------------------------------------


def _prefix_case(call: RecurrenceCall, steps: int) -> dict:
    """Random inputs of ``call``'s cell and shapes over ``steps`` steps (the GRU's: no c0, dc_T or
    w_hr; a b_hn)."""
    T, B, H, P = steps, call.batch, call.hidden_size, call.state_size
    gen = torch.Generator().manual_seed(0)
    lstm = call.cell == LSTM

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(call.dtype).to(call.device)

    G = gates(call.cell)
    case = dict(xg=rnd(T, B, G * H, scale=0.5), w_hh=rnd(G * H, P, scale=P**-0.5), h0=rnd(B, P, scale=0.5),
                c0=rnd(B, H, scale=0.5) if lstm else None,
                w_hr=rnd(P, H, scale=H**-0.5) if call.has_projection else None,
                dh_all=rnd(T, B, P), dh_T=rnd(B, P), dc_T=rnd(B, H) if lstm else None, batch_sizes=None, resets=None,
                b_hn=None if lstm else rnd(H, scale=0.5))
    if call.has_resets:  # at the first step in row 0, every third step in the others, none in the last
        resets = torch.zeros(T, B, dtype=torch.bool)
        resets[0, 0] = True
        resets[1::3, 1:max(B - 1, 1)] = True
        case["resets"] = resets.to(call.device)
    if call.variable_lengths:  # lengths from T down to about T/2, non-increasing, the first full
        lengths = [T - (b * T) // (2 * B) for b in range(B)]
        case["batch_sizes"] = torch.tensor([sum(n > t for n in lengths) for t in range(T)], dtype=torch.int64)
    return case


def _run(backend: Backend, case: dict, needs_grad: bool, dtype: Optional[torch.dtype] = None) -> dict:
    """Forward (and, with ``needs_grad``, backward) of ``backend`` on ``case``, inputs cast to ``dtype``."""
    cast = (lambda t: None if t is None else t.to(dtype)) if dtype is not None else (lambda t: t)
    xg, w_hh, h0, c0, w_hr = (cast(case[n]) for n in ("xg", "w_hh", "h0", "c0", "w_hr"))
    bs = case["batch_sizes"]
    resets = with_resets(case["resets"])
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, bs)
    cell = cell_args(inputs.cell, cast(case["b_hn"]))
    h_all, h_T, c_T, workspace = backend.forward(xg, w_hh, h0, c0, w_hr, bs, needs_grad, **resets, **cell)
    out = dict(h_all=h_all, h_T=h_T)
    if inputs.cell == LSTM:
        out["c_T"] = c_T
    if needs_grad:
        dG, dh0, dc0, extra = backend.backward(inputs, h_all, tuple(workspace), cast(case["dh_all"]),
                                               cast(case["dh_T"]), cast(case["dc_T"]), **resets, **cell)
        out.update(dG=dG, dh0=dh0)
        if inputs.cell == GRU:
            out["d_hn"] = extra
        else:
            out["dc0"] = dc0
            if w_hr is not None:
                out["dW_hr"] = extra
    if xg.is_cuda:
        torch.cuda.synchronize(xg.device)
    return out


def _autocast_off(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def verify(backend: Backend, call: RecurrenceCall, steps: int = VERIFY_STEPS) -> Verdict:
    """Run ``backend`` on a prefix of ``call`` (forward, and backward where the call needs gradients)
    against float64; never raises. A verdict whose detail starts with "raised" comes from an exception."""
    case = _prefix_case(call, max(1, min(steps, call.seq_len)))
    reference = get_backend("reference")
    grad = call.needs_grad
    try:
        with verification_bounds(), torch.no_grad(), _autocast_off(call.device):
            actual = _run(backend, case, grad)
            expected = _run(reference, case, grad, torch.float64)
            own = _run(reference, case, grad)  # the reference's own error in this dtype
    except Exception as error:  # noqa: BLE001 - any failure of an unproven kernel is a failed verification
        first_line = (str(error).splitlines() or [""])[0][:300]
        return Verdict(False, math.inf, f"raised {type(error).__name__}: {first_line}")
    base = REL_TOL["tf32" if tf32_in_use(call) else call.dtype]
    worst, failures = 0.0, []
    for name, e in expected.items():
        a = actual.get(name)
        tol = max(base, 2 * rel_error(own[name], e))
        what = mismatch(a, e, tol)
        if a is None or a.shape != e.shape or torch.isnan(a.double()).any():
            worst = math.inf
        else:
            worst = max(worst, rel_error(a, e))
        if what is not None:
            failures.append(f"{name}: {what}")
    states = "h, c" if call.cell == LSTM else "h"
    steps_run = len(case["xg"])
    detail = "; ".join(failures) or f"{states} and every gradient within tolerance over {steps_run} steps"
    return Verdict(not failures, worst, detail)


# ---- what dispatch asks ------------------------------------------------------------------------


def _failure_at_any_batch(backend: Backend, call: RecurrenceCall) -> Optional[str]:
    """Why ``backend`` failed verification for ``call``'s plan at some batch (known verdicts only)."""
    def without_batch(key: str) -> dict:
        fields = json.loads(key)
        fields.pop("batch", None)
        return fields

    wanted = without_batch(plan_key(backend, call))
    known = {**_DISK.entries(environment_key()), **_VERDICTS}
    for key, verdict in known.items():
        if not verdict.ok and without_batch(key) == wanted:
            return f"its plan failed verification on this machine: {verdict.detail}"
    return None


def failure(backend: Backend, call: RecurrenceCall, measure: bool = True) -> Optional[str]:
    """None when ``backend`` may serve ``call`` (verified, or not subject to verification); else why not.

    Verifies the plan the first time this process meets it (unless a verdict is on disk). With
    ``measure`` False (torch.compile tracing) only a known verdict counts: an unknown plan passes here
    and is verified when the compiled op first runs. A call of batch -1 (a traced batch may be
    symbolic) asks whether the plan is known to fail at any batch."""
    if not enabled() or not backend.verify_on_first_use(call):
        return None
    if call.batch == -1:
        return _failure_at_any_batch(backend, call)
    key = plan_key(backend, call)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        env_key = environment_key()
        verdict = _DISK.get(env_key, key)
        if verdict is None:
            if not measure:
                return None
            if call.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"lstm_kernels: the {backend.name!r} plan for this call has not been verified on this GPU, and "
                    "verification cannot run during CUDA graph capture: run the model once eagerly before "
                    f"capturing (a warm-up, as PyTorch's CUDA graph documentation asks). Plan: {key}")
            verdict = verify(backend, call)
            if not verdict.detail.startswith("raised"):  # a measured verdict; an exception may pass
                _DISK.put(env_key, environment(), key, verdict)
        _VERDICTS[key] = verdict
    if verdict.ok:
        return None
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"lstm_kernels: the {backend.name!r} backend failed verification on this machine and will not "
                      f"serve this plan (largest error {verdict.max_error:.3g}): {verdict.detail}. Plan: {key}",
                      RuntimeWarning, stacklevel=2)
    return f"its plan failed verification on this machine (largest error {verdict.max_error:.3g}): {verdict.detail}"


set_verifier(failure)
