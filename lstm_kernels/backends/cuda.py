"""The ``cuda`` backend: hand-written CUDA kernels of ``csrc/``, bound by pybind11 as ``lstm_kernels._C``.

The extension takes device pointers, sizes, a dtype code and the CUDA stream as
Python ints (no libtorch); this module validates the call, makes inputs
contiguous, allocates every output and scratch buffer with torch and passes
``torch.cuda.current_stream().cuda_stream``.

Kernels at the budget of one step (csrc/fused_forward.cu, csrc/fused_backward.cu; host side
in :mod:`.cuda_fused`), on tensor cores with fp32 accumulation: float16 and bfloat16 on
mma.sync m16n8k16; float32 on m16n8k8 tf32, rounded to tf32 only where torch allows TF32
(``torch.backends.cuda.matmul.allow_tf32``), else at fp32 accuracy by splitting each operand
into two tf32 parts (three MMAs per product, "3xTF32"). W_hh resident in shared memory over ceil(H/8) x ceil(B/16) blocks, gate rows
interleaved so the cell runs on the accumulators, h_{t-1} (backward: dG_{t+1} in the storage dtype) copied
once per step with cp.async, a light grid barrier (release-add, acquire-poll). They also
serve ``proj_size`` (two half-steps and two barriers per step; dW_hr by one GEMM of the saved
dh_t and m_t) and variable lengths (``batch_sizes``: a step touches only its active rows).
Their grid must be co-resident for the persistent launch (one cooperative launch; the plan is
``_C.fused_plan``); otherwise the same code runs one launch per (half-)step, with the same bits.
Not served by them (and then by the kernels below): ``LSTM_KERNELS_CUDA_MMA=0``, and H too
large for their shared memory (checked per direction; the largest H served is 2240 forward and
2408 backward in 16 bits, 1120 and 1204 in float32 on sm_90's 227 KB; 1536, 1384, 768 and 692 on
sm_80's 163 KB).

Kernels (csrc/lstm_forward.cu, csrc/lstm_backward.cu), two variants:

- ``step``: one fused launch per time step (recurrent matmul + cell update;
  W_hh read from global memory/L2);
- ``persistent``: one cooperative launch for all steps, each block holding its
  slice of W_hh in shared memory, a grid-wide sync between steps; it runs only
  where the slice fits and the grid is co-resident (the extension checks with
  the occupancy API; ``_C.occupancy`` reports the plan), else ``auto`` falls
  back to ``step``.

The variant comes from the environment variable ``LSTM_KERNELS_CUDA_VARIANT``
(``fused``, ``step``, ``persistent`` or ``auto``), default :data:`DEFAULT_VARIANT`:

- ``fused`` (default): the fused persistent kernels where they serve the call and their grid
  is co-resident, else the per-step kernels;
- ``step``, ``persistent``, ``auto``: the kernels of lstm_forward.cu / lstm_backward.cu as
  described here.

Projections and variable lengths are served by the fused kernels only, whatever the variant:
persistent where the grid is co-resident (per-step with ``step``), else one launch per
half-step; ``persistent`` raises where the grid is not co-resident. With ``auto``
a cooperative launch that the runtime refuses although the plan allowed it (MPS,
MIG, green contexts, SMs held elsewhere: ``_C.CooperativeLaunchRefused``) is run again
with the per-step kernels, and that (device, direction, dtype, H, tensor cores) key
stays per-step for the process (:func:`refused_cooperative_launches`); a named
``persistent`` raises. The extension caches the persistent plan per (device, kernel,
grid, shared memory) (``_C.plan_cache_stats``).

The kernels of lstm_forward.cu / lstm_backward.cu run the recurrent matmuls on tensor cores (wmma, fp32 accumulation) unless
``LSTM_KERNELS_CUDA_MMA=0``: the forward h_{t-1} W_hh^T on fp16/bf16 operands
(products exact in fp32), the backward dG_{t+1} W_hh on tf32 (dG is fp32 and is
rounded to tf32; 16-bit W_hh is exact in tf32). For float32 they use tf32 only
where torch allows it (``torch.backends.cuda.matmul.allow_tf32``); otherwise,
and with the switch off, plain fp32 FMA, so float32 is exact fp32.

Availability: the extension links its own CUDA runtime statically, so besides torch
seeing a GPU, the backend asks that runtime (``_C.runtime_status``, once per process):
a driver older than the nvcc that built it (``cudaErrorInsufficientDriver``) makes
the backend unavailable with that reason, and ``auto`` moves on.

Grid barriers: every persistent launch (both kernel families) bounds its grid-barrier waits in
time (``LSTM_KERNELS_BARRIER_TIMEOUT``, seconds, default 10; 0: no bound), read from the GPU's
clock only after a poll found the barrier closed; the earlier persistent kernels then use a
hand-written barrier instead of ``grid.sync()``. A launch whose wait gave up ends early and
leaves a record (:mod:`.barrier_bound`); nothing synchronises the call: the record's copy is
queued after the launch, and the next call on that device raises a RuntimeError naming the
kernel, the step and the block (verification raises at once).

Resets inside a sequence (``resets`` [T, B] bool on xg's device, passed to the kernels as uint8): served
by the fused kernels (both launch modes; each kernel's instance with resets is a template instance of
its own, the one without is unchanged) and by the per-step kernels. The earlier cooperative
``persistent`` kernels do not serve them: a call with resets that ``LSTM_KERNELS_CUDA_VARIANT=persistent``
would send there (no projection, no variable lengths) is refused by :meth:`CudaBackend.supports`, and
``auto`` runs the per-step kernels for it.

Dimension names: T steps, B batch, H hidden units. Gate order along 4H: i, f, g, o.
Workspace kept for backward: the activated gates ``act`` [T, B, 4H] fp32 and the
cell states ``c_all`` [T, B, H] fp32 (backward recomputes only tanh(c_t)).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Optional

import torch

from ..build_info import build_info
from . import Backend, RecurrenceCall, RecurrenceInputs, barrier_bound, cuda_fused, register
from .barrier_bound import BARRIER_TIMEOUT_ENV  # noqa: F401  (the bound's switch, shared with the triton backend)

try:
    from .. import _C
except ImportError:  # built without nvcc (or LSTM_KERNELS_SKIP_CUDA=1)
    _C = None

NOT_BUILT = "the CUDA extension lstm_kernels._C is not built (install with nvcc on PATH or CUDA_HOME set)"
NO_GPU = "no CUDA GPU"

_INT32_MAX = 2**31 - 1
#: The per-step kernels put batch tiles of 16 rows on gridDim.y, which is at most 65535.
_MAX_BATCH = 65535 * 16

VARIANT_ENV = "LSTM_KERNELS_CUDA_VARIANT"
#: The fused kernels where they serve (issue 13), else the per-step kernels.
DEFAULT_VARIANT = "fused"
_VARIANTS = ("fused", "step", "persistent", "auto")


MMA_ENV = "LSTM_KERNELS_CUDA_MMA"


def tensor_cores_requested() -> bool:
    """``LSTM_KERNELS_CUDA_MMA`` (default 1): the recurrent matmuls on tensor cores (see the module docstring)."""
    v = os.environ.get(MMA_ENV, "1")
    if v not in ("0", "1"):
        raise ValueError(f"{MMA_ENV}={v!r}; choose 0 or 1")
    return v == "1"


def use_tensor_cores(dtype: torch.dtype) -> bool:
    """Whether a call's matmuls run on tensor cores: the switch, and for float32 torch's TF32 flag."""
    if not tensor_cores_requested():
        return False
    return dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32


def requested_variant() -> str:
    v = os.environ.get(VARIANT_ENV, DEFAULT_VARIANT)
    if v not in _VARIANTS:
        raise ValueError(f"{VARIANT_ENV}={v!r}; choose one of {', '.join(_VARIANTS)}")
    return v


@functools.lru_cache(maxsize=None)
def _runtime_status_of(ext) -> tuple:
    return tuple(ext.runtime_status())


def runtime_status() -> tuple:
    """(error code, message or None, device count, runtime version, driver version) of the extension's
    own CUDA runtime, asked once per process (see ``_C.runtime_status``)."""
    return _runtime_status_of(_C)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def runtime_unavailable_reason() -> Optional[str]:
    """Why the extension's CUDA runtime cannot run kernels here (cached), or None."""
    code, message, count, runtime, driver = runtime_status()
    versions = f"extension built with CUDA {_cuda_version(runtime)}, driver supports CUDA {_cuda_version(driver)}"
    if code != 0:
        return f"the extension's CUDA runtime cannot use the GPU: {message} ({versions})"
    if count < 1:
        return f"the extension's CUDA runtime sees no device ({versions})"
    return None


