"""Host checks (no GPU) of the fused CUDA kernels' plain arithmetic (issue 13):

- ``csrc/fused_plan.cuh`` compiled into a host program (``tests/cuda_host/plan_dump.cpp``, g++)
  agrees with ``lstm_kernels/backends/cuda_fused.py`` (byte constants, kpad / smem_pad / k_chunks
  for 16-bit and float storage, interleavings, cell threads, warp chunk ranges);
- the gate-row interleaving of W_hh and its inverse, and that an mma.sync thread's accumulators
  hold i, f, g, o of the same (b, j) under it;
- the tiling plan: every (b, j) owned by exactly one cell thread, every 32-byte chunk of the
  reduction by exactly one warp, for B and H not multiples of 16;
- ldmatrix + mma.sync (m16n8k16 on 16-bit types, m16n8k8 on tf32, and the 3xTF32 split of float)
  emulated with the header's lane addresses: the kernels' k loops compute the block products;
- the float32 products: ``to_tf32`` (cvt.rna) bit patterns, the 3xTF32 split, its fp32 accuracy
  against float64, and a whole BPTT on emulated tf32 / 3xTF32 products inside the fp32 / tf32
  tolerances;
- the 16-bit dG exchange: its rounding against float64, and its effect on a whole BPTT
  against DESIGN.md's tolerance;
- the kernels' step rules (variable lengths, where dh_T / dc_T enter, zero rows) emulated in
  float64 against the reference backend;
- the cuda backend's dispatch to the fused kernels per dtype and direction (a fake extension).
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from lstm_kernels.backends import cuda_fused as cf
from lstm_kernels.backends.reference import ReferenceBackend
from lstm_kernels.backends import RecurrenceInputs

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 1), (1, 13), (5, 13), (16, 16), (17, 129), (33, 100), (16, 768)]  # (B, H)
ELEMS = [2, 4]  # bytes of the storage type: 16-bit (fp16 / bf16) and float
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def test_constants_agree_with_the_header(plan_dump):
    d = plan_dump(3, 5)
    for name in ("WARPS", "UNITS", "BATCH_TILE", "FWD_ROWS", "CHUNK_BYTES", "KPAD_BYTES", "SMEM_PAD_BYTES",
                 "STAGE_PAIRS", "RING_STAGES", "STAGE_ROW_BYTES", "STAGE_BYTES", "WARP_RING_BYTES"):
        assert d[name] == getattr(cf, name), name
    assert d["THREADS"] == 32 * cf.WARPS
    for elem in ELEMS:
        assert d["kpad"][str(elem)] == cf.kpad(elem), elem
        assert d["smem_pad"][str(elem)] == cf.smem_pad(elem), elem
    # K padded to pairs of 32-byte chunks: k32 of a 16-bit type, k16 of float; shared rows padded 16 bytes
    assert (cf.kpad(2), cf.kpad(4), cf.smem_pad(2), cf.smem_pad(4)) == (32, 16, 8, 4)
    assert cf.KPAD_BYTES == 2 * cf.CHUNK_BYTES
    assert {(Kp, elem) for Kp, elem, _ in d["k_chunks"]} >= {(32, 2), (256, 2), (16, 4), (128, 4)}
    for Kp, elem, n in d["k_chunks"]:  # one chunk = one MMA's k: k16 (m16n8k16) or k8 of float (m16n8k8)
        assert cf.k_chunks(Kp, elem) == n == Kp // (16 if elem == 2 else 8), (Kp, elem)


@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("B, H", SHAPES)
def test_header_maps_agree_with_python(plan_dump, B, H, elem):
    d = plan_dump(B, H, elem)
    assert d["elem"] == elem
    assert tuple(d["grid"]) == cf.Plan(B, H).grid
    assert d["fwd_row"] == [cf.fwd_row(g, j) for g in range(4) for j in range(H)]
    assert d["bwd_col"] == [cf.bwd_col(g, j) for g in range(4) for j in range(H)]
    for q, y, w, lane, b, j in d["fwd_cells"]:
        assert (b, j) == cf.fwd_cell(q, y, w, lane)
    for q, y, w, lane, b, j in d["bwd_cells"]:
        assert (b, j) == cf.bwd_cell(q, y, w, lane)
    # the forward walks chunks of K = H, the backward pairs of chunks of K = 4H
    assert d["ks_fwd"] == cf.k_chunks(cf.round_up(H, cf.kpad(elem)), elem)
    assert d["kpairs_bwd"] == cf.k_chunks(cf.round_up(4 * H, cf.kpad(elem)), elem) // 2
    assert d["fwd_k"] == [list(cf.warp_k_range(w, d["ks_fwd"])) for w in range(cf.WARPS)]
    assert d["bwd_k"] == [list(cf.warp_k_range(w, d["kpairs_bwd"])) for w in range(cf.WARPS)]
    # the kernels' k ranges cover each product's K once, in order, balanced to within one unit
    for product in ("fwd_gate_k", "fwd_proj_k", "bwd_gate_k", "bwd_proj_k"):
        ranges = d[product]
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (product, ranges)
        sizes = [e - b for b, e in ranges]
        assert max(sizes) - min(sizes) <= 1, (product, ranges)


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


@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("H", [1, 13, 16, 100, 129, 768, 1000])
def test_warps_split_the_reduction_exactly_once_and_balanced(plan_dump, H, elem):
    d = plan_dump(1, H, elem)
    for key, total in (("fwd_k", d["ks_fwd"]), ("bwd_k", d["kpairs_bwd"])):
        ranges = d[key]
        covered = [k for b, e in ranges for k in range(b, e)]
        assert covered == list(range(total)), key  # every chunk (pair of chunks) once, in order
        sizes = [e - b for b, e in ranges]
        assert max(sizes) - min(sizes) <= 1, (key, sizes)
        assert max(sizes) == -(-total // cf.WARPS)  # the busiest warp does the ideal share, rounded up
    # every element of the padded reduction in exactly one chunk
    assert d["ks_fwd"] * cf.CHUNK_BYTES == cf.round_up(H, cf.kpad(elem)) * elem
    assert d["kpairs_bwd"] * 2 * cf.CHUNK_BYTES == cf.round_up(4 * H, cf.kpad(elem)) * elem
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


def test_float32_exchange_is_exact():
    """float32 storage exchanges the fp32 values themselves: no rounding (unit roundoff 2^-24 is that
    of computing them)."""
    x = torch.randn(10_000, dtype=torch.float32) * 30
    assert torch.equal(cf.exchange_round(x, torch.float32), x)
    assert cf.exchange_unit_roundoff(torch.float32) == 2.0**-24 == torch.finfo(torch.float32).eps / 2


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
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


def _emulate(xg, w_hh, h0, c0, bs, dh_all, dh_T, dc_T, ex_dtype, round_dg=True, w_hr=None, matmul=torch.matmul,
             resets=None):
    """Float64 emulation of the fused kernels' step rules (fused_forward.cu / fused_backward.cu):
    h exchanged in ``ex_dtype`` (the kernel's h_all values), dG rounded to ``ex_dtype`` before the
    next step's product (the 16-bit exchange) while the cell works on the unrounded values, rows
    b >= n_t untouched, dh_T / dc_T entering at each row's last step, zero outputs elsewhere.
    With ``w_hr`` (proj_size): m_t exchanged in ``ex_dtype`` before h_t = m_t W_hr^T, and
    dh_t exchanged in ``ex_dtype`` before dm_t = dh_t W_hr; returns dW_hr too. ``matmul`` computes
    the kernels' products (h_{t-1} W_hh^T, dG_{t+1} W_hh, and with w_hr m_t W_hr^T, dh_t W_hr):
    exact by default, or e.g. as the float kernels' tf32 / 3xTF32 products (cf.tf32_matmul).
    ``resets`` [T, B] bool: as the kernels apply it, the forward's exchange copy of h_{t-1} lands as
    zero rows and c_{t-1} is zeroed in its register where resets[t]; the backward takes c_{t-1} = 0,
    zeroes dc_{t-1} and writes zeros to the dG exchange (not to dG) of those rows at step t."""
    T, B, H4 = xg.shape
    H = H4 // 4
    n = [B] * T if bs is None else [int(v) for v in bs]
    rnd = (lambda v: v.to(ex_dtype).double()) if ex_dtype is not None else (lambda v: v)
    h, c = rnd(h0.clone()), c0.clone()
    P = H if w_hr is None else w_hr.shape[0]
    acts, cs, cps, ms, h_all = [], [], [], [], torch.zeros(T, B, P, dtype=torch.float64)
    cut = torch.zeros(T, B, 1, dtype=torch.bool) if resets is None else resets[:, :, None]
    for t in range(T):
        h_in, c = torch.where(cut[t], 0.0, h), torch.where(cut[t], 0.0, c)  # exchange copy; c's register
        pre = xg[t] + matmul(h_in, w_hh.t())
        sig = pre.sigmoid()
        i, f, g, o = sig[:, :H], sig[:, H:2 * H], pre[:, 2 * H:3 * H].tanh(), sig[:, 3 * H:]
        c_new = f * c + i * g
        m_t = o * c_new.tanh()
        h_new = rnd(m_t) if w_hr is None else rnd(matmul(rnd(m_t), w_hr.t()))
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
        dh_in = torch.where(from_next, matmul(dgx, w_hh), dh_T)
        dc_in = torch.where(from_next, dc, dc_T)
        i, f, g, o = acts[t].split(H, 1)
        tc = cs[t].tanh()
        dh = dh_in + dh_all[t]
        m = torch.arange(B)[:, None] < n[t]
        if w_hr is not None:
            dw_hr += torch.where(m, dh, 0.0).t() @ torch.where(m, ms[t], 0.0)
            dh = matmul(rnd(dh), w_hr)  # dm_t
        dct = dc_in + dh * o * (1 - tc * tc)
        d = torch.cat([dct * g * i * (1 - i), dct * cps[t] * f * (1 - f), dct * i * (1 - g * g),
                       dh * tc * o * (1 - o)], 1)
        dG[t] = torch.where(m, d, 0.0)
        dgx = torch.where(m, torch.where(cut[t], 0.0, rnd(d) if round_dg else d), dgx)
        dc = torch.where(m, torch.where(cut[t], 0.0, dct * f), dc)
    from_next = torch.arange(B)[:, None] < n[0]
    out = (h_all, dG, torch.where(from_next, matmul(dgx, w_hh), dh_T), torch.where(from_next, dc, dc_T))
    return out if w_hr is None else out + (dw_hr,)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


#: Reset patterns over T = 7 steps, B = 5 rows (t, b): none, at the first and the last step, adjacent
#: steps, and every row at one step.
RESET_PATTERNS = {"none": [], "first-last": [(0, 0), (6, 1), (0, 4), (6, 4)],
                  "adjacent": [(2, 0), (3, 0), (4, 0), (1, 2), (2, 2)], "all-rows": [(3, b) for b in range(5)]}


def _reset_mask(pattern: str, T: int = 7, B: int = 5) -> torch.Tensor:
    r = torch.zeros(T, B, dtype=torch.bool)
    for t, b in RESET_PATTERNS[pattern]:
        r[t, b] = True
    return r


def _emulated_and_reference(varlen: bool, proj: bool, seed: int, resets=None) -> tuple:
    """(the emulated kernel rules' results, the reference backend's) in float64, no rounding:
    h_all, dG, dh0, dc0 (and dW_hr with proj_size) on one random call of T = 7, B = 5, H = 6."""
    torch.manual_seed(seed)
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
    kw = {} if resets is None else {"resets": resets}
    got = _emulate(xg, w, h0, c0, bs, dh_all, dh_T, dc_T, None, w_hr=w_hr, **kw)
    ref = ReferenceBackend()
    r_h_all, _, _, _ = ref.forward(xg, w, h0, c0, w_hr, bs, True, **kw)
    r_dG, r_dh0, r_dc0, r_dw_hr = ref.backward(RecurrenceInputs(xg, w, h0, c0, w_hr, bs), r_h_all, (), dh_all, dh_T,
                                               dc_T, **kw)
    want = (r_h_all, r_dG, r_dh0, r_dc0) + ((r_dw_hr,) if proj else ())
    without_resets = None if resets is None else _emulate(xg, w, h0, c0, bs, dh_all, dh_T, dc_T, None, w_hr=w_hr)
    return got, want, without_resets


def _assert_same(got, want) -> None:
    for name, a, b in zip(("h_all", "dG", "dh0", "dc0", "dW_hr"), got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), f"{name}: max err {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("pattern", list(RESET_PATTERNS))
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_step_rules_with_resets_match_the_reference_in_float64(varlen, proj, pattern):
    """The kernels' row rules for resets (masked exchange rows and c register in the forward; c_{t-1} = 0,
    zero dc and zero dG exchange rows in the backward) are the reference's resets, outputs and every
    gradient, with variable lengths and proj_size too."""
    got, want, plain = _emulated_and_reference(varlen, proj, 6, _reset_mask(pattern))
    _assert_same(got, want)
    if pattern != "none":  # the rules matter: without them the emulation is not the reference's
        assert not all(torch.allclose(a, b) for a, b in zip(plain, want))


@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_step_rules_match_the_reference_in_float64(varlen, proj):
    """With no rounding (ex_dtype None) the emulated kernel rules are the reference's BPTT
    (with proj_size: the two half-steps of each step, and dW_hr from the saved dh_t and m_t)."""
    got, want, _ = _emulated_and_reference(varlen, proj, 3)
    _assert_same(got, want)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
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


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
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


# ---- float32 products: tf32 (Tf32Mma) and 3xTF32 (Fp32Mma) ------------------------------------


def _f32_of_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _bits_of_f32(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF


def _tf32_reference(x: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` (normal range) to 11 significant bits, to nearest with ties away from
    zero, computed in float64 independently of the bit trick of cf.to_tf32."""
    xd = x.double()
    _, e = torch.frexp(xd)  # |x| = m 2^e, m in [0.5, 1): tf32's ulp is 2^(e - 11)
    ulp = torch.ldexp(torch.ones_like(xd), e - 11)
    return torch.sign(xd) * torch.floor(xd.abs() / ulp + 0.5) * ulp


