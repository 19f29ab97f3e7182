"""GPU tests of the fused CUDA kernels at the budget of one step (``csrc/fused_forward.cu``,
``csrc/fused_backward.cu``; issue 13). Marked ``gpu``: skipped without a CUDA GPU.

- persistent (one cooperative launch, light grid barrier) against the float64 reference, and
  bitwise against the same tile code launched once per (half-)step, at several shapes including
  the flagship (T = 1024, B = 16, H = 768), in every precision (fp16, bf16, float32 at fp32
  accuracy, float32 on tf32), with and without variable lengths, with and without a projection
  (proj_size: h_t = W_hr m_t, dW_hr), where the device's shared memory holds the kernels;
- the backward likewise (dG exchanged in the storage dtype, streamed per warp), and run-to-run
  bitwise determinism;
- µs per step at the flagship shape, printed next to nn.LSTM's (pytest -s).

The kernels are reached through ``lstm_kernels._C`` when the extension exports them
(``fused_forward`` / ``fused_backward``), else through a standalone build of the two .cu files
with nvcc (ctypes), so they can be checked before the extension is wired.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lstm_kernels.backends import RecurrenceInputs
from lstm_kernels.backends import cuda_fused as cf
from lstm_kernels.backends.reference import ReferenceBackend
from utils import REL_TOL, assert_rel_close

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu
#: (name, dtype, tf32, tolerance relative to a float64 reference, tests/utils.py): the kernels' Ops.
PRECISIONS = [("fp16", torch.float16, False, REL_TOL[torch.float16]),
              ("bf16", torch.bfloat16, False, REL_TOL[torch.bfloat16]),
              ("fp32", torch.float32, False, REL_TOL[torch.float32]), ("tf32", torch.float32, True, REL_TOL["tf32"])]
PRECISION_IDS = [p[0] for p in PRECISIONS]


def _skip_unless_fits(dtype, B, H, P):
    """Skip where this device's shared memory does not hold the fused kernels' blocks."""
    optin = torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin
    plan = cf.Plan(B, H, P)
    elem = torch.empty((), dtype=dtype).element_size()
    if not plan.fits(optin, elem):
        pytest.skip(f"the fused kernels' blocks for B={B} H={H} P={P} {dtype} do not fit {optin} bytes here")


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    """(forward entry, backward entry, plan entries) taking ints, returning a CUDA error code."""
    try:
        from lstm_kernels import _C
    except ImportError:
        _C = None
    if _C is not None and hasattr(_C, "fused_forward"):
        return _C.fused_forward, _C.fused_backward
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("neither lstm_kernels._C.fused_forward nor nvcc for a standalone build")
    cap = torch.cuda.get_device_capability()
    so = tmp_path_factory.mktemp("fused") / "libfused_lstm.so"
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17", f"-arch=sm_{cap[0]}{cap[1]}",
                    f"-I{ROOT / 'csrc'}", str(ROOT / "csrc/fused_forward.cu"), str(ROOT / "csrc/fused_backward.cu"),
                    "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    P, I = ctypes.c_void_p, ctypes.c_int
    L = ctypes.c_longlong
    lib.lstm_fused_forward.argtypes = [I] + [P] * 14 + [I] * 5 + [P, L, P]
    lib.lstm_fused_backward.argtypes = [I] + [P] * 17 + [I] * 5 + [P, L, P]
    lib.lstm_fused_forward.restype = lib.lstm_fused_backward.restype = I

    def c_order(fn):  # the extension's order (..., stream, barrier_state, barrier_spins) -> the C API's
        return lambda *a: fn(*a[:-3], a[-2], a[-1], a[-3])

    return c_order(lib.lstm_fused_forward), c_order(lib.lstm_fused_backward)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(T, B, H, dtype, seed, varlen, P=None):
    g = torch.Generator().manual_seed(seed)
    K = H if P is None else P
    xg = torch.randn(T, B, 4 * H, generator=g) * 0.5
    w = torch.randn(4 * H, K, generator=g) / K**0.5
    w_hr = None if P is None else torch.randn(P, H, generator=g) / H**0.5
    h0, c0 = torch.randn(B, K, generator=g) * 0.5, torch.randn(B, H, generator=g) * 0.5
    bs = None
    if varlen:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        lengths = lengths.sort(descending=True).values
        bs = torch.tensor([int((lengths > t).sum()) for t in range(T)])
    cuda = lambda t: None if t is None else t.to("cuda", dtype)  # noqa: E731
    return cuda(xg), cuda(w), cuda(h0), cuda(c0), cuda(w_hr), bs


def _reference(xg, w, h0, c0, w_hr, bs, dh_all, dh_T, dc_T):
    ref = ReferenceBackend()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    h_all, h_T, c_T, _ = ref.forward(d(xg), d(w), d(h0), d(c0), d(w_hr), bs, True)
    dG, dh0, dc0, dw_hr = ref.backward(RecurrenceInputs(d(xg), d(w), d(h0), d(c0), d(w_hr), bs), h_all, (),
                                       d(dh_all), d(dh_T), d(dc_T))
    return h_all, h_T, c_T, dG, dh0, dc0, dw_hr


SHAPES = [(1, 1, 1, None), (5, 3, 13, None), (7, 17, 40, None), (33, 20, 129, None), (16, 16, 768, None),
          (9, 40, 256, None), (6, 5, 24, 7), (11, 18, 100, 36), (16, 16, 768, 256)]  # (T, B, H, P)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, dtype, tf32, tol", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("T, B, H, P", SHAPES)
@pytest.mark.parametrize("varlen", [False, True])
def test_fused_matches_reference_and_per_step_bitwise(entries, name, dtype, tf32, tol, T, B, H, P, varlen):
    fwd, bwd = entries
    _skip_unless_fits(dtype, B, H, P)
    xg, w, h0, c0, w_hr, bs = _inputs(T, B, H, dtype, seed=T * 1000 + H, varlen=varlen, P=P)
    K = H if P is None else P
    g = torch.Generator().manual_seed(7)
    # gradients on padded rows too: a kernel must ignore them there, as the reference does
    dh_all = (torch.randn(T, B, K, generator=g)).to("cuda", dtype)
    dh_T = torch.randn(B, K, generator=g).to("cuda", dtype)
    dc_T = torch.randn(B, H, generator=g).to("cuda", dtype)
    outs = {}
    for persistent in (True, False):
        h_all, h_T, c_T, (act, c_all) = cf.forward(fwd, xg, w, h0, c0, w_hr, bs, True, persistent, tf32=tf32)
        dG, dh0, dc0, dw_hr = cf.backward(bwd, w, c0, act, c_all, w_hr, dh_all, dh_T, dc_T, bs, persistent,
                                          tf32=tf32)
        torch.cuda.synchronize()
        outs[persistent] = (h_all, h_T, c_T, act, c_all, dG, dh0, dc0, dw_hr)
    names = ("h_all", "h_T", "c_T", "act", "c_all", "dG", "dh0", "dc0", "dW_hr")
    for name, a, b in zip(names, outs[True], outs[False]):
        if a is not None:
            assert torch.equal(a, b), f"{name}: persistent and per-step launches differ"
    ref = _reference(xg, w, h0, c0, w_hr, bs, dh_all, dh_T, dc_T)
    h_all, h_T, c_T, _, _, dG, dh0, dc0, dw_hr = outs[True]
    errs = {n: _rel(a, r) for n, a, r in zip(("h_all", "h_T", "c_T", "dG", "dh0", "dc0", "dW_hr"),
                                              (h_all, h_T, c_T, dG, dh0, dc0, dw_hr), ref) if a is not None}
    print(f"\nfused {name} T={T} B={B} H={H} P={P} varlen={varlen}: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    for n, a, r in zip(("h_all", "h_T", "c_T", "dG", "dh0", "dc0", "dW_hr"), (h_all, h_T, c_T, dG, dh0, dc0, dw_hr),
                       ref):
        if a is not None:  # the norm-relative bound and the per-element one
            assert_rel_close(a, r, tol, f"{name} {n}")
    if bs is not None:
        for t in range(T):  # inactive rows: zero outputs
            assert (h_all[t, int(bs[t]):] == 0).all() and (dG[t, int(bs[t]):] == 0).all()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name, dtype, tf32, tol", PRECISIONS, ids=PRECISION_IDS)
def test_flagship_bitwise_deterministic_and_timed(entries, name, dtype, tf32, tol):
    fwd, bwd = entries
    T, B, H = 1024, 16, 768
    _skip_unless_fits(dtype, B, H, None)
    xg, w, h0, c0, _, _ = _inputs(T, B, H, dtype, seed=1, varlen=False)
    dh_all = torch.randn(T, B, H, device="cuda").to(dtype)
    dh_T, dc_T = torch.zeros(B, H, device="cuda", dtype=dtype), torch.zeros(B, H, device="cuda", dtype=dtype)
    runs = []
    for persistent in (True, True, False):
        h_all, h_T, c_T, (act, c_all) = cf.forward(fwd, xg, w, h0, c0, None, None, True, persistent, tf32=tf32)
        dG, dh0, dc0, _ = cf.backward(bwd, w, c0, act, c_all, None, dh_all, dh_T, dc_T, None, persistent, tf32=tf32)
        runs.append((h_all, c_T, dG, dh0, dc0))
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(a, c)
    ref = _reference(xg, w, h0, c0, None, None, dh_all, dh_T, dc_T)
    assert_rel_close(runs[0][0], ref[0], tol, f"{name} h_all")
    assert_rel_close(runs[0][2], ref[3], tol, f"{name} dG")

    def timed(fn, n=5):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(n):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end))
        return sorted(ts)[n // 2]

    f_ms = timed(lambda: cf.forward(fwd, xg, w, h0, c0, None, None, True, True, tf32=tf32))
    saved = cf.forward(fwd, xg, w, h0, c0, None, None, True, True, tf32=tf32)[3]
    b_ms = timed(lambda: cf.backward(bwd, w, c0, *saved, None, dh_all, dh_T, dc_T, None, True, tf32=tf32))
    lstm = torch.nn.LSTM(H, H).to("cuda", dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)
    with torch.no_grad():
        n_ms = timed(lambda: lstm(x))
    print(f"\n[GPU {torch.cuda.get_device_name()}] fused {name} T={T} B={B} H={H}: "
          f"forward {f_ms * 1e3 / T:.2f} us/step"
          f" (incl. host-side interleave/alloc), backward {b_ms * 1e3 / T:.2f} us/step; nn.LSTM forward "
          f"(incl. input GEMM) {n_ms * 1e3 / T:.2f} us/step")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, dtype, tf32, tol", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("P, varlen", [(None, True), (24, False), (24, True)])
def test_backend_serves_projection_and_variable_lengths(monkeypatch, set_tf32, name, dtype, tf32, tol, P, varlen):
    """Through the cuda backend (the default variant): projected and packed calls go to the
    fused kernels and match the reference backend."""
    from lstm_kernels.backends import get_backend
    from lstm_kernels.backends import cuda as cuda_backend

    backend = get_backend("cuda")
    if backend.unavailable_reason() is not None:
        pytest.skip(backend.unavailable_reason())
    monkeypatch.delenv(cuda_backend.VARIANT_ENV, raising=False)
    monkeypatch.delenv(cuda_backend.MMA_ENV, raising=False)
    set_tf32(tf32)
    T, B, H = 12, 9, 40
    xg, w, h0, c0, w_hr, bs = _inputs(T, B, H, dtype, seed=3, varlen=varlen, P=P)
    assert backend.supports(RecurrenceInputs(xg, w, h0, c0, w_hr, bs).call()) is None
    h_all, h_T, c_T, ws = backend.forward(xg, w, h0, c0, w_hr, bs, True)
    assert backend.last_forward_kernel == "fused"
    dh_all = torch.randn_like(h_all)  # nonzero on padded rows too: the kernels must ignore those
    dh_T, dc_T = torch.randn_like(h_T), torch.randn_like(c_T)
    dG, dh0, dc0, dw_hr = backend.backward(RecurrenceInputs(xg, w, h0, c0, w_hr, bs), h_all, ws, dh_all, dh_T, dc_T)
    assert backend.last_backward_kernel == "fused"
    ref = _reference(xg, w, h0, c0, w_hr, bs, dh_all, dh_T, dc_T)
    for name, a, r in zip(("h_all", "h_T", "c_T", "dG", "dh0", "dc0", "dW_hr"), (h_all, h_T, c_T, dG, dh0, dc0, dw_hr),
                          ref):
        if a is not None:
            assert_rel_close(a, r, tol, f"{name} {dtype} tf32={tf32}")