#: Cooperative launches the runtime refused, {(device, direction, dtype, H, tensor cores): error}:
#: ``auto`` runs the per-step kernels for these keys from then on.
_REFUSED: dict = {}


def refused_cooperative_launches() -> dict:
    """The keys whose cooperative launch the runtime refused in this process, with the error."""
    return dict(_REFUSED)


def _variant_code(v: str) -> int:
    return {"step": _C.VARIANT_STEP, "persistent": _C.VARIANT_PERSISTENT, "auto": _C.VARIANT_AUTO}[v]


def _variant_name(code: int) -> str:
    return {_C.VARIANT_STEP: "step", _C.VARIANT_PERSISTENT: "persistent"}[code]


def _dtype_codes() -> dict:
    if _C is None:
        return {}
    return {torch.float32: _C.DTYPE_FLOAT32, torch.float16: _C.DTYPE_FLOAT16, torch.bfloat16: _C.DTYPE_BFLOAT16}


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _grad_or_zeros(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if g is None:
        return torch.zeros_like(like)
    return g.to(like.dtype).contiguous()


def _run_variant(entry, args: tuple, requested: str, mma: bool, key: tuple, barrier: tuple = (0, 0, 0, 0),
                 **kwargs) -> int:
    """``entry(*args, variant, mma, *barrier, **kwargs)`` for the ``requested`` variant; returns the code of the
    one that ran.

    With ``auto``, a cooperative launch the runtime refuses (``_C.CooperativeLaunchRefused``:
    nothing ran) is run again per-step, and ``key`` is remembered so that later ``auto``
    calls go per-step directly. A named variant raises.
    """
    variant = "step" if requested == "auto" and key in _REFUSED else requested
    try:
        return entry(*args, _variant_code(variant), mma, *barrier, **kwargs)
    except _C.CooperativeLaunchRefused as e:
        if variant != "auto":
            raise
        _REFUSED[key] = str(e)
        warnings.warn(
            f"lstm_kernels cuda backend: the runtime refused the persistent kernel's cooperative launch ({e}); "
            "running the per-step kernels for this shape from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        return entry(*args, _C.VARIANT_STEP, mma, *barrier, **kwargs)


def resets_mask(resets: Optional[torch.Tensor], T: int, B: int, device: torch.device) -> Optional[torch.Tensor]:
    """``resets`` [T, B] bool on ``device`` as the kernels read it: contiguous uint8 (the same bytes), or None."""
    if resets is None:
        return None
    if resets.dtype != torch.bool:
        raise TypeError(f"cuda backend: resets must be a bool tensor, got {resets.dtype}")
    if tuple(resets.shape) != (T, B):
        raise ValueError(f"cuda backend: resets has shape {tuple(resets.shape)}, expected (T, B) = ({T}, {B})")
    if resets.device != device:
        raise ValueError(f"cuda backend: resets is on {resets.device}, xg on {device}")
    return resets.contiguous().view(torch.uint8)


def _with_resets(mask: Optional[torch.Tensor]) -> dict:
    """The ``resets`` keyword of an extension entry: none without resets, so that call is as before."""
    return {} if mask is None else {"resets": mask.data_ptr()}


def _barrier(device: torch.device, kernel: str) -> tuple:
    """The barrier arguments of a persistent launch of ``kernel`` (a :data:`barrier_bound.KERNELS`
    name): a zeroed per-launch state, the device's error record, the bound in ns and the code."""
    return (barrier_bound.launch_state(device), barrier_bound.device_record(device),
            barrier_bound.barrier_timeout_ns(), barrier_bound.kernel_code(kernel))


def _barrier_args(barrier: tuple) -> tuple:
    state, record, timeout_ns, code = barrier
    return _ptr(state), _ptr(record), timeout_ns, code


def _launch(entry, kernel: str, like: torch.Tensor, *tensors: Optional[torch.Tensor],
            sizes: tuple, resets: Optional[torch.Tensor] = None) -> tuple[str, bool]:
    """Call ``_C.forward`` or ``_C.backward`` (``kernel``: "forward" or "backward") on torch's
    current stream of ``like``'s device.

    ``tensors`` are the entry's tensor arguments in order (None for a null pointer); the
    dtype code, variant, tensor-core switch and the barrier's bound follow from ``like``'s dtype
    and the environment; a persistent launch queues the copy of the device's barrier record. Returns the variant that ran and whether tensor cores were used.
    ``resets``: the uint8 mask of :func:`resets_mask`, or None; only the per-step kernels serve it (``auto``
    runs them; ``persistent`` is refused by :meth:`CudaBackend.supports`).
    """
    mma = use_tensor_cores(like.dtype)
    requested = requested_variant()
    if requested == "fused" or (resets is not None and requested == "auto"):  # the per-step kernels
        requested = "step"
    key = (str(like.device), kernel, like.dtype, sizes[-1], mma)
    with torch.cuda.device(like.device):
        stream = torch.cuda.current_stream(like.device).cuda_stream
        barrier = _barrier(like.device, f"cuda {kernel} (persistent)") if requested != "step" else None
        args = (_dtype_codes()[like.dtype], *(_ptr(t) for t in tensors), *sizes, stream)
        used = _run_variant(entry, args, requested, mma, key, _barrier_args(barrier) if barrier else (0, 0, 0, 0),
                            **_with_resets(resets))
        if used == _C.VARIANT_PERSISTENT:
            barrier_bound.after_launch(like.device, barrier[1])
    return _variant_name(used), mma


def _smem_optin(device: torch.device) -> int:
    """Shared memory a block may opt in to on ``device`` (a conservative sm_80 figure when unknown)."""
    try:
        return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)
    except Exception:  # no GPU here, or an older torch
        return cuda_fused.SMEM_OPTIN_SM80


def fused_tf32(dtype: torch.dtype) -> bool:
    """Whether the fused kernels run a float32 call's products on tf32 (torch allows TF32), rather
    than at fp32 accuracy."""
    return dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32)