ONE = 0x3F800000  # 1.0f
TF32_CASES = [  # (float32 bits, the bits cvt.rna.tf32.f32 gives): tf32 keeps mantissa bits 22..13
    (ONE, ONE),
    (ONE + (1 << 12), ONE + (1 << 13)),  # 1 + 2^-11: a tie, away from zero -> 1 + 2^-10 (ties-to-even: 1)
    (ONE + (1 << 11), ONE),  # 1 + 2^-12 -> 1
    (ONE + (1 << 12) - 1, ONE),  # just below the tie
    (ONE + (1 << 12) + 1, ONE + (1 << 13)),  # just above
    (ONE + (3 << 12), ONE + (2 << 13)),  # 1 + 3 2^-11: tie, odd last bit -> up (either rule)
    (ONE + (5 << 12), ONE + (3 << 13)),  # 1 + 5 2^-11: tie, even last bit -> away, up (ties-to-even: down)
    (ONE + (1 << 13) + (1 << 12) - 1, ONE + (1 << 13)),  # 1 + 2^-10 + (2^-11 - 2^-23): below the tie -> 1 + 2^-10
    (ONE + (1 << 13) + (1 << 13) - 1, ONE + (2 << 13)),  # 1 + 2^-10 + (2^-10 - 2^-23): above it -> 1 + 2^-9
    (0x3FFFFFFF, 0x40000000),  # 2 - 2^-23 -> 2: the carry into the exponent
    (0x3FFFF000, 0x40000000),  # 2 - 2^-11: the tie at the top of the binade -> 2
    (0x00000000, 0x00000000),
    (0x4B7FFFFF, 0x4B800000),  # 2^24 - 1 -> 2^24
    (0x38D1B717, 0x38D1C000),  # 1e-4f: low 13 bits 0x1717 > 0x1000 (half) -> up
    (0x3DCCCCCD, 0x3DCCC000),  # 0.1f: low 13 bits 0x0CCD < 0x1000 -> down
]


