"""Host-side logic of the cuda backend, without a GPU (issue 10, items 4, 5, 6, 9):

- availability asks the extension's own CUDA runtime (``_C.runtime_status``), once;
- ``auto`` falls back to the per-step kernels when the runtime refuses a cooperative launch,
  a named ``persistent`` raises;
- the persistent-plan cache (``_C.plan_cache_probe``: the C++ cache with a counting planner);
- the debug grid barrier's switch and report.

The real binding is used where the extension is built (here: nvcc but no driver, so the
runtime reports an error); the Python logic is also run against fake bindings.
"""
from __future__ import annotations

import pytest
import torch

from lstm_kernels.backends import available_backends, get_backend, unavailable_backends
from lstm_kernels.backends import cuda as cuda_backend

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

    VARIANT_STEP, VARIANT_PERSISTENT, VARIANT_AUTO = 0, 1, 2
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
    monkeypatch.setattr(cuda_backend, "_C", fake)
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
    monkeypatch.setattr(cuda_backend, "_C", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_backend("cuda").unavailable_reason() == cuda_backend.NO_GPU
    assert fake.status_calls == 0


# ---- item 5: a refused cooperative launch --------------------------------------------------------


class ScriptedEntry:
    """_C.forward/_C.backward stand-in: refuses (or fails) cooperative launches as told, records calls."""

    def __init__(self, refuse=True, error=None):
        self.refuse, self.error, self.calls = refuse, error, []

    def __call__(self, *args):
        variant, mma, state, spins = args[-4:]
        self.calls.append((variant, state, spins))
        if variant != FakeExt.VARIANT_STEP:
            if self.error is not None:
                raise self.error
            if self.refuse:
                raise FakeRefused("lstm forward_persistent_kernel (cooperative launch) failed: too large")
            return FakeExt.VARIANT_PERSISTENT
        return FakeExt.VARIANT_STEP


@pytest.fixture
def fake_ext(monkeypatch):
    fake = FakeExt()
    monkeypatch.setattr(cuda_backend, "_C", fake)
    monkeypatch.setattr(cuda_backend, "_REFUSED", {})
    return fake


KEY = ("cuda:0", "forward", torch.float16, 768, True)
ARGS = (1, 111, 222, 3, 4, 5, 0)


def test_auto_falls_back_to_step_when_the_cooperative_launch_is_refused(fake_ext):
    entry = ScriptedEntry()
    with pytest.warns(RuntimeWarning, match="refused the persistent kernel's cooperative launch"):
        used = cuda_backend._run_variant(entry, ARGS, "auto", True, KEY, (0, 0))
    assert used == FakeExt.VARIANT_STEP
    assert [c[0] for c in entry.calls] == [FakeExt.VARIANT_AUTO, FakeExt.VARIANT_STEP]
    assert KEY in cuda_backend.refused_cooperative_launches()
    # remembered: the next auto call of this key goes per-step at once, without a refused launch
    entry.calls.clear()
    assert cuda_backend._run_variant(entry, ARGS, "auto", True, KEY, (0, 0)) == FakeExt.VARIANT_STEP
    assert [c[0] for c in entry.calls] == [FakeExt.VARIANT_STEP]
    # another key still tries the persistent kernel
    entry.calls.clear()
    other = KEY[:3] + (512,) + KEY[4:]
    with pytest.warns(RuntimeWarning):
        cuda_backend._run_variant(entry, ARGS, "auto", True, other, (0, 0))
    assert [c[0] for c in entry.calls] == [FakeExt.VARIANT_AUTO, FakeExt.VARIANT_STEP]


def test_named_persistent_raises_when_the_cooperative_launch_is_refused(fake_ext):
    entry = ScriptedEntry()
    with pytest.raises(RuntimeError, match="cooperative launch"):
        cuda_backend._run_variant(entry, ARGS, "persistent", True, KEY, (0, 0))
    assert [c[0] for c in entry.calls] == [FakeExt.VARIANT_PERSISTENT]
    assert not cuda_backend.refused_cooperative_launches()


def test_auto_does_not_hide_other_errors(fake_ext):
    entry = ScriptedEntry(error=RuntimeError("lstm forward_persistent_kernel failed: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cuda_backend._run_variant(entry, ARGS, "auto", True, KEY, (0, 0))
    assert [c[0] for c in entry.calls] == [FakeExt.VARIANT_AUTO]
    assert not cuda_backend.refused_cooperative_launches()


def test_accepted_launch_and_barrier_arguments_pass_through(fake_ext):
    entry = ScriptedEntry(refuse=False)
    assert cuda_backend._run_variant(entry, ARGS, "auto", False, KEY, (4096, 77)) == FakeExt.VARIANT_PERSISTENT
    assert entry.calls == [(FakeExt.VARIANT_AUTO, 4096, 77)]
    assert cuda_backend._run_variant(entry, ARGS, "step", False, KEY, (0, 0)) == FakeExt.VARIANT_STEP


@needs_ext
def test_the_binding_exposes_the_refusal_as_a_runtime_error():
    assert issubclass(_C.CooperativeLaunchRefused, RuntimeError)
    # which runtime errors of a planned cooperative launch count as a refusal (csrc/lstm_cuda.h)
    refusals = set(_C.COOPERATIVE_REFUSALS.values())
    assert {"cudaErrorCooperativeLaunchTooLarge", "cudaErrorNotSupported"} <= refusals
    assert not refusals & {"cudaErrorIllegalAddress", "cudaErrorLaunchFailure", "cudaErrorInvalidValue"}


# ---- item 6: the persistent-plan cache ------------------------------------------------------------


@needs_ext
def test_plan_cache_plans_each_key_once():
    keys = [(0, 1, 48, 98304), (0, 1, 48, 98304), (0, 2, 48, 98304), (1, 1, 48, 98304), (0, 1, 16, 98304)]
    planned, hits, size = _C.plan_cache_probe(keys, 1)
    assert (planned, hits, size) == (4, 1, 4)


@needs_ext
def test_plan_cache_is_thread_safe_and_plans_once_per_key():
    keys = [(d, k, b, 1024 * b) for d in range(2) for k in range(3) for b in (1, 7, 48)] * 3
    threads = 8
    planned, hits, size = _C.plan_cache_probe(keys, threads)
    distinct = len(set(keys))
    assert size == distinct and planned == distinct
    assert hits == threads * len(keys) - distinct


@needs_ext
def test_plan_cache_does_not_keep_failed_plans():
    keys = [(0, 1, -1, 0)] * 3 + [(0, 1, 16, 0)] * 2  # the probe's planner fails for blocks < 0
    planned, hits, size = _C.plan_cache_probe(keys, 2)
    assert size == 1 and planned == 2 * 3 + 1 and hits == 2 * 2 - 1


@needs_ext
def test_plan_cache_counters():
    stats = _C.plan_cache_stats()
    assert set(stats) == {"planned", "hits", "size"} and all(v >= 0 for v in stats.values())
    _C.clear_plan_cache()
    assert _C.plan_cache_stats() == {"planned": 0, "hits": 0, "size": 0}


# ---- item 9: the grid barrier's time bound (tests/test_barrier_bound.py: the bound and the record) --


def test_barrier_arguments_name_the_kernel_in_the_record():
    state, record, timeout_ns, code = cuda_backend._barrier(torch.device("cpu"), "cuda backward (persistent)")
    assert state.dtype == torch.int64 and state.tolist() == [0, 0]
    assert record is cuda_backend.barrier_bound.device_record(torch.device("cpu"))
    assert timeout_ns == cuda_backend.barrier_bound.barrier_timeout_ns() > 0
    assert cuda_backend.barrier_bound.KERNELS[code - 1] == "cuda backward (persistent)"


@needs_ext
def test_barrier_arguments_are_checked_by_the_binding():
    args = dict(dtype=0, xg=8, w_hh=8, h0=8, c0=8, h_all=8, c_T=8, act=8, c_all=8, c_work=0, T=1, B=1, H=1, stream=0)
    with pytest.raises(ValueError, match="barrier_record must be set"):
        _C.forward(**args, barrier_state=8, barrier_timeout_ns=10)
    with pytest.raises(ValueError, match="barrier_timeout_ns >= 0"):
        _C.forward(**args, barrier_state=8, barrier_record=8, barrier_timeout_ns=-1, barrier_kernel=1)
    with pytest.raises(ValueError, match="barrier_kernel >= 1"):
        _C.backward(0, *([8] * 12), 2, 1, 1, 0, barrier_state=8, barrier_record=8, barrier_timeout_ns=0)


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
def test_the_earlier_persistent_kernels_refuse_resets(monkeypatch, variant):
    """With resets, the variant ``persistent`` (the earlier cooperative kernels, for a call without projection
    or variable lengths) is refused with a reason naming it, so a named cuda backend raises and auto moves on;
    every other variant serves, and the same call without resets is served by all."""
    monkeypatch.setenv(cuda_backend.VARIANT_ENV, variant)
    backend = get_backend("cuda")
    why = backend.supports(_resets_call())
    if variant == "persistent":
        assert why is not None and "resets" in why and "persistent" in why, why
    else:
        assert why is None, why
    assert backend.supports(_resets_call(has_resets=False)) is None


def test_per_step_launch_with_resets_runs_step_and_passes_the_mask(fake_ext, monkeypatch):
    """``auto`` with resets runs the per-step kernels without asking for the cooperative one, and the mask's
    pointer reaches the entry as ``resets=``; without resets the entry gets no such keyword."""
    import contextlib
    monkeypatch.setenv(cuda_backend.VARIANT_ENV, "auto")
    monkeypatch.setattr(cuda_backend, "_dtype_codes", lambda: {torch.float16: 1})
    monkeypatch.setattr(cuda_backend.torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(cuda_backend.torch.cuda, "current_stream", lambda d: type("S", (), {"cuda_stream": 0})())
    monkeypatch.setattr(cuda_backend, "_barrier", lambda device, kernel: (None, None, 0, 1))
    monkeypatch.setattr(cuda_backend, "_barrier_args", lambda barrier: (0, 0, 0, 0))
    monkeypatch.setattr(cuda_backend.barrier_bound, "after_launch", lambda device, record: None)
    calls = []

    def entry(*args, **kw):
        calls.append((args[-6], kw))
        return FakeExt.VARIANT_STEP

    like = torch.zeros(2, 3, dtype=torch.float16)
    mask = torch.zeros(2, 3, dtype=torch.uint8)
    assert cuda_backend._launch(entry, "forward", like, like, sizes=(2, 3, 1), resets=mask)[0] == "step"
    cuda_backend._launch(entry, "forward", like, like, sizes=(2, 3, 1))
    assert calls == [(FakeExt.VARIANT_STEP, {"resets": mask.data_ptr()}), (FakeExt.VARIANT_AUTO, {})]


@needs_ext
def test_the_binding_refuses_resets_for_the_persistent_variant():
    """The extension itself raises (before any CUDA call) where the persistent variant is asked with resets."""
    fwd = dict(dtype=0, xg=8, w_hh=8, h0=8, c0=8, h_all=8, c_T=8, act=0, c_all=0, c_work=8, T=2, B=1, H=1, stream=0)
    with pytest.raises(ValueError, match="persistent variant does not serve resets"):
        _C.forward(**fwd, variant=_C.VARIANT_PERSISTENT, resets=8)
    with pytest.raises(ValueError, match="persistent variant does not serve resets"):
        _C.backward(0, *([8] * 12), 2, 1, 1, 0, variant=_C.VARIANT_PERSISTENT, resets=8)