def _directions(call: RecurrenceCall) -> tuple:
    return ("forward", "backward") if call.needs_grad else ("forward",)


def fused_unserved_reason(call: RecurrenceCall, directions: Optional[tuple] = None) -> Optional[str]:
    """Why the fused kernels (csrc/fused_*.cu) do not serve ``call`` in ``directions`` (default: the
    forward, and the backward when the call needs gradients), or None."""
    if call.dtype not in cuda_fused.DTYPES:
        return f"the fused kernels serve float16, bfloat16 and float32, not {call.dtype}"
    if not tensor_cores_requested():
        return f"the fused kernels run on tensor cores, which {MMA_ENV}=0 turns off"
    if call.has_projection and not 0 < call.state_size < call.hidden_size:
        return f"proj_size must be in [1, H), got {call.state_size} (H={call.hidden_size})"
    plan = cuda_fused.Plan(call.batch, call.hidden_size, call.state_size if call.has_projection else None)
    elem = torch.empty((), dtype=call.dtype).element_size()
    for direction in directions or _directions(call):
        if not plan.fits(_smem_optin(call.device), elem, (direction,)):
            return (f"H={call.hidden_size} is too large for the fused {direction} kernel's shared memory "
                    f"({plan.smem_bytes(direction, elem)} bytes in {call.dtype}) on this device")
    return None


