"""The cuda backend's dispatch to the fused kernels, on the host (a fake extension; no GPU):

- which kernel serves a call and how it is launched, per ``LSTM_KERNELS_CUDA_VARIANT`` and direction
  (``cuda/fused.py``'s ``fused_mode``): ``fused`` / ``auto`` the fused kernels, persistent where their grid
  is co-resident, else one launch per (half-)step, else the per-step kernels; ``persistent`` the fused
  kernels' persistent launch or an error; ``step`` the per-step kernels (projected or packed calls: the
  fused kernels per half-step);
- what ``supports()`` declines (projections and variable lengths the fused kernels cannot serve, and
  anything they cannot serve under ``persistent``), per dtype, direction and shared memory;
- the launch (``run_fused``): the precision's op code, resets, the barrier's arguments and record, and a
  refused cooperative launch (one launch per step from then on; raised under ``persistent``);
- the extension's fused entry points' argument checks (where it is built).
"""
from __future__ import annotations

import pytest
import torch

from lstm_kernels.backends.cuda import fused as cf

SIXTEEN_BIT = (torch.float16, torch.bfloat16)

from lstm_kernels.backends import RecurrenceCall
from lstm_kernels.backends import cuda as cuda_backend
from lstm_kernels.backends.cuda import extension as cuda_ext


class _Refused(RuntimeError):
    pass


class _FakeExt:
    CooperativeLaunchRefused = _Refused

    def __init__(self, possible=True, fits=True):
        self.possible, self.fits = possible, fits
        self.plans, self.plan_resets = [], []

    def fused_plan(self, direction, dtype, B, H, P, **kw):
        self.plans.append((direction, dtype, B, H, P))
        self.plan_resets.append(kw)
        return {"blocks": cf.Plan(B, H).blocks, "smem": 0, "possible": self.possible and self.fits, "fits": self.fits}

    fused_forward = fused_backward = None


@pytest.fixture
def fake_fused(monkeypatch):
    def install(possible=True, variant=None, optin=cf.SMEM_OPTIN_SM90):
        fake = _FakeExt(possible)
        monkeypatch.setattr(cuda_ext, "_C", fake)
        monkeypatch.setattr(cf, "_REFUSED", {})
        monkeypatch.setattr(cf, "smem_optin", lambda device: optin)
        monkeypatch.setattr(torch.cuda, "device", lambda d: __import__("contextlib").nullcontext())
        cf._fused_plan_of.cache_clear()
        monkeypatch.delenv(cuda_backend.MMA_ENV, raising=False)
        monkeypatch.delenv(cuda_backend.BARRIER_TIMEOUT_ENV, raising=False)
        bound = cuda_backend.barrier_bound  # the barrier's buffers on the CPU; no copy back
        monkeypatch.setattr(bound, "launch_state", lambda device: torch.zeros(2, dtype=torch.int64))
        monkeypatch.setattr(bound, "device_record", lambda device: torch.zeros(4, dtype=torch.int64))
        monkeypatch.setattr(bound, "after_launch", lambda device, record: None)
        if variant is None:
            monkeypatch.delenv(cuda_backend.VARIANT_ENV, raising=False)
        else:
            monkeypatch.setenv(cuda_backend.VARIANT_ENV, variant)
        return fake

    yield install
    cf._fused_plan_of.cache_clear()


def _call(dtype=torch.float16, B=16, H=768, P=None, varlen=False, cell="lstm"):
    return RecurrenceCall(seq_len=8, batch=B, hidden_size=H, state_size=P or H, dtype=dtype,
                          device=torch.device("cuda"), has_projection=P is not None, variable_lengths=varlen,
                          needs_grad=True, cell=cell)


def test_default_variant_is_the_fused_kernels():
    assert cuda_backend.DEFAULT_VARIANT == "fused"


@pytest.mark.parametrize("kw", [dict(varlen=True), dict(P=256), dict(P=7, H=24, B=5, varlen=True)])
@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_supports_projection_and_variable_lengths_in_16_bits(fake_fused, kw, dtype):
    fake_fused()
    assert cuda_backend.CudaBackend().supports(_call(dtype, **kw)) is None


@pytest.mark.parametrize("kw", [dict(varlen=True, H=512), dict(P=256, H=512), dict(P=7, H=24, B=5, varlen=True)])
def test_supports_projection_and_variable_lengths_in_float32(fake_fused, kw):
    """float32 on sm_90 where both fused directions' blocks fit its shared memory (H = 512)."""
    fake_fused()
    assert cuda_backend.CudaBackend().supports(_call(torch.float32, **kw)) is None