def test_to_tf32_matches_cvt_rna_bit_patterns():
    """cf.to_tf32 as cvt.rna.tf32.f32: nearest, ties away from zero, low 13 bits zero; negative values
    the same magnitudes with the sign kept."""
    for bits_in, bits_out in TF32_CASES:
        for sign in (0, 0x80000000):
            x = torch.tensor([_f32_of_bits(bits_in | sign)], dtype=torch.float32)
            got = _bits_of_f32(cf.to_tf32(x)).item()
            assert got == bits_out | sign, f"{bits_in | sign:#010x} -> {got:#010x}, want {bits_out | sign:#010x}"
    assert cf.to_tf32(torch.tensor([1.0 + 2.0**-11])).item() == 1.0 + 2.0**-10
    assert cf.to_tf32(torch.tensor([1.0 + 2.0**-12])).item() == 1.0
    assert cf.to_tf32(torch.tensor([-(1.0 + 2.0**-11)])).item() == -(1.0 + 2.0**-10)


def test_to_tf32_on_random_data():
    torch.manual_seed(9)
    x = torch.cat([torch.randn(100_000) * s for s in (1e-3, 1.0, 1e3)]).float()
    r = cf.to_tf32(x)
    assert r.dtype == torch.float32 and r.shape == x.shape
    assert (_bits_of_f32(r) & 0x1FFF == 0).all(), "low 13 mantissa bits not zero"
    assert torch.equal(r.double(), _tf32_reference(x)), "differs from round-to-nearest-ties-away at 11 bits"
    rel = ((r.double() - x.double()).abs() / x.double().abs()).max().item()
    assert rel <= 2.0**-11, f"relative error {rel:.3e} > 2^-11"
    assert rel >= 2.0**-12, f"the rounding is suspiciously exact ({rel:.3e})"
    assert torch.equal(cf.to_tf32(r), r)  # idempotent: tf32 values stay


def test_tf32_split_parts_are_tf32_and_add_up_to_x():
    torch.manual_seed(10)
    x = torch.cat([torch.randn(100_000) * s for s in (1e-3, 1.0, 1e3)]).float()
    big, small = cf.tf32_split(x)
    for part in (big, small):
        assert part.dtype == torch.float32 and (_bits_of_f32(part) & 0x1FFF == 0).all()
    assert torch.equal(big, cf.to_tf32(x))
    xd = x.double()
    assert ((small.double()).abs() <= 2.0**-11 * xd.abs()).all()
    err = ((big.double() + small.double() - xd).abs() / xd.abs()).max().item()
    assert err <= 2.0**-22, f"big + small is {err:.3e} off x (relative), > 2^-22"
    assert err > 0  # 24 bits do not fit in 2 x 11: the split is not exact, the bound is what it promises


@pytest.mark.parametrize("K", [768, 3072])
def test_3xtf32_products_have_fp32_accuracy_and_tf32_does_not(K):
    """A [16, K] x [K, 8] block product as the float kernels compute it (cf.tf32_matmul) against
    float64: 3xTF32 (Fp32Mma) is of the order of fp32's accuracy; tf32 (Tf32Mma) is within 2^-10 and
    clearly worse."""
    torch.manual_seed(K)
    a, b = torch.randn(16, K), torch.randn(K, 8)
    exact = a.double() @ b.double()
    e_split = _rel(cf.tf32_matmul(a, b, split=True), exact)
    e_tf32 = _rel(cf.tf32_matmul(a, b, split=False), exact)
    e_fp32 = _rel((a @ b).double(), exact)  # an fp32 GEMM on the CPU, for scale
    print(f"\n[16, {K}] x [{K}, 8] vs float64 (norm-relative): 3xTF32 {e_split:.2e}, tf32 {e_tf32:.2e}, "
          f"fp32 CPU GEMM {e_fp32:.2e}")
    assert e_split <= 1e-6, f"3xTF32: {e_split:.3e}"
    assert e_tf32 <= 2.0**-10, f"tf32: {e_tf32:.3e}"
    assert e_tf32 > 10 * e_split, f"tf32 {e_tf32:.3e} is not clearly worse than 3xTF32 {e_split:.3e}"


