"""The GPU-only test files, checked on the CPU: they skip without a GPU, so an API they use could
drift without anyone noticing. Here:

- pytest collects each of them without an error (every module-level import and name resolves, and
  every parametrisation builds), and collects tests from each (a module skipped whole at import
  would prove nothing: this test skips instead, naming why);
- the helpers they use that need no GPU run here on CPU tensors and stand-ins: the injected
  barrier states (a counter one short, a counter that can never reach its target), the regular
  expressions the give-up tests match against barrier_bound.describe's message, the attributes
  the tests monkeypatch, and the keyword wrapper of the fused entries, driven by
  ``lstm_kernels.backends.cuda.fused``'s ``forward`` / ``backward`` themselves, so that the positional order they call the
  extension with and the extension's parameter names agree (the counters the test swaps are the
  counters, the barrier's four arguments are the barrier's).

Not proven here: anything the kernels do (that needs a GPU).
"""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lstm_kernels.backends import barrier_bound

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GPU_TEST_FILES = ("tests/test_cuda_gpu.py", "tests/test_cuda_fused_gpu.py", "tests/triton/test_triton_gpu.py",
                  "tests/test_gru_gpu.py")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


needs_extension = pytest.mark.skipif(not _importable("lstm_kernels._C"), reason="lstm_kernels._C is not built")
needs_triton = pytest.mark.skipif(not _importable("triton"), reason="triton is not installed")


@needs_extension
@needs_triton
def test_gpu_test_files_collect_without_errors():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *GPU_TEST_FILES], cwd=ROOT, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert not re.search(r"\berrors?\b.*\bin [\d.]+s|ERROR collecting|ImportError|AttributeError", text), text[-6000:]
    for path in GPU_TEST_FILES:
        assert re.search(rf"^{re.escape(path)}::test_", text, re.M), f"no test collected from {path}:\n{text[-3000:]}"


def _module(name: str, monkeypatch):
    if name == "test_triton_gpu":
        monkeypatch.syspath_prepend(str(TESTS / "triton"))
    return importlib.import_module(name)


@pytest.fixture
def records(monkeypatch):
    """barrier_bound's records and pending copies, fresh for the test (CPU records here)."""
    monkeypatch.setattr(barrier_bound, "_RECORDS", {})
    monkeypatch.setattr(barrier_bound, "_PENDING", {})


def _describe(kernel: str, step: int, block: int) -> str:
    return barrier_bound.describe(torch.device("cuda", 0), barrier_bound.kernel_code(kernel), step, block, 51_234_567)


@needs_extension
def test_cuda_gpu_helpers(monkeypatch, records):
    mod = _module("test_cuda_gpu", monkeypatch)
    from lstm_kernels.backends import cuda as cuda_backend
    from lstm_kernels.backends.cuda import fused as cuda_fused

    # the injected extension: the fused entries wrapped (their counters swapped), everything else the real one's
    from lstm_kernels import _C

    never = mod.never_opens(_C, device="cpu")
    assert never.fused_plan is _C.fused_plan and never.runtime_status is _C.runtime_status
    assert never.fused_forward is not _C.fused_forward and never.fused_backward is not _C.fused_backward
    fused_mod = _module("test_cuda_fused_gpu", monkeypatch)
    assert fused_mod.NEVER < -(2**20)
    # the attributes the tests swap, and what they swap in has the shape of the real thing
    for owner, name in ((barrier_bound, "launch_state"), (cuda_fused, "barrier_args"), (cuda_fused, "fused_mode"),
                        (cuda_fused, "fused_persistent_possible")):
        assert callable(getattr(owner, name)), (owner, name)
    real = cuda_fused.barrier_args(cuda_fused.barrier(torch.device("cpu"), "cuda fused forward (persistent)"))
    assert len(real) == len(mod.no_bound_instead(real)) == 4 and mod.no_bound_instead(real) == (0, 0, 0, 0)
    assert isinstance(mod.SHORT_BOUND_S, float) and 0 < mod.SHORT_BOUND_S < barrier_bound.DEFAULT_BARRIER_TIMEOUT_S
    # the messages the give-up tests expect are the ones barrier_bound writes, and only those
    for direction, step in (("forward", 0), ("backward", 4)):
        kernel = f"cuda fused {direction} (persistent)"
        assert re.search(mod._gave_up(kernel, step), _describe(kernel, step, 3))
        assert not re.search(mod._gave_up(kernel, step), _describe(kernel, step + 1, 3))
        other = "backward" if direction == "forward" else "forward"
        assert not re.search(mod._gave_up(kernel, step), _describe(f"cuda fused {other} (persistent)", step, 3))
    for name in ("reset", "raise_if_gave_up", "bounded_barriers", "after_launch", "device_record"):
        assert callable(getattr(barrier_bound, name)), name
    assert cuda_backend.BARRIER_TIMEOUT_ENV == barrier_bound.BARRIER_TIMEOUT_ENV


