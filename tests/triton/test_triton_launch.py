"""The launch path of the triton backend, on the CPU: what a kernel call does around the kernels.

- No host-synchronising copy: the row counts are filled on the device, or copied from pinned
  memory without blocking (CUDA-graph capture forbids a blocking copy; in eager mode it stalls
  the host every call). The launch helpers run on meta tensors with the kernels recorded
  (launch_capture), under a spy on every tensor copy.
- Launches run inside a device guard of the tensors' device.
- A persistent call whose plan does not fit runs the per-step kernels; a cooperative launch
  refused at run time makes ``auto`` fall back to them; a named variant raises.
- The bounded barrier spin (LSTM_KERNELS_BARRIER_TIMEOUT): a persistent launch whose programs
  cannot all run at once fails with the barrier it waited on, instead of hanging. The
  interpreter runs programs one after another, so a persistent launch of several programs over
  all steps (not the steps mode the interpreter gets by default) is exactly such a launch.
"""
from __future__ import annotations

import contextlib

import time

import pytest
import torch

from lstm_kernels.backends import known_backends

known_backends()
triton_backend = pytest.importorskip("lstm_kernels.backends.triton")
kernels = pytest.importorskip("lstm_kernels.backends.triton.config")
from lstm_kernels.backends import device_rows  # noqa: E402
from lstm_kernels.backends.triton import launch, persistent, step_backward, step_forward  # noqa: E402

import launch_capture  # noqa: E402
import recurrence_cases  # noqa: E402

#: What the driver reports for a refused cooperative launch, as Triton's launcher raises it
#: (backends/nvidia/driver.py: gpuAssert, "Triton Error [CUDA]: " + cuGetErrorString(code)).
REFUSED = "Triton Error [CUDA]: too many blocks in cooperative launch"


# ----------------------------------------------------------------------------- no host sync


class CopySpy:
    """Records every cross-device tensor copy (Tensor.to / Tensor.copy_ / Tensor.cuda) as
    (source, destination device, non_blocking). A copy to "cuda" is not performed (this torch
    may have no CUDA): it returns a clone, so host code after it still runs."""

    def __init__(self, monkeypatch):
        self.copies = []
        real_to, real_copy, spy = torch.Tensor.to, torch.Tensor.copy_, self

        def to(self, *args, **kwargs):
            device, non_blocking = _to_target(self, args, kwargs)
            if device is not None and device != self.device:
                spy.copies.append((self, device, non_blocking))
                if device.type == "cuda":
                    return self.clone()
            return real_to(self, *args, **kwargs)

        def copy_(self, src, non_blocking=False):
            if isinstance(src, torch.Tensor) and src.device != self.device:
                spy.copies.append((src, self.device, non_blocking))
            return real_copy(self, src, non_blocking)

        def cuda(self, device=None, non_blocking=False, **kwargs):
            spy.copies.append((self, torch.device("cuda" if device is None else device), non_blocking))
            return self.clone()

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "copy_", copy_)
        monkeypatch.setattr(torch.Tensor, "cuda", cuda)

    def host_to_device(self):
        return [(src, dev, nb) for src, dev, nb in self.copies if src.device.type == "cpu" and dev.type != "cpu"]


def _to_target(tensor, args, kwargs):
    """(device, non_blocking) of a Tensor.to call; device None when it does not move the tensor."""
    device = kwargs.get("device")
    non_blocking = kwargs.get("non_blocking", False)
    rest = list(args)
    if rest and isinstance(rest[0], torch.Tensor):
        device = rest.pop(0).device
    elif rest and isinstance(rest[0], (str, torch.device)):
        device = rest.pop(0)
    if rest and isinstance(rest[0], torch.dtype):
        rest.pop(0)
    if rest and isinstance(rest[0], bool):
        non_blocking = rest[0]
    return (None if device is None else torch.device(device)), non_blocking


def test_step_rows_without_batch_sizes_is_built_on_the_device(monkeypatch):
    spy = CopySpy(monkeypatch)
    rows = device_rows.step_rows(None, 5, 3, torch.device("meta"))
    assert rows.device.type == "meta" and rows.dtype == torch.int32 and rows.shape == (6,)
    assert spy.host_to_device() == [], "the row counts were copied from the host"
    cpu = device_rows.step_rows(None, 5, 3, torch.device("cpu"))
    assert cpu.tolist() == [3] * 5 + [0]