@functools.lru_cache(maxsize=None)
def _fused_plan_of(device: str, direction: str, code: int, B: int, H: int, P: int, resets: bool = False) -> dict:
    with torch.cuda.device(torch.device(device)):
        return dict(_C.fused_plan(direction, code, B, H, P, **({"resets": True} if resets else {})))


def _fused_plan(device: torch.device, direction: str, dtype, B: int, H: int, P: int, resets: bool = False) -> dict:
    """``_C.fused_plan`` of the fused ``direction`` kernel for this call on ``device`` (cached); ``resets``:
    of the kernel's instance that serves resets (its own registers, so its own occupancy)."""
    code = cuda_fused.op_code(dtype, fused_tf32(dtype))
    return _fused_plan_of(str(device), direction, code, B, H, P, resets)


def fused_persistent_possible(device: torch.device, direction: str, dtype, B: int, H: int, P: int,
                              resets: bool = False) -> bool:
    """The fused ``direction`` kernel's grid is co-resident on ``device`` (``_C.fused_plan``, cached)."""
    key = (str(device), "fused-" + direction, dtype, B, H, P)
    return key not in _REFUSED and _fused_plan(device, direction, dtype, B, H, P, resets)["possible"]


def _fused_mode(call: RecurrenceCall, direction: str) -> Optional[bool]:
    """How the fused kernels run ``call``: True persistent, False one launch per (half-)step, None
    not at all (the kernels of lstm_forward.cu / lstm_backward.cu serve it). A projected or packed
    call, which only the fused kernels serve, raises where they cannot run it (never a kernel that
    ignores W_hr or batch_sizes)."""
    requested = requested_variant()
    only_fused = call.has_projection or call.variable_lengths
    if not only_fused and requested != "fused":
        return None
    P = call.state_size
    why = fused_unserved_reason(call, (direction,))
    if why is None and not _fused_plan(call.device, direction, call.dtype, call.batch, call.hidden_size, P,
                                       call.has_resets)["fits"]:
        why = f"the device's plan says the fused {direction} block's shared memory does not fit (B={call.batch}, " \
              f"H={call.hidden_size}, P={P}, {call.dtype})"
    if why is not None:
        if only_fused:
            what = "proj_size > 0" if call.has_projection else "variable lengths (PackedSequence)"
            raise RuntimeError(f"cuda backend: {what} is served by the fused kernels only, and {why}")
        return None
    if requested == "step":
        return False
    if fused_persistent_possible(call.device, direction, call.dtype, call.batch, call.hidden_size, P, call.has_resets):
        return True
    if requested == "persistent":
        raise RuntimeError(
            f"cuda backend: the persistent fused {direction} kernel was requested ({VARIANT_ENV}=persistent) but its "
            f"grid cannot be co-resident here (B={call.batch}, H={call.hidden_size}, P={P})"
        )
    return False if only_fused else None


