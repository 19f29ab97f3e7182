"""The persistent kernels of issue 12 (lstm_kernels/backends/triton/persistent*.py) against the reference.

On the CPU under TRITON_INTERPRET=1 the kernels run in their per-step mode (one launch per step
and phase, no grid barrier: the interpreter runs programs one after another); on a GPU as one
cooperative persistent launch. Forward (h_all, h_T, c_T) and backward (dG, dh0, dc0, dW_hr)
are compared with the reference backend in float64 on the same rounded inputs, with the
tolerances of tests/utils.py (DESIGN.md). Shapes stress every tile edge: H and B not multiples
of the tile (several unit blocks and batch tiles, the last partial), H = 1, B = 1, K split
over warps and in two pieces, programs idle in one phase (P > H), projections and variable
lengths. Small T: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

from lstm_kernels.backends import RecurrenceInputs, get_backend, known_backends
import recurrence_cases
from utils import REL_TOL, assert_rel_close

known_backends()
tp = pytest.importorskip("lstm_kernels.backends.triton.persistent")
kernels = pytest.importorskip("lstm_kernels.backends.triton.config")

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.interpreting() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def tf32_on_a_gpu(set_tf32):
    """On a GPU these kernels serve float32 only where torch allows TF32 (the plans refuse it
    otherwise, torch's default); under the interpreter float32 is served as it is."""
    if DEVICE == "cuda":
        set_tf32(True)


def tolerance(dtype: torch.dtype) -> float:
    """float32 runs on TF32 on a GPU (see tf32_on_a_gpu)."""
    return REL_TOL["tf32" if dtype == torch.float32 and DEVICE == "cuda" else dtype]


def run_persistent(case, block_h=None, units=None, block_b=None):
    """persistent_forward then persistent_backward; returns the outputs by name."""
    xg, w_hh, h0, c0, w_hr, bs = (case[n] for n in ("xg", "w_hh", "h0", "c0", "w_hr", "batch_sizes"))
    T, B, four_h = xg.shape
    H, P = four_h // 4, w_hh.shape[1]
    device = torch.device(DEVICE)
    fw_cfg = tp.forward_plan(B, H, P, xg.dtype, device, w_hr is not None, block_h=block_h, block_b=block_b)
    bw_cfg = tp.backward_plan(B, H, P, xg.dtype, device, w_hr is not None, units=units, block_b=block_b)
    assert isinstance(fw_cfg, dict), fw_cfg
    assert isinstance(bw_cfg, dict), bw_cfg
    h_all, h_T, c_T, ws = tp.persistent_forward(xg, w_hh, h0, c0, w_hr, bs, True, cfg=fw_cfg)
    dG, dh0, dc0, dw_hr = tp.persistent_backward(xg, w_hh, c0, w_hr, ws, case["dh_all"], case["dh_T"], case["dc_T"],
                                                 bs, cfg=bw_cfg)
    out = dict(h_all=h_all, h_T=h_T, c_T=c_T, dG=dG, dh0=dh0, dc0=dc0)
    if w_hr is not None:
        out["dW_hr"] = dw_hr
    else:
        assert dw_hr is None
    return out


def reference(case):
    d = {n: (None if case[n] is None else case[n].double()) for n in ("xg", "w_hh", "h0", "c0", "w_hr")}
    ref = get_backend("reference")
    h_all, h_T, c_T, ws = ref.forward(d["xg"], d["w_hh"], d["h0"], d["c0"], d["w_hr"], case["batch_sizes"], True)
    inputs = RecurrenceInputs(d["xg"], d["w_hh"], d["h0"], d["c0"], d["w_hr"], case["batch_sizes"])
    dG, dh0, dc0, dw_hr = ref.backward(inputs, h_all, ws, case["dh_all"].double(), case["dh_T"].double(),
                                       case["dc_T"].double())
    out = dict(h_all=h_all, h_T=h_T, c_T=c_T, dG=dG, dh0=dh0, dc0=dc0)
    if case["w_hr"] is not None:
        out["dW_hr"] = dw_hr
    return out


def check(case, dtype, **tiles):
    actual, expected = run_persistent(case, **tiles), reference(case)
    for name, e in expected.items():
        assert actual[name].device.type == DEVICE
        assert_rel_close(actual[name], e, tolerance(dtype), name)
    assert actual["h_all"].dtype == dtype and actual["dG"].dtype == dtype
    return actual


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(
    "T,B,H,tiles",
    [(3, 1, 1, {}),  # H = 1, B = 1: one unit block of 4 (3 rows masked), one batch tile of 16 (15 masked)
     (3, 17, 13, dict(block_h=8, units=8, block_b=16)),  # 2 unit blocks and 2 batch tiles, both last partial
     (2, 3, 33, {})],  # K split over 2 warps in two pieces (32 + 16); backward 4H = 132 in 2 pieces of 128
    ids=["T3_B1_H1", "T3_B17_H13_tiles", "T2_B3_H33"],
)
def test_matches_reference(T, B, H, tiles, dtype):
    check(recurrence_cases.make_case(T, B, H, dtype, DEVICE), dtype, **tiles)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(
    "T,B,H,P", [(3, 3, 13, 5), (2, 17, 6, 40), (2, 1, 1, 1)],  # P > H: programs idle in the cell phase
    ids=["H13_P5", "B17_H6_P40", "H1_P1"],
)
def test_projection_matches_reference(T, B, H, P, dtype):
    check(recurrence_cases.make_case(T, B, H, dtype, DEVICE, proj=P), dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("proj", [0, 7], ids=["no_proj", "proj7"])
@pytest.mark.parametrize("T,lengths", [(4, [4, 4, 2, 2, 1]), (3, [3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])],
                         ids=["B5_ties", "B17"])
def test_variable_lengths_match_reference(T, lengths, proj, dtype):
    case = recurrence_cases.make_case(T, len(lengths), 13, dtype, DEVICE, lengths=lengths, proj=proj)
    actual = check(case, dtype, block_b=16)
    for b, n in enumerate(lengths):  # padding steps hold zeros, as PackedSequence's padding does
        assert (actual["h_all"][n:, b] == 0).all()
        assert (actual["dG"][n:, b] == 0).all()


def test_deterministic():
    """Run after run, bitwise the same (the only atomic is the barrier counter)."""
    case = recurrence_cases.make_case(3, 5, 13, torch.float16, DEVICE, lengths=[3, 3, 2, 1, 1], proj=7)
    first, again = run_persistent(case), run_persistent(case)
    for name in first:
        assert torch.equal(first[name], again[name]), name


def test_workspace_pairs_with_the_step_backward():
    """persistent_forward keeps step_forward's workspace layout: the step backward accepts it (forward
    and backward choose their kernels separately)."""
    from lstm_kernels.backends.triton.step_backward import step_backward

    case = recurrence_cases.make_case(3, 3, 13, torch.float32, DEVICE, proj=5)
    xg, w_hh, h0, c0, w_hr = (case[n] for n in ("xg", "w_hh", "h0", "c0", "w_hr"))
    _, _, _, ws = tp.persistent_forward(xg, w_hh, h0, c0, w_hr, None, True)
    dG, dh0, dc0, dw_hr = step_backward(xg, w_hh, c0, w_hr, ws, case["dh_all"], case["dh_T"], case["dc_T"], None)
    expected = reference(case)
    for name, actual in (("dG", dG), ("dh0", dh0), ("dc0", dc0), ("dW_hr", dw_hr)):
        assert_rel_close(actual, expected[name], tolerance(torch.float32), name)


def test_interleave_gate_rows():
    H, U, K = 6, 4, 3
    w = torch.arange(4 * H * K, dtype=torch.float32).reshape(4 * H, K)
    w_int = tp.interleave_gate_rows(w, H, U)
    assert w_int.shape == (2 * 4 * U, K)
    for u in range(2):
        for k in range(4):
            for jj in range(U):
                row = w_int[u * 4 * U + k * U + jj]
                j = u * U + jj
                assert torch.equal(row, w[k * H + j] if j < H else torch.zeros(K)), (u, k, jj)


def test_plans_say_why_they_do_not_serve():
    cpu = torch.device("cpu")
    reason = tp.forward_plan(16, 768, 768, torch.float16, cpu, False, programs=8, budget=1 << 20)
    assert isinstance(reason, str) and "co-resident programs" in reason
    reason = tp.forward_plan(16, 768, 768, torch.float16, cpu, False, programs=132, budget=1024)
    assert isinstance(reason, str) and "bytes" in reason
    assert isinstance(tp.backward_plan(16, 768, 768, torch.float16, cpu, False, programs=8, budget=1 << 20), str)
    case = recurrence_cases.make_case(1, 2, 200, torch.float16, DEVICE)
    cfg = tp.forward_plan(2, 200, 200, torch.float16, cpu, False, programs=1, budget=1 << 20)
    assert isinstance(cfg, str) and "co-resident" in cfg, cfg
    with pytest.raises(ValueError, match="co-resident"):
        tp.persistent_forward(case["xg"], case["w_hh"], case["h0"], case["c0"], None, None, False, cfg=cfg)


def test_flagship_plan_spreads_over_the_sms():
    """B = 16, H = 768 on a 132-SM H100: the forward in 96 programs of 8 units, the backward in 48 of
    16 units, none of its MMA rows padded (the structural counts of these kernels are in
    tests/test_triton_step_budget.py)."""
    for dtype in (torch.float16, torch.bfloat16):
        fw = tp.forward_plan(16, 768, 768, dtype, torch.device("cuda"), False, programs=132, budget=144 * 1024)
        bw = tp.backward_plan(16, 768, 768, dtype, torch.device("cuda"), False, programs=132, budget=144 * 1024)
        assert fw["programs"] == 96 and fw["BLOCK_H"] == 8, fw
        assert bw["programs"] == 48 and bw["UNITS"] == bw["BLOCK_H"] == 16, bw
