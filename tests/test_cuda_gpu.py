"""The cuda backend on a real GPU: outputs and every gradient against the reference.

Marked ``gpu`` (skipped without CUDA); skipped too when ``lstm_kernels._C`` is not built.
The rule for every dtype (STYLE.md's flash-attention rule): against the float64
reference on the same rounded inputs, the relative error is at most
max(REL_TOL[dtype], 2 x the error of the reference backend itself run in that dtype),
and no single element is off by more than ELEMENT_FACTOR times that, relative to the
largest reference magnitude (tests/utils.py: one wrong edge tile cannot hide in the norm).

Variants (LSTM_KERNELS_CUDA_VARIANT): ``fused`` (the default: the fused kernels of csrc/fused/,
persistent where their grid is co-resident, else one launch per step; the per-step kernels of
csrc/step/ where the fused ones cannot serve), ``step`` (the per-step kernels) and ``persistent``
(the fused kernels' persistent launch only; skipped where it cannot run here).

Inter-block races of the fused kernels' persistent launch (racecheck sees only shared memory) are
looked for by comparing it bit for bit with the same kernels launched once per step, at every
shape of this file and at the flagship shape, several times (test_launch_modes_agree_bitwise).
Every test has a per-test timeout (tests/conftest.py); the time-bounded grid barrier
(LSTM_KERNELS_BARRIER_TIMEOUT, seconds; lstm_kernels/backends/barrier_bound.py) is tested to give
the same bits as no bound, and to report a barrier that never opens (injected arrival counters that
never reach their targets) at the next call on the device, or at once under bounded_barriers.
"""
from __future__ import annotations

import re

import pytest
import torch

from lstm_kernels.backends import RecurrenceCall, RecurrenceInputs, barrier_bound, get_backend
from lstm_kernels.backends import cuda as cuda_backend
from lstm_kernels.backends.cuda import extension as cuda_ext
from lstm_kernels.backends.cuda import fused as cuda_fused
from lstm_kernels.function import lstm_layer
from utils import REL_TOL, assert_rel_close, rel_error

_C = pytest.importorskip("lstm_kernels._C")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.usefixtures("no_tf32"),
    pytest.mark.skipif(
        torch.cuda.is_available() and get_backend("cuda").unavailable_reason() is not None,
        reason=f"cuda backend unavailable: {get_backend('cuda').unavailable_reason()}",
    ),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: "fused": the default (csrc/fused/ where they serve the call); "step": the per-step kernels of csrc/step/;
#: "persistent": the fused kernels' persistent launch only.
VARIANTS = ["fused", "step", "persistent"]
# (T, B, H): T = 1, B = 1, H not a multiple of the 16-unit tile (13, 100, 1000), B not a
# multiple of the 16-row tile (3, 17), the largest batch (256), a long sequence (2048).
SHAPES = {
    "T1_B1_H13": (1, 1, 13),
    "T5_B3_H13": (5, 3, 13),
    "T64_B1_H1000": (64, 1, 1000),
    "T128_B17_H100": (128, 17, 100),
    "T32_B256_H768": (32, 256, 768),
    "T16_B256_H1000": (16, 256, 1000),
    "T300_B64_H256": (300, 64, 256),
    "T2048_B4_H64": (2048, 4, 64),
}


def _call(T, B, H, dtype):
    return RecurrenceCall(seq_len=T, batch=B, hidden_size=H, state_size=H, dtype=dtype, device=torch.device("cuda"),
                          has_projection=False, variable_lengths=False, needs_grad=True)


def skip_unless_persistent(dtype, B, H):
    """Skip where the fused kernels cannot serve (B, H, dtype) here (with the tensor-core switch and torch's
    TF32 flag as set), or their grid is not co-resident."""
    why = cuda_backend.fused_unserved_reason(_call(1, B, H, dtype))
    if why is not None:
        pytest.skip(f"the fused kernels do not serve B={B} H={H} {dtype} here: {why}")
    for direction in ("forward", "backward"):
        if not cuda_backend.fused_persistent_possible(torch.device("cuda"), direction, dtype, B, H, H):
            pytest.skip(f"the fused {direction} grid for B={B} H={H} {dtype} is not co-resident here")


