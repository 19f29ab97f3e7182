"""Host-side logic of the cuda backend, without a GPU (issue 10, items 4, 5, 9):

- availability asks the extension's own CUDA runtime (``_C.runtime_status``), once;
- which runtime errors of a cooperative launch count as a refusal (the fused kernels' fallback to
  one launch per step, and the persistent variant's error, are tested in tests/test_cuda_plan_host.py);
- the grid barrier's arguments and their checks in the binding;
- resets: the mask, every variant serves them, and the per-step kernels' launch passes them on.

The real binding is used where the extension is built (here: nvcc but no driver, so the
runtime reports an error); the Python logic is also run against fake bindings.
"""
from __future__ import annotations

import pytest
import torch

from lstm_kernels.backends import available_backends, get_backend, unavailable_backends
from lstm_kernels.backends import cuda as cuda_backend
from lstm_kernels.backends.cuda import extension as cuda_ext
from lstm_kernels.backends.cuda import fused as cuda_fused
from lstm_kernels.backends.cuda import step as cuda_step

try:
    from lstm_kernels import _C
except ImportError:
    _C = None

needs_ext = pytest.mark.skipif(_C is None, reason="lstm_kernels._C is not built (no nvcc)")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


class FakeRefused(RuntimeError):
    pass


class FakeExt:
    """A stand-in for ``lstm_kernels._C``: constants, the refusal exception, and a scripted runtime."""

    DTYPE_FLOAT32, DTYPE_FLOAT16, DTYPE_BFLOAT16 = 0, 1, 2
    CooperativeLaunchRefused = FakeRefused

    def __init__(self, status=(0, None, 1, 13000, 13000)):
        self.status = status
        self.status_calls = 0

    def runtime_status(self):
        self.status_calls += 1
        return self.status


# ---- item 4: the extension's own runtime decides availability --------------------------------------


@needs_ext
@no_gpu
def test_real_runtime_status_reports_why_it_cannot_run_here():
    code, message, count, runtime, driver = _C.runtime_status()
    assert code != 0, "no GPU and no driver here: cudaGetDeviceCount must fail"
    assert isinstance(message, str) and message.startswith("cuda") and ": " in message
    assert count == 0
    assert runtime == _C.CUDA_RUNTIME_VERSION
    assert driver >= 0
    reason = cuda_backend.runtime_unavailable_reason()
    assert reason is not None and message in reason


@needs_ext
@no_gpu
def test_backend_unavailable_when_torch_sees_a_gpu_but_the_extension_runtime_does_not(monkeypatch):
    """The issue's case: torch's runtime sees a GPU, the statically linked runtime of _C cannot use it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    message = _C.runtime_status()[1]
    reason = get_backend("cuda").unavailable_reason()
    assert reason is not None and message in reason
    assert "cuda" not in available_backends()
    assert unavailable_backends()["cuda"] == reason


@pytest.mark.parametrize(
    "status, expect",
    [
        ((35, "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version", 0, 13000,
          12040), ["cudaErrorInsufficientDriver", "CUDA 13.0", "CUDA 12.4"]),
        ((100, "cudaErrorNoDevice: no CUDA-capable device is detected", 0, 13000, 13000), ["cudaErrorNoDevice"]),
        ((0, None, 0, 13000, 13000), ["sees no device"]),
        ((0, None, 2, 13000, 13000), None),
    ],
)
def test_runtime_reason_from_a_fake_binding(monkeypatch, status, expect):
    fake = FakeExt(status)
    monkeypatch.setattr(cuda_ext, "_C", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = get_backend("cuda").unavailable_reason()
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and all(e in reason for e in expect), reason
    # asked once per process (per binding), however often availability is asked
    for _ in range(3):
        get_backend("cuda").unavailable_reason()
    assert fake.status_calls == 1


def test_no_gpu_for_torch_is_reported_before_the_runtime_is_asked(monkeypatch):
    fake = FakeExt((0, None, 1, 13000, 13000))
    monkeypatch.setattr(cuda_ext, "_C", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_backend("cuda").unavailable_reason() == cuda_backend.NO_GPU
    assert fake.status_calls == 0


# ---- item 5: a refused cooperative launch --------------------------------------------------------


@needs_ext
def test_the_binding_exposes_the_refusal_as_a_runtime_error():
    assert issubclass(_C.CooperativeLaunchRefused, RuntimeError)
    # which runtime errors of a planned cooperative launch count as a refusal (csrc/fused/launch_refusal.h)
    refusals = set(_C.COOPERATIVE_REFUSALS.values())
    assert {"cudaErrorCooperativeLaunchTooLarge", "cudaErrorNotSupported"} <= refusals
    assert not refusals & {"cudaErrorIllegalAddress", "cudaErrorLaunchFailure", "cudaErrorInvalidValue"}


# ---- item 9: the grid barrier's time bound (tests/test_barrier_bound.py: the bound and the record) --


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_barrier_arguments_name_the_kernel_in_the_record(direction):
    kernel = f"cuda fused {direction} (persistent)"
    state, record, timeout_ns, code = cuda_fused.barrier(torch.device("cpu"), kernel)
    assert state.dtype == torch.int64 and state.tolist() == [0, 0]
    assert record is cuda_backend.barrier_bound.device_record(torch.device("cpu"))
    assert timeout_ns == cuda_backend.barrier_bound.barrier_timeout_ns() > 0
    assert cuda_backend.barrier_bound.KERNELS[code - 1] == kernel
    assert cuda_fused.barrier_args((state, record, timeout_ns, code)) == (
        state.data_ptr(), record.data_ptr(), timeout_ns, code)


def test_every_cuda_kernel_in_the_record_is_a_fused_one():
    """Only the fused kernels' persistent launch has a grid barrier among the cuda kernels."""
    cuda = [k for k in cuda_backend.barrier_bound.KERNELS if k.startswith("cuda")]
    assert cuda == ["cuda fused forward (persistent)", "cuda fused backward (persistent)"]