def _run_fused(fn, direction: str, call: RecurrenceCall, persistent: bool, device: torch.device, *args,
               resets: Optional[torch.Tensor] = None):
    """``fn(entry, *args, persistent, barrier=...)`` (and ``resets=`` where not None) on ``device``'s current
    stream; returns (result,
    whether the persistent launch ran). A refused cooperative launch (nothing ran) is run again per
    (half-)step, and its key remembered (:func:`refused_cooperative_launches`); a named ``persistent``
    raises. The persistent launch's grid waits are bounded in time (:mod:`.barrier_bound`), and the
    copy of the device's record is queued after it (no host sync)."""
    entry = getattr(_C, "fused_" + direction)
    tf32 = fused_tf32(call.dtype)
    kw = {} if resets is None else {"resets": resets}
    with torch.cuda.device(device):
        if persistent:
            barrier = _barrier(device, f"cuda fused {direction} (persistent)")
            try:
                out = fn(entry, *args, True, barrier=_barrier_args(barrier), tf32=tf32, **kw)
            except _C.CooperativeLaunchRefused as e:
                if requested_variant() == "persistent":
                    raise
                _REFUSED[(str(device), "fused-" + direction, call.dtype, call.batch, call.hidden_size,
                          call.state_size)] = str(e)
                warnings.warn(f"lstm_kernels cuda backend: the runtime refused the fused {direction} kernel's "
                              f"cooperative launch ({e}); one launch per step for this shape from now on",
                              RuntimeWarning, stacklevel=3)
            else:
                barrier_bound.after_launch(device, barrier[1])
                return out, True
        return fn(entry, *args, False, tf32=tf32, **kw), False