def use_variant(monkeypatch, variant, dtype, H, B=None):
    """Select the kernel variant; skip a persistent case that cannot run here (B: every batch size of the
    test; None skips only on what the fused kernels cannot serve)."""
    if variant == "persistent":
        skip_unless_persistent(dtype, B or 1, H)
    monkeypatch.setenv(cuda_backend.VARIANT_ENV, variant)


def check_variant_ran(variant, T=None, B=None, H=None, dtype=None):
    """The kernels asked for ran. For "fused" (the default), the fused kernels where they serve the call
    (persistent where their grid is co-resident, else one launch per half-step), else the per-step kernels."""
    backend = get_backend("cuda")
    ran = [(backend.last_forward_kernel, backend.last_forward_variant),
           (backend.last_backward_kernel, backend.last_backward_variant)]
    if variant == "step":
        assert [v for _, v in ran] == ["step", "step"], ran
        assert all(k != "fused" for k, _ in ran), ran
        return
    if variant == "persistent":
        assert ran == [("fused", "persistent")] * 2, ran
        return
    call = _call(T, B, H, dtype)
    for (kernel, ran_variant), direction in zip(ran, ("forward", "backward")):
        mode = cuda_fused.fused_mode(call, direction)
        expected = ("fused", "persistent" if mode else "step") if mode is not None else (kernel, "step")
        assert (kernel, ran_variant) == expected, (direction, ran, expected)
        assert (kernel == "fused") == (mode is not None), (direction, kernel)


def make_case(T, B, H, dtype, seed=0):
    """Inputs (rounded to ``dtype``) and output cotangents, on the GPU."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).cuda()

    inputs = dict(xg=rnd(T, B, 4 * H), w_hh=rnd(4 * H, H, scale=H**-0.5), h0=rnd(B, H, scale=0.5), c0=rnd(B, H))
    cotangents = (rnd(T, B, H), rnd(B, H), rnd(B, H))
    return inputs, cotangents


def run_layer(inputs, cotangents, backend, dtype=None):
    """Outputs and gradients (xg, w_hh, h0, c0) of lstm_layer through ``backend``, inputs cast to ``dtype``."""
    leaves = {k: (v.to(dtype) if dtype else v).detach().requires_grad_(True) for k, v in inputs.items()}
    h_all, h_T, c_T = lstm_layer(leaves["xg"], leaves["w_hh"], leaves["h0"], leaves["c0"], None, None, backend=backend)
    outs = (h_all, h_T, c_T)
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(cotangents, outs)])
    grads = {f"d{k}": v.grad for k, v in leaves.items()}
    return {"h_all": h_all.detach(), "h_T": h_T.detach(), "c_T": c_T.detach(), **grads}


def check_against_reference(got, inputs, cotangents, dtype, tol=None):
    truth = run_layer(inputs, cotangents, "reference", torch.float64)
    base = run_layer(inputs, cotangents, "reference")
    tol = REL_TOL[dtype] if tol is None else tol
    for name, expected in truth.items():
        allowed = max(tol, 2 * rel_error(base[name], expected))
        assert got[name].dtype == base[name].dtype, f"{name}: dtype {got[name].dtype} != {base[name].dtype}"
        assert_rel_close(got[name], expected, allowed, name)


# Every dtype with the FMA matmul and on tensor cores (fp32: tf32, with torch's TF32 flag on).
MATMULS = [("fp32", "fma"), ("fp32", "tf32"), ("bf16", "mma"), ("bf16", "fma"), ("fp16", "mma"), ("fp16", "fma")]


def use_matmul(monkeypatch, matmul):
    """LSTM_KERNELS_CUDA_MMA and torch's TF32 flag (restored by the no_tf32 fixture); the tolerance key."""
    monkeypatch.setenv(cuda_backend.MMA_ENV, "0" if matmul == "fma" else "1")
    torch.backends.cuda.matmul.allow_tf32 = matmul == "tf32"
    return "tf32" if matmul == "tf32" else None


def check_matmul_ran(matmul):
    backend = get_backend("cuda")
    assert backend.last_forward_mma == backend.last_backward_mma == (matmul != "fma")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dt,matmul", MATMULS, ids=[f"{d}-{m}" for d, m in MATMULS])