@pytest.mark.parametrize("kw, optin, words", [
    # float32 at the flagship on sm_80: the forward fits, the backward does not
    (dict(dtype=torch.float32, varlen=True), cf.SMEM_OPTIN_SM80,
     ("variable lengths", "backward", "shared memory", "float32")),
    (dict(dtype=torch.float32, P=4), cf.SMEM_OPTIN_SM80, ("proj_size", "backward", "shared memory", "float32")),
    (dict(H=4000, varlen=True), cf.SMEM_OPTIN_SM90, ("variable lengths", "shared memory")),
])
def test_supports_declines_what_the_fused_kernels_do_not_serve(fake_fused, kw, optin, words):
    fake_fused(optin=optin)
    why = cuda_backend.CudaBackend().supports(_call(**kw))
    assert why is not None and all(w in why for w in words), why


def test_the_gru_asks_the_plan_of_its_own_instances(fake_fused):
    """A GRU call's fused_mode asks _C.fused_plan for the GRU's instance (gates=3), both directions; its
    backward block holds 3H of W_hh^T, so float32 at the flagship fits sm_80's shared memory where the
    LSTM's does not."""
    fake = fake_fused(optin=cf.SMEM_OPTIN_SM80)
    call = _call(torch.float32, varlen=True, cell="gru")
    assert cuda_backend.CudaBackend().supports(call) is None
    assert cuda_backend.CudaBackend().supports(_call(torch.float32, varlen=True)) is not None
    for direction in ("forward", "backward"):
        assert cf.fused_mode(call, direction) is True
    assert {"gates": 3} in fake.plan_resets and all(kw.get("gates", 4) in (3, 4) for kw in fake.plan_resets)


@pytest.mark.parametrize("weights", ["shared", "registers"])
def test_the_forward_plans_the_instance_of_its_weights_variant(fake_fused, monkeypatch, weights):
    """The forward's instance with the register path has its own registers, so its own co-residency: with
    LSTM_KERNELS_CUDA_FUSED_WEIGHTS=registers the forward asks _C.fused_plan for it (w_registers=1), else for
    the instance without; the backward has no such instance. A refused cooperative launch of one is no
    refusal of the other."""
    fake = fake_fused()
    monkeypatch.setenv(cuda_backend.WEIGHTS_ENV, weights)
    call = _call(varlen=True)
    for direction in ("forward", "backward"):
        assert cf.fused_mode(call, direction) is True
    asked = {direction: kw for (direction, *_), kw in zip(fake.plans, fake.plan_resets)}
    assert asked["forward"].get("w_registers", 0) == (1 if weights == "registers" else 0), asked
    assert "w_registers" not in asked["backward"], asked
    keys = {}
    for choice in ("shared", "registers"):
        monkeypatch.setenv(cuda_backend.WEIGHTS_ENV, choice)
        keys[choice] = [cf._refusal_key(call.device, direction, call.dtype, call.batch, call.hidden_size,
                                        call.hidden_size) for direction in ("forward", "backward")]
    assert keys["shared"][0] != keys["registers"][0] and keys["shared"][1] == keys["registers"][1], keys


def test_a_refused_cooperative_launch_is_of_its_own_instance(set_tf32):
    """The refusal's key tells apart what device_plan does: float32 on TF32 and at fp32 accuracy (two Ops, two
    kernels with their own registers), with and without resets."""
    device = torch.device("cuda")
    keys = set()
    for tf32 in (False, True):
        set_tf32(tf32)
        for resets in (False, True):
            keys.add(cf._refusal_key(device, "forward", torch.float32, 16, 768, 768, resets=resets))
    assert len(keys) == 4, keys


def test_fused_kernels_do_not_serve_other_dtypes(fake_fused):
    fake_fused()
    why = cuda_backend.fused_unserved_reason(_call(torch.float64, H=64))
    assert why is not None and all(w in why for w in ("float16", "bfloat16", "float32", "float64")), why


def test_supports_declines_projection_without_tensor_cores(fake_fused, monkeypatch):
    fake_fused()
    monkeypatch.setenv(cuda_backend.MMA_ENV, "0")
    why = cuda_backend.CudaBackend().supports(_call(P=8))
    assert why is not None and "proj_size" in why and "tensor cores" in why