def _f32_exact(t: torch.Tensor) -> torch.Tensor:
    """float64 tensor holding float32 values (the data a float32 call gives the kernels)."""
    return t.float().double()


def test_float32_bptt_on_emulated_tf32_products_inside_the_tolerances():
    """A whole BPTT in float64 whose recurrent products (forward h_{t-1} W_hh^T, backward
    dG_{t+1} W_hh) are the float kernels' (cf.tf32_matmul), h and dG exchanged in float32, against
    the exact float64 recurrence of the same float32 data: 3xTF32 stays within the fp32 tolerance
    1e-5 (DESIGN.md, tests/utils.py), tf32 within 1e-3, and the two are told apart."""
    torch.manual_seed(11)
    T, B, H = 48, 4, 32
    xg = _f32_exact(torch.randn(T, B, 4 * H, dtype=torch.float64))
    w = _f32_exact(torch.randn(4 * H, H, dtype=torch.float64) / H**0.5)
    h0, c0 = (_f32_exact(torch.randn(B, H, dtype=torch.float64) * 0.5) for _ in range(2))
    dh_all = _f32_exact(torch.randn(T, B, H, dtype=torch.float64))
    dh_T, dc_T = (_f32_exact(torch.randn(B, H, dtype=torch.float64)) for _ in range(2))
    exact = _emulate(xg, w, h0, c0, None, dh_all, dh_T, dc_T, None)
    names = ("h_all", "dG", "dh0", "dc0")
    errs = {}
    for label, split in (("3xTF32", True), ("tf32", False)):
        def mm(a, b, split=split):
            return cf.tf32_matmul(a.float(), b.float(), split)

        got = _emulate(xg, w, h0, c0, None, dh_all, dh_T, dc_T, torch.float32, matmul=mm)
        errs[label] = {name: _rel(a, b) for name, a, b in zip(names, got, exact)}
        print(f"\nfloat32 BPTT on {label} products, T={T} B={B} H={H}: relative errors vs float64 "
              + ", ".join(f"{k} {v:.2e}" for k, v in errs[label].items()))
    for name in names:
        assert errs["3xTF32"][name] <= 1e-5, f"3xTF32 {name}: {errs['3xTF32'][name]:.3e} > 1e-5"
        assert errs["tf32"][name] <= 1e-3, f"tf32 {name}: {errs['tf32'][name]:.3e} > 1e-3"
    for name in ("h_all", "dG", "dh0"):
        assert errs["tf32"][name] > 10 * errs["3xTF32"][name], f"{name}: tf32 and 3xTF32 not told apart"


# ---- dispatch of the cuda backend to the fused kernels (host only: a fake extension) ----------

from lstm_kernels.backends import RecurrenceCall  # noqa: E402
from lstm_kernels.backends import cuda as cuda_backend  # noqa: E402


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
        monkeypatch.setattr(cuda_backend, "_C", fake)
        monkeypatch.setattr(cuda_backend, "_REFUSED", {})
        monkeypatch.setattr(cuda_backend, "_smem_optin", lambda device: optin)
        monkeypatch.setattr(cuda_backend.torch.cuda, "device", lambda d: __import__("contextlib").nullcontext())
        cuda_backend._fused_plan_of.cache_clear()
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
    cuda_backend._fused_plan_of.cache_clear()


def _call(dtype=torch.float16, B=16, H=768, P=None, varlen=False):
    return RecurrenceCall(seq_len=8, batch=B, hidden_size=H, state_size=P or H, dtype=dtype,
                          device=torch.device("cuda"), has_projection=P is not None, variable_lengths=varlen,
                          needs_grad=True)


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
    (None, True, {}, True),                 # default: fused persistent where it fits
    (None, False, {}, None),                # ... else the per-step kernels of lstm_forward.cu
    (None, False, dict(varlen=True), False),  # only the fused kernels serve: one launch per half-step
    ("step", True, {}, None),
    ("step", True, dict(P=128), False),
    ("persistent", True, {}, None),         # the named variants keep their kernels ...
    ("persistent", True, dict(varlen=True), True),  # ... except where only the fused ones serve
    ("auto", False, dict(P=128), False),
    (None, True, dict(dtype=torch.float32, H=512), True),  # float32 where both directions fit (sm_90)
    (None, False, dict(dtype=torch.float32, H=512, varlen=True), False),
])
def test_fused_mode(fake_fused, variant, possible, kw, expected):
    fake = fake_fused(possible, variant)
    for direction in ("forward", "backward"):
        assert cuda_backend._fused_mode(_call(**kw), direction) is expected
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
        assert all(cuda_backend._fused_mode(_call(dtype), d) is True for d in ("forward", "backward"))
    f32 = _call(torch.float32)
    assert cuda_backend.fused_unserved_reason(f32, ("forward",)) is None
    assert cuda_backend._fused_mode(f32, "forward") is True
    assert ("forward", cf.FLOAT32, 16, 768, 768) in fake.plans  # asked with the fp32-accuracy op code
    if optin == cf.SMEM_OPTIN_SM80:
        why = cuda_backend.fused_unserved_reason(f32, ("backward",))
        assert why is not None and all(w in why for w in ("backward", "shared memory", "float32")), why
        assert cuda_backend._fused_mode(f32, "backward") is None  # the per-step kernels of lstm_backward.cu
        assert cuda_backend.fused_unserved_reason(f32) == why  # needs_grad: both directions asked
    else:
        assert cuda_backend.fused_unserved_reason(_call(torch.float32, H=512)) is None
        assert all(cuda_backend._fused_mode(_call(torch.float32, H=512), d) is True for d in ("forward", "backward"))


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
        assert cuda_backend._fused_mode(call, direction) is (True if fits[direction] else None)
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
    assert cuda_backend._fused_mode(call, "forward") is True
    assert fake.plans[-1] == ("forward", cf.TF32 if allow_tf32 else cf.FLOAT32, 16, 512, 512)
    cuda_backend._fused_mode(_call(torch.float16), "forward")
    assert fake.plans[-1][1] == cf.FLOAT16
    seen = []

    def fn(entry, *args, barrier=(0, 0), tf32=False):
        seen.append((args[-1], tf32))
        return "ran"

    for persistent in (True, False):
        assert cuda_backend._run_fused(fn, "forward", call, persistent, call.device) == ("ran", persistent)
    assert seen == [(True, allow_tf32), (False, allow_tf32)]