def test_layer_matches_reference(shape, dt, matmul, variant, monkeypatch):
    T, B, H = SHAPES[shape]
    dtype = DTYPES[dt]
    tol_key = use_matmul(monkeypatch, matmul)
    use_variant(monkeypatch, variant, dtype, H, B)
    inputs, cot = make_case(T, B, H, dtype)
    got = run_layer(inputs, cot, "cuda")
    check_variant_ran(variant, T, B, H, dtype)
    check_matmul_ran(matmul)
    check_against_reference(got, inputs, cot, dtype, REL_TOL[tol_key] if tol_key else None)


#: The flagship shape of DESIGN.md's step budget (fp16/bf16).
FLAGSHIP = {"T1024_B16_H768": (1024, 16, 768)}
#: Every shape of this file, one more with tails in B and H, and the flagship.
BITWISE_SHAPES = {**SHAPES, "T40_B37_H100": (40, 37, 100), **FLAGSHIP}
BITWISE_CASES = [
    (shape, dt, matmul) for shape in BITWISE_SHAPES for dt, matmul in MATMULS
    if matmul != "fma" and (shape not in FLAGSHIP or dt in ("fp16", "bf16"))  # fma: the fused kernels do not run
]
#: Persistent runs compared with one per-step run: a race between blocks need not show every time.
REPEATS = 3


def assert_bitwise(got, want, what):
    for name in want:
        a, b = got[name], want[name]
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs()
            bad = (a != b) & ~(a.isnan() & b.isnan())
            first = tuple(int(i) for i in bad.nonzero()[0]) if bad.any() else None
            raise AssertionError(
                f"{name}: {what}: {int(bad.sum())} of {a.numel()} elements differ, max |diff| "
                f"{diff.nan_to_num().max().item():.3e}, first at {first}"
            )


def per_step_launches(monkeypatch):
    """The fused kernels one launch per step (as where their grid is not co-resident): their plan says so."""
    monkeypatch.setattr(cuda_fused, "fused_persistent_possible", lambda *a, **k: False)


@pytest.mark.parametrize("shape,dt,matmul", BITWISE_CASES, ids=[f"{s}-{d}-{m}" for s, d, m in BITWISE_CASES])
def test_launch_modes_agree_bitwise(shape, dt, matmul, monkeypatch):
    """Same tile code, same summation order: the fused kernels' persistent launch and their launches one
    per step give identical bits, forward and backward, run after run (a difference is a race between
    blocks, or a stale read across the grid barrier)."""
    T, B, H = BITWISE_SHAPES[shape]
    dtype = DTYPES[dt]
    inputs, cot = make_case(T, B, H, dtype, seed=17)
    use_matmul(monkeypatch, matmul)
    use_variant(monkeypatch, "persistent", dtype, H, B)  # skips where it cannot run
    with monkeypatch.context() as m:
        m.setenv(cuda_backend.VARIANT_ENV, "fused")
        per_step_launches(m)
        want = run_layer(inputs, cot, "cuda")
        backend = get_backend("cuda")
        assert (backend.last_forward_kernel, backend.last_forward_variant) == ("fused", "step")
        assert (backend.last_backward_kernel, backend.last_backward_variant) == ("fused", "step")
    for r in range(REPEATS):
        got = run_layer(inputs, cot, "cuda")
        check_variant_ran("persistent")
        assert_bitwise(got, want, f"persistent run {r + 1} of {REPEATS} vs one launch per step")


def test_fused_falls_back_to_the_per_step_kernels_where_weights_do_not_fit(monkeypatch):
    H = 2048  # fp32: beyond the fused blocks' shared memory (1120 forward at most, on sm_90)
    call = _call(3, 2, H, torch.float32)
    assert cuda_backend.fused_unserved_reason(call) is not None
    for variant in ("fused", "auto"):
        monkeypatch.setenv(cuda_backend.VARIANT_ENV, variant)
        inputs, cot = make_case(3, 2, H, torch.float32, seed=19)
        got = run_layer(inputs, cot, "cuda")
        check_variant_ran("step")
        check_against_reference(got, inputs, cot, torch.float32)
    monkeypatch.setenv(cuda_backend.VARIANT_ENV, "persistent")
    with pytest.raises(RuntimeError, match="LSTM_KERNELS_CUDA_VARIANT=persistent runs the fused kernels only"):
        run_layer(inputs, cot, "cuda")