@pytest.mark.parametrize("variant, possible, kw, expected", [
    (None, True, {}, True),                 # default: fused persistent where the grid is co-resident ...
    (None, False, {}, False),               # ... else the fused kernels one launch per (half-)step
    (None, False, dict(varlen=True), False),
    ("auto", True, {}, True),               # auto: the same as fused
    ("auto", False, {}, False),
    ("auto", False, dict(P=128), False),
    ("step", True, {}, None),               # step: the per-step kernels of csrc/step/ ...
    ("step", True, dict(P=128), False),     # ... but only the fused kernels serve projections: per half-step
    ("step", True, dict(varlen=True), False),
    ("persistent", True, {}, True),         # persistent: the fused kernels' persistent launch
    ("persistent", True, dict(varlen=True), True),
    (None, True, dict(dtype=torch.float32, H=512), True),  # float32 where both directions fit (sm_90)
    (None, False, dict(dtype=torch.float32, H=512, varlen=True), False),
])
def test_fused_mode(fake_fused, variant, possible, kw, expected):
    fake = fake_fused(possible, variant)
    for direction in ("forward", "backward"):
        assert cf.fused_mode(_call(**kw), direction) is expected
    if expected is not None and variant != "step":
        assert {p[0] for p in fake.plans} == {"forward", "backward"}


def _elem(dtype):
    return torch.empty((), dtype=dtype).element_size()


OPTINS = pytest.mark.parametrize("optin", [cf.SMEM_OPTIN_SM90, cf.SMEM_OPTIN_SM80], ids=["sm_90", "sm_80"])


def test_float32_is_a_fused_dtype_and_op_codes():
    assert torch.float32 in cf.DTYPES and set(SIXTEEN_BIT) < set(cf.DTYPES)
    assert (cf.FLOAT32, cf.FLOAT16, cf.BFLOAT16, cf.TF32) == (0, 1, 2, 3)
    assert cf.op_code(torch.float32) == cf.FLOAT32  # fp32 accuracy (3xTF32) unless tf32 is allowed
    assert cf.op_code(torch.float32, tf32=True) == cf.TF32
    for tf32 in (False, True):  # the 16-bit types ignore the flag
        assert cf.op_code(torch.float16, tf32=tf32) == cf.FLOAT16
        assert cf.op_code(torch.bfloat16, tf32=tf32) == cf.BFLOAT16
    with pytest.raises(KeyError):
        cf.op_code(torch.float64)


@OPTINS
def test_flagship_dispatch_per_dtype_and_direction(fake_fused, optin):
    """B = 16, H = 768: the 16-bit types in both directions; float32's forward on both optin sizes;
    float32's backward (its operands twice the bytes) not on sm_80; float32 at H = 512 in both
    directions on sm_90. (float32's backward at H = 768 on sm_90: as cf.Plan says, next test.)"""
    fake = fake_fused(optin=optin)
    for dtype in SIXTEEN_BIT:
        assert cuda_backend.fused_unserved_reason(_call(dtype)) is None, dtype
        assert all(cf.fused_mode(_call(dtype), d) is True for d in ("forward", "backward"))
    f32 = _call(torch.float32)
    assert cuda_backend.fused_unserved_reason(f32, ("forward",)) is None
    assert cf.fused_mode(f32, "forward") is True
    assert ("forward", cf.FLOAT32, 16, 768, 768) in fake.plans  # asked with the fp32-accuracy op code
    if optin == cf.SMEM_OPTIN_SM80:
        why = cuda_backend.fused_unserved_reason(f32, ("backward",))
        assert why is not None and all(w in why for w in ("backward", "shared memory", "float32")), why
        assert cf.fused_mode(f32, "backward") is None  # the per-step kernels of csrc/step/
        assert cuda_backend.fused_unserved_reason(f32) == why  # needs_grad: both directions asked
    else:
        assert cuda_backend.fused_unserved_reason(_call(torch.float32, H=512)) is None
        assert all(cf.fused_mode(_call(torch.float32, H=512), d) is True for d in ("forward", "backward"))


@OPTINS
@pytest.mark.parametrize("dtype, H", [(torch.float16, 768), (torch.bfloat16, 1024), (torch.float16, 1536),
                                      (torch.float32, 420), (torch.float32, 512), (torch.float32, 592),
                                      (torch.float32, 768), (torch.float32, 1024), (torch.float32, 1280),
                                      (torch.float16, 2560)])