def test_resets_reach_the_fused_plan_and_launch_only_where_given(fake_fused):
    """A call with resets plans the kernels' instance with resets (``resets=True``; its registers, so its
    occupancy, are its own) and hands the mask to the launch as ``resets=``; a call without passes
    neither, so its plan and launch are as before."""
    fake = fake_fused()
    call = _call()
    with_resets = RecurrenceCall(**{**call.__dict__, "has_resets": True})
    assert cuda_backend._fused_mode(call, "forward") is True and fake.plan_resets[-1] == {}
    assert cuda_backend._fused_mode(with_resets, "backward") is True and fake.plan_resets[-1] == {"resets": True}
    seen = []

    def fn(entry, *args, barrier=(0, 0, 0, 0), tf32=False, **kw):
        seen.append(kw)
        return "ran"

    mask = torch.zeros(2, 16, dtype=torch.uint8)
    for persistent in (True, False):
        cuda_backend._run_fused(fn, "forward", call, persistent, call.device)
        cuda_backend._run_fused(fn, "forward", with_resets, persistent, call.device, resets=mask)
    assert seen == [{}, {"resets": mask}] * 2


def test_named_persistent_raises_where_the_fused_grid_does_not_fit(fake_fused):
    fake_fused(False, "persistent")
    with pytest.raises(RuntimeError, match="cannot be co-resident"):
        cuda_backend._fused_mode(_call(varlen=True), "forward")


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
    monkeypatch.setattr(cuda_backend, "_ptr", lambda t: 0 if t is None else id(t))
    seen = []

    def fn(entry, *args, barrier=(0, 0, 0, 0), tf32=False):
        seen.append((barrier, args[-1]))
        return "ran"

    call = _call()
    assert cuda_backend._run_fused(fn, "backward", call, True, call.device) == ("ran", True)
    code = barrier_bound.kernel_code("cuda fused backward (persistent)")
    assert seen == [((id(made["state"]), id(made["record"]), 1_500_000_000, code), True)]
    assert queued == [(call.device, made["record"])]
    assert cuda_backend._run_fused(fn, "backward", call, False, call.device) == ("ran", False)
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


# ---- ldmatrix + mma.sync emulated on the host, with the header's lane addresses ----------------
# Shared tiles are row-major values of `elem` bytes at byte 0; the lane addresses are byte offsets
# (fused_plan.cuh's ldsm_*), taken from the header dump. The kernels' Op (csrc/fused_common.cuh):
# "16-bit" Fp16Mma / Bf16Mma (m16n8k16 on the stored values), "tf32" Tf32Mma (operands rounded to
# tf32, m16n8k8), "3xTF32" Fp32Mma (operands split into big + small tf32 parts, three m16n8k8).

OPS = {"16-bit": 2, "tf32": 4, "3xTF32": 4}  # op -> storage bytes
_LDSM_STRIDES = (80, 208)  # the row strides (bytes) plan_dump.cpp evaluates the ldsm maps at


def _lane_offsets(plan_dump, name, ldb):
    """Byte offset of each lane's ldmatrix row address into a tile of row stride ``ldb`` bytes, from
    fused_plan.cuh's ``name`` (dumped at two strides: offset = row * stride + byte column)."""
    d = plan_dump(1, 1)
    s0, s1 = _LDSM_STRIDES
    out = []
    for lane, (o0, o1) in enumerate(zip(d[f"{name}@{s0}"], d[f"{name}@{s1}"])):
        row, rem = divmod(o1 - o0, s1 - s0)
        col = o0 - row * s0
        assert rem == 0 and 0 <= col and col + 16 <= s0, (name, lane, o0, o1)
        assert col % 16 == 0, f"{name}: lane {lane}'s column {col} is not a multiple of 16 bytes"
        out.append(row * ldb + col)
    return out