@pytest.mark.parametrize("dt", list(DTYPES))
def test_extreme_pre_activations(dt):
    dtype = DTYPES[dt]
    inputs, cot = make_case(16, 5, 37, dtype, seed=3)
    inputs["xg"] = (inputs["xg"].float() * 30).to(dtype)  # saturated gates
    got = run_layer(inputs, cot, "cuda")
    for name, v in got.items():
        assert torch.isfinite(v).all(), f"{name}: non-finite"
    check_against_reference(got, inputs, cot, dtype)


@pytest.mark.parametrize("dt", list(DTYPES))
def test_non_contiguous_inputs(dt):
    dtype = DTYPES[dt]
    T, B, H = 7, 9, 40
    inputs, cot = make_case(T, B, H, dtype, seed=5)
    wide = torch.zeros(T, B, 8 * H, dtype=dtype, device="cuda")
    wide[:, :, ::2] = inputs["xg"]
    inputs_nc = {**inputs, "xg": wide[:, :, ::2], "w_hh": inputs["w_hh"].t().contiguous().t()}
    assert not inputs_nc["xg"].is_contiguous() and not inputs_nc["w_hh"].is_contiguous()
    got = run_layer(inputs_nc, cot, "cuda")
    check_against_reference(got, inputs, cot, dtype)