class _Stream:
    cuda_stream = 12345


@needs_extension
def test_cuda_fused_gpu_helpers(monkeypatch, records):
    """by_keyword over the extension's own parameter names, driven by cuda/fused.py's forward and
    backward on CPU tensors (the launch replaced by a recorder): every argument lands on the
    parameter of its name, and the swapped counters replace the counters cuda/fused.py allocated."""
    mod = _module("test_cuda_fused_gpu", monkeypatch)
    from lstm_kernels import _C
    from lstm_kernels.backends.cuda import fused as cf

    if not hasattr(_C, "fused_forward"):
        pytest.skip("lstm_kernels._C lacks fused_forward")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    T, B, H = 3, 5, 16
    barrier = (111, 222, 333, 4)
    for direction in ("forward", "backward"):
        entry = getattr(_C, "fused_" + direction)
        names = mod.parameter_names(entry)
        for name in ("counters", "stream", "persistent", "T", "B", "H", "P", "barrier_state", "barrier_record",
                     "barrier_timeout_ns", "barrier_kernel"):
            assert name in names, (direction, name, names)
        seen = []

        def recorder(**kw):
            seen.append(kw)
            return 0

        recorder.__doc__ = entry.__doc__
        never = []

        def swap(ptr):
            never.append(ptr)
            return 777

        wrapped = mod.by_keyword(recorder, counters=swap)
        g = torch.Generator().manual_seed(0)
        w = torch.randn(4 * H, H, generator=g)
        c0 = torch.randn(B, H, generator=g)
        if direction == "forward":
            xg, h0 = torch.randn(T, B, 4 * H, generator=g), torch.randn(B, H, generator=g)
            cf.forward(wrapped, xg, w, h0, c0, None, None, True, True, barrier=barrier)
        else:
            act, c_all = torch.zeros(T, B, 4 * H), torch.zeros(T, B, H)
            dh_all, dh_T, dc_T = torch.randn(T, B, H, generator=g), torch.zeros(B, H), torch.zeros(B, H)
            monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self, raising=False)
            cf.backward(wrapped, w, c0, act, c_all, None, dh_all, dh_T, dc_T, None, True, barrier=barrier)
        (kw,) = seen
        assert set(kw) <= set(names), (direction, sorted(set(kw) - set(names)))
        assert (kw["T"], kw["B"], kw["H"], kw["P"], kw["persistent"]) == (T, B, H, H, cf.PERSISTENT), kw
        assert kw["stream"] == _Stream.cuda_stream, kw
        assert tuple(kw[n] for n in ("barrier_state", "barrier_record", "barrier_timeout_ns", "barrier_kernel")) \
            == barrier, kw
        assert kw["counters"] == 777 and len(never) == 1 and never[0] not in (0, 777), (kw, never)
        with pytest.raises(KeyError, match="no_such"):
            mod.by_keyword(recorder, no_such=1)(*range(len(names)))
        with pytest.raises(TypeError):
            mod.by_keyword(recorder)(*range(len(names) + 1))
    # the give-up's message, as the test expects it
    kernel = "cuda fused backward (persistent)"
    assert re.search(mod.gave_up_message(kernel, 4, 7), _describe(kernel, 4, 7))
    assert not re.search(mod.gave_up_message(kernel, 4, 7), _describe(kernel, 4, 8))
    assert not re.search(mod.gave_up_message(kernel, 4, 7), _describe("cuda fused forward (persistent)", 4, 7))
    assert mod.NEVER < -(2**20) and isinstance(cf.Plan(16, 64).blocks, int) and cf.batch_tiles(16) >= 1


@needs_triton
def test_triton_gpu_helpers(monkeypatch, records):
    mod = _module("test_triton_gpu", monkeypatch)
    kernels = mod.kernels
    for module in mod.BARRIER_LAUNCHERS:  # each launcher has the name the tests swap
        assert getattr(module, "barrier_args") is kernels.barrier_args, module.__name__
    kernel = "triton forward (persistent, step budget)"
    state, record, timeout_ns, code = mod.never_opens(kernels.barrier_args)(torch.device("cpu"), kernel)
    sound = kernels.barrier_args(torch.device("cpu"), kernel)[0]
    assert state.dtype == sound.dtype and state.shape == sound.shape and state.tolist() == [mod.NEVER, 0]
    assert code == barrier_bound.kernel_code(kernel)
    assert kernels.barrier_bound is barrier_bound and kernels.BARRIER_TIMEOUT_ENV == barrier_bound.BARRIER_TIMEOUT_ENV
    for kernel in barrier_bound.KERNELS:
        matches = re.search(mod.GAVE_UP, _describe(kernel, 9, 2)) is not None
        assert matches == kernel.startswith("triton"), kernel