class CudaBackend(Backend):
    name = "cuda"
    differentiable_backward = False
    serves_resets = True
    #: The variants that ran in the last forward and backward (for tests and benchmarks).
    last_forward_variant: Optional[str] = None
    last_backward_variant: Optional[str] = None
    #: Whether the last forward and backward ran their matmuls on tensor cores.
    last_forward_mma: Optional[bool] = None
    last_backward_mma: Optional[bool] = None
    #: Which kernels ran: "fused" (csrc/fused_*.cu), "wmma" or "fma" (csrc/lstm_*.cu).
    last_forward_kernel: Optional[str] = None
    last_backward_kernel: Optional[str] = None

    def verify_on_first_use(self, call: RecurrenceCall) -> bool:
        return call.device.type == "cuda"

    def plan_signature(self, call: RecurrenceCall) -> tuple:
        return (requested_variant(), use_tensor_cores(call.dtype))

    def unavailable_reason(self) -> Optional[str]:
        if _C is None:
            recorded = (build_info() or {}).get("reason")
            return f"{NOT_BUILT}; the build says: {recorded}" if recorded else NOT_BUILT
        if not torch.cuda.is_available():
            return NO_GPU
        return runtime_unavailable_reason()

    def supports(self, call: RecurrenceCall) -> Optional[str]:
        if call.device.type != "cuda":
            return f"{call.device.type} tensors are not served (CUDA only)"
        if call.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"dtype {call.dtype} is not served (float32, bfloat16 and float16 are)"
        if call.has_projection or call.variable_lengths:
            why = fused_unserved_reason(call)
            if why is not None:
                what = "proj_size > 0" if call.has_projection else "variable lengths (PackedSequence)"
                return f"{what} is served by the fused kernels only, and {why}"
        if (call.has_resets and requested_variant() == "persistent"
                and not (call.has_projection or call.variable_lengths)):
            return (f"resets inside a sequence are not served by the earlier cooperative persistent kernels "
                    f"({VARIANT_ENV}=persistent); the fused and the step variants serve them")
        if call.seq_len < 1 or call.batch < 1 or call.hidden_size < 1:
            return "empty input (T, B and H must be >= 1)"
        if call.batch * 4 * call.hidden_size > _INT32_MAX:
            return "B * 4H does not fit in int32"
        if call.batch > _MAX_BATCH:
            return f"batch {call.batch} is larger than the kernels' grid allows ({_MAX_BATCH})"
        return None

    def workspace_spec(self, call: RecurrenceCall):
        if not call.needs_grad:
            return ()
        T, B, H = call.seq_len, call.batch, call.hidden_size
        return (((T, B, 4 * H), torch.float32), ((T, B, H), torch.float32))

    def _check(self, xg, w_hh, h0, c0, w_hr=None):
        T, B, four_h = xg.shape
        H = four_h // 4
        P = H if w_hr is None else w_hr.shape[0]
        if (four_h != 4 * H or w_hh.shape != (4 * H, P) or h0.shape != (B, P) or c0.shape != (B, H)
                or (w_hr is not None and w_hr.shape != (P, H))):
            raise ValueError(
                f"cuda backend: bad shapes xg {tuple(xg.shape)}, w_hh {tuple(w_hh.shape)}, "
                f"h0 {tuple(h0.shape)}, c0 {tuple(c0.shape)}"
                + ("" if w_hr is None else f", w_hr {tuple(w_hr.shape)}")
            )
        for name, t in (("w_hh", w_hh), ("h0", h0), ("c0", c0)) + ((("w_hr", w_hr),) if w_hr is not None else ()):
            if t.dtype != xg.dtype:
                raise TypeError(f"cuda backend: {name} is {t.dtype}, xg is {xg.dtype}; one dtype expected")
            if t.device != xg.device:
                raise ValueError(f"cuda backend: {name} is on {t.device}, xg on {xg.device}")
        return T, B, H

    def forward(self, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad: bool, resets=None):
        call = RecurrenceCall.of(xg, w_hh, w_hr, batch_sizes, needs_grad, resets)
        why = self.unavailable_reason() or self.supports(call)
        if why is not None:
            raise RuntimeError(f"cuda backend: {why}")
        T, B, H = self._check(xg, w_hh, h0, c0, w_hr)
        mask = resets_mask(resets, T, B, xg.device)
        barrier_bound.raise_if_gave_up(xg.device)
        mode = _fused_mode(call, "forward")
        if mode is not None:
            (h_all, h_T, c_T, workspace), ran = _run_fused(
                cuda_fused.forward, "forward", call, mode, xg.device, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad,
                resets=mask)
            self.last_forward_variant = "persistent" if ran else "step"
            self.last_forward_kernel, self.last_forward_mma = "fused", True
            return h_all, h_T, c_T, workspace
        xg, w_hh, h0, c0 = (t.contiguous() for t in (xg, w_hh, h0, c0))
        dev = xg.device
        h_all = torch.empty((T, B, H), dtype=xg.dtype, device=dev)
        c_T = torch.empty((B, H), dtype=xg.dtype, device=dev)
        if needs_grad:
            act = torch.empty((T, B, 4 * H), dtype=torch.float32, device=dev)
            c_all = torch.empty((T, B, H), dtype=torch.float32, device=dev)
            c_work = None
        else:
            act = c_all = None
            c_work = torch.empty((B, H), dtype=torch.float32, device=dev)
        self.last_forward_variant, self.last_forward_mma = _launch(
            _C.forward, "forward", xg, xg, w_hh, h0, c0, h_all, c_T, act, c_all, c_work, sizes=(T, B, H), resets=mask
        )
        self.last_forward_kernel = "wmma" if self.last_forward_mma else "fma"
        h_T = h_all[-1].clone()
        workspace = (act, c_all) if needs_grad else ()
        return h_all, h_T, c_T, workspace

    def backward(self, inputs: RecurrenceInputs, h_all, workspace, dh_all, dh_T, dc_T, resets=None):
        xg, w_hh, h0, c0, w_hr, batch_sizes = inputs
        if len(workspace) != 2:
            raise RuntimeError("cuda backend: backward needs the workspace of a forward run with needs_grad=True")
        T, B, H = self._check(xg, w_hh, h0, c0, w_hr)
        mask = resets_mask(resets, T, B, xg.device)
        barrier_bound.raise_if_gave_up(xg.device)
        act, c_all = (w.contiguous() for w in workspace)
        w_hh, c0 = w_hh.contiguous(), c0.contiguous()
        dh_all = _grad_or_zeros(dh_all, h_all)
        dh_T = _grad_or_zeros(dh_T, h0)
        dc_T = _grad_or_zeros(dc_T, c0)
        call = dataclasses.replace(inputs.call(), has_resets=mask is not None)
        mode = _fused_mode(call, "backward")
        if mode is not None:
            (dG, dh0, dc0, dw_hr), ran = _run_fused(
                cuda_fused.backward, "backward", call, mode, xg.device, w_hh, c0, act, c_all, w_hr, dh_all, dh_T, dc_T,
                batch_sizes, resets=mask)
            self.last_backward_variant = "persistent" if ran else "step"
            self.last_backward_kernel, self.last_backward_mma = "fused", True
            return dG, dh0, dc0, dw_hr
        dev = xg.device
        dG = torch.empty((T, B, 4 * H), dtype=xg.dtype, device=dev)
        dh0 = torch.empty((B, H), dtype=h0.dtype, device=dev)
        dc0 = torch.empty((B, H), dtype=c0.dtype, device=dev)
        dg_work = torch.empty((2, B, 4 * H), dtype=torch.float32, device=dev)
        dc_work = torch.empty((B, H), dtype=torch.float32, device=dev)
        self.last_backward_variant, self.last_backward_mma = _launch(
            _C.backward, "backward", xg, w_hh, c0, act, c_all, dh_all, dh_T, dc_T, dG, dh0, dc0, dg_work, dc_work,
            sizes=(T, B, H), resets=mask,
        )
        self.last_backward_kernel = "wmma" if self.last_backward_mma else "fma"
        return dG, dh0, dc0, None


register(CudaBackend())