@pytest.mark.parametrize("dt", list(DTYPES))
def test_deterministic_and_needs_grad_invariant(dt):
    dtype = DTYPES[dt]
    inputs, cot = make_case(50, 33, 129, dtype, seed=7)
    a = run_layer(inputs, cot, "cuda")
    b = run_layer(inputs, cot, "cuda")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: not bitwise reproducible"
    backend = get_backend("cuda")
    h_all, h_T, c_T, ws = backend.forward(*inputs.values(), None, None, False)
    assert ws == ()
    assert torch.equal(h_all, a["h_all"]) and torch.equal(h_T, a["h_T"]) and torch.equal(c_T, a["c_T"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_side_stream(variant, monkeypatch):
    use_variant(monkeypatch, variant, torch.float32, 64, 8)
    inputs, cot = make_case(20, 8, 64, torch.float32, seed=11)
    expected = run_layer(inputs, cot, "cuda")
    check_variant_ran(variant, 20, 8, 64, torch.float32)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = run_layer(inputs, cot, "cuda")
        check_variant_ran(variant, 20, 8, 64, torch.float32)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert_bitwise(got, expected, f"{variant} on a side stream vs the default stream")


def test_fused_plan_is_cached(monkeypatch):
    """Planning the fused kernels (runtime queries, cudaFuncSetAttribute: _C.fused_plan) happens once per
    (device, direction, op, B, H, P, resets), not per call."""
    use_variant(monkeypatch, "persistent", torch.float16, 64, 4)
    inputs, cot = make_case(6, 4, 64, torch.float16, seed=23)
    cuda_fused._fused_plan_of.cache_clear()
    run_layer(inputs, cot, "cuda")
    check_variant_ran("persistent")
    first = cuda_fused._fused_plan_of.cache_info()
    assert first.misses == 2 and first.currsize == 2, first  # the forward and the backward kernel
    for _ in range(3):
        run_layer(inputs, cot, "cuda")
    again = cuda_fused._fused_plan_of.cache_info()
    assert again.misses == 2 and again.currsize == 2 and again.hits >= first.hits + 6, (first, again)


#: How long a wait on a barrier that never opens lasts in these tests (seconds): long enough for a
#: working barrier, short enough to keep the tests fast.
SHORT_BOUND_S = 0.05


def never_opens(ext, device="cuda"):
    """A stand-in for ``lstm_kernels._C`` whose fused entries get arrival counters that can never reach
    their targets (test_cuda_fused_gpu.py's injection: counters that start at its NEVER), the injected
    bug of the tests below; every other attribute is the extension's."""
    from test_cuda_fused_gpu import NEVER, by_keyword

    keep = []  # the swapped counters, alive as long as the stand-in

    def never_counters(ptr: int) -> int:
        keep.append(torch.full((65536,), NEVER, dtype=torch.int32, device=device))  # >= one per batch tile
        return keep[-1].data_ptr()

    class NeverOpens:
        fused_forward = staticmethod(by_keyword(ext.fused_forward, counters=never_counters))
        fused_backward = staticmethod(by_keyword(ext.fused_backward, counters=never_counters))

        def __getattr__(self, name):
            return getattr(ext, name)

    return NeverOpens()


def no_bound_instead(barrier: tuple) -> tuple:
    """A stand-in for ``cuda/fused.py``'s ``barrier_args``: no barrier state, so the fused kernels' grid
    waits are not bounded and leave no record (the C API's default)."""
    return (0, 0, 0, 0)


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_bounded_barrier_gives_the_same_bits(dt, monkeypatch):
    """The time-bounded grid barrier (on by default) orders the steps like an unbounded wait: bitwise
    equal outputs and gradients, with the default bound, a short one and none
    (LSTM_KERNELS_BARRIER_TIMEOUT=0), several runs each, and no give-up recorded."""
    dtype = DTYPES[dt]
    T, B, H = 50, 33, 200
    use_variant(monkeypatch, "persistent", dtype, H, B)
    inputs, cot = make_case(T, B, H, dtype, seed=29)
    with monkeypatch.context() as m:
        m.setattr(cuda_fused, "barrier_args", no_bound_instead)
        want = run_layer(inputs, cot, "cuda")
        check_variant_ran("persistent")
    for bound in ("", "1", "0"):
        monkeypatch.setenv(cuda_backend.BARRIER_TIMEOUT_ENV, bound)
        for r in range(REPEATS):
            got = run_layer(inputs, cot, "cuda")
            check_variant_ran("persistent")
            assert_bitwise(got, want, f"bounded barrier ({cuda_backend.BARRIER_TIMEOUT_ENV}={bound!r}) run {r + 1} "
                                      "vs no bound")
    torch.cuda.synchronize()
    barrier_bound.raise_if_gave_up(torch.device("cuda"))  # nothing recorded: raises nothing


def _gave_up(kernel: str, step: int) -> str:
    """The message (barrier_bound.describe) of a give-up of ``kernel`` after ``step``, any block."""
    return (rf"grid barrier of the {re.escape(kernel)} kernel on cuda:\d+ gave up after waiting [\d.e+-]+ s "
            rf"\(block \d+, waiting after step {step}\).*outputs of the call that launched it are invalid")


@pytest.mark.timeout(120, method="thread")
def test_bounded_barrier_raises_at_the_next_call_on_the_device(monkeypatch):
    """A barrier bug (arrival counters that never reach their targets): the launch does not hang; its
    wait gives up after the bound (LSTM_KERNELS_BARRIER_TIMEOUT, seconds), the call itself returns
    (nothing synchronises it), and the next call on the device raises, naming the kernel, the step
    (forward: after step 0; backward: after step T-1) and a block. The record is then cleared: the
    call after that runs normally and is right."""
    T, B, H = 5, 3, 64
    use_variant(monkeypatch, "persistent", torch.float32, H, B)
    monkeypatch.setenv(cuda_backend.BARRIER_TIMEOUT_ENV, str(SHORT_BOUND_S))
    inputs, cot = make_case(T, B, H, torch.float32, seed=31)
    backend = get_backend("cuda")
    device = torch.device("cuda")
    barrier_bound.reset(device)
    sound = cuda_ext._C
    ref = get_backend("reference").forward(*(v.double() for v in inputs.values()), None, None, True)
    for direction, step in (("forward", 0), ("backward", T - 1)):
        h_all, _, _, ws = backend.forward(*inputs.values(), None, None, True)  # a sound forward
        monkeypatch.setattr(cuda_ext, "_C", never_opens(sound))
        if direction == "forward":
            backend.forward(*inputs.values(), None, None, True)  # gives up; returns invalid outputs
        else:
            backend.backward(RecurrenceInputs(*inputs.values(), None, None), h_all, ws, *cot)
        assert backend.last_forward_variant == "persistent" and backend.last_backward_variant == "persistent"
        monkeypatch.setattr(cuda_ext, "_C", sound)
        torch.cuda.synchronize()  # the launch ended (after the bound) and the record's copy landed
        with pytest.raises(RuntimeError, match=_gave_up(f"cuda fused {direction} (persistent)", step)):
            backend.forward(*inputs.values(), None, None, True)
        h_all, h_T, c_T, _ = backend.forward(*inputs.values(), None, None, True)  # cleared: runs, and is right
        torch.cuda.synchronize()
        assert_rel_close(h_all, ref[0], REL_TOL[torch.float32], f"h_all after a {direction} give-up")
    barrier_bound.raise_if_gave_up(device)  # nothing left


@pytest.mark.timeout(120, method="thread")
def test_bounded_barrier_raises_at_once_under_bounded_barriers(monkeypatch):
    """Under barrier_bound.bounded_barriers (verification's context) the launch whose wait gave up
    raises before the call returns, naming kernel, step and block, whatever the environment says;
    nothing is left for the next call."""
    T, B, H = 5, 3, 64
    use_variant(monkeypatch, "persistent", torch.float32, H, B)
    monkeypatch.setenv(cuda_backend.BARRIER_TIMEOUT_ENV, "0")  # no bound outside the context
    inputs, _ = make_case(T, B, H, torch.float32, seed=37)
    backend = get_backend("cuda")
    barrier_bound.reset(torch.device("cuda"))
    monkeypatch.setattr(cuda_ext, "_C", never_opens(cuda_ext._C))
    with barrier_bound.bounded_barriers(SHORT_BOUND_S):
        with pytest.raises(RuntimeError, match=_gave_up("cuda fused forward (persistent)", 0)):
            backend.forward(*inputs.values(), None, None, True)
    barrier_bound.raise_if_gave_up(torch.device("cuda"))  # the record was cleared by the raise


def test_backend_backward_direct():
    """The contract directly: dG, dh0, dc0 against the reference backend's (fp32)."""
    inputs, (dh_all, dh_T, dc_T) = make_case(12, 6, 50, torch.float32, seed=13)
    cuda, ref = get_backend("cuda"), get_backend("reference")
    h_all, _, _, ws = cuda.forward(*inputs.values(), None, None, True)
    assert [w.shape for w in ws] == [s for s, _ in cuda.workspace_spec(RecurrenceInputs(*inputs.values(), None, None).call())]
    rin = RecurrenceInputs(*inputs.values(), None, None)
    got = cuda.backward(rin, h_all, ws, dh_all, dh_T, dc_T)
    exp = ref.backward(rin, h_all, (), dh_all, dh_T, dc_T)
    for name, g, e in zip(("dG", "dh0", "dc0"), got[:3], exp[:3]):
        assert_rel_close(g, e, 1e-5, name)
    assert got[3] is None


def test_fused_plan_and_device_queries():
    n, why = _C.device_count()
    assert n >= 1 and why is None
    code, message, count, runtime, driver = _C.runtime_status()
    assert (code, message) == (0, None) and count == n and runtime == _C.CUDA_RUNTIME_VERSION
    assert driver >= runtime, "a driver older than the runtime fails cudaGetDeviceCount"
    props = _C.device_properties(torch.cuda.current_device())
    assert props["multiprocessor_count"] > 0
    for direction in ("forward", "backward"):
        for code in (_C.FUSED_FLOAT32, _C.FUSED_FLOAT16, _C.FUSED_BFLOAT16, _C.FUSED_TF32):
            plan = _C.fused_plan(direction, code, 16, 256, 256)
            assert plan["fits"] and plan["possible"], plan  # 32 blocks of 256 units: co-resident on sm_80+
            assert plan["blocks"] == cuda_fused.Plan(16, 256).blocks


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_lstm_module(dt, bidirectional):
    from lstm_kernels import FusedLSTM

    dtype = DTYPES[dt]
    torch.manual_seed(0)
    kw = dict(input_size=24, hidden_size=100, num_layers=2, bidirectional=bidirectional, batch_first=True)
    truth = FusedLSTM(**kw, backend="reference").cuda().double()
    ref = FusedLSTM(**kw, backend="reference").cuda().to(dtype)
    mod = FusedLSTM(**kw, backend="cuda").cuda().to(dtype)
    ref.load_state_dict(truth.state_dict())
    mod.load_state_dict(truth.state_dict())
    x = torch.randn(5, 37, 24, device="cuda").to(dtype)
    gy = torch.randn(5, 37, 200 if bidirectional else 100, device="cuda").to(dtype)

    def run(m, cast):
        xi = x.to(cast).detach().requires_grad_(True)
        y, (h, c) = m(xi)
        (y * gy.to(cast)).sum().add_(h.sum() + c.sum()).backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        return {"y": y.detach(), "h_n": h.detach(), "c_n": c.detach(), "dx": xi.grad, **grads}

    want, base, got = run(truth, torch.float64), run(ref, dtype), run(mod, dtype)
    for name, expected in want.items():
        allowed = max(REL_TOL[dtype], 2 * rel_error(base[name], expected))
        assert_rel_close(got[name], expected, allowed, name)