def test_fused_dispatch_follows_the_shared_memory_plan_per_direction(fake_fused, optin, dtype, H):
    """Each direction is served exactly where cf.Plan says its block fits the device's optin shared
    memory for the dtype's element size; otherwise the reason names the direction and its bytes."""
    fake_fused(optin=optin)
    call, plan, elem = _call(dtype, H=H), cf.Plan(16, H), _elem(dtype)
    fits = {}
    for direction in ("forward", "backward"):
        fits[direction] = plan.smem_bytes(direction, elem) <= optin
        assert fits[direction] == plan.fits(optin, elem, (direction,))
        why = cuda_backend.fused_unserved_reason(call, (direction,))
        assert (why is None) == fits[direction], why
        if why is not None:
            assert direction in why and "shared memory" in why and str(plan.smem_bytes(direction, elem)) in why, why
        assert cf.fused_mode(call, direction) is (True if fits[direction] else None)
    assert (cuda_backend.fused_unserved_reason(call) is None) == plan.fits(optin, elem) == all(fits.values())
    print(f"\n{dtype} H={H} optin {optin}: forward {plan.smem_bytes('forward', elem)} B "
          f"{'fits' if fits['forward'] else 'does not fit'}, backward {plan.smem_bytes('backward', elem)} B "
          f"{'fits' if fits['backward'] else 'does not fit'}")


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_float32_op_code_follows_torchs_tf32_flag(fake_fused, set_tf32, allow_tf32):
    """The plan is asked, and the kernels are run, with TF32 only where torch allows TF32; the 16-bit
    types are unaffected."""
    fake = fake_fused()
    set_tf32(allow_tf32)
    assert cuda_backend.fused_tf32(torch.float32) is allow_tf32
    assert cuda_backend.fused_tf32(torch.float16) is False and cuda_backend.fused_tf32(torch.bfloat16) is False
    call = _call(torch.float32, H=512)
    assert cf.fused_mode(call, "forward") is True
    assert fake.plans[-1] == ("forward", cf.TF32 if allow_tf32 else cf.FLOAT32, 16, 512, 512)
    cf.fused_mode(_call(torch.float16), "forward")
    assert fake.plans[-1][1] == cf.FLOAT16
    seen = []

    def fn(entry, *args, barrier=(0, 0), tf32=False):
        seen.append((args[-1], tf32))
        return "ran"

    for persistent in (True, False):
        assert cf.run_fused(fn, "forward", call, persistent, call.device) == ("ran", persistent)
    assert seen == [(True, allow_tf32), (False, allow_tf32)]


def test_resets_reach_the_fused_plan_and_launch_only_where_given(fake_fused):
    """A call with resets plans the kernels' instance with resets (``resets=True``; its registers, so its
    occupancy, are its own) and hands the mask to the launch as ``resets=``; a call without passes
    neither, so its plan and launch are as before."""
    fake = fake_fused()
    call = _call()
    with_resets = RecurrenceCall(**{**call.__dict__, "has_resets": True})
    assert cf.fused_mode(call, "forward") is True and fake.plan_resets[-1] == {}
    assert cf.fused_mode(with_resets, "backward") is True and fake.plan_resets[-1] == {"resets": True}
    seen = []

    def fn(entry, *args, barrier=(0, 0, 0, 0), tf32=False, **kw):
        seen.append(kw)
        return "ran"

    mask = torch.zeros(2, 16, dtype=torch.uint8)
    for persistent in (True, False):
        cf.run_fused(fn, "forward", call, persistent, call.device)
        cf.run_fused(fn, "forward", with_resets, persistent, call.device, resets=mask)
    assert seen == [{}, {"resets": mask}] * 2


@pytest.mark.parametrize("kw", [{}, dict(varlen=True), dict(P=128)])
def test_named_persistent_raises_where_the_fused_grid_is_not_co_resident(fake_fused, kw):
    fake_fused(False, "persistent")
    for direction in ("forward", "backward"):
        with pytest.raises(RuntimeError, match="LSTM_KERNELS_CUDA_VARIANT=persistent.*cannot be co-resident"):
            cf.fused_mode(_call(**kw), direction)