def _ldmatrix_x4(tile, elem, addrs):
    """ldmatrix.sync.aligned.m8n8.x4.shared.b16 (PTX ISA): lanes 8i..8i+7 give the byte addresses
    ``addrs`` of the eight 16-byte rows of 8x8 b16 matrix i (= 8x4 b32), and lane l receives in register
    i the 32-bit word l % 4 of row l / 4 of matrix i: two 16-bit values (elem 2) or one float (elem 4).
    Returns regs [32 lanes, 4 registers, 4 // elem values]."""
    rows, ldb, per = tile.shape[0], tile.shape[1] * elem, 4 // elem
    regs = torch.empty(32, 4, per, dtype=tile.dtype)
    for i in range(4):
        for lane in range(32):
            row_addr = addrs[8 * i + lane // 4]
            assert row_addr % 16 == 0, "ldmatrix row addresses are 16-byte aligned"
            r, cb = divmod(row_addr + 4 * (lane % 4), ldb)
            assert 0 <= r < rows and cb % elem == 0 and cb // elem + per <= tile.shape[1], (i, lane, row_addr)
            regs[lane, i] = tile[r, cb // elem:cb // elem + per]
    return regs


def _frag(op, regs):
    """ldsm_frag<Op>: (big, small) registers: the stored values (16-bit), rounded to tf32 (tf32), or
    big = tf32(x), small = tf32(x - big) (3xTF32; x - big is exact in fp32)."""
    if OPS[op] == 2:
        return regs, None
    x = regs.float()
    big = cf.to_tf32(x)
    small = cf.to_tf32(x - big) if op == "3xTF32" else None
    return big.double(), None if small is None else small.double()


def _d_fragments(D):
    """The m16n8 f32 accumulator fragments of D (PTX ISA, both shapes): lane l holds d0, d1 at row
    g = l/4, columns 2t, 2t + 1 (t = l % 4); d2, d3 at row g + 8."""
    return torch.stack([torch.stack([D[t >> 2, 2 * (t & 3)], D[t >> 2, 2 * (t & 3) + 1], D[(t >> 2) + 8, 2 * (t & 3)],
                                     D[(t >> 2) + 8, 2 * (t & 3) + 1]]) for t in range(32)])


def _mma_16816(a, b):
    """mma.sync.aligned.m16n8k16.row.col.f32 (PTX ISA), products and sums in float64: A 16x16 from
    a [32, 4, 2]: a0 (row g, k 2t, 2t+1), a1 (row g+8, same k), a2 (row g, k 2t+8, 2t+9), a3 (row g+8,
    k 2t+8, 2t+9); B 16x8 (k x n) from b [32, 2, 2]: b0 (k 2t, 2t+1, n g), b1 (k 2t+8, 2t+9, n g);
    g = lane / 4, t = lane % 4. Returns the D fragments [32, 4]."""
    A = torch.full((16, 16), float("nan"), dtype=torch.float64)
    Bm = torch.full((16, 8), float("nan"), dtype=torch.float64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for e in range(2):
            A[g, 2 * t + e], A[g + 8, 2 * t + e] = a[lane, 0, e], a[lane, 1, e]
            A[g, 8 + 2 * t + e], A[g + 8, 8 + 2 * t + e] = a[lane, 2, e], a[lane, 3, e]
            Bm[2 * t + e, g], Bm[8 + 2 * t + e, g] = b[lane, 0, e], b[lane, 1, e]
    assert not A.isnan().any() and not Bm.isnan().any(), "a fragment element was never loaded"
    return _d_fragments(A @ Bm)


def _mma_1688_tf32(a, b):
    """mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (PTX ISA), products and sums in float64:
    A 16x8 from a [32, 4, 1]: a0 (row g, col t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B 8x8 (k x n)
    from b [32, 2, 1]: b0 (k t, n g), b1 (k t+4, n g); g = lane / 4, t = lane % 4. The operands must be
    tf32 values (ldsm_frag rounds them). Returns the D fragments [32, 4] (layout as m16n8k16)."""
    for x in (a, b):
        assert torch.equal(cf.to_tf32(x.float()).double(), x), "an mma.sync tf32 operand is not a tf32 value"
    A = torch.full((16, 8), float("nan"), dtype=torch.float64)
    Bm = torch.full((8, 8), float("nan"), dtype=torch.float64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4] = a[lane, :, 0]
        Bm[t, g], Bm[t + 4, g] = b[lane, :, 0]
    assert not A.isnan().any() and not Bm.isnan().any(), "a fragment element was never loaded"
    return _d_fragments(A @ Bm)


def _mma_chunk(op, acc, a, b, half):
    """mma_chunk<Op>: acc (fragments [32, 4]) += a x (b's n8 tile ``half``: registers 2 half, 2 half + 1)
    over one 32-byte chunk; 3xTF32 adds a_small b_big, a_big b_small, a_big b_big."""
    mma = _mma_16816 if OPS[op] == 2 else _mma_1688_tf32
    (a_big, a_small), (b_big, b_small) = a, b
    sel = slice(2 * half, 2 * half + 2)
    if op == "3xTF32":
        acc += mma(a_small, b_big[:, sel])
        acc += mma(a_big, b_small[:, sel])
    acc += mma(a_big, b_big[:, sel])


def _tile_of(frags):
    """The 16x8 tile whose per-lane fragments are ``frags``."""
    out = torch.zeros(16, 8, dtype=torch.float64)
    for t, d in enumerate(frags):
        out[t >> 2, 2 * (t & 3)], out[t >> 2, 2 * (t & 3) + 1] = d[0], d[1]
        out[(t >> 2) + 8, 2 * (t & 3)], out[(t >> 2) + 8, 2 * (t & 3) + 1] = d[2], d[3]
    return out


def _tile_data(rows, cols, kind):
    """``dyadic``: multiples of 2^-8 in [-4, 4] (11 significant bits: exact in fp16 and tf32, and every
    sum of their products exact in float64); ``float``: float32 values (not tf32)."""
    if kind == "dyadic":
        return torch.randint(-1024, 1025, (rows, cols)).double() * 2.0**-8
    return torch.randn(rows, cols).double()  # float32 values


def _want(op, kind, a, b):
    """a @ b^T as the kernel's Op computes it: exact for dyadic data (and for 16-bit values); else
    the float kernels' products (cf.tf32_matmul)."""
    if kind == "dyadic" or OPS[op] == 2:
        return a @ b.t()
    return cf.tf32_matmul(a.float(), b.float().t(), split=op == "3xTF32")


def _check(op, kind, got, want):
    if kind == "dyadic":
        assert torch.equal(got, want), f"max err {(got - want).abs().max():.3e}"
    else:
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"max err {(got - want).abs().max():.3e}"


@pytest.mark.parametrize("kind", ["dyadic", "float"])
@pytest.mark.parametrize("op", list(OPS))
def test_forward_k_loop_addressing_computes_the_block_product(plan_dump, op, kind):
    """fused_forward.cu's k loop: A = ldmatrix of the W slice [32 rows][LD] at ldsm_a16 (rows 0-15,
    and 16-31 at + 16 LD E bytes), B = ldmatrix of the h tile [16][LD] at ldsm_b16 (two batch tiles:
    registers 0, 1 and 2, 3), chunk ks at + 32 ks bytes, over every warp's chunk range of the header
    (warp_k_range over k_chunks(Kp, E)); LD = Kp + smem_pad(E). The sum is W_slice h_tile^T: exactly
    for dyadic data, and as cf.tf32_matmul computes it for float data on tf32 / 3xTF32."""
    torch.manual_seed(6)
    elem = OPS[op]
    H = 96 if elem == 2 else 48  # 6 chunks: warps with 0 and 1 chunks
    Kp = cf.round_up(H, cf.kpad(elem))
    d = plan_dump(1, H, elem)
    assert d["ks_fwd"] == cf.k_chunks(Kp, elem) == 6
    LD = Kp + cf.smem_pad(elem)  # the padding columns hold data too: reading them would show
    w, h = _tile_data(cf.FWD_ROWS, LD, kind), _tile_data(cf.BATCH_TILE, LD, kind)
    w_off = _lane_offsets(plan_dump, "ldsm_a16", LD * elem)
    h_off = _lane_offsets(plan_dump, "ldsm_b16", LD * elem)
    acc = {(mt, nt): torch.zeros(32, 4, dtype=torch.float64) for mt in range(2) for nt in range(2)}
    for ks_begin, ks_end in d["fwd_k"]:  # warp by warp
        for ks in range(ks_begin, ks_end):
            a = [_frag(op, _ldmatrix_x4(w, elem, [o + ks * cf.CHUNK_BYTES + mt * 16 * LD * elem for o in w_off]))
                 for mt in range(2)]
            bf = _frag(op, _ldmatrix_x4(h, elem, [o + ks * cf.CHUNK_BYTES for o in h_off]))
            for mt in range(2):
                for nt in range(2):
                    _mma_chunk(op, acc[(mt, nt)], a[mt], bf, nt)
    want = _want(op, kind, w[:, :Kp], h[:, :Kp])
    for (mt, nt), frags in acc.items():
        _check(op, kind, _tile_of(frags), want[16 * mt:16 * mt + 16, 8 * nt:8 * nt + 8])


@pytest.mark.parametrize("kind", ["dyadic", "float"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("rows_name", ["backward dG x W^T", "projection m x W_hr^T"])
def test_pair_k_loop_addressing_computes_the_block_product(plan_dump, rows_name, op, kind):
    """split_k_mma_16x8 (fused_backward.cu's k loop, and the projection half-steps): A = ldmatrix of
    the batch tile [16][LD] at ldsm_a16 for chunks 2kp and 2kp + 1, B = ldmatrix of the 8-row weight
    strip at ldsm_b8x2 (registers 0, 1 for chunk 2kp, 2, 3 for 2kp + 1), 64 bytes per pair, over the
    header's pair ranges; two accumulators added at the end."""
    torch.manual_seed(7)
    elem = OPS[op]
    H = 24 if elem == 2 else 12  # K = 4H: 3 pairs of chunks
    Kp = cf.round_up(4 * H, cf.kpad(elem))
    d = plan_dump(1, H, elem)
    assert d["kpairs_bwd"] == cf.k_chunks(Kp, elem) // 2 == 3
    LD = Kp + cf.smem_pad(elem)
    g, w = _tile_data(cf.BATCH_TILE, LD, kind), _tile_data(cf.UNITS, LD, kind)
    g_off = _lane_offsets(plan_dump, "ldsm_a16", LD * elem)
    w_off = _lane_offsets(plan_dump, "ldsm_b8x2", LD * elem)
    CB = cf.CHUNK_BYTES
    total = torch.zeros(32, 4, dtype=torch.float64)
    for kp_begin, kp_end in d["bwd_k"]:  # warp by warp
        acc0, acc1 = torch.zeros(32, 4, dtype=torch.float64), torch.zeros(32, 4, dtype=torch.float64)
        for kp in range(kp_begin, kp_end):
            a0 = _frag(op, _ldmatrix_x4(g, elem, [o + kp * 2 * CB for o in g_off]))
            a1 = _frag(op, _ldmatrix_x4(g, elem, [o + kp * 2 * CB + CB for o in g_off]))
            bw = _frag(op, _ldmatrix_x4(w, elem, [o + kp * 2 * CB for o in w_off]))
            _mma_chunk(op, acc0, a0, bw, 0)
            _mma_chunk(op, acc1, a1, bw, 1)
        total += acc0 + acc1
    _check(op, kind, _tile_of(total), _want(op, kind, g[:, :Kp], w[:, :Kp]))


@pytest.mark.parametrize("op", list(OPS))
def test_the_emulated_mma_sees_a_wrong_address(plan_dump, op):
    """The emulation is not blind: one lane's row address 16 bytes or one row off gives a different
    product (one chunk of a 16 x 8 product, A at ldsm_a16, B at ldsm_b8x2)."""
    torch.manual_seed(8)
    elem = OPS[op]
    ce = cf.CHUNK_BYTES // elem  # elements per chunk
    LD = 2 * ce + cf.smem_pad(elem)
    g, w = _tile_data(16, LD, "dyadic"), _tile_data(8, LD, "dyadic")
    good = _lane_offsets(plan_dump, "ldsm_a16", LD * elem)
    bw = _frag(op, _ldmatrix_x4(w, elem, _lane_offsets(plan_dump, "ldsm_b8x2", LD * elem)))

    def product(addrs):
        acc = torch.zeros(32, 4, dtype=torch.float64)
        _mma_chunk(op, acc, _frag(op, _ldmatrix_x4(g, elem, addrs)), bw, 0)
        return _tile_of(acc)

    ok = product(good)
    assert torch.equal(ok, g[:, :ce] @ w[:, :ce].t())
    for lane, delta in ((17, 16), (3, LD * elem)):
        bad = list(good)
        bad[lane] += delta
        assert not torch.allclose(product(bad), ok), (lane, delta)


@pytest.mark.parametrize("shape", ["wrapping ring", "empty warps"])
@pytest.mark.parametrize("landing", ["at issue", "at the wait"])
@pytest.mark.parametrize("kind", ["dyadic", "float"])
@pytest.mark.parametrize("op", list(OPS))
def test_streamed_ring_computes_the_block_product(plan_dump, op, kind, landing, shape):
    """split_k_mma_16x8_streamed (fused_backward.cu's dG_{t+1} W_hh): each warp copies its pairs of
    chunks of the exchange rows (global, row stride Kp elements) stage by stage (STAGE_PAIRS pairs,
    16-byte cp.async pieces; past kp_end in a short last stage, zero-filled copies whose source is
    the stage's first column, multiplied with the stage's first W pair) into slot s % RING_STAGES of its ring (rows of
    STAGE_ROW_BYTES), RING_STAGES - 1 stages ahead, and multiplies stage s from the ring (A at
    ldsm_a16 with the ring's row stride) with the resident W strip (B at ldsm_b8x2).

    The copies land either as soon as they are issued (the earliest the hardware may write: a slot
    still to be read must not be overwritten) or only when cp.async.wait_group<RING_STAGES - 1>
    forces them (the latest: a stage must have landed before it is read; the ring starts as NaN).
    Both give the block product, so the schedule is right whatever the copies' timing."""
    torch.manual_seed(9)
    elem = OPS[op]
    if shape == "wrapping ring":  # 72 pairs: 9 per warp, 5 stages (the last short), the ring wraps
        H = 576 if elem == 2 else 288
    else:  # 3 pairs (4H = 96 or 48 elements): five warps have none, the others one
        H = 24 if elem == 2 else 12
    d = plan_dump(16, H, elem)
    SP, RING, ROW, SLOT = (d[n] for n in ("STAGE_PAIRS", "RING_STAGES", "STAGE_ROW_BYTES", "STAGE_BYTES"))
    Kp = cf.round_up(4 * H, cf.kpad(elem))
    LD = Kp + cf.smem_pad(elem)
    src = _tile_data(cf.BATCH_TILE, Kp, kind)  # the exchange rows of this batch tile
    w = _tile_data(cf.UNITS, LD, kind)
    w_off = _lane_offsets(plan_dump, "ldsm_b8x2", LD * elem)
    a_lane = _lane_offsets(plan_dump, "ldsm_a16", ROW)
    CB, per16 = cf.CHUNK_BYTES, 16 // elem
    if shape == "wrapping ring":
        assert max(-(-(e - b) // SP) for b, e in d["bwd_k"]) > RING and any((e - b) % SP for b, e in d["bwd_k"])
    else:
        assert any(b == e for b, e in d["bwd_k"])
    k_row = SP * 2 * CB // 16  # the kernel's lane map: lane = row * k_row + col, rows row + 32 / k_row * i
    rows_per_pass = 32 // k_row
    total = torch.zeros(32, 4, dtype=torch.float64)
    for kp_begin, kp_end in d["bwd_k"]:  # warp by warp
        ring = torch.full((RING * cf.BATCH_TILE, ROW // elem), float("nan"), dtype=torch.float64)
        held, consumed, pending = [None] * RING, set(), []
        n_stages = -(-(kp_end - kp_begin) // SP)

        def land(group):
            stage, copies = group
            if stage is None:
                return
            slot = stage % RING
            assert held[slot] is None or held[slot] in consumed, f"stage {stage} overwrites unread stage {held[slot]}"
            held[slot] = stage
            for dst, src_byte, nbytes in copies:  # one 16-byte cp.async: nbytes read, the rest zero-filled
                r, c = divmod(dst, ROW)
                sr, sc = divmod(src_byte, Kp * elem)
                assert 0 <= sr < cf.BATCH_TILE and sc + 16 <= Kp * elem, "a copy's source lies outside the rows"
                data = src[sr, sc // elem:sc // elem + per16]
                ring[r, c // elem:c // elem + per16] = data if nbytes == 16 else torch.zeros_like(data)

        def issue(s):  # one commit group, empty past the last stage; a full stage, zero-filled past kp_end
            group = (None, [])
            if s < n_stages:  # lane by lane, as split_k_mma_16x8_streamed computes the addresses
                pairs = min(SP, kp_end - kp_begin - s * SP)
                copies = []
                for lane in range(32):
                    col, row = lane % k_row, lane // k_row
                    copy = col < pairs * (2 * CB // 16)
                    src_row = row * Kp * elem + kp_begin * 2 * CB
                    for r in range(0, cf.BATCH_TILE, rows_per_pass):
                        copies.append(((s % RING) * SLOT + (row + r) * ROW + col * 16,
                                       src_row + s * SP * 2 * CB + (col * 16 if copy else 0) + r * Kp * elem,
                                       16 if copy else 0))
                dsts = [c[0] for c in copies]
                assert len(set(dsts)) == len(dsts) == cf.BATCH_TILE * k_row, "each piece of a stage copied once"
                group = (s, copies)
            if landing == "at issue":
                land(group)
            else:
                pending.append(group)

        acc0, acc1 = torch.zeros(32, 4, dtype=torch.float64), torch.zeros(32, 4, dtype=torch.float64)
        for s in range(RING - 1):
            issue(s)
        for s in range(n_stages):
            issue(s + RING - 1)
            while len(pending) > RING - 1:  # cp.async.wait_group<RING_STAGES - 1>
                land(pending.pop(0))
            base, p0 = (s % RING) * SLOT, kp_begin + s * SP
            for i in range(SP):  # every pair of the stage; past kp_end zeros times the stage's first W pair
                p = p0 + i if p0 + i < kp_end else p0
                a0 = _frag(op, _ldmatrix_x4(ring, elem, [base + o + i * 2 * CB for o in a_lane]))
                a1 = _frag(op, _ldmatrix_x4(ring, elem, [base + o + i * 2 * CB + CB for o in a_lane]))
                bw = _frag(op, _ldmatrix_x4(w, elem, [o + p * 2 * CB for o in w_off]))
                _mma_chunk(op, acc0, a0, bw, 0)
                _mma_chunk(op, acc1, a1, bw, 1)
            consumed.add(s)
        total += acc0 + acc1
    _check(op, kind, _tile_of(total), _want(op, kind, src, w[:, :Kp]))


def test_backward_shared_memory_holds_the_rings_and_the_resident_slice():
    """backward_smem_bytes (fused_backward.cu; its Python mirror here): the W^T slice, the eight
    warps' rings and the partial sums, whatever the dG tile's size: float32 fits sm_90 at the flagship."""
    for elem in ELEMS:
        ld = cf.round_up(4 * 768, cf.kpad(elem)) + cf.smem_pad(elem)
        assert cf.backward_smem_bytes(768, None, elem) == cf.UNITS * ld * elem + cf.WARPS * cf.WARP_RING_BYTES + 4096
    assert cf.backward_smem_bytes(768, None, 4) <= cf.SMEM_OPTIN_SM90 < cf.backward_smem_bytes(1208, None, 4)
    assert cf.WARP_RING_BYTES == cf.RING_STAGES * cf.BATCH_TILE * (cf.STAGE_PAIRS * 2 * cf.CHUNK_BYTES + 16)


def test_device_plan_that_does_not_fit_is_never_launched(fake_fused):
    """Where the device's own plan (_C.fused_plan: dynamic + static shared memory against the opt-in)
    says a block does not fit although the Python formula does, a plain call goes to the per-step
    kernels and a projected or packed call (which only the fused kernels serve) raises."""
    fake = fake_fused()
    fake.fits = False
    assert cuda_backend._fused_mode(_call(), "forward") is None
    for kw in (dict(P=256), dict(varlen=True)):
        with pytest.raises(RuntimeError, match="served by the fused kernels only.*does not fit"):
            cuda_backend._fused_mode(_call(**kw), "forward")


def test_fit_counts_the_kernels_static_shared_memory():
    """A block whose dynamic shared memory equals the opt-in exactly does not fit: the kernels' static
    bytes (abort flag) count too (a projected backward lands there: fp16 H = 2384, P = 32 on sm_90)."""
    plan = cf.Plan(16, 2384, 32)
    assert plan.smem_bytes("backward", 2) == cf.SMEM_OPTIN_SM90
    assert not plan.fits(cf.SMEM_OPTIN_SM90, 2, ("backward",))
    assert plan.fits(cf.SMEM_OPTIN_SM90 + cf.STATIC_SMEM_BYTES, 2, ("backward",))


def test_3xtf32_is_not_ieee_at_infinity():
    """The documented edge of Fp32Mma (fused_common.cuh): an infinite operand's products are NaN where
    fp32 gives +-inf (inf - inf in the split); finite operands near 1 are unaffected. If the kernels
    learn to keep infinities, this test and that comment change together."""
    x = torch.tensor([[float("inf"), 1.5]])
    y = torch.tensor([[1.0], [2.0]])
    assert (x.double() @ y.double()).item() == float("inf")
    assert cf.tf32_matmul(x, y, split=True).isnan().all()
    assert cf.tf32_matmul(x[:, 1:], y[1:], split=True).item() == 3.0


def test_to_tf32_keeps_infinities_and_nans():
    """to_tf32 as cvt.rna at the edges: infinities stay, FLT_MAX rounds up to infinity, and every NaN
    stays NaN, the GPU's canonical 0x7fffffff and 0xffffffff included (adding half an ulp to those
    would carry into the sign bit and give -0.0 / +0.0)."""
    x = torch.tensor([float("inf"), -float("inf"), torch.finfo(torch.float32).max, float("nan")])
    r = cf.to_tf32(x)
    assert r[0] == float("inf") and r[1] == -float("inf") and r[2] == float("inf") and r[3].isnan()
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7FFFF000], dtype=torch.int32).view(torch.float32)
    assert cf.to_tf32(nans).isnan().all()
