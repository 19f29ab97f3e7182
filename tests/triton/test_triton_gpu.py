"""The triton backend on a real GPU, at real sizes, both variants, every dtype.

Marked ``gpu``: skipped without CUDA, and skipped under TRITON_INTERPRET=1 (the
interpreter would run these sizes for hours). Each test has its own time limit
(pytest-timeout, "thread" method): a grid barrier that never opens fails the test
instead of hanging the whole run. The rule for every dtype (the flash-attention rule
of STYLE.md): against the float64 reference on the same rounded inputs, the relative
error is at most max(REL_TOL[dtype], 2 x the error of the reference backend itself run
in that dtype), and no single element is off by more than ELEMENT_FACTOR times that
of the tensor's largest magnitude (tests/utils.py: one wrong tile cannot hide in the norm).

Races between the programs of a persistent launch (its grid barrier) are what no
sanitizer sees; the detector is the comparison of the persistent kernels with the same kernels
launched once per step (their steps mode, where a launch boundary is the barrier): bitwise, for
every shape here and at the flagship shape, several runs each
(test_step_budget_kernels_match_their_steps_mode_bitwise). The persistent variant as launched is
also bitwise the same run after run and close to the step variant
(test_persistent_is_deterministic_and_close_to_step). Every test that claims a kernel asserts
that it ran (the backend's last_forward_kernel / last_backward_kernel).
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from lstm_kernels.backends import get_backend, known_backends
import recurrence_cases
from utils import REL_TOL, assert_rel_close, rel_error

known_backends()
triton_backend = pytest.importorskip("lstm_kernels.backends.triton")
kernels = pytest.importorskip("lstm_kernels.backends.triton.config")
from lstm_kernels.backends import device_rows  # noqa: E402
from lstm_kernels.backends.triton import launch, persistent as triton_persistent  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300, method="thread"),
    pytest.mark.usefixtures("no_tf32"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="real-size GPU tests; not interpreted"),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ["step", "persistent"]
# (T, B, H, proj_size): long sequence; the largest batch x hidden; B = 1 with odd H; odd
# sizes; more tiles than SMs (persistent runs the step kernels); projections; one tile.
SHAPES = {
    "T1024_B64_H256": (1024, 64, 256, 0),
    "T512_B256_H1024": (512, 256, 1024, 0),
    "T64_B1_H1000": (64, 1, 1000, 0),
    "T128_B17_H129": (128, 17, 129, 0),
    "T16_B256_H2048": (16, 256, 2048, 0),
    "T256_B64_H512_P128": (256, 64, 512, 128),
    "T64_B256_H1024_P1536": (64, 256, 1024, 1536),
    # one tile: a single persistent program, whose threads still exchange tiles through memory
    "T64_B8_H32": (64, 8, 32, 0),
    "T64_B8_H32_P16": (64, 8, 32, 16),
}


def make_case(T, B, H, proj, dtype, seed=0, lengths=None):
    return recurrence_cases.make_case(T, B, H, dtype, "cuda", seed=seed, lengths=lengths, proj=proj)


def run(backend, case, dtype=None):
    out, _ = recurrence_cases.run(backend, case, dtype)
    torch.cuda.synchronize()
    return out


def expected_kernels(variant, case) -> tuple:
    """(forward, backward) kernels a call of ``variant`` must run: the persistent kernels where their
    plan serves the call (fp16/bf16, and fp32 with TF32), else the step ones."""
    if variant == "step":
        return "step", "step"
    T, B, four_h = case["xg"].shape
    H, P, has_proj, dtype = four_h // 4, case["w_hh"].shape[1], case["w_hr"] is not None, case["xg"].dtype
    device = case["xg"].device
    fw = triton_persistent.forward_plan(B, H, P, dtype, device, has_proj)
    bw = triton_persistent.backward_plan(B, H, P, dtype, device, has_proj)
    return tuple("step_budget" if isinstance(plan, dict) else "step" for plan in (fw, bw))


def assert_ran(backend, expected, what=""):
    ran = (backend.last_forward_kernel, backend.last_backward_kernel)
    assert ran == tuple(expected), f"{what}: ran {ran}, expected {tuple(expected)}"


def check(variant, case, dtype, tol_key=None):
    backend = triton_backend.TritonBackend(variant)
    actual = run(backend, case)
    assert_ran(backend, expected_kernels(variant, case), variant)
    expected = run(get_backend("reference"), case, torch.float64)
    own = run(get_backend("reference"), case)  # the reference's own error in this dtype
    base = REL_TOL[tol_key or dtype]
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].dtype == dtype and actual[name].is_cuda, name
        tol = max(base, 2 * rel_error(own[name], expected[name]))
        assert_rel_close(actual[name], expected[name], tol, f"{variant} {name}")
    return actual


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference_at_real_sizes(shape, dtype, variant):
    check(variant, make_case(*shape, dtype), dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_variable_lengths(dtype, variant):
    T, B, H, P = 300, 64, 256, 0
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(5)).sort(descending=True).values
    lengths[0] = T
    actual = check(variant, make_case(T, B, H, P, dtype, lengths=lengths.tolist()), dtype)
    for b, n in enumerate(lengths.tolist()):
        assert (actual["h_all"][n:, b] == 0).all() and (actual["dG"][n:, b] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_long_memory(dtype, variant):
    """A forget gate near 1 (its pre-activation + 4): an error of one sign in f piles up in c over the
    memory's length. The cell's sigmoid divides by div.full.f32 (approximate) in 16 bits and tf32, and
    correctly rounded at float32 accuracy (device_helpers._sigmoid); tests/test_cell_error_budget.py
    models the case on the CPU, where a reciprocal biased by an ulp breaks float32's tolerance."""
    T, B, H = 512, 16, 64
    case = make_case(T, B, H, 0, dtype)
    case["xg"][:, :, H:2 * H] += 4.0
    check(variant, case, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tf32(variant, set_tf32):
    set_tf32(True)
    check(variant, make_case(256, 64, 512, 0, torch.float32), torch.float32, tol_key="tf32")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_deterministic(dtype, variant):
    case = make_case(128, 96, 384, 0, dtype, seed=7)
    first = run(triton_backend.TritonBackend(variant), case)
    for _ in range(3):
        again = run(triton_backend.TritonBackend(variant), case)
        for name in first:
            assert torch.equal(first[name], again[name]), f"{name} differs between runs"


def test_auto_variant_choice():
    """auto = the persistent kernels where their plan fits (every tile its own SM), the step kernels
    otherwise."""
    device = torch.device("cuda")
    assert launch.choose_variant("auto", device) == "persistent"
    for (T, B, H), expected in (((4, 64, 256), "step_budget"), ((2, 256, 4096), "step")):
        backend = triton_backend.TritonBackend("auto")
        run(backend, make_case(T, B, H, 0, torch.bfloat16))
        assert_ran(backend, (expected, expected), f"auto at B = {B}, H = {H}")


@pytest.mark.parametrize("proj_size", [0, 32], ids=["no_proj", "proj32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_module_on_gpu_matches_nn_lstm(variant, proj_size, monkeypatch):
    """FusedLSTM(backend="triton") end to end on CUDA: packed, bidirectional, two layers, fp32."""
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    from lstm_kernels import FusedLSTM

    monkeypatch.setenv(kernels.VARIANT_ENV, variant)
    torch.manual_seed(0)
    expected_module = nn.LSTM(
        48, 96, num_layers=2, bidirectional=True, proj_size=proj_size, dtype=torch.float64, device="cuda"
    )
    fused = FusedLSTM.from_torch(expected_module, backend="triton").float()
    lengths = [40, 33, 33, 17, 5, 1]
    x = torch.randn(40, len(lengths), 48, dtype=torch.float64, device="cuda", requires_grad=True)
    x32 = x.detach().float().requires_grad_(True)
    results = []
    for module, inp in ((fused, x32), (expected_module, x)):
        out, (h_n, c_n) = module(pack_padded_sequence(inp, lengths))
        loss = out.data.double().square().sum() + h_n.double().sum() + c_n.double().sum()
        grads = torch.autograd.grad(loss, [inp, *module.parameters()])
        results.append((out.data, h_n, c_n, *grads))
    for i, (a, e) in enumerate(zip(*results)):
        assert_rel_close(a, e, REL_TOL[torch.float32], f"result {i}")


#: The flagship shape (DESIGN.md, "The budget of one step"): T = 1024, B = 16, H = 768.
FLAGSHIP = (1024, 16, 768, 0)
BITWISE_CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES] + [
    ("flagship", "fp16"), ("flagship", "bf16")]
RUNS = 3


def assert_bitwise(actual, expected, what):
    for name in expected:
        a, e = actual[name], expected[name]
        if not torch.equal(a, e):
            diff = (a.double() - e.double()).abs()
            where = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
            raise AssertionError(
                f"{what}: {name} differs from the step variant in {int((a != e).sum())} of {a.numel()} elements; "
                f"max |diff| {diff.max().item():.3e} at {where}")


@pytest.mark.timeout(900, method="thread")
@pytest.mark.parametrize("shape_name,dtype_name", BITWISE_CASES, ids=[f"{s}-{d}" for s, d in BITWISE_CASES])
def test_persistent_is_deterministic_and_close_to_step(shape_name, dtype_name):
    """The persistent variant against the step variant: as launched (the persistent kernels where
    their plan fits: another summation grouping, K split over warps) bitwise the same run after
    run, and within the tolerance of the step variant element by element. (The race detector of
    the persistent kernels, bitwise against their own steps mode, is
    test_step_budget_kernels_match_their_steps_mode_bitwise.)"""
    shape = FLAGSHIP if shape_name == "flagship" else SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    case = make_case(*shape, dtype, seed=11)
    step = run(triton_backend.TritonBackend("step"), case)
    first = run(triton_backend.TritonBackend("persistent"), case)
    for i in range(1, RUNS):
        again = run(triton_backend.TritonBackend("persistent"), case)
        for name in first:
            assert torch.equal(first[name], again[name]), f"persistent run {i}: {name} differs from run 0"
    for name in step:
        assert_rel_close(first[name], step[name], REL_TOL[dtype], f"persistent vs step {name}")


def _run_step_budget(case, steps_mode: bool) -> dict:
    """The persistent kernels' forward and backward, launched persistently or once per step (the same
    kernels, tiles and arithmetic without the grid barrier)."""
    xg, w_hh, h0, c0, w_hr, bs = (case[n] for n in ("xg", "w_hh", "h0", "c0", "w_hr", "batch_sizes"))
    h_all, h_T, c_T, ws = triton_persistent.persistent_forward(xg, w_hh, h0, c0, w_hr, bs, True, steps_mode=steps_mode)
    dG, dh0, dc0, dw_hr = triton_persistent.persistent_backward(xg, w_hh, c0, w_hr, ws, case["dh_all"], case["dh_T"],
                                                                case["dc_T"], bs, steps_mode=steps_mode)
    torch.cuda.synchronize()
    out = dict(h_all=h_all, h_T=h_T, c_T=c_T, dG=dG, dh0=dh0, dc0=dc0)
    return out if dw_hr is None else out | dict(dW_hr=dw_hr)


STEP_BUDGET_CASES = [(shape, dtype) for shape in SHAPES for dtype in ("fp16", "bf16")] + [
    ("flagship", "fp16"), ("flagship", "bf16")]


@pytest.mark.timeout(900, method="thread")
@pytest.mark.parametrize("shape_name,dtype_name", STEP_BUDGET_CASES, ids=[f"{s}-{d}" for s, d in STEP_BUDGET_CASES])
def test_step_budget_kernels_match_their_steps_mode_bitwise(shape_name, dtype_name):
    """The kernels fp16/bf16 calls launch by default (the persistent ones), persistent against the same
    kernels launched once per step: bitwise equal, several runs, so a grid-barrier race shows."""
    shape = FLAGSHIP if shape_name == "flagship" else SHAPES[shape_name]
    case = make_case(*shape, DTYPES[dtype_name], seed=11)
    xg = case["xg"]
    H, P = xg.shape[2] // 4, case["w_hh"].shape[1]
    for plan in (triton_persistent.forward_plan, triton_persistent.backward_plan):
        cfg = plan(xg.shape[1], H, P, xg.dtype, xg.device, case["w_hr"] is not None)
        if not isinstance(cfg, dict):
            pytest.skip(f"the step-budget kernels do not serve this call: {cfg}")
    steps = _run_step_budget(case, steps_mode=True)
    for i in range(RUNS):
        assert_bitwise(_run_step_budget(case, steps_mode=False), steps, f"step-budget persistent launch, run {i}")


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_side_stream_and_cuda_graph(variant, packed):
    """Each variant on a side stream and under CUDA-graph capture: the launches run on the current
    stream, the row counts reach the GPU without a blocking copy (a blocking copy from pageable
    memory is not permitted while capturing), and replays after new inputs are copied in give
    what an eager run on those inputs gives, bitwise."""
    T, B, H = 64, 16, 256
    lengths = [T] + sorted(torch.randint(1, T + 1, (B - 1,), generator=torch.Generator().manual_seed(2)).tolist(),
                           reverse=True) if packed else None
    case = make_case(T, B, H, 0, torch.float16, seed=3, lengths=lengths)
    backend = triton_backend.TritonBackend(variant)
    expected = run(backend, case)  # also compiles the kernels before the capture

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side, _ = recurrence_cases.run(backend, case)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert_bitwise(on_side, expected, f"{variant} on a side stream")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = recurrence_cases.run(backend, case)
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise(captured, expected, f"{variant} graph replay")

    new = make_case(T, B, H, 0, torch.float16, seed=4, lengths=lengths)
    for name, tensor in case.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
            tensor.copy_(new[name])
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise(captured, run(backend, new), f"{variant} graph replay with new inputs")


def test_row_counts_of_a_packed_batch_come_from_pinned_memory(monkeypatch):
    """step_rows on a GPU: the copy's source is page-locked, and the result is right."""
    seen = []
    real = device_rows.pinned_int32

    def spy(n):
        seen.append(real(n))
        return seen[-1]

    monkeypatch.setattr(device_rows, "pinned_int32", spy)
    rows = device_rows.step_rows(torch.tensor([3, 3, 1]), 3, 3, torch.device("cuda"))
    assert seen and seen[0].is_pinned()
    assert rows.is_cuda and rows.tolist() == [3, 3, 1, 0]
    assert device_rows.step_rows(None, 3, 5, torch.device("cuda")).tolist() == [5, 5, 5, 0]


#: The modules that launch persistent Triton kernels, each with its own name for barrier_args.
BARRIER_LAUNCHERS = (triton_persistent,)
#: A grid-barrier counter that starts this far below zero never reaches a wait's target
#: (``_wait`` compares seen < target, int32): a barrier that never opens.
NEVER = -(2**30)
#: The message of a give-up of a persistent Triton kernel (barrier_bound.describe), any step and program.
GAVE_UP = (r"grid barrier of the triton (forward|backward) \(persistent(, step budget)?\) kernel on "
           r"cuda:\d+ gave up after waiting [\d.e+-]+ s \(block \d+, waiting after step \d+\)")


def never_opens(barrier_args):
    """A stand-in for ``config.barrier_args`` whose counter starts at NEVER."""

    def args(device, kernel):
        state, *rest = barrier_args(device, kernel)
        state[0] = NEVER
        return (state, *rest)

    return args


@pytest.mark.timeout(120, method="thread")
def test_bounded_barrier_passes_a_working_launch(monkeypatch):
    """The time bound on a working persistent launch: the default bound, a short one, and
    bounded_barriers (which checks the record at once) give the same bits as no bound
    (LSTM_KERNELS_BARRIER_TIMEOUT=0), and nothing is recorded."""
    barrier_bound = kernels.barrier_bound
    case = make_case(32, 64, 256, 0, torch.float16, seed=5)
    backend = triton_backend.TritonBackend("persistent")
    barrier_bound.reset(torch.device("cuda"))
    monkeypatch.setenv(kernels.BARRIER_TIMEOUT_ENV, "0")
    expected = run(backend, case)
    for bound in ("", "1"):
        monkeypatch.setenv(kernels.BARRIER_TIMEOUT_ENV, bound)
        assert_bitwise(run(backend, case), expected, f"with {kernels.BARRIER_TIMEOUT_ENV}={bound!r}")
    with barrier_bound.bounded_barriers(1.0):
        assert_bitwise(run(backend, case), expected, "under bounded_barriers")
    torch.cuda.synchronize()
    barrier_bound.raise_if_gave_up(torch.device("cuda"))  # nothing recorded


@pytest.mark.timeout(120, method="thread")
def test_bounded_barrier_reports_a_barrier_that_never_opens(monkeypatch):
    """A persistent launch whose grid-barrier counter can never reach its target gives up after the
    bound instead of hanging. Without bounded_barriers the call returns and the next call on the
    device raises (or the same call's backward launch, if the forward's record copy landed by then),
    naming the Triton kernel, the step and the program; under bounded_barriers the
    call itself raises. After the raise a working call runs and matches the call before."""
    barrier_bound = kernels.barrier_bound
    case = make_case(32, 64, 256, 0, torch.float16, seed=6)
    backend = triton_backend.TritonBackend("persistent")
    device = torch.device("cuda")
    barrier_bound.reset(device)
    expected = run(backend, case)
    message = GAVE_UP
    monkeypatch.setenv(kernels.BARRIER_TIMEOUT_ENV, "0.05")
    raised = []
    with monkeypatch.context() as m:
        for module in BARRIER_LAUNCHERS:
            m.setattr(module, "barrier_args", never_opens(kernels.barrier_args))
        try:  # the forward gives up; the backward's launch may already see the record's copy
            run(backend, case)
        except RuntimeError as e:
            raised.append(str(e))
    if not raised:  # else: the next call raises (the copy has landed: run() synchronised)
        with pytest.raises(RuntimeError) as info:
            run(backend, case)
        raised.append(str(info.value))
    assert re.search(message, raised[0]), raised[0]
    assert_bitwise(run(backend, case), expected, "after a give-up")
    with monkeypatch.context() as m:
        for module in BARRIER_LAUNCHERS:
            m.setattr(module, "barrier_args", never_opens(kernels.barrier_args))
        monkeypatch.setenv(kernels.BARRIER_TIMEOUT_ENV, "0")  # no bound outside the context
        with barrier_bound.bounded_barriers(0.05):
            with pytest.raises(RuntimeError, match=message):
                run(backend, case)
    barrier_bound.raise_if_gave_up(device)  # cleared by the raise