@pytest.mark.parametrize("kw, optin, words", [
    (dict(dtype=torch.float32), cf.SMEM_OPTIN_SM80, ("backward", "shared memory", "float32")),
    (dict(H=4000), cf.SMEM_OPTIN_SM90, ("forward", "shared memory")),
])
def test_named_persistent_declines_what_the_fused_kernels_cannot_serve(fake_fused, monkeypatch, kw, optin, words):
    """``persistent`` runs the fused kernels only: supports() declines a call they cannot serve, naming
    the variable and why (a named backend raises, auto moves on), and a launch asked anyway raises; the
    same holds without tensor cores (LSTM_KERNELS_CUDA_MMA=0), which the fused kernels need."""
    fake_fused(True, "persistent", optin=optin)
    call = _call(**kw)
    why = cuda_backend.CudaBackend().supports(call)
    assert why is not None and "LSTM_KERNELS_CUDA_VARIANT=persistent" in why and all(w in why for w in words), why
    direction = words[0] if words[0] in ("forward", "backward") else "forward"
    with pytest.raises(RuntimeError, match="persistent.*shared memory"):
        cf.fused_mode(call, direction)
    monkeypatch.setenv(cuda_backend.MMA_ENV, "0")
    why = cuda_backend.CudaBackend().supports(_call())
    assert why is not None and "tensor cores" in why, why
    monkeypatch.setenv(cuda_backend.VARIANT_ENV, "fused")
    assert cuda_backend.CudaBackend().supports(_call()) is None  # the per-step kernels serve it


def test_named_persistent_raises_where_the_runtime_refuses_the_cooperative_launch(fake_fused):
    """Under ``persistent`` a refused cooperative launch raises (nothing is retried, nothing remembered)."""
    fake_fused(True, "persistent")
    calls = []

    def fn(entry, *args, barrier=(0, 0, 0, 0), tf32=False):
        calls.append(args[-1])
        raise _Refused("lstm fused_forward_kernel (cooperative launch) failed: not permitted")

    call = _call()
    with pytest.raises(_Refused, match="cooperative launch"):
        cf.run_fused(fn, "forward", call, True, call.device)
    assert calls == [True] and not cf.refused_cooperative_launches()


def test_other_errors_of_the_persistent_launch_are_not_hidden(fake_fused):
    """Only a refusal falls back per step: any other error of the launch propagates, and nothing is
    remembered."""
    fake_fused(True)

    def fn(entry, *args, barrier=(0, 0, 0, 0), tf32=False):
        raise RuntimeError("lstm fused_forward_kernel failed: an illegal memory access was encountered")

    call = _call()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cf.run_fused(fn, "forward", call, True, call.device)
    assert not cf.refused_cooperative_launches()


def test_the_fused_persistent_launch_is_bounded_and_queues_its_record(fake_fused, monkeypatch):
    """The fused persistent launch gets a zeroed state, the device's record, the bound in ns
    (LSTM_KERNELS_BARRIER_TIMEOUT, seconds) and its kernel's code, and queues the copy of the record
    after it (no host sync); the per-step launches get no barrier."""
    from lstm_kernels.backends import barrier_bound
    fake_fused(True)
    monkeypatch.setenv(cuda_backend.BARRIER_TIMEOUT_ENV, "1.5")
    made = {}
    monkeypatch.setattr(barrier_bound, "launch_state", lambda device: made.setdefault("state", torch.zeros(2)))
    monkeypatch.setattr(barrier_bound, "device_record", lambda device: made.setdefault("record", torch.zeros(4)))
    queued = []
    monkeypatch.setattr(barrier_bound, "after_launch", lambda device, record: queued.append((device, record)))
    monkeypatch.setattr(cf, "_ptr", lambda t: 0 if t is None else id(t))
    seen = []

    def fn(entry, *args, barrier=(0, 0, 0, 0), tf32=False):
        seen.append((barrier, args[-1]))
        return "ran"

    call = _call()
    assert cf.run_fused(fn, "backward", call, True, call.device) == ("ran", True)
    code = barrier_bound.kernel_code("cuda fused backward (persistent)")
    assert seen == [((id(made["state"]), id(made["record"]), 1_500_000_000, code), True)]
    assert queued == [(call.device, made["record"])]
    assert cf.run_fused(fn, "backward", call, False, call.device) == ("ran", False)
    assert seen[-1] == ((0, 0, 0, 0), False) and len(queued) == 1


