"""Host checks (no GPU) of the fused CUDA kernels' plain arithmetic (issue 13):

- ``csrc/fused_plan.cuh`` compiled into a host program (``tests/cuda_host/plan_dump.cpp``, g++)
  agrees with ``lstm_kernels/backends/cuda_fused.py`` (constants, interleavings, cell threads);
- the gate-row interleaving of W_hh and its inverse, and that an mma.sync thread's accumulators
  hold i, f, g, o of the same (b, j) under it;
- the tiling plan: every (b, j) owned by exactly one cell thread, every k16 step by exactly one
  warp, for B and H not multiples of 16;
- the 16-bit dG exchange: its rounding against float64, and its effect on a whole BPTT
  against DESIGN.md's tolerance;
- the kernels' step rules (variable lengths, where dh_T / dc_T enter, zero rows) emulated in
  float64 against the reference backend.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lstm_kernels.backends import cuda_fused as cf
from lstm_kernels.backends.reference import ReferenceBackend
from lstm_kernels.backends import RecurrenceInputs

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 1), (1, 13), (5, 13), (16, 16), (17, 129), (33, 100), (16, 768)]  # (B, H)


@pytest.fixture(scope="module")
def plan_dump(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path_factory.mktemp("plan") / "plan_dump"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(ROOT / "tests/cuda_host/plan_dump.cpp"),
                    "-o", str(exe)], check=True)

    def run(B: int, H: int) -> dict:
        return json.loads(subprocess.run([str(exe), str(B), str(H)], capture_output=True, text=True,
                                         check=True).stdout)

    return run


def test_constants_agree_with_the_header(plan_dump):
    d = plan_dump(3, 5)
    for name in ("WARPS", "UNITS", "BATCH_TILE", "FWD_ROWS", "KPAD", "SMEM_PAD"):
        assert d[name] == getattr(cf, name), name
    assert d["THREADS"] == 32 * cf.WARPS


@pytest.mark.parametrize("B, H", SHAPES)
def test_header_maps_agree_with_python(plan_dump, B, H):
    d = plan_dump(B, H)
    assert tuple(d["grid"]) == cf.Plan(B, H).grid
    assert d["fwd_row"] == [cf.fwd_row(g, j) for g in range(4) for j in range(H)]
    assert d["bwd_col"] == [cf.bwd_col(g, j) for g in range(4) for j in range(H)]
    for q, y, w, lane, b, j in d["fwd_cells"]:
        assert (b, j) == cf.fwd_cell(q, y, w, lane)
    for q, y, w, lane, b, j in d["bwd_cells"]:
        assert (b, j) == cf.bwd_cell(q, y, w, lane)
    assert d["fwd_k"] == [list(cf.warp_k_range(w, d["ks_fwd"])) for w in range(cf.WARPS)]
    assert d["bwd_k"] == [list(cf.warp_k_range(w, d["kpairs_bwd"])) for w in range(cf.WARPS)]


@pytest.mark.parametrize("B, H", SHAPES)
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_every_cell_owned_exactly_once(plan_dump, B, H, direction):
    """Each (b, j) with b < B, j < H is run by exactly one cell thread of the block that owns
    unit j and row b; threads outside (padding) are the only ones left over, and are masked."""
    d = plan_dump(B, H)
    plan = cf.Plan(B, H)
    seen = {}
    for q, y, w, lane, b, j in d[f"{direction}_cells"]:
        assert 0 <= w < 4 and 0 <= lane < 32
        if b < B and j < H:
            assert (b, j) not in seen, f"(b={b}, j={j}) owned twice: {seen[(b, j)]} and {(q, y, w, lane)}"
            seen[(b, j)] = (q, y, w, lane)
            assert j in plan.block_units(q) and b in plan.block_rows(y)
    assert len(seen) == B * H
    n_threads = plan.blocks * 4 * 32
    assert n_threads == len(d[f"{direction}_cells"])
    assert n_threads - B * H == plan.grid[0] * plan.grid[1] * cf.UNITS * cf.BATCH_TILE - B * H  # padding only


@pytest.mark.parametrize("B, H", SHAPES)
def test_blocks_partition_units_and_rows(B, H):
    plan = cf.Plan(B, H)
    units = [j for q in range(plan.grid[0]) for j in plan.block_units(q)]
    rows = [b for y in range(plan.grid[1]) for b in plan.block_rows(y)]
    assert units == list(range(H)) and rows == list(range(B))


@pytest.mark.parametrize("H", [1, 13, 16, 100, 129, 768, 1000])
def test_warps_split_the_reduction_exactly_once_and_balanced(plan_dump, H):
    d = plan_dump(1, H)
    for key, total in (("fwd_k", d["ks_fwd"]), ("bwd_k", d["kpairs_bwd"])):
        ranges = d[key]
        covered = [k for b, e in ranges for k in range(b, e)]
        assert covered == list(range(total)), key  # every k16 step (pair) once, in order
        sizes = [e - b for b, e in ranges]
        assert max(sizes) - min(sizes) <= 1, (key, sizes)
        assert max(sizes) == -(-total // cf.WARPS)  # the busiest warp does the ideal share, rounded up
    if H >= 128:  # every warp busy
        assert all(e > b for b, e in d["fwd_k"]) and all(e > b for b, e in d["bwd_k"])


def test_flagship_grid_spreads_over_most_sms():
    plan = cf.Plan(16, 768)
    assert plan.blocks == 96  # of 132 H100 SMs (48 before)
    assert cf.forward_smem_bytes(768) <= cf.SMEM_OPTIN_SM90 and cf.backward_smem_bytes(768) <= cf.SMEM_OPTIN_SM90
    assert plan.fits()


@pytest.mark.parametrize("H, P", [(1, 1), (5, 5), (8, 8), (13, 13), (129, 129), (1000, 1000), (13, 5), (100, 36)])
def test_interleavings_and_inverses(H, P):
    """W_hh [4H, P] (P = proj_size or H) to the forward's w_fwd and the backward's w_bwd and back."""
    torch.manual_seed(H)
    w = torch.randn(4 * H, P, dtype=torch.float64)
    w_fwd = cf.interleave_forward(w)
    assert w_fwd.shape == (cf.unit_blocks(H) * cf.FWD_ROWS, P)
    for g in range(4):
        for j in range(0, H, max(1, H // 7)):
            assert torch.equal(w_fwd[cf.fwd_row(g, j)], w[g * H + j])
    pad = torch.ones(w_fwd.shape[0], dtype=torch.bool)
    pad[[cf.fwd_row(g, j) for g in range(4) for j in range(H)]] = False
    assert (w_fwd[pad] == 0).all()  # rows of units >= H
    assert torch.equal(cf.deinterleave_forward(w_fwd, H), w)
    w_bwd = cf.interleave_backward(w)
    assert w_bwd.shape == (cf.unit_blocks(P) * cf.UNITS, 4 * H)
    for g in range(4):
        for j in range(0, H, max(1, H // 7)):
            assert torch.equal(w_bwd[:P, cf.bwd_col(g, j)], w[g * H + j])
    assert (w_bwd[P:] == 0).all()
    assert torch.equal(cf.deinterleave_backward(w_bwd, P), w)
    w_hr = torch.randn(P, H, dtype=torch.float64)
    padded = cf.pad_rows(w_hr)
    assert padded.shape[0] % cf.UNITS == 0 and torch.equal(padded[:P], w_hr) and (padded[P:] == 0).all()


def _fragment(tile: torch.Tensor, lane: int, e: int) -> torch.Tensor:
    """Element e of lane's m16n8 accumulator fragment (PTX ISA: rows l/4 (+8), columns 2(l%4) (+1))."""
    return tile[lane // 4 + 8 * (e // 2), 2 * (lane % 4) + e % 2]


@pytest.mark.parametrize("B, H", [(5, 13), (16, 24), (17, 129)])
def test_forward_fragment_holds_the_four_gates_of_one_cell(B, H):
    """The products of one block, cut into the m16n8 tiles the warps accumulate, read at the
    registers the forward's cell thread reads (fused_forward.cu: i = tile (0, nt) element cc,
    f = element 2 + cc, g and o the same in tile (1, nt)), are the i, f, g, o pre-activations
    of that thread's (b, j)."""
    torch.manual_seed(0)
    w = torch.randn(4 * H, H, dtype=torch.float64)
    h = torch.randn(B, H, dtype=torch.float64)
    gates = h @ w.t()  # [B, 4H]
    w_fwd = cf.interleave_forward(w)
    plan = cf.Plan(B, H)
    for q in range(plan.grid[0]):
        for y in range(plan.grid[1]):
            h_tile = torch.zeros(cf.BATCH_TILE, H, dtype=torch.float64)
            rows = list(plan.block_rows(y))
            h_tile[: len(rows)] = h[rows]
            prod = w_fwd[q * cf.FWD_ROWS:(q + 1) * cf.FWD_ROWS] @ h_tile.t()  # [32 rows, 16 batch]
            for w_ in range(4):
                nt, cc = (w_ >> 1) & 1, w_ & 1
                for lane in range(32):
                    b, j = cf.fwd_cell(q, y, w_, lane)
                    if b >= B or j >= H:
                        continue
                    t0 = prod[0:16, nt * 8:nt * 8 + 8]
                    t1 = prod[16:32, nt * 8:nt * 8 + 8]
                    got = [_fragment(t0, lane, cc), _fragment(t0, lane, 2 + cc), _fragment(t1, lane, cc),
                           _fragment(t1, lane, 2 + cc)]
                    want = [gates[b, g * H + j] for g in range(4)]
                    assert torch.allclose(torch.stack(got), torch.stack(want)), (q, y, w_, lane)


@pytest.mark.parametrize("B, H", [(5, 13), (17, 24)])
def test_backward_fragment_and_exchange_order(B, H):
    """dG in the exchange order r' = 4j + g times w_bwd is dG W_hh; the backward's cell thread
    (warp w, lane) reads element w of its fragment of the block's [16 x 8] product."""
    torch.manual_seed(1)
    w = torch.randn(4 * H, H, dtype=torch.float64)
    dg = torch.randn(B, 4 * H, dtype=torch.float64)
    want = dg @ w
    dg_x = dg[:, cf.backward_col_index(H)]  # [B, 4H] in r' order
    w_bwd = cf.interleave_backward(w)
    plan = cf.Plan(B, H)
    for q in range(plan.grid[0]):
        for y in range(plan.grid[1]):
            rows = list(plan.block_rows(y))
            g_tile = torch.zeros(cf.BATCH_TILE, 4 * H, dtype=torch.float64)
            g_tile[: len(rows)] = dg_x[rows]
            prod = g_tile @ w_bwd[q * cf.UNITS:(q + 1) * cf.UNITS].t()  # [16 batch, 8 units]
            for w_ in range(4):
                for lane in range(32):
                    b, j = cf.bwd_cell(q, y, w_, lane)
                    if b < B and j < H:
                        assert torch.allclose(_fragment(prod, lane, w_), want[b, j])


@pytest.mark.parametrize("dtype", cf.DTYPES)
def test_exchange_rounding_against_float64(dtype):
    """One rounding to 16 bits: at most half an ulp relative in the normal range, round to
    nearest even, and no NaN / inf for finite gradients in range."""
    torch.manual_seed(2)
    x = torch.cat([torch.randn(100_000, dtype=torch.float64) * s for s in (1e-3, 1.0, 30.0)])
    x = x.float().double()  # the fp32 value the kernel rounds
    r = cf.exchange_round(x.float(), dtype).double()
    tiny = torch.finfo(dtype).tiny  # below it (fp16: 6.1e-5) the spacing is absolute, not relative
    normal = x.abs() >= tiny
    rel = ((r - x).abs() / x.abs())[normal].max().item()
    u = cf.exchange_unit_roundoff(dtype)
    sub_spacing = tiny * 2 * u  # spacing of the subnormals
    assert ((r - x).abs()[~normal] <= sub_spacing / 2).all()
    assert rel <= u * (1 + 1e-12), f"{dtype}: relative rounding error {rel:.3e} > {u:.3e}"
    assert rel >= u / 4, f"{dtype}: the rounding is suspiciously exact ({rel:.3e})"
    # ties go to even: 1 + half an ulp rounds to 1
    ulp = 2 * u
    assert cf.exchange_round(torch.tensor([1.0 + ulp / 2]), dtype).item() == 1.0
    assert cf.exchange_round(torch.tensor([1.0 + 1.5 * ulp]), dtype).item() == 1.0 + 2 * ulp


def _emulate(xg, w_hh, h0, c0, bs, dh_all, dh_T, dc_T, ex_dtype, round_dg=True, w_hr=None):
    """Float64 emulation of the fused kernels' step rules (fused_forward.cu / fused_backward.cu):
    h exchanged in ``ex_dtype`` (the kernel's h_all values), dG rounded to ``ex_dtype`` before the
    next step's product (the 16-bit exchange) while the cell works on the unrounded values, rows
    b >= n_t untouched, dh_T / dc_T entering at each row's last step, zero outputs elsewhere.
    With ``w_hr`` (proj_size): m_t exchanged in ``ex_dtype`` before h_t = m_t W_hr^T, and
    dh_t exchanged in ``ex_dtype`` before dm_t = dh_t W_hr; returns dW_hr too."""
    T, B, H4 = xg.shape
    H = H4 // 4
    n = [B] * T if bs is None else [int(v) for v in bs]
    rnd = (lambda v: v.to(ex_dtype).double()) if ex_dtype is not None else (lambda v: v)
    h, c = rnd(h0.clone()), c0.clone()
    P = H if w_hr is None else w_hr.shape[0]
    acts, cs, cps, ms, h_all = [], [], [], [], torch.zeros(T, B, P, dtype=torch.float64)
    for t in range(T):
        pre = xg[t] + h @ w_hh.t()
        sig = pre.sigmoid()
        i, f, g, o = sig[:, :H], sig[:, H:2 * H], pre[:, 2 * H:3 * H].tanh(), sig[:, 3 * H:]
        c_new = f * c + i * g
        m_t = o * c_new.tanh()
        h_new = rnd(m_t) if w_hr is None else rnd(rnd(m_t) @ w_hr.t())
        ms.append(m_t)
        act = torch.cat([i, f, g, o], 1)
        m = torch.arange(B)[:, None] < n[t]
        acts.append(act), cps.append(c.clone())
        h_all[t] = torch.where(m, h_new, 0.0)
        h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
        cs.append(c.clone())
    dG = torch.zeros(T, B, H4, dtype=torch.float64)
    dgx = torch.zeros(B, H4, dtype=torch.float64)
    dc = torch.zeros(B, H, dtype=torch.float64)
    dw_hr = None if w_hr is None else torch.zeros_like(w_hr)
    for t in reversed(range(T)):
        n_next = 0 if t == T - 1 else n[t + 1]
        from_next = torch.arange(B)[:, None] < n_next
        dh_in = torch.where(from_next, dgx @ w_hh, dh_T)
        dc_in = torch.where(from_next, dc, dc_T)
        i, f, g, o = acts[t].split(H, 1)
        tc = cs[t].tanh()
        dh = dh_in + dh_all[t]
        m = torch.arange(B)[:, None] < n[t]
        if w_hr is not None:
            dw_hr += torch.where(m, dh, 0.0).t() @ torch.where(m, ms[t], 0.0)
            dh = rnd(dh) @ w_hr  # dm_t
        dct = dc_in + dh * o * (1 - tc * tc)
        d = torch.cat([dct * g * i * (1 - i), dct * cps[t] * f * (1 - f), dct * i * (1 - g * g),
                       dh * tc * o * (1 - o)], 1)
        dG[t] = torch.where(m, d, 0.0)
        dgx = torch.where(m, rnd(d) if round_dg else d, dgx)
        dc = torch.where(m, dct * f, dc)
    from_next = torch.arange(B)[:, None] < n[0]
    out = (h_all, dG, torch.where(from_next, dgx @ w_hh, dh_T), torch.where(from_next, dc, dc_T))
    return out if w_hr is None else out + (dw_hr,)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_step_rules_match_the_reference_in_float64(varlen, proj):
    """With no rounding (ex_dtype None) the emulated kernel rules are the reference's BPTT
    (with proj_size: the two half-steps of each step, and dW_hr from the saved dh_t and m_t)."""
    torch.manual_seed(3)
    T, B, H = 7, 5, 6
    P = 4 if proj else H
    xg = torch.randn(T, B, 4 * H, dtype=torch.float64)
    w = torch.randn(4 * H, P, dtype=torch.float64) * 0.4
    w_hr = torch.randn(P, H, dtype=torch.float64) * 0.5 if proj else None
    h0, c0 = torch.randn(B, P, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    bs = torch.tensor([5, 5, 4, 3, 3, 1, 1]) if varlen else None
    dh_all = torch.randn(T, B, P, dtype=torch.float64)
    if varlen:
        dh_all *= (torch.arange(B)[None, :, None] < bs[:, None, None])
    dh_T, dc_T = torch.randn(B, P, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    got = _emulate(xg, w, h0, c0, bs, dh_all, dh_T, dc_T, None, w_hr=w_hr)
    ref = ReferenceBackend()
    r_h_all, _, _, _ = ref.forward(xg, w, h0, c0, w_hr, bs, True)
    r_dG, r_dh0, r_dc0, r_dw_hr = ref.backward(RecurrenceInputs(xg, w, h0, c0, w_hr, bs), r_h_all, (), dh_all, dh_T,
                                               dc_T)
    want = (r_h_all, r_dG, r_dh0, r_dc0) + ((r_dw_hr,) if proj else ())
    for name, a, b in zip(("h_all", "dG", "dh0", "dc0", "dW_hr"), got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), f"{name}: max err {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("dtype", cf.DTYPES)
def test_sixteen_bit_exchange_error_is_inside_the_tolerance(dtype):
    """The whole BPTT with h and dG exchanged in 16 bits (everything else float64) against exact
    float64: relative error of dG and dh0 well inside DESIGN.md's 1e-2, and of the order of the
    unit roundoff (the test fails if the emulation stops rounding)."""
    torch.manual_seed(4)
    T, B, H = 48, 8, 32
    xg = torch.randn(T, B, 4 * H, dtype=torch.float64)
    w = torch.randn(4 * H, H, dtype=torch.float64) / H**0.5
    h0, c0 = torch.randn(B, H, dtype=torch.float64) * 0.5, torch.randn(B, H, dtype=torch.float64) * 0.5
    dh_all = torch.randn(T, B, H, dtype=torch.float64)
    dh_T, dc_T = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    exact = _emulate(xg, w, h0, c0, None, dh_all, dh_T, dc_T, None)
    rounded = _emulate(xg, w, h0, c0, None, dh_all, dh_T, dc_T, dtype)
    h_only = _emulate(xg, w, h0, c0, None, dh_all, dh_T, dc_T, dtype, round_dg=False)
    errs = {name: _rel(a, b) for name, a, b in zip(("h_all", "dG", "dh0", "dc0"), rounded, exact)}
    base = {name: _rel(a, b) for name, a, b in zip(("h_all", "dG", "dh0", "dc0"), h_only, exact)}
    u = cf.exchange_unit_roundoff(dtype)
    print(f"\n16-bit exchange ({dtype}), T={T} B={B} H={H}: relative errors vs float64 "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + f" (unit roundoff {u:.1e}); with h rounded "
          "but dG exchanged exactly: " + ", ".join(f"{k} {v:.2e}" for k, v in base.items()))
    for name, e in errs.items():
        assert e <= 1e-2 / 4, f"{name}: {e:.3e} is not well inside 1e-2"
    assert errs["dG"] >= u / 16, "the emulated exchange does not round"


@pytest.mark.parametrize("dtype", cf.DTYPES)
def test_sixteen_bit_exchanges_with_projection_inside_the_tolerance(dtype):
    """proj_size: m_t and dh_t are exchanged in 16 bits too; the whole BPTT stays well inside 1e-2."""
    torch.manual_seed(5)
    T, B, H, P = 32, 6, 24, 10
    xg = torch.randn(T, B, 4 * H, dtype=torch.float64)
    w = torch.randn(4 * H, P, dtype=torch.float64) / P**0.5
    w_hr = torch.randn(P, H, dtype=torch.float64) / H**0.5
    h0, c0 = torch.randn(B, P, dtype=torch.float64) * 0.5, torch.randn(B, H, dtype=torch.float64) * 0.5
    dh_all = torch.randn(T, B, P, dtype=torch.float64)
    dh_T, dc_T = torch.randn(B, P, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    exact = _emulate(xg, w, h0, c0, None, dh_all, dh_T, dc_T, None, w_hr=w_hr)
    rounded = _emulate(xg, w, h0, c0, None, dh_all, dh_T, dc_T, dtype, w_hr=w_hr)
    errs = {name: _rel(a, b) for name, a, b in zip(("h_all", "dG", "dh0", "dc0", "dW_hr"), rounded, exact)}
    print(f"\n16-bit exchanges with projection ({dtype}), T={T} B={B} H={H} P={P}: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    for name, e in errs.items():
        assert e <= 1e-2 / 4, f"{name}: {e:.3e} is not well inside 1e-2"
    assert errs["dG"] >= cf.exchange_unit_roundoff(dtype) / 16


# ---- dispatch of the cuda backend to the fused kernels (host only: a fake extension) ----------

from lstm_kernels.backends import RecurrenceCall  # noqa: E402
from lstm_kernels.backends import cuda as cuda_backend  # noqa: E402


class _Refused(RuntimeError):
    pass


class _FakeExt:
    CooperativeLaunchRefused = _Refused

    def __init__(self, possible=True):
        self.possible = possible
        self.plans = []

    def fused_plan(self, direction, dtype, B, H, P):
        self.plans.append((direction, dtype, B, H, P))
        return {"blocks": cf.Plan(B, H).blocks, "smem": 0, "possible": self.possible, "fits": True}

    fused_forward = fused_backward = None


@pytest.fixture
def fake_fused(monkeypatch):
    def install(possible=True, variant=None):
        fake = _FakeExt(possible)
        monkeypatch.setattr(cuda_backend, "_C", fake)
        monkeypatch.setattr(cuda_backend, "_REFUSED", {})
        monkeypatch.setattr(cuda_backend, "_smem_optin", lambda device: cf.SMEM_OPTIN_SM90)
        monkeypatch.setattr(cuda_backend.torch.cuda, "device", lambda d: __import__("contextlib").nullcontext())
        cuda_backend._fused_plan_of.cache_clear()
        monkeypatch.delenv(cuda_backend.MMA_ENV, raising=False)
        monkeypatch.delenv(cuda_backend.BARRIER_TIMEOUT_ENV, raising=False)
        if variant is None:
            monkeypatch.delenv(cuda_backend.VARIANT_ENV, raising=False)
        else:
            monkeypatch.setenv(cuda_backend.VARIANT_ENV, variant)
        return fake

    yield install
    cuda_backend._fused_plan_of.cache_clear()


def _call(dtype=torch.float16, B=16, H=768, P=None, varlen=False):
    return RecurrenceCall(seq_len=8, batch=B, hidden_size=H, state_size=P or H, dtype=dtype,
                          device=torch.device("cuda"), has_projection=P is not None, variable_lengths=varlen,
                          needs_grad=True)


def test_default_variant_is_the_fused_kernels():
    assert cuda_backend.DEFAULT_VARIANT == "fused"


@pytest.mark.parametrize("kw", [dict(varlen=True), dict(P=256), dict(P=7, H=24, B=5, varlen=True)])
@pytest.mark.parametrize("dtype", cf.DTYPES)
def test_supports_projection_and_variable_lengths_in_16_bits(fake_fused, kw, dtype):
    fake_fused()
    assert cuda_backend.CudaBackend().supports(_call(dtype, **kw)) is None


@pytest.mark.parametrize("kw, words", [
    (dict(dtype=torch.float32, varlen=True), ("variable lengths", "float16")),
    (dict(dtype=torch.float32, P=4), ("proj_size", "float16")),
    (dict(H=4000, varlen=True), ("variable lengths", "shared memory")),
])
def test_supports_declines_what_the_fused_kernels_do_not_serve(fake_fused, kw, words):
    fake_fused()
    why = cuda_backend.CudaBackend().supports(_call(**kw))
    assert why is not None and all(w in why for w in words), why


def test_supports_declines_projection_without_tensor_cores(fake_fused, monkeypatch):
    fake_fused()
    monkeypatch.setenv(cuda_backend.MMA_ENV, "0")
    why = cuda_backend.CudaBackend().supports(_call(P=8))
    assert why is not None and "proj_size" in why and "tensor cores" in why


@pytest.mark.parametrize("variant, possible, kw, expected", [
    (None, True, {}, True),                 # default: fused persistent where it fits
    (None, False, {}, None),                # ... else the per-step kernels of lstm_forward.cu
    (None, False, dict(varlen=True), False),  # only the fused kernels serve: one launch per half-step
    ("step", True, {}, None),
    ("step", True, dict(P=128), False),
    ("persistent", True, {}, None),         # the named variants keep their kernels ...
    ("persistent", True, dict(varlen=True), True),  # ... except where only the fused ones serve
    ("auto", False, dict(P=128), False),
    (None, True, dict(dtype=torch.float32), None),
])
def test_fused_mode(fake_fused, variant, possible, kw, expected):
    fake = fake_fused(possible, variant)
    for direction in ("forward", "backward"):
        assert cuda_backend._fused_mode(_call(**kw), direction) is expected
    if expected is not None and variant != "step":
        assert {p[0] for p in fake.plans} == {"forward", "backward"}


def test_named_persistent_raises_where_the_fused_grid_does_not_fit(fake_fused):
    fake_fused(False, "persistent")
    with pytest.raises(RuntimeError, match="cannot be co-resident"):
        cuda_backend._fused_mode(_call(varlen=True), "forward")


def test_debug_barrier_switch_bounds_the_fused_wait_and_raises(fake_fused, monkeypatch):
    """LSTM_KERNELS_BARRIER_TIMEOUT: the fused persistent launch gets a zeroed state and the poll
    limit; a state that says "timed out" raises naming the kernel and the step."""
    fake_fused(True)
    monkeypatch.setenv(cuda_backend.BARRIER_TIMEOUT_ENV, "1000")
    assert cuda_backend._fused_mode(_call(), "forward") is True
    seen = {}

    def fn(entry, *args, barrier=(0, 0)):
        seen["barrier"], seen["persistent"] = barrier, args[-1]
        return "ran"

    states = []
    monkeypatch.setattr(cuda_backend, "_new_barrier_state", lambda device: states.append(_FakeState()) or states[-1])
    monkeypatch.setattr(cuda_backend, "_ptr", lambda t: 0 if t is None else 1234)
    monkeypatch.setattr(cuda_backend.torch.cuda, "is_current_stream_capturing", lambda: False)
    call = _call()
    assert cuda_backend._run_fused(fn, "forward", call, True, call.device) == ("ran", True)
    assert seen == {"barrier": (1234, 1000), "persistent": True}
    states[-1].values = [0, 1, 7, 3]
    monkeypatch.setattr(cuda_backend, "_new_barrier_state", lambda device: states[-1])
    with pytest.raises(RuntimeError, match="fused forward persistent kernel: the grid barrier after step t=7"):
        cuda_backend._run_fused(fn, "forward", call, True, call.device)


class _FakeState:
    def __init__(self):
        self.values = [0, 0, 0, 0]

    def tolist(self):
        return list(self.values)


def test_refused_cooperative_launch_runs_per_step_and_is_remembered(fake_fused):
    fake_fused(True)
    calls = []

    def fn(entry, *args, barrier=(0, 0)):
        calls.append(args[-1])
        if args[-1]:
            raise _Refused("lstm fused_forward_kernel (cooperative launch) failed: too large")
        return "ran"

    call = _call()
    with pytest.warns(RuntimeWarning, match="refused the fused forward kernel's cooperative launch"):
        assert cuda_backend._run_fused(fn, "forward", call, True, call.device, 1, 2) == ("ran", False)
    assert calls == [True, False]
    assert cuda_backend._fused_mode(call, "forward") is None  # remembered: not persistent any more
    assert cuda_backend._fused_mode(_call(varlen=True), "forward") is False  # same shape: per-step launches
    assert cuda_backend._fused_mode(_call(B=32), "forward") is True  # another shape still tries it


try:
    from lstm_kernels import _C as _ext
except ImportError:
    _ext = None


@pytest.mark.skipif(_ext is None, reason="lstm_kernels._C is not built")
def test_extension_entry_points_check_arguments():
    ptrs = [8] * 14
    with pytest.raises(ValueError, match="dtype code 0 is not served"):
        _ext.fused_forward(0, *ptrs, 2, 1, 1, 1, 0, 0)
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
    with pytest.raises(ValueError, match="barrier_spins must be >= 1"):
        _ext.fused_forward(1, 8, 8, 0, 8, 8, 8, 0, 8, 8, 8, 0, 0, 0, 8, 2, 1, 4, 4, 1, 0, 8, 0)
    with pytest.raises(RuntimeError, match=r"fused_backward_kernel \(cooperative launch\)"):
        _ext.fused_backward(2, 8, 0, 8, 8, 8, 8, 8, 8, 8, 8, 0, 8, 8, 8, 0, 0, 8, 2, 1, 4, 4, 1, 0)
    with pytest.raises(RuntimeError, match="fused plan"):
        _ext.fused_plan("forward", 1, 16, 768, 768)


# ---- ldmatrix + mma.sync emulated on the host, with the header's lane addresses ----------------


def _lane_rc(plan_dump, name):
    """(row, column) of each lane's ldmatrix address, from fused_plan.cuh (dumped for row stride 40)."""
    return [divmod(o, 40) for o in plan_dump(1, 1)[name]]


def _ldmatrix_x4(tile, rc, row0, col0):
    """regs[lane][i] = the two elements lane receives from 8x8 matrix i (PTX ISA: row lane/4 of the
    matrix whose row addresses lanes 8i..8i+7 give, columns 2 (lane % 4) and +1)."""
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        for t in range(32):
            r, c = rc[8 * i + (t >> 2)]
            col = col0 + c + 2 * (t & 3)
            regs[t][i] = (tile[row0 + r, col], tile[row0 + r, col + 1])
    return regs


def _mma_16816(a, b):
    """d[lane] = the m16n8 accumulator fragment of A (16x16 from a[lane][0..3]) x B (16x8 from b[lane][0..1])."""
    A = torch.full((16, 16), float("nan"), dtype=torch.float64)
    Bm = torch.full((16, 8), float("nan"), dtype=torch.float64)
    for t in range(32):
        g, c = t >> 2, t & 3
        for e in range(2):
            A[g, 2 * c + e], A[g + 8, 2 * c + e] = a[t][0][e], a[t][1][e]
            A[g, 8 + 2 * c + e], A[g + 8, 8 + 2 * c + e] = a[t][2][e], a[t][3][e]
            Bm[2 * c + e, g], Bm[8 + 2 * c + e, g] = b[t][0][e], b[t][1][e]
    assert not A.isnan().any() and not Bm.isnan().any(), "a fragment element was never loaded"
    D = A @ Bm
    return [[D[t >> 2, 2 * (t & 3)], D[t >> 2, 2 * (t & 3) + 1], D[(t >> 2) + 8, 2 * (t & 3)],
             D[(t >> 2) + 8, 2 * (t & 3) + 1]] for t in range(32)]


def _tile_of(frags):
    """The 16x8 tile whose per-lane fragments are ``frags``."""
    out = torch.zeros(16, 8, dtype=torch.float64)
    for t, d in enumerate(frags):
        out[t >> 2, 2 * (t & 3)], out[t >> 2, 2 * (t & 3) + 1] = d[0], d[1]
        out[(t >> 2) + 8, 2 * (t & 3)], out[(t >> 2) + 8, 2 * (t & 3) + 1] = d[2], d[3]
    return out


def test_forward_k_loop_addressing_computes_the_block_product(plan_dump):
    """fused_forward.cu's k loop (A = ldmatrix of the W slice at ldsm_a16x16, rows 0-15 and 16-31;
    B = ldmatrix of the h tile at ldsm_b2n8k16, two batch tiles) summed over every warp's k range
    is W_slice h_tile^T; half-step B (A = m tile, B = W_hr rows at ldsm_bn8k32, pairs of k16) too."""
    torch.manual_seed(6)
    Kp = 64
    w = torch.randn(cf.FWD_ROWS, Kp + cf.SMEM_PAD, dtype=torch.float64)
    h = torch.randn(cf.BATCH_TILE, Kp + cf.SMEM_PAD, dtype=torch.float64)
    a_rc, b_rc = _lane_rc(plan_dump, "ldsm_a16x16"), _lane_rc(plan_dump, "ldsm_b2n8k16")
    acc = {(mt, nt): torch.zeros(16, 8, dtype=torch.float64) for mt in range(2) for nt in range(2)}
    for warp in range(cf.WARPS):
        for ks in range(*cf.warp_k_range(warp, Kp // 16)):
            a = [_ldmatrix_x4(w, a_rc, 16 * mt, 16 * ks) for mt in range(2)]
            bf = _ldmatrix_x4(h, b_rc, 0, 16 * ks)
            bn = [[(r[0], r[1]) for r in bf], [(r[2], r[3]) for r in bf]]
            for mt in range(2):
                for nt in range(2):
                    acc[(mt, nt)] += _tile_of(_mma_16816(a[mt], bn[nt]))
    want = w[:, :Kp] @ h[:, :Kp].t()
    for (mt, nt), tile in acc.items():
        assert torch.allclose(tile, want[16 * mt:16 * mt + 16, 8 * nt:8 * nt + 8]), (mt, nt)


@pytest.mark.parametrize("rows_name", ["backward dG x W^T", "projection m x W_hr^T"])
def test_pair_k_loop_addressing_computes_the_block_product(plan_dump, rows_name):
    """fused_backward.cu's k loop (and the projection half-steps): A = ldmatrix of the batch tile at
    ldsm_a16x16 for k16 steps 2kp and 2kp + 1, B = ldmatrix of the 8-row weight strip at
    ldsm_bn8k32; two accumulators added at the end."""
    torch.manual_seed(7)
    Kp = 96
    g = torch.randn(cf.BATCH_TILE, Kp + cf.SMEM_PAD, dtype=torch.float64)
    w = torch.randn(cf.UNITS, Kp + cf.SMEM_PAD, dtype=torch.float64)
    a_rc, b_rc = _lane_rc(plan_dump, "ldsm_a16x16"), _lane_rc(plan_dump, "ldsm_bn8k32")
    total = torch.zeros(16, 8, dtype=torch.float64)
    for warp in range(cf.WARPS):
        acc0, acc1 = torch.zeros(16, 8, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
        for kp in range(*cf.warp_k_range(warp, Kp // 32)):
            a0, a1 = _ldmatrix_x4(g, a_rc, 0, 32 * kp), _ldmatrix_x4(g, a_rc, 0, 32 * kp + 16)
            bw = _ldmatrix_x4(w, b_rc, 0, 32 * kp)
            acc0 += _tile_of(_mma_16816(a0, [(r[0], r[1]) for r in bw]))
            acc1 += _tile_of(_mma_16816(a1, [(r[2], r[3]) for r in bw]))
        total += acc0 + acc1
    assert torch.allclose(total, g[:, :Kp] @ w[:, :Kp].t())


def test_the_emulated_mma_sees_a_wrong_address():
    """The emulation is not blind: a lane address off by one column gives a different product."""
    torch.manual_seed(8)
    g = torch.randn(16, 40, dtype=torch.float64)
    w = torch.randn(8, 40, dtype=torch.float64)
    good = [divmod(((l & 7) + ((l >> 3) & 1) * 8) * 40 + (l >> 4) * 8, 40) for l in range(32)]
    bad = list(good)
    bad[17] = (bad[17][0], bad[17][1] + 1)
    b_rc = [divmod((l & 7) * 40 + (l >> 3) * 8, 40) for l in range(32)]
    bw = _ldmatrix_x4(w, b_rc, 0, 0)
    ok = _tile_of(_mma_16816(_ldmatrix_x4(g, good, 0, 0), [(r[0], r[1]) for r in bw]))
    ko = _tile_of(_mma_16816(_ldmatrix_x4(g, bad, 0, 0), [(r[0], r[1]) for r in bw]))
    assert torch.allclose(ok, g[:, :16] @ w[:, :16].t()) and not torch.allclose(ko, ok)