def test_step_rows_with_batch_sizes_copies_from_pinned_memory_without_blocking(monkeypatch):
    """PackedSequence keeps batch_sizes on the CPU: the one copy to the GPU must come from pinned
    memory and not block. (This torch may have no CUDA: the pinned buffer is a stand-in here,
    and the spy does not perform the copy; tests/triton/test_triton_gpu.py runs it for real.)"""
    pinned = []

    def fake_pinned(n):
        pinned.append(torch.zeros(n, dtype=torch.int32))
        return pinned[-1]

    monkeypatch.setattr(device_rows, "pinned_int32", fake_pinned)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    spy = CopySpy(monkeypatch)
    batch_sizes = torch.tensor([3, 2, 2, 1])
    rows = device_rows.step_rows(batch_sizes, 4, 3, torch.device("cuda"))
    [(src, device, non_blocking)] = spy.host_to_device()
    assert device.type == "cuda" and non_blocking, "a blocking copy from the host"
    assert pinned and src is pinned[0], "the copy's source is not the pinned buffer"
    assert rows.tolist() == [3, 2, 2, 1, 0]


def test_step_rows_keeps_a_captured_copy_s_source(monkeypatch):
    """Under CUDA-graph capture every replay reads the pinned buffer again: it must stay alive."""
    monkeypatch.setattr(device_rows, "pinned_int32", lambda n: torch.zeros(n, dtype=torch.int32))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(device_rows, "_CAPTURED_HOST_ROWS", [])
    CopySpy(monkeypatch)
    device_rows.step_rows(torch.tensor([2, 1]), 2, 2, torch.device("cuda"))
    assert [r.tolist() for r in device_rows._CAPTURED_HOST_ROWS] == [[2, 1, 0]]


@pytest.mark.parametrize("variant", ["step", "persistent"])
@pytest.mark.parametrize("proj", [0, 8], ids=["no_proj", "proj8"])
def test_a_kernel_call_makes_no_host_copy(proj, variant, monkeypatch):
    """The whole host path of forward + backward on meta tensors: no copy from the host, and
    nothing read back (a meta tensor has no data: .item() / .tolist() would raise)."""
    spy = CopySpy(monkeypatch)
    fw, bw = launch_capture.record_launches(monkeypatch)
    launch_capture.run_host_path(launch_capture.meta_case(6, 5, 24, torch.float16, proj=proj), variant)
    assert fw.launches and bw.launches
    assert spy.host_to_device() == [], [(tuple(s.shape), d) for s, d, _ in spy.host_to_device()]


@pytest.mark.parametrize("variant", ["step", "persistent"])
def test_launches_run_under_a_guard_of_the_tensors_device(variant, monkeypatch):
    entered = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        yield
        entered.remove(device)

    inside = []
    monkeypatch.setattr(launch, "device_guard", guard)
    real = launch_capture.Recorder.__getitem__

    def getitem(self, grid):
        inside.append(list(entered))
        return real(self, grid)

    monkeypatch.setattr(launch_capture.Recorder, "__getitem__", getitem)
    launch_capture.record_launches(monkeypatch)
    launch_capture.run_host_path(launch_capture.meta_case(3, 2, 16, torch.float32), variant)
    assert inside and all(e == [torch.device("meta")] for e in inside), inside


def test_device_guard_selects_the_tensors_cuda_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: chosen.append(d) or contextlib.nullcontext())
    with kernels.device_guard(torch.device("cuda", 1)):
        pass
    assert chosen == [torch.device("cuda", 1)]
    with kernels.device_guard(torch.device("cpu")):
        pass
    assert len(chosen) == 1


# ----------------------------------------------------------------------------- which kernels serve


