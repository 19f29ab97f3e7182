"""GPU tests of the fused CUDA kernels at the budget of one step (``csrc/fused/fused_forward.cu``,
``csrc/fused/fused_backward.cu``; issue 13). Marked ``gpu``: skipped without a CUDA GPU.

- persistent (one cooperative launch, light grid barrier) against the float64 reference, and
  bitwise against the same tile code launched once per (half-)step, at several shapes including
  the flagship (T = 1024, B = 16, H = 768), in every precision (fp16, bf16, float32 at fp32
  accuracy, float32 on tf32), with and without variable lengths, with and without a projection
  (proj_size: h_t = W_hr m_t, dW_hr), where the device's shared memory holds the kernels;
- the backward likewise (dG exchanged in the storage dtype, streamed per warp), and run-to-run
  bitwise determinism; its wide variant (16 units per block) and its narrow one (16 units x 8 rows, W^T and
  dG^T the MMA's A and B) bitwise against the ring;
- the GRU's instances (GATES = 3) likewise: persistent against per-step bitwise and against the
  float64 reference, dense, packed, with resets;
- µs per step at the flagship shape, printed next to nn.LSTM's (pytest -s).

The kernels are reached through ``lstm_kernels._C`` (``fused_forward`` / ``fused_backward``; the
tests skip where the extension lacks them). The persistent launch's grid wait is bounded in time
(csrc/fused/barrier_wait.cuh): test_fused_barrier_that_never_opens_gives_up_and_is_reported injects
arrival counters that can never reach their target and checks the give-up is recorded (kernel,
step, block) and raised, and that the next launch is unaffected.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lstm_kernels.backends import RecurrenceInputs
from lstm_kernels.backends.cuda import fused as cf
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


def _extension():
    """``lstm_kernels._C`` with the fused entries, or None."""
    try:
        from lstm_kernels import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "fused_forward") and hasattr(_C, "fused_backward") else None


@pytest.fixture(scope="module")
def entries():
    """The extension's (fused_forward, fused_backward), as ``cuda/fused.py``'s ``forward`` / ``backward`` call them."""
    _C = _extension()
    if _C is None:
        pytest.skip("lstm_kernels._C is not built with fused_forward / fused_backward")
    return _C.fused_forward, _C.fused_backward


def parameter_names(fn) -> list:
    """The parameter names of a pybind11 function, in order, from its signature line
    (``name(a: int, b: int = 0) -> int``)."""
    head = (fn.__doc__ or "").lstrip().split("\n", 1)[0]
    inner = head[head.index("(") + 1:head.rindex(")")] if "(" in head else ""
    return re.findall(r"(?:^|,)\s*(\w+)\s*:", inner)


def by_keyword(fn, **replace):
    """``fn`` called by keyword: the positional arguments of a caller (``cuda/fused.py``'s ``forward``) are
    named after ``fn``'s own parameters, then ``replace`` swaps some of them (name -> value, or
    callable of the old value), so a parameter added to ``fn`` cannot shift what a test swaps."""
    names = parameter_names(fn)

    def call(*args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"{len(args)} positional arguments for {names}")
        kwargs = {**dict(zip(names, args)), **kwargs}
        for name, value in replace.items():
            if name not in kwargs:
                raise KeyError(f"{name!r} is not an argument of this call ({sorted(kwargs)})")
            kwargs[name] = value(kwargs[name]) if callable(value) else value
        return fn(**kwargs)

    return call


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


def _reference(xg, w, h0, c0, w_hr, bs, dh_all, dh_T, dc_T, dtype=torch.float64):
    """The reference backend's outputs and gradients, computed in ``dtype`` (float64: the oracle)."""
    ref = ReferenceBackend()
    d = lambda t: None if t is None else t.to(dtype)  # noqa: E731
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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, dtype, tf32, tol", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("T, B, H", [(512, 16, 64), (256, 16, 768)])
def test_fused_long_memory_holds_the_tolerance(entries, name, dtype, tf32, tol, T, B, H):
    """A forget gate near 1 (its pre-activation + 4): an error of one sign in f piles up in c over the
    memory's length. The 16-bit and tf32 kernels run the fast activations of csrc/common/cell.cuh (ex2 and
    rcp approximations), float32 accuracy the precise ones; every output and gradient within the tolerance,
    or within twice the reference's own error in the same dtype where the case makes that larger (a long
    memory amplifies every rounding; tests/test_cell_error_budget.py models the case on the CPU)."""
    fwd, bwd = entries
    _skip_unless_fits(dtype, B, H, None)
    xg, w, h0, c0, w_hr, bs = _inputs(T, B, H, dtype, seed=H, varlen=False)
    xg[:, :, H:2 * H] += 4.0
    g = torch.Generator().manual_seed(3)
    dh_all, dh_T, dc_T = (torch.randn(*shape, generator=g).to("cuda", dtype) for shape in ((T, B, H), (B, H), (B, H)))
    h_all, h_T, c_T, (act, c_all) = cf.forward(fwd, xg, w, h0, c0, None, None, True, True, tf32=tf32)
    dG, dh0, dc0, _ = cf.backward(bwd, w, c0, act, c_all, None, dh_all, dh_T, dc_T, None, True, tf32=tf32)
    ref = _reference(xg, w, h0, c0, None, None, dh_all, dh_T, dc_T)
    own = _reference(xg, w, h0, c0, None, None, dh_all, dh_T, dc_T, dtype=dtype)
    names = ("h_all", "h_T", "c_T", "dG", "dh0", "dc0")
    print(f"\nlong memory {name} T={T} B={B} H={H}: " + ", ".join(
        f"{n} {_rel(a, r):.2e} (reference in {name}: {_rel(o, r):.2e})"
        for n, a, o, r in zip(names, (h_all, h_T, c_T, dG, dh0, dc0), own, ref)))
    for n, a, o, r in zip(names, (h_all, h_T, c_T, dG, dh0, dc0), own, ref):
        assert_rel_close(a, r, max(tol, 2 * _rel(o, r)), f"{name} {n}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype, tf32", [(torch.float16, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp16", "bf16", "tf32"])
@pytest.mark.parametrize("T, B, H, P, cell", [(5, 3, 13, None, "lstm"), (16, 16, 768, None, "lstm"),
                                              (11, 18, 100, 36, "lstm"), (16, 16, 1024, None, "lstm"),
                                              (7, 17, 40, None, "gru"), (16, 16, 768, None, "gru")])
def test_fused_forward_with_weights_in_registers_is_bitwise_the_shared_one(entries, monkeypatch, dtype, tf32, T, B, H,
                                                                           P, cell):
    """LSTM_KERNELS_CUDA_FUSED_WEIGHTS=registers (W_hh as register fragments, read from shared memory once per
    launch; tf32: rounded once there) against the default: the same MMAs in the same order, so the same bits,
    persistent and per step; at B = 16, H = 1024 fills the 16-bit register slots (W_REG_CHUNKS) and H = 768
    tf32's (W_REG_CHUNKS_TF32), where at H = 1024 tf32 reads W from shared memory."""
    fwd, _ = entries
    n_gates = 4 if cell == "lstm" else 3
    _skip_unless_fits(dtype, B, H, P)
    xg, w, h0, c0, w_hr, _ = _inputs(T, B, H, dtype, seed=T * 1000 + H, varlen=False, P=P)
    if cell == "gru":
        xg, w, c0 = xg[..., :3 * H].contiguous(), w[:3 * H].contiguous(), None
    outs = {}
    for weights in ("shared", "registers"):
        monkeypatch.setenv("LSTM_KERNELS_CUDA_FUSED_WEIGHTS", weights)
        for persistent in (True, False):
            h_all, h_T, c_T, (act, c_all) = cf.forward(fwd, xg, w, h0, c0, w_hr, None, True, persistent, tf32=tf32,
                                                       cell=cell)
            torch.cuda.synchronize()
            outs[weights, persistent] = (h_all, h_T, c_T, act, c_all)
    assert act.shape[-1] == n_gates * H
    for persistent in (True, False):
        for n, a, b in zip(("h_all", "h_T", "c_T", "act", "c_all"), outs["registers", persistent],
                           outs["shared", persistent]):
            if a is not None:
                assert torch.equal(a, b), f"{n} (persistent={persistent}): registers and shared memory differ"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T, B, H", [(5, 3, 13), (9, 33, 100), (16, 16, 768), (16, 16, 1024)])
@pytest.mark.parametrize("varlen, resets", [(False, None), (True, "random"), (False, "whole steps")],
                         ids=["dense", "packed_resets", "whole_step_resets"])
def test_fused_forward_with_the_tagged_exchange_is_bitwise_the_shared_one(entries, monkeypatch, dtype, T, B, H, varlen,
                                                                          resets):
    """LSTM_KERNELS_CUDA_FUSED_EXCHANGE=tagged (h_t exchanged as tagged words, no grid barrier; W in registers)
    against the default (shared W, the counter's barrier): the same MMAs in the same order, so the same bits,
    persistent and per step, dense and packed with resets; odd H leaves a last pair half padding. The tagged
    buffer's last slot carries tag T for every row active at the last step: the kernel took the tagged path.
    "whole steps" resets every row at step 1 and at step T / 2, where a tile whose rows all reset must still
    wait for h_{t-1} before it overwrites the slot of h_{t-2}; the persistent run is repeated, as a race
    there shows only in some runs (a hang until the barrier's bound, or another block's h_t read as h_0)."""
    fwd, _ = entries
    _skip_unless_fits(dtype, B, H, None)
    xg, w, h0, c0, _, bs = _inputs(T, B, H, dtype, seed=T * 100 + H, varlen=varlen)
    g = torch.Generator().manual_seed(H)
    mask = None
    if resets == "random":
        mask = (torch.rand(T, B, generator=g) < 0.3).to(torch.uint8).cuda().contiguous()
    elif resets == "whole steps":
        mask = torch.zeros(T, B, dtype=torch.uint8)
        mask[[1, T // 2]] = 1
        mask = mask.cuda().contiguous()
    packed = []
    pack = cf.pack_tagged
    monkeypatch.setattr(cf, "pack_tagged", lambda *a: packed.append(pack(*a)) or packed[-1])
    outs = {}
    for exchange, weights in (("counter", "shared"), ("tagged", "shared")):
        monkeypatch.setenv("LSTM_KERNELS_CUDA_FUSED_EXCHANGE", exchange)
        monkeypatch.setenv("LSTM_KERNELS_CUDA_FUSED_WEIGHTS", weights)
        for persistent in (True, False):
            h_all, h_T, c_T, (act, c_all) = cf.forward(fwd, xg, w, h0, c0, None, bs, True, persistent, resets=mask)
            torch.cuda.synchronize()
            outs[exchange, persistent] = (h_all, h_T, c_T, act, c_all)
            if exchange == "tagged":
                last = packed[-1][(T - 1) & 1]
                active = B if bs is None else int(bs[T - 1])
                words = last[:active, cf.tagged_pos(torch.arange((H + 1) // 2, device=last.device))]
                assert ((words >> 32) == T).all(), "a word of the last step does not carry its tag"
    assert len(packed) == 2
    for persistent in (True, False):
        for n, a, b in zip(("h_all", "h_T", "c_T", "act", "c_all"), outs["tagged", persistent],
                           outs["counter", persistent]):
            assert torch.equal(a, b), f"{n} (persistent={persistent}): the tagged and the counter exchange differ"
    for _ in range(10 if resets == "whole steps" else 0):
        h_all, *_ = cf.forward(fwd, xg, w, h0, c0, None, bs, True, True, resets=mask)
        torch.cuda.synchronize()
        assert torch.equal(h_all, outs["counter", True][0]), "a repeated persistent run differs"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, dtype, tf32, tol", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("T, B, H, cell", [(5, 3, 13, "lstm"), (9, 33, 100, "lstm"), (16, 16, 768, "lstm"),
                                           (16, 16, 776, "lstm"), (7, 17, 40, "gru"), (16, 16, 768, "gru")])
@pytest.mark.parametrize("varlen, with_resets", [(False, False), (True, True)], ids=["dense", "packed_resets"])
@pytest.mark.parametrize("tile", ["wide", "narrow"])
def test_fused_backward_tiles_are_bitwise_the_ring(entries, monkeypatch, name, dtype, tf32, tol, T, B, H, cell, varlen,
                                                   with_resets, tile):
    """LSTM_KERNELS_CUDA_FUSED_BACKWARD=wide (blocks of 16 units, dG loaded straight into MMA fragments) and
    ``narrow`` (16 units x 8 rows, W^T and dG^T the MMA's A and B, from the same exchange layout) against the
    default ring: the same products in the same order (the narrow one computes each sum's transpose, the same
    k order inside each MMA), so the same bits, persistent and per step, dense and packed with resets. The
    plan names the kernel: the tile wherever its block fits shared memory (48 wide blocks at the flagship, 96
    narrow ones); float at H = 768 and H = 776 (13 pairs per warp in 16 bits) take two batches of slots;
    H = 100 leaves half of the last 16-unit block past H, B = 3, 17 and 33 part of the last batch tile."""
    fwd, bwd = entries
    n_gates = 4 if cell == "lstm" else 3
    _skip_unless_fits(dtype, B, H, None)
    xg, w, h0, c0, _, bs = _inputs(T, B, H, dtype, seed=T * 10 + H, varlen=varlen)
    xg, w = xg[..., :n_gates * H].contiguous(), w[:n_gates * H].contiguous()
    c0 = c0 if cell == "lstm" else None
    g = torch.Generator().manual_seed(H + 1)
    mask = (torch.rand(T, B, generator=g) < 0.3).to(torch.uint8).cuda().contiguous() if with_resets else None
    dh_all, dh_T, dc_T = (torch.randn(*s, generator=g).to("cuda", dtype) for s in ((T, B, H), (B, H), (B, H)))
    h_all, _, _, (act, c_all) = cf.forward(fwd, xg, w, h0, c0, None, bs, True, True, tf32=tf32, resets=mask,
                                           cell=cell)
    elem = torch.empty((), dtype=dtype).element_size()
    monkeypatch.setenv("LSTM_KERNELS_CUDA_FUSED_BACKWARD", tile)
    plan = cf.device_plan(torch.device("cuda"), "backward", dtype, B, H, H, with_resets, cell)
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    tile_smem = cf.backward_smem_bytes(H, None, elem, n_gates, tile)
    served = tile_smem + cf.STATIC_SMEM_BYTES <= optin
    assert plan["tile"] == cf.BWD_TILES[tile if served else "ring"], (plan, tile_smem, optin)
    if served:
        assert plan["smem"] == tile_smem, plan
        assert plan["blocks"] == -(-H // cf.WIDE_UNITS) * cf.bwd_batch_tiles(B, tile), plan
    if (H, elem) == (768, 2):
        assert served and plan["blocks"] == {"wide": 48, "narrow": 96}[tile], plan
    outs = {}
    for backward in ("ring", tile):
        monkeypatch.setenv("LSTM_KERNELS_CUDA_FUSED_BACKWARD", backward)
        for persistent in (True, False):
            outs[backward, persistent] = cf.backward(
                bwd, w, c0, act, c_all, None, dh_all, dh_T, dc_T if cell == "lstm" else None, bs, persistent,
                tf32=tf32, resets=mask, cell=cell, h0=h0, h_all=h_all)
            torch.cuda.synchronize()
    for persistent in (True, False):
        for n, a, b in zip(("dG", "dh0", "dc0", "dW_hr / d_hn"), outs[tile, persistent], outs["ring", persistent]):
            if a is not None:
                assert torch.equal(a, b), f"{n} (persistent={persistent}): the {tile} and the ring backward differ"


GRU_SHAPES = [(1, 1, 1), (5, 3, 13), (7, 17, 40), (16, 16, 768)]  # (T, B, H)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, dtype, tf32, tol", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("T, B, H", GRU_SHAPES)
@pytest.mark.parametrize("varlen, with_resets", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["dense", "packed", "resets", "packed_resets"])
def test_fused_gru_matches_reference_and_per_step_bitwise(entries, name, dtype, tf32, tol, T, B, H, varlen,
                                                          with_resets):
    """The GRU's instances (GATES = 3): persistent against one launch per step, bitwise (the state that
    crosses launches: h_{t-1} from the exchange, the carry through dc_work), and against the float64
    reference: h_all, h_T, dG, dh0 and d_hn."""
    fwd, bwd = entries
    if not cf.Plan(B, H, None, 3).fits(torch.cuda.get_device_properties(0).shared_memory_per_block_optin,
                                       torch.empty((), dtype=dtype).element_size()):
        pytest.skip("the GRU's fused blocks do not fit this device's shared memory")
    g = torch.Generator().manual_seed(T * 1000 + H)
    cuda = lambda t: t.to("cuda", dtype)  # noqa: E731
    xg, w, h0 = cuda(torch.randn(T, B, 3 * H, generator=g) * 0.5), cuda(torch.randn(3 * H, H, generator=g) / H**0.5), \
        cuda(torch.randn(B, H, generator=g) * 0.5)
    b_hn = cuda(torch.randn(H, generator=g) * 0.3)
    bs = None
    if varlen:
        lengths = torch.randint(1, T + 1, (B,), generator=g).sort(descending=True).values
        lengths[0] = T
        bs = torch.tensor([int((lengths > t).sum()) for t in range(T)])
    resets = (torch.rand(T, B, generator=g) < 0.3).cuda() if with_resets else None
    dh_all, dh_T = cuda(torch.randn(T, B, H, generator=g)), cuda(torch.randn(B, H, generator=g))
    mask = None if resets is None else resets.to(torch.uint8).contiguous()
    outs = {}
    for persistent in (True, False):
        h_all, h_T, c_T, (act, hn) = cf.forward(fwd, xg, w, h0, None, None, bs, True, persistent, tf32=tf32,
                                                resets=mask, cell="gru", b_hn=b_hn)
        dG, dh0, dc0, d_hn = cf.backward(bwd, w, None, act, hn, None, dh_all, dh_T, None, bs, persistent, tf32=tf32,
                                         resets=mask, cell="gru", h0=h0, h_all=h_all)
        torch.cuda.synchronize()
        assert c_T is None and dc0 is None
        outs[persistent] = (h_all, h_T, act, hn, dG, dh0, d_hn)
    for n, a, b in zip(("h_all", "h_T", "act", "hn", "dG", "dh0", "d_hn"), outs[True], outs[False]):
        assert torch.equal(a, b), f"{n}: persistent and per-step launches differ"
    ref = ReferenceBackend()
    d = lambda t: t.double()  # noqa: E731
    e_all, e_T, _, _ = ref.forward(d(xg), d(w), d(h0), None, None, bs, False, resets=resets, cell="gru",
                                   b_hn=d(b_hn))
    e_dG, e_dh0, _, e_d_hn = ref.backward(RecurrenceInputs(d(xg), d(w), d(h0), None, None, bs), e_all, (),
                                          d(dh_all), d(dh_T), None, resets=resets, cell="gru", b_hn=d(b_hn))
    h_all, h_T, _, _, dG, dh0, d_hn = outs[True]
    for n, a, r in zip(("h_all", "h_T", "dG", "dh0", "d_hn"), (h_all, h_T, dG, dh0, d_hn),
                       (e_all, e_T, e_dG, e_dh0, e_d_hn)):
        assert_rel_close(a, r, tol, f"GRU {name} {n}")


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


def gave_up_message(kernel: str, step: int, block: int) -> str:
    """The message (barrier_bound.describe) of a give-up of ``kernel`` after ``step`` in ``block``."""
    return (rf"grid barrier of the {re.escape(kernel)} kernel on cuda:\d+ gave up after waiting [\d.e+-]+ s "
            rf"\(block {block}, waiting after step {step}\)")


#: The bound of the wait in the give-up tests below (seconds).
SHORT_BOUND_S = 0.05
#: Arrival counters that start this far below zero never reach a wait's target (the kernels compare
#: wrap-safe: (int)(count - target) >= 0), so every wait of such a launch is on a barrier that never opens.
NEVER = -(2**30)


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("direction, first_step", [("forward", 0), ("backward", 4)])
def test_fused_barrier_that_never_opens_gives_up_and_is_reported(entries, direction, first_step):
    """A persistent fused launch whose arrival counters can never reach their targets (swapped for
    counters that start at -2**30) gives up after the bound instead of hanging: the launch's abort
    flag (state[1]) is raised, the device record holds the kernel's code, the step of its first
    wait (forward: after step 0; backward: after step T-1) and a block of the grid, and the time
    waited is at least the bound; barrier_bound raises on it naming all three. A launch with sound
    counters right after is bitwise equal to one launched before (the give-up left nothing behind)."""
    from lstm_kernels.backends import barrier_bound

    fwd, bwd = entries
    T, B, H = 5, 16, 64
    dtype = torch.float16
    _skip_unless_fits(dtype, B, H, None)
    device = torch.device("cuda")
    xg, w, h0, c0, _, _ = _inputs(T, B, H, dtype, seed=7, varlen=False)
    dh_all = torch.randn(T, B, H, device="cuda").to(dtype)
    dh_T, dc_T = torch.zeros(B, H, device="cuda", dtype=dtype), torch.zeros(B, H, device="cuda", dtype=dtype)
    kernel = f"cuda fused {direction} (persistent)"
    barrier_bound.reset(device)

    def launch(entry, barrier):
        if direction == "forward":
            return cf.forward(entry, xg, w, h0, c0, None, None, True, True, barrier=barrier)
        saved = cf.forward(fwd, xg, w, h0, c0, None, None, True, True)[3]
        return cf.backward(entry, w, c0, *saved, None, dh_all, dh_T, dc_T, None, True, barrier=barrier)

    def barrier():
        state, record = barrier_bound.launch_state(device), barrier_bound.device_record(device)
        args = (state.data_ptr(), record.data_ptr(), int(SHORT_BOUND_S * 1e9), barrier_bound.kernel_code(kernel))
        return state, record, args

    entry = fwd if direction == "forward" else bwd
    state, record, args = barrier()
    before = launch(entry, args)
    torch.cuda.synchronize()
    assert state.tolist()[1] == 0 and record.tolist() == [0, 0, 0, 0], "a sound launch gave up"

    keep = []  # the swapped counters, alive until the launch has run

    def never_counters(ptr: int) -> int:  # one per batch tile of any backward tile (cuda/fused.py's sizes) at NEVER
        tiles = max(cf.bwd_batch_tiles(B, tile) for tile in cf.BWD_TILES)
        keep.append(torch.full((tiles,), NEVER, dtype=torch.int32, device="cuda"))
        return keep[-1].data_ptr()

    never = by_keyword(entry, counters=never_counters)
    state, record, args = barrier()
    launch(never, args)
    torch.cuda.synchronize()
    code, step, block, waited = record.tolist()
    assert state.tolist()[1] == 1, "the launch's abort flag is not up"
    assert code == barrier_bound.kernel_code(kernel) and step == first_step, record.tolist()
    grid = cf.device_plan(device, direction, dtype, B, H, H)["blocks"]  # the backward's under the tile asked for
    assert 0 <= block < grid, (block, grid)
    assert waited >= SHORT_BOUND_S * 1e9, waited
    barrier_bound.after_launch(device, record)
    torch.cuda.synchronize()  # the record's copy has landed
    with pytest.raises(RuntimeError, match=gave_up_message(kernel, first_step, block)):
        barrier_bound.raise_if_gave_up(device)
    assert record.tolist() == [0, 0, 0, 0], "the host did not clear the record"

    state, record, args = barrier()
    after = launch(entry, args)
    torch.cuda.synchronize()
    assert state.tolist()[1] == 0 and record.tolist() == [0, 0, 0, 0]
    for a, b in zip(before[:3], after[:3]):
        assert torch.equal(a, b), "a launch after a give-up differs from one before"


@pytest.mark.timeout(120)
def test_the_forward_without_the_register_path_keeps_two_blocks_per_sm():
    """The forward's instance without the register path (LSTM_KERNELS_CUDA_FUSED_WEIGHTS=shared, the default)
    keeps its registers (under 128 per thread), so where shared memory holds two of its blocks on an SM a grid
    of up to twice the SMs is co-resident: B = 32, H = 768 in fp16 (192 blocks of 90,880 bytes) runs persistent
    on an H100. The instance with the register path (179 to 255 registers: one block per SM) runs that grid per
    step."""
    _C = _extension()
    if _C is None:
        pytest.skip("lstm_kernels._C is not built")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    B, H = 32, 768
    blocks, smem = cf.Plan(B, H, None).blocks, cf.forward_smem_bytes(H, H, 2)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 0)
    if not props.multi_processor_count < blocks <= 2 * props.multi_processor_count or 2 * (smem + 1024) > per_sm:
        pytest.skip(f"{blocks} blocks of {smem} B are not a two-per-SM grid on this device")
    code = cf.op_code(torch.float16, False)
    shared = _C.fused_plan("forward", code, B, H, H)
    registers = _C.fused_plan("forward", code, B, H, H, w_registers=1)
    assert shared["blocks"] == registers["blocks"] == blocks
    assert shared["possible"] and not registers["possible"], (shared, registers)