@needs_ext
def test_barrier_arguments_are_checked_by_the_binding():
    ptrs = [8] * 14
    with pytest.raises(ValueError, match="barrier_record must be set"):
        _C.fused_forward(1, *ptrs, 2, 1, 4, 4, 0, 0, barrier_state=8, barrier_timeout_ns=10)
    with pytest.raises(ValueError, match="barrier_timeout_ns >= 0"):
        _C.fused_forward(1, *ptrs, 2, 1, 4, 4, 0, 0, barrier_state=8, barrier_record=8, barrier_timeout_ns=-1,
                         barrier_kernel=1)
    with pytest.raises(ValueError, match="barrier_kernel >= 1"):
        _C.fused_backward(1, *([8] * 17), 2, 1, 4, 4, 0, 0, barrier_state=8, barrier_record=8, barrier_timeout_ns=0)


# ---- resets inside a sequence: the glue of the cuda backend ---------------------------------------


def test_the_cuda_backend_serves_resets_and_checks_the_mask():
    """``serves_resets``; the mask must be bool [T, B] on xg's device, and goes to the kernels as the same
    bytes in uint8, contiguous (a strided view is copied)."""
    assert get_backend("cuda").serves_resets
    r = torch.tensor([[True, False, True], [False, False, True]])
    m = cuda_backend.resets_mask(r, 2, 3, r.device)
    assert m.dtype == torch.uint8 and m.is_contiguous() and m.tolist() == [[1, 0, 1], [0, 0, 1]]
    strided = torch.zeros(3, 2, dtype=torch.bool)
    strided[0, 1] = True
    assert cuda_backend.resets_mask(strided.t(), 2, 3, r.device).tolist() == [[0, 0, 0], [1, 0, 0]]
    assert cuda_backend.resets_mask(None, 2, 3, r.device) is None
    with pytest.raises(TypeError, match="bool"):
        cuda_backend.resets_mask(r.to(torch.uint8), 2, 3, r.device)
    with pytest.raises(ValueError, match=r"\(T, B\) = \(3, 2\)"):
        cuda_backend.resets_mask(r, 3, 2, r.device)
    with pytest.raises(ValueError, match="is on"):
        cuda_backend.resets_mask(r, 2, 3, torch.device("meta"))


def _resets_call(**kw):
    from lstm_kernels.backends import RecurrenceCall
    fields = dict(seq_len=4, batch=3, hidden_size=8, state_size=8, dtype=torch.float16, device=torch.device("cuda", 0),
                  has_projection=False, variable_lengths=False, needs_grad=True, has_resets=True)
    return RecurrenceCall(**{**fields, **kw})


@pytest.mark.parametrize("variant", ["fused", "step", "auto", "persistent"])
def test_every_variant_serves_resets(monkeypatch, variant):
    """Both kernel families serve resets, so every variant does (``persistent``: the fused kernels' persistent
    launch), with and without them."""
    monkeypatch.setenv(cuda_backend.VARIANT_ENV, variant)
    backend = get_backend("cuda")
    assert backend.supports(_resets_call()) is None
    assert backend.supports(_resets_call(has_resets=False)) is None


def test_per_step_launch_passes_the_mask_only_where_given(fake_ext, monkeypatch):
    """The per-step kernels' launch hands the mask's pointer to the entry as ``resets=``, with the dtype code,
    the sizes, the stream and the tensor-core switch; without resets the entry gets no such keyword."""
    import contextlib
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d: type("S", (), {"cuda_stream": 77})())
    calls = []
    fake_ext.step_forward = lambda *args, **kw: calls.append((args[0], args[-4:], kw))
    T, B, H = 2, 3, 4
    xg, w = torch.zeros(T, B, 4 * H, dtype=torch.float16), torch.zeros(4 * H, H, dtype=torch.float16)
    h0 = c0 = torch.zeros(B, H, dtype=torch.float16)
    mask = torch.zeros(T, B, dtype=torch.uint8)
    h_all, h_T, c_T, ws = cuda_step.forward(xg, w, h0, c0, True, True, resets=mask)
    assert h_all.shape == (T, B, H) and [t.shape for t in ws] == [(T, B, 4 * H), (T, B, H)]
    cuda_step.forward(xg, w, h0, c0, False, False)
    assert calls == [(1, (T, B, H, 77), {"mma": True, "resets": mask.data_ptr()}),
                     (1, (T, B, H, 77), {"mma": False})]


@pytest.fixture
def fake_ext(monkeypatch):
    fake = FakeExt()
    monkeypatch.setattr(cuda_ext, "_C", fake)
    return fake


@needs_ext
def test_the_binding_has_no_variant_of_its_own():
    """The per-step entries take no variant and no barrier (the retired cooperative kernels' arguments): which
    kernel runs is decided in Python (cuda/fused.py's fused_mode), and only the fused kernels have a barrier."""
    for gone in ("forward", "backward", "occupancy", "plan_cache_stats", "VARIANT_PERSISTENT", "VARIANT_STEP"):
        assert not hasattr(_C, gone), gone
    args = dict(dtype=0, xg=8, w_hh=8, h0=8, c0=8, h_all=8, c_T=8, act=0, c_all=0, c_work=8, T=2, B=1, H=1, stream=0)
    with pytest.raises(TypeError):
        _C.step_forward(**args, variant=1)