def test_auto_is_persistent_on_a_gpu_and_step_elsewhere(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(kernels.VARIANT_ENV, raising=False)
    assert launch.choose_variant("auto", cpu) == "step"
    assert launch.choose_variant("persistent", cpu) == "persistent" and launch.choose_variant("step", cuda) == "step"
    assert launch.choose_variant("auto", cuda) == ("step" if kernels.interpreting() else "persistent")
    monkeypatch.setenv(kernels.VARIANT_ENV, "persistent")
    assert launch.choose_variant("auto", cpu) == "persistent"
    assert launch.choose_variant("step", cpu) == "step"
    monkeypatch.setenv(kernels.VARIANT_ENV, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        launch.choose_variant("auto", cpu)


@pytest.mark.parametrize("declined", ["forward", "backward"])
def test_a_persistent_call_whose_plan_does_not_fit_runs_the_step_kernels(declined, monkeypatch):
    """Forward and backward plan separately: the direction whose plan declines runs the step kernel,
    the other the persistent one (host path on meta tensors, kernels recorded)."""
    monkeypatch.setattr(persistent, "co_resident_programs", lambda device: 1 << 20)  # as under the interpreter
    monkeypatch.setattr(persistent, f"{declined}_plan", lambda *args, **kwargs: "does not fit (test)")
    step_kernels = dict(forward=step_forward._step_fw_kernel, backward=step_backward._step_bw_kernel)
    persistent_kernels = dict(forward=persistent._lstm_pfw_kernel, backward=persistent._lstm_pbw_kernel)
    fw, bw = launch_capture.record_launches(monkeypatch)
    launch_capture.run_host_path(launch_capture.meta_case(3, 5, 24, torch.float16), "persistent")
    for direction, recorder in (("forward", fw), ("backward", bw)):
        expected = step_kernels[direction] if direction == declined else persistent_kernels[direction]
        assert recorder.launches and all(x.kernel is expected for x in recorder.launches), direction
        assert kernels.LAST_KERNELS[direction] == ("step" if direction == declined else "step_budget"), direction


def test_cooperative_launch_refused_recognises_the_driver_errors():
    assert launch.cooperative_launch_refused(RuntimeError(REFUSED))
    assert launch.cooperative_launch_refused(RuntimeError("Triton Error [CUDA]: operation not supported"))
    assert not launch.cooperative_launch_refused(RuntimeError("Triton Error [CUDA]: an illegal memory access"))
    assert not launch.cooperative_launch_refused(RuntimeError("too many blocks in cooperative launch"))
    assert not launch.cooperative_launch_refused(ValueError(REFUSED))


class RefusingKernel:
    """A kernel whose persistent (cooperative) launches fail as the driver refuses them; its
    launches in steps mode run the real kernel."""

    def __init__(self, kernel, error):
        self.kernel, self.error, self.refused = kernel, error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if "launch_cooperative_grid" in kwargs:  # only persistent launches pass it
                self.refused += 1
                raise self.error
            return self.kernel[grid](*args, **kwargs)
        return launch


def _refuse_persistent(monkeypatch, error):
    """The persistent kernels launched over all steps, as on a GPU, and refused there; auto chooses them."""
    fw = RefusingKernel(persistent._lstm_pfw_kernel, error)
    bw = RefusingKernel(persistent._lstm_pbw_kernel, error)
    monkeypatch.setattr(persistent, "_lstm_pfw_kernel", fw)
    monkeypatch.setattr(persistent, "_lstm_pbw_kernel", bw)
    monkeypatch.setattr(persistent, "use_steps_mode", lambda: False)
    monkeypatch.setattr(launch, "choose_variant",
                        lambda variant, device: "step" if kernels.requested_variant(variant) == "step" else "persistent")
    return fw, bw


needs_interpreter = pytest.mark.skipif(not kernels.interpreting(), reason="runs the kernels under TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("proj", [0, 4], ids=["no_proj", "proj4"])
def test_auto_falls_back_to_step_when_the_cooperative_launch_is_refused(proj, monkeypatch):
    case = recurrence_cases.make_case(4, 3, 13, torch.float32, "cpu", proj=proj, lengths=[4, 2, 1])
    expected, _ = recurrence_cases.run(triton_backend.TritonBackend("step"), case)
    fw, bw = _refuse_persistent(monkeypatch, RuntimeError(REFUSED))
    with pytest.warns(RuntimeWarning, match="cooperative launch was refused"):
        actual, _ = recurrence_cases.run(triton_backend.TritonBackend("auto"), case)
    assert fw.refused == 1 and bw.refused == 1, "auto did not try the persistent launch"
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name}: the fallback is not the step variant"


@needs_interpreter
def test_a_named_persistent_variant_still_raises(monkeypatch):
    case = recurrence_cases.make_case(3, 2, 5, torch.float32, "cpu")
    _refuse_persistent(monkeypatch, RuntimeError(REFUSED))
    with pytest.raises(RuntimeError, match="cooperative launch"):
        recurrence_cases.run(triton_backend.TritonBackend("persistent"), case)
    monkeypatch.setenv(kernels.VARIANT_ENV, "persistent")  # named through the environment: also raises
    with pytest.raises(RuntimeError, match="cooperative launch"):
        recurrence_cases.run(triton_backend.TritonBackend("auto"), case)


@needs_interpreter
def test_auto_does_not_swallow_other_launch_errors(monkeypatch):
    case = recurrence_cases.make_case(3, 2, 5, torch.float32, "cpu")
    _refuse_persistent(monkeypatch, RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        recurrence_cases.run(triton_backend.TritonBackend("auto"), case)


# ----------------------------------------------------------------------------- bounded barrier spin


def test_barrier_args_carry_the_bound_and_the_kernel(monkeypatch):
    monkeypatch.setenv(kernels.BARRIER_TIMEOUT_ENV, "0.5")
    name = "triton backward (persistent, step budget)"
    state, record, timeout_ns, code = kernels.barrier_args(torch.device("cpu"), name)
    assert state.dtype == torch.int32 and state.tolist() == [0, 0] and record.dtype == torch.int64
    assert timeout_ns == 500_000_000 and kernels.barrier_bound.KERNELS[code - 1] == name


@needs_interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the programs run on with invalid data
@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("proj", [0, 6], ids=["no_proj", "proj6"])
def test_a_barrier_that_cannot_open_fails_instead_of_hanging(which, proj, monkeypatch):
    """The persistent kernels launched over all steps under the interpreter: their programs run one
    after another, so the first one's first barrier can never see the arrivals it waits for (a
    co-residency bug, as on a GPU). Its wait gives up after the bound (1 ms, read from the
    interpreter's clock: the host's monotonic clock, as inline asm cannot run there), every later
    wait leaves at once, the call returns, and the next call raises naming the kernel, the step and
    the program (block 0)."""
    monkeypatch.setenv(kernels.BARRIER_TIMEOUT_ENV, "0.001")
    case = recurrence_cases.make_case(2, 3, 20, torch.float32, "cpu", proj=proj)  # H = 20: 2 backward programs
    backend = triton_backend.TritonBackend("persistent")
    args = (case["xg"], case["w_hh"], case["h0"], case["c0"], case["w_hr"], None)
    if which == "backward":  # a forward that works: the steps mode, no grid barrier
        h_all, _, _, ws = backend.forward(*args, True)
    monkeypatch.setattr(persistent, "use_steps_mode", lambda: False)  # one launch over all steps, several programs
    kernels.barrier_bound.reset()
    inputs = recurrence_cases.RecurrenceInputs(*args)
    run = (lambda: backend.forward(*args, True)) if which == "forward" else (
        lambda: backend.backward(inputs, h_all, ws, case["dh_all"], case["dh_T"], case["dc_T"]))
    started = time.monotonic()
    run()  # gave up after one bound, not one per step; nothing synchronised, nothing raised yet
    assert time.monotonic() - started < 60
    first_step = 0 if which == "forward" else 1  # T = 2: the backward's first barrier follows step t = 1
    with pytest.raises(RuntimeError, match=rf"triton {which} \(persistent, step budget\) kernel on cpu gave up after "
                                           rf"waiting .* \(block 0, waiting after step {first_step}\).*invalid"):
        backend.forward(*args, True)  # the next call on the device
    with kernels.barrier_bound.bounded_barriers(0.001):  # verification's context: raised by the call itself
        with pytest.raises(RuntimeError, match=rf"triton {which} \(persistent, step budget\) kernel"):
            run()


# ----------------------------------------------------------------------------- supported Triton versions


@pytest.mark.parametrize("version,served", [("3.2.0", False), ("3.3.0", False), ("3.5.1+git1234", False),
                                            ("3.6.0", True), ("3.9.0", True)])
def test_triton_older_than_3_6_is_declined(version, served, monkeypatch):
    """3.6 (torch 2.11's) is the oldest Triton whose compiled kernels CI checks: an older one makes the
    backend unavailable, with why."""
    monkeypatch.setattr(triton_backend.triton, "__version__", version)
    why = triton_backend.TritonBackend().unavailable_reason()
    if served:
        assert why is None or "older" not in why
    else:
        assert why is not None and f"triton {version} is older than 3.6" in why


@pytest.mark.parametrize("variant", ["step", "persistent"])
def test_backend_records_the_kernels_it_ran(variant, set_tf32):
    """last_forward_kernel / last_backward_kernel name what ran, so that a test claiming a kernel can
    check it: "persistent" runs the persistent kernels ("step_budget") where their plan fits (here it
    does: a small call, float32 with TF32 on a GPU; under the interpreter in their steps mode)."""
    device = "cuda" if torch.cuda.is_available() and not kernels.interpreting() else "cpu"
    if device == "cpu" and not kernels.interpreting():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    set_tf32(True)
    backend = triton_backend.TritonBackend(variant)
    kernels.LAST_KERNELS.update(forward=None, backward=None)
    recurrence_cases.run(backend, recurrence_cases.make_case(2, 3, 5, torch.float32, device))
    expected = "step" if variant == "step" else "step_budget"
    assert (backend.last_forward_kernel, backend.last_backward_kernel) == (expected, expected)