def test_refused_cooperative_launch_runs_per_step_and_is_remembered(fake_fused):
    fake_fused(True)
    calls = []

    def fn(entry, *args, barrier=(0, 0), tf32=False):
        calls.append(args[-1])
        if args[-1]:
            raise _Refused("lstm fused_forward_kernel (cooperative launch) failed: too large")
        return "ran"

    call = _call()
    with pytest.warns(RuntimeWarning, match="refused the fused forward kernel's cooperative launch"):
        assert cf.run_fused(fn, "forward", call, True, call.device, 1, 2) == ("ran", False)
    assert calls == [True, False]
    assert cf.fused_mode(call, "forward") is False  # remembered: one launch per step from now on
    assert cf.fused_mode(_call(varlen=True), "forward") is False  # same shape: per-step launches
    assert cf.fused_mode(_call(B=32), "forward") is True  # another shape still tries it


try:
    from lstm_kernels import _C as _ext
except ImportError:
    _ext = None


@pytest.mark.skipif(_ext is None, reason="lstm_kernels._C is not built")
def test_extension_entry_points_check_arguments():
    ptrs = [8] * 14
    assert (_ext.FUSED_FLOAT32, _ext.FUSED_FLOAT16, _ext.FUSED_BFLOAT16, _ext.FUSED_TF32) == (
        cf.FLOAT32, cf.FLOAT16, cf.BFLOAT16, cf.TF32)
    for code in (4, -1):
        with pytest.raises(ValueError, match=f"dtype code {code} is not served"):
            _ext.fused_forward(code, *ptrs, 2, 1, 1, 1, 0, 0)
        with pytest.raises(ValueError, match=f"dtype code {code} is not served"):
            _ext.fused_plan("forward", code, 1, 4, 4)
    for code in (cf.FLOAT32, cf.TF32):  # float32 codes pass the dtype check: the next check raises
        with pytest.raises(ValueError, match="proj_size < H with w_hr"):
            _ext.fused_forward(code, *ptrs, 2, 1, 4, 4, 0, 0)
    with pytest.raises(ValueError, match="proj_size < H with w_hr"):
        _ext.fused_forward(1, *ptrs, 2, 1, 4, 4, 0, 0)  # w_hr given, P == H
    with pytest.raises(ValueError, match="proj_size < H with w_hr"):
        _ext.fused_backward(2, 8, 0, *([8] * 15), 2, 1, 4, 2, 0, 0)  # P < H without w_hrT
    with pytest.raises(ValueError, match="unknown kernel direction"):
        _ext.fused_plan("sideways", 1, 1, 4, 4)


@pytest.mark.skipif(_ext is None or torch.cuda.is_available(), reason="checks the no-GPU behaviour of the extension")
def test_extension_launch_without_gpu_raises_naming_the_kernel():
    if _ext.device_count()[0] != 0:
        pytest.skip("a CUDA device is visible to the runtime")
    with pytest.raises(RuntimeError, match="fused_forward_kernel"):
        _ext.fused_forward(1, 8, 8, 0, 8, 8, 8, 0, 8, 8, 8, 0, 0, 0, 8, 2, 1, 4, 4, 0, 0)
    with pytest.raises(ValueError, match="barrier_record must be set"):
        _ext.fused_forward(1, 8, 8, 0, 8, 8, 8, 0, 8, 8, 8, 0, 0, 0, 8, 2, 1, 4, 4, 1, 0, 8, 0, 10, 3)
    with pytest.raises(RuntimeError, match=r"fused_backward_kernel \(cooperative launch\)"):
        _ext.fused_backward(2, 8, 0, 8, 8, 8, 8, 8, 8, 8, 8, 0, 8, 8, 8, 0, 0, 8, 2, 1, 4, 4, 1, 0)
    with pytest.raises(RuntimeError, match="fused plan"):
        _ext.fused_plan("forward", 1, 16, 768, 768)


def test_device_plan_that_does_not_fit_is_never_launched(fake_fused):
    """Where the device's own plan (_C.fused_plan: dynamic + static shared memory against the opt-in)
    says a block does not fit although the Python formula does, a plain call goes to the per-step
    kernels and a projected or packed call (which only the fused kernels serve) raises."""
    fake = fake_fused()
    fake.fits = False
    assert cf.fused_mode(_call(), "forward") is None
    for kw in (dict(P=256), dict(varlen=True)):
        with pytest.raises(RuntimeError, match="served by the fused kernels only.*does not fit"):
            cf.fused_mode(_call(**kw), "forward")
