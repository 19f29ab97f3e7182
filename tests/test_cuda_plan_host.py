"""Host checks (no GPU) of the fused CUDA kernels' plain arithmetic (issue 13):

- ``csrc/fused/fused_plan.cuh`` compiled into a host program (``tests/cuda_host/plan_dump.cpp``, g++)
  agrees with ``lstm_kernels/backends/cuda/fused.py`` (byte constants, kpad / smem_pad / k_chunks
  for 16-bit and float storage, interleavings, cell threads, warp chunk ranges);
- the gate-row interleaving of W_hh and its inverse, and that an mma.sync thread's accumulators
  hold i, f, g, o of the same (b, j) under it;
- the tiling plan: every (b, j) owned by exactly one cell thread, every 32-byte chunk of the
  reduction by exactly one warp, for B and H not multiples of 16;
- the float32 products: ``to_tf32`` (cvt.rna) bit patterns, the 3xTF32 split, its fp32 accuracy
  against float64, and a whole BPTT on emulated tf32 / 3xTF32 products inside the fp32 / tf32
  tolerances;
- the 16-bit dG exchange: its rounding against float64, and its effect on a whole BPTT
  against DESIGN.md's tolerance;
- the kernels' step rules (variable lengths, where dh_T / dc_T enter, zero rows) emulated in
  float64 against the reference backend;
- the wide backward (fused_plan.cuh, "THE WIDE BACKWARD"): its constants, word transpose, exchange
  layout, lane loads, cell threads, slot test and shared memory against the Python mirror, and that a
  lane's 16-byte loads from the wide exchange are, register for register, the A fragments ldmatrix gives
  the ring from the natural layout (a mutant header without the transpose is caught);
- the narrow backward (fused_plan.cuh, "THE NARROW BACKWARD"): its grid, cell threads (each block's
  product read from the transposed fragments) and shared memory, and that a lane's one 16-byte load per
  pair from the same exchange is, register for register, the B fragment ldmatrix gives of dG^T.

Elsewhere: the k loops' ldmatrix + mma.sync emulated with the header's lane addresses
(tests/test_cuda_mma_emulation_host.py), the backend's dispatch to the fused kernels
(tests/test_cuda_dispatch_host.py).
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from lstm_kernels.backends.cuda import fused as cf
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
    assert d["bwd_stage_pairs"] == {str(g): cf.stage_pairs(g) for g in (4, 3)}
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
    for w, lane, src_lane, element in d["fwd_n_fragment"]:
        assert (src_lane, element) == cf.fwd_n_fragment(w, lane)
    # the forward walks chunks of K = H, the backward pairs of chunks of K = 4H
    assert d["ks_fwd"] == cf.k_chunks(cf.round_up(H, cf.kpad(elem)), elem)
    assert d["kpairs_bwd"] == cf.k_chunks(cf.round_up(4 * H, cf.kpad(elem)), elem) // 2
    assert d["fwd_k"] == [list(cf.warp_k_range(w, d["ks_fwd"])) for w in range(cf.WARPS)]
    assert d["bwd_k"] == [list(cf.warp_k_range(w, d["kpairs_bwd"])) for w in range(cf.WARPS)]
    # the kernels' k ranges cover each product's K once, in order, balanced to within one unit
    for product in ("fwd_gate_k", "fwd_proj_k", "bwd_gate_k", "bwd_proj_k", "bwd_gru_gate_k"):
        ranges = d[product]
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (product, ranges)
        sizes = [e - b for b, e in ranges]
        assert max(sizes) - min(sizes) <= 1, (product, ranges)
    # the tagged exchange's test of the register path: the longest of the warps' gate ranges
    assert d["fwd_gate_k_longest"] == max(e - b for b, e in d["fwd_gate_k"])


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
    # whole blocks of the ring's UNITS and of the wide backward's WIDE_UNITS
    assert w_bwd.shape == (cf.round_up(P, cf.WIDE_UNITS), 4 * H)
    assert w_bwd.shape[0] >= cf.unit_blocks(P) * cf.UNITS and w_bwd.shape[0] % cf.UNITS == 0
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


def _forward_cell_threads(h: torch.Tensor, H: int):
    """Every forward cell thread that owns a cell: (block q, the block's batch rows of h as a zero-padded
    [16, H] tile, warp, nt, cc, lane, b, j) (fused_forward.cu: nt = (warp >> 1) & 1, cc = warp & 1)."""
    B = h.shape[0]
    plan = cf.Plan(B, H)
    for q in range(plan.grid[0]):
        for y in range(plan.grid[1]):
            h_tile = torch.zeros(cf.BATCH_TILE, H, dtype=torch.float64)
            rows = list(plan.block_rows(y))
            h_tile[: len(rows)] = h[rows]
            for w_ in range(4):
                for lane in range(32):
                    b, j = cf.fwd_cell(q, y, w_, lane)
                    if b < B and j < H:
                        yield q, h_tile, w_, (w_ >> 1) & 1, w_ & 1, lane, b, j


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
    for q, h_tile, w_, nt, cc, lane, b, j in _forward_cell_threads(h, H):
        prod = w_fwd[q * cf.FWD_ROWS:(q + 1) * cf.FWD_ROWS] @ h_tile.t()  # [32 rows, 16 batch]
        t0, t1 = prod[0:16, nt * 8:nt * 8 + 8], prod[16:32, nt * 8:nt * 8 + 8]
        got = [_fragment(t0, lane, cc), _fragment(t0, lane, 2 + cc), _fragment(t1, lane, cc),
               _fragment(t1, lane, 2 + cc)]
        want = [gates[b, g * H + j] for g in range(4)]
        assert torch.allclose(torch.stack(got), torch.stack(want)), (q, b, j, w_, lane)


@pytest.mark.parametrize("B, H", [(5, 13), (16, 24), (17, 129)])
def test_gru_forward_fragments_hold_the_three_gates_of_one_cell(B, H):
    """The GRU's forward (fused_forward.cu with GATES = 3): w_fwd holds r, z where the LSTM holds i, f and
    the n rows at 16-23 of a block (its fourth gate's rows zero); the block's r, z tile read as the LSTM's
    i, f, and its transposed n tile (h [16 batch, K] x the n rows^T: batch x 8 units) read at
    fwd_n_fragment, are r, z and the n rows' pre-activations of the cell thread's (b, j)."""
    torch.manual_seed(2)
    w = torch.randn(3 * H, H, dtype=torch.float64)
    h = torch.randn(B, H, dtype=torch.float64)
    gates = h @ w.t()  # [B, 3H]
    w_fwd = cf.interleave_forward(w, 3)
    assert w_fwd.shape == (cf.unit_blocks(H) * cf.FWD_ROWS, H)
    assert torch.equal(cf.deinterleave_forward(w_fwd, H, 3), w)
    for q in range(cf.unit_blocks(H)):
        assert (w_fwd[q * cf.FWD_ROWS + 24:(q + 1) * cf.FWD_ROWS] == 0).all()  # no fourth gate
    for q, h_tile, w_, nt, cc, lane, b, j in _forward_cell_threads(h, H):
        block = w_fwd[q * cf.FWD_ROWS:(q + 1) * cf.FWD_ROWS]
        t0 = (block[0:16] @ h_tile.t())[:, nt * 8:nt * 8 + 8]  # r, z of 8 units x 8 batch rows
        n_tile = h_tile @ block[16:24].t()  # [16 batch, 8 units]
        got = [_fragment(t0, lane, cc), _fragment(t0, lane, 2 + cc), _fragment(n_tile, *cf.fwd_n_fragment(w_, lane))]
        want = [gates[b, g * H + j] for g in range(3)]
        assert torch.allclose(torch.stack(got), torch.stack(want)), (q, b, j, w_, lane)


@pytest.mark.parametrize("n_gates", [4, 3], ids=["lstm", "gru"])
@pytest.mark.parametrize("B, H", [(5, 13), (17, 24)])
def test_backward_fragment_and_exchange_order(B, H, n_gates):
    """dG in the exchange order r' = 4j + g (the GRU's [d_r, d_z, d_hn] in r' = 3j + g) times w_bwd is
    dG W_hh; the backward's cell thread (warp w, lane) reads element w of its fragment of the block's
    [16 x 8] product, and writes its gates at bwd_col(g, j)."""
    torch.manual_seed(1)
    w = torch.randn(n_gates * H, H, dtype=torch.float64)
    dg = torch.randn(B, n_gates * H, dtype=torch.float64)
    want = dg @ w
    dg_x = dg[:, cf.backward_col_index(H, n_gates=n_gates)]  # [B, n_gates*H] in r' order
    for g in range(n_gates):
        assert torch.equal(dg_x[:, [cf.bwd_col(g, j, n_gates) for j in range(H)]], dg[:, g * H:(g + 1) * H])
    w_bwd = cf.interleave_backward(w, n_gates)
    assert torch.equal(cf.deinterleave_backward(w_bwd, H, n_gates), w)
    plan = cf.Plan(B, H)
    for q in range(plan.grid[0]):
        for y in range(plan.grid[1]):
            rows = list(plan.block_rows(y))
            g_tile = torch.zeros(cf.BATCH_TILE, n_gates * H, dtype=torch.float64)
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


def test_backward_shared_memory_holds_the_rings_and_the_resident_slice():
    """backward_smem_bytes (fused_backward.cu; its Python mirror here): the W^T slice, the eight
    warps' rings and the partial sums, whatever the dG tile's size: float32 fits sm_90 at the flagship."""
    for elem in ELEMS:
        ld = cf.round_up(4 * 768, cf.kpad(elem)) + cf.smem_pad(elem)
        assert cf.backward_smem_bytes(768, None, elem) == cf.UNITS * ld * elem + cf.WARPS * cf.WARP_RING_BYTES + 4096
    assert cf.backward_smem_bytes(768, None, 4) <= cf.SMEM_OPTIN_SM90 < cf.backward_smem_bytes(1208, None, 4)
    assert cf.WARP_RING_BYTES == cf.RING_STAGES * cf.BATCH_TILE * (cf.STAGE_PAIRS * 2 * cf.CHUNK_BYTES + 16)


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


# ---- the wide backward (fused_plan.cuh, "THE WIDE BACKWARD") ------------------------------------

WIDE_SHAPES = [(1, 1), (5, 13), (17, 100), (16, 768), (16, 776), (33, 1000), (16, 1024)]  # (B, H)
#: the header's wide_word without the transpose: the exchange in the natural layout
IDENTITY_WIDE_WORD = "FUSED_HD int wide_word(int w) { return w; }"
WIDE_WORD_SITE = "FUSED_HD int wide_word(int w) { return (w & 3) * 4 + (w >> 2); }"


def test_wide_constants_agree_with_the_header(plan_dump):
    d = plan_dump(3, 5)
    assert (d["WIDE_UNITS"], d["WIDE_PAIR_SLOTS"]) == (cf.WIDE_UNITS, cf.WIDE_PAIR_SLOTS) == (16, 12)
    assert d["bwd_units"] == {"ring": cf.UNITS, "wide": cf.WIDE_UNITS, "narrow": cf.WIDE_UNITS}
    assert d["NARROW_BATCH_TILE"] == cf.NARROW_BATCH_TILE == 8 and d["bwd_tiles"] == cf.BWD_TILES
    assert cf.WIDE_UNITS % 8 == 0 and cf.WIDE_UNITS // 8 * 4 == cf.WARPS  # n tiles of 8 units x 4 elements: every warp
    assert d["wide_word"] == [cf.wide_word(w) for w in range(16)]


@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("B, H", WIDE_SHAPES)
def test_wide_maps_agree_with_python(plan_dump, B, H, elem):
    """The wide backward's grid, busiest warp, batches of slots, exchange layout, lane loads and cell threads of the
    header are the Python mirror's (fused.py), for the LSTM (4 gates) and the GRU (3)."""
    d = plan_dump(B, H, elem)
    assert tuple(d["wide_grid"]) == (-(-H // cf.WIDE_UNITS), cf.batch_tiles(B))
    assert tuple(d["ring_grid"]) == cf.Plan(B, H).grid == tuple(d["grid"])
    for n_gates in (4, 3):
        key = str(n_gates)
        assert d["bwd_gate_k_longest"][key] == cf.bwd_gate_k_longest(H, elem, n_gates), d["bwd_gate_k_longest"]
        assert d["bwd_wide_batches"][key] == cf.bwd_wide_batches(H, elem, n_gates), (n_gates, d["bwd_wide_batches"])
    # the busiest warp of the kernels' own k ranges (bwd_gate_k; the GRU's K = 3H: bwd_gru_gate_k)
    assert d["bwd_gate_k_longest"]["4"] == max(e - b for b, e in d["bwd_gate_k"])
    assert d["bwd_gate_k_longest"]["3"] == max(e - b for b, e in d["bwd_gru_gate_k"])
    per_pair = 2 * cf.CHUNK_BYTES // elem
    n = len(d["wide_exchange_pos"])
    assert n >= 2 * per_pair and n % per_pair == 0
    assert d["wide_exchange_pos"] == [cf.wide_exchange_pos(r, elem) for r in range(n)]
    rs = torch.arange(n)
    assert cf.wide_exchange_pos(rs, elem).tolist() == d["wide_exchange_pos"]  # the tensor form too
    row_bytes = d["wide_lane_row_bytes"]
    assert row_bytes % (2 * cf.CHUNK_BYTES) == 0
    for lane, half, pair, byte in d["wide_lane_byte"]:  # rows lane / 4 (+ 8), 16 bytes at 16 (lane % 4) of the pair
        assert byte == ((lane // 4) + 8 * half) * row_bytes + pair * 2 * cf.CHUNK_BYTES + 16 * (lane % 4)
    assert len(d["wide_lane_byte"]) == 32 * 2 * (row_bytes // (2 * cf.CHUNK_BYTES))
    for q, y, w, lane, b, j in d["bwd_wide_cells"]:
        assert (b, j) == cf.bwd_cell(q, y, w, lane, "wide"), (q, y, w, lane)
    # the narrow backward: its grid and cell threads
    assert tuple(d["narrow_grid"]) == (-(-H // cf.WIDE_UNITS), -(-B // cf.NARROW_BATCH_TILE))
    assert cf.bwd_batch_tiles(B, "narrow") == d["narrow_grid"][1] and cf.bwd_batch_tiles(B, "ring") == d["grid"][1]
    for q, y, w, lane, b, j in d["bwd_narrow_cells"]:
        assert (b, j) == cf.bwd_cell(q, y, w, lane, "narrow"), (q, y, w, lane)


@pytest.mark.parametrize("elem", ELEMS)
def test_wide_word_is_an_involution_and_the_exchange_a_permutation_of_each_pair(plan_dump, elem):
    d = plan_dump(1, 1, elem)
    ww = d["wide_word"]
    assert sorted(ww) == list(range(16)), "wide_word is a permutation of a pair's 16 words"
    assert all(ww[ww[w]] == w for w in range(16)), "wide_word is its own inverse"
    assert ww != list(range(16))
    per_pair = 2 * cf.CHUNK_BYTES // elem
    pos = d["wide_exchange_pos"]
    for p in range(len(pos) // per_pair):
        lo = p * per_pair
        assert sorted(pos[lo:lo + per_pair]) == list(range(lo, lo + per_pair)), f"pair {p} is not permuted in itself"
    per_word = 4 // elem
    for r, e in enumerate(pos):  # whole 4-byte words move, their elements in order
        assert e % per_word == r % per_word and (r // per_word) % 16 == ww[(e // per_word) % 16]
    # the Python mirror over a whole exchange row of the flagship (r' < 4H padded to kpad)
    kp = cf.round_up(4 * 768, cf.kpad(elem))
    got = cf.wide_exchange_pos(torch.arange(kp), elem)
    assert sorted(got.tolist()) == list(range(kp))
    assert torch.equal(cf.wide_exchange_pos(got, elem), torch.arange(kp)), "the layout is its own inverse"


def _random_tile(rows: int, K: int, elem: int, seed: int) -> torch.Tensor:
    """rows x K random raw bits of ``elem``-byte elements (int16 or int32)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 1 << (8 * elem), (rows, K), generator=gen, dtype=torch.int64)
    return (bits - (1 << (8 * elem)) * (bits >= 1 << (8 * elem - 1))).to(torch.int16 if elem == 2 else torch.int32)


def _padded_words(vals: torch.Tensor, row_bytes: int, elem: int) -> tuple:
    """``vals`` in a shared tile of rows padded by SMEM_PAD_BYTES, as 4-byte words (ldmatrix moves b32s), and
    the tile's row stride in bytes."""
    tile_row = row_bytes + cf.SMEM_PAD_BYTES
    tile = torch.zeros(vals.shape[0], tile_row // elem, dtype=vals.dtype)
    tile[:, :vals.shape[1]] = vals
    return tile.view(torch.int32), tile_row


def _stored_exchange(d: dict, vals: torch.Tensor) -> tuple:
    """``vals`` (r' order) as the wide and narrow backward's cell threads store them (wide_exchange_pos), as one
    run of 4-byte words, and each lane's 16-byte load offset {(lane, half, pair): byte} (wide_lane_byte)."""
    ex = torch.zeros_like(vals)
    ex[:, torch.tensor(d["wide_exchange_pos"])] = vals
    return ex.view(torch.int32).reshape(-1), {(lane, half, pair): byte for lane, half, pair, byte in d["wide_lane_byte"]}


def _wide_fragment_mismatches(dump, elem: int, seed: int = 0) -> list:
    """A random dG tile (16 rows x K, K = the dump's whole pairs of `elem`-byte elements, raw bits) read two
    ways: the ring's (the natural layout, r' contiguous, in a shared stage of padded rows, A fragments by
    ldmatrix at ldsm_a16 for chunks 2 p and 2 p + 1: fused_common.cuh's mma_pair) and the wide backward's
    (the tile stored at wide_exchange_pos in rows of whole pairs, each lane's 16-byte loads at wide_lane_byte
    for its two rows, chunk 0's registers {.x, .x, .y, .y} and chunk 1's {.z, .z, .w, .w} of (row, row + 8):
    split_k_mma_wide). Returns the (pair, chunk, lane, register, ring word, wide word) that differ."""
    from test_cuda_mma_emulation_host import _lane_offsets, _ldmatrix_x4

    d = dump(1, 1, elem)
    row_bytes = d["wide_lane_row_bytes"]
    pairs, K = row_bytes // (2 * cf.CHUNK_BYTES), row_bytes // elem
    assert len(d["wide_exchange_pos"]) == K
    vals = _random_tile(cf.BATCH_TILE, K, elem, seed)
    # the ring: a stage of `pairs` pairs
    stage_words, stage_row = _padded_words(vals, row_bytes, elem)
    a_lane = _lane_offsets(dump, "ldsm_a16", stage_row)
    ring = {(p, c): _ldmatrix_x4(stage_words, 4, [o + (2 * p + c) * cf.CHUNK_BYTES for o in a_lane])[:, :, 0]
            for p in range(pairs) for c in range(2)}  # [32 lanes, 4 registers]
    # the wide backward: the exchange rows as the cell threads store them, then each lane's loads
    ex_words, byte_of = _stored_exchange(d, vals)
    bad = []
    for p in range(pairs):
        for lane in range(32):
            loads = []
            for half in range(2):
                byte = byte_of[(lane, half, p)]
                assert byte % 16 == 0 and 0 <= byte and byte + 16 <= ex_words.numel() * 4, (lane, half, p, byte)
                loads.append(ex_words[byte // 4:byte // 4 + 4])  # .x .y .z .w
            wide = {0: [loads[0][0], loads[1][0], loads[0][1], loads[1][1]],
                    1: [loads[0][2], loads[1][2], loads[0][3], loads[1][3]]}
            for c in range(2):
                for reg in range(4):
                    want, got = int(ring[(p, c)][lane, reg]), int(wide[c][reg])
                    if want != got:
                        bad.append((p, c, lane, reg, want, got))
    return bad


def _narrow_fragment_mismatches(dump, elem: int, seed: int = 0) -> list:
    """A random dG tile (NARROW_BATCH_TILE rows x K, raw bits) read two ways: as the B operand dG^T (K x 8 rows)
    that ldmatrix gives from the natural layout, an [n][k] tile with n the batch row (ldsm_b8x2: b0, b1 of chunks
    2 p and 2 p + 1, what mma_pair reads as its B), and as the narrow backward loads it (the tile stored at
    wide_exchange_pos, each lane's one 16-byte load at wide_lane_byte for row lane / 4, half 0, registers
    {.x, .y, .z, .w}: split_k_mma_narrow). Returns the (pair, lane, register, ldmatrix word, loaded word) that
    differ."""
    from test_cuda_mma_emulation_host import _lane_offsets, _ldmatrix_x4

    d = dump(1, 1, elem)
    row_bytes = d["wide_lane_row_bytes"]
    pairs, K = row_bytes // (2 * cf.CHUNK_BYTES), row_bytes // elem
    vals = _random_tile(cf.NARROW_BATCH_TILE, K, elem, seed)
    tile_words, tile_row = _padded_words(vals, row_bytes, elem)
    b_lane = _lane_offsets(dump, "ldsm_b8x2", tile_row)
    want = {p: _ldmatrix_x4(tile_words, 4, [o + 2 * p * cf.CHUNK_BYTES for o in b_lane])[:, :, 0]
            for p in range(pairs)}  # [32 lanes, 4 registers]: b0, b1 of chunk 2p, then of 2p + 1
    ex_words, byte_of = _stored_exchange(d, vals)
    bad = []
    for p in range(pairs):
        for lane in range(32):
            byte = byte_of[(lane, 0, p)]
            loaded = ex_words[byte // 4:byte // 4 + 4]
            for reg in range(4):
                if int(want[p][lane, reg]) != int(loaded[reg]):
                    bad.append((p, lane, reg, int(want[p][lane, reg]), int(loaded[reg])))
    return bad


@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("seed", [0, 1])
def test_narrow_loads_are_ldmatrix_b_fragments(plan_dump, elem, seed):
    """Why the narrow backward multiplies the right operands: for every lane, pair and register, the B fragment a
    lane loads from the wide exchange (one 16-byte load per pair, row lane / 4) is the one ldmatrix gives of dG^T
    from the natural layout (16-bit and float storage), and the kernel builds its registers in that order."""
    assert _narrow_fragment_mismatches(plan_dump, elem, seed) == []
    kernel = (ROOT / "csrc" / "fused" / "fused_common.cuh").read_text()
    assert "r[4] = {v[i].x, v[i].y, v[i].z, v[i].w};" in kernel
    assert "load_cg_16(v[i], src + wide_lane_byte(lane, 0, base + i, row_bytes), i < n);" in kernel
    # W^T is A and dG^T is B, the ring's operands swapped: 3xTF32's cross terms must keep the ring's order (its
    # small dG part times big W first), which mma_chunk's SWAPPED gives; both chains of the pair take it
    narrow = kernel[kernel.index("split_k_mma_narrow("):]
    assert narrow.count("mma_chunk<Op, true>(") == 2 and "mma_chunk<Op>(" not in narrow, "the cross terms' order"
    swapped = kernel[kernel.index("if constexpr (SWAPPED) {"):]
    assert swapped.index("Op::mma(d, a.big, b_small);") < swapped.index("Op::mma(d, a.small, b_big);")


@pytest.mark.parametrize("elem", ELEMS)
@pytest.mark.parametrize("seed", [0, 1])
def test_wide_loads_are_the_rings_ldmatrix_fragments(plan_dump, elem, seed):
    """Why the wide backward gives the ring's bits: for every lane, chunk and register, the A fragment a lane
    loads straight from the wide exchange is the one ldmatrix gives the ring from the natural layout, so the
    two run the same MMAs on the same operands in the same order (16-bit and float storage)."""
    assert _wide_fragment_mismatches(plan_dump, elem, seed) == []
    # the registers as split_k_mma_wide (fused_common.cuh) builds them from its two loads, as emulated above
    kernel = (ROOT / "csrc" / "fused" / "fused_common.cuh").read_text()
    assert "r0[4] = {a[i][0].x, a[i][1].x, a[i][0].y, a[i][1].y}" in kernel
    assert "r1[4] = {a[i][0].z, a[i][1].z, a[i][0].w, a[i][1].w}" in kernel


def test_wide_lstm_cell_stores_are_aligned_words(plan_dump):
    """The LSTM's 16-bit cell thread stores i, f (r' = 4j, 4j + 1) and g, o (4j + 2, 4j + 3) as two 4-byte
    words (fused_backward.cu's store_exchange<..., WIDE>): under wide_exchange_pos each pair lands in one
    aligned word, positions 2k and 2k + 1, in order."""
    d = plan_dump(1, 1, 2)
    pos = d["wide_exchange_pos"]
    for j in range(len(pos) // 4):
        for lo in (4 * j, 4 * j + 2):
            assert pos[lo] % 2 == 0 and pos[lo + 1] == pos[lo] + 1, (j, lo, pos[lo], pos[lo + 1])
    for j in range(4 * 768 // 4):  # the Python mirror over the flagship's units
        for lo in (4 * j, 4 * j + 2):
            p = cf.wide_exchange_pos(lo, 2)
            assert p % 2 == 0 and cf.wide_exchange_pos(lo + 1, 2) == p + 1 and p < 4 * 768, (j, lo)


def test_a_wide_word_without_the_transpose_is_caught(tmp_path, plan_dump):
    """A mutant of fused_plan.cuh whose wide_word is the identity (the exchange in the natural layout) makes
    the lanes' loads differ from the ring's fragments, and the check above sees it; the real header not."""
    from plan_dump import compile_mutant_plan_dump

    mutant = compile_mutant_plan_dump(tmp_path, WIDE_WORD_SITE, IDENTITY_WIDE_WORD)
    if mutant is None:
        pytest.skip("no host C++ compiler")
    assert mutant(1, 1)["wide_word"] == list(range(16))
    for elem in ELEMS:
        assert _wide_fragment_mismatches(plan_dump, elem) == [] == _narrow_fragment_mismatches(plan_dump, elem)
        assert _narrow_fragment_mismatches(mutant, elem), f"elem {elem}: the identity wide_word is not caught (narrow)"
        bad = _wide_fragment_mismatches(mutant, elem)
        assert bad, f"elem {elem}: the identity wide_word is not caught"
        # exactly the registers whose word the transpose moves: register reg of chunk c holds the pair's word
        # n = 8 c + 4 (reg / 2) + lane % 4 of its row, in place unless wide_word moves it (all but 0, 5, 10, 15)
        pairs = mutant(1, 1, elem)["wide_lane_row_bytes"] // (2 * cf.CHUNK_BYTES)
        word = {(c, lane, reg): 8 * c + 4 * (reg // 2) + lane % 4 for c in range(2) for lane in range(32)
                for reg in range(4)}
        moved = {(p, c, lane, reg) for p in range(pairs) for (c, lane, reg), n in word.items() if cf.wide_word(n) != n}
        assert {(p, c, lane, reg) for p, c, lane, reg, _, _ in bad} == moved


def _tile_blocks(d: dict, tile: str, B: int, H: int, warps: int) -> dict:
    """{(q, y): [(w, lane, b, j)]} of the backward ``tile``'s cell threads (the dump's bwd_<tile>_cells), checked
    to run each of a block's (b, j) (bwd_batch_tile rows x WIDE_UNITS units) on exactly one of its ``warps`` x 32
    threads, over the whole grid (<tile>_grid), and every (b < B, j < H) once."""
    rows = cf.bwd_batch_tile(tile)
    gq, gy = d[f"{tile}_grid"]
    blocks = {}
    for q, y, w, lane, b, j in d[f"bwd_{tile}_cells"]:
        blocks.setdefault((q, y), []).append((w, lane, b, j))
    assert set(blocks) == {(q, y) for q in range(gq) for y in range(gy)}
    seen = set()
    for (q, y), threads in blocks.items():
        assert len(threads) == warps * 32
        cells = sorted((b, j) for _, _, b, j in threads)
        assert cells == sorted((y * rows + r, q * cf.WIDE_UNITS + u) for r in range(rows)
                               for u in range(cf.WIDE_UNITS)), (q, y)
        seen |= {(b, j) for b, j in cells if b < B and j < H}
    assert len(seen) == B * H
    return blocks


def _block_products(blocks: dict, tile: str, B: int, H: int, n_gates: int):
    """For random dG and W_hh (float64): dG W_hh [B, H], and per block (q, y) the block's product from its rows of
    dG (r' order, zero past B) and its 16 rows of w_bwd: [rows, 16 units] (wide), or its transpose (narrow)."""
    torch.manual_seed(H + n_gates)
    w = torch.randn(n_gates * H, H, dtype=torch.float64)
    dg = torch.randn(B, n_gates * H, dtype=torch.float64)
    dg_x = dg[:, cf.backward_col_index(H, n_gates=n_gates)]
    w_bwd = cf.interleave_backward(w, n_gates)
    assert w_bwd.shape[0] % cf.WIDE_UNITS == 0  # whole 16-unit blocks of rows
    rows = cf.bwd_batch_tile(tile)
    products = {}
    for q, y in blocks:
        g_tile = torch.zeros(rows, n_gates * H, dtype=torch.float64)
        tile_rows = [b for b in range(y * rows, (y + 1) * rows) if b < B]
        g_tile[: len(tile_rows)] = dg_x[tile_rows]
        prod = g_tile @ w_bwd[q * cf.WIDE_UNITS:(q + 1) * cf.WIDE_UNITS].t()  # [rows, 16 units]
        products[q, y] = prod.t() if tile == "narrow" else prod
    return dg @ w, products


@pytest.mark.parametrize("n_gates", [4, 3], ids=["lstm", "gru"])
@pytest.mark.parametrize("B, H", [(1, 1), (5, 13), (17, 100), (16, 776)])
def test_wide_cells_cover_each_block_once(plan_dump, B, H, n_gates):
    """Each wide block (16 batch rows x WIDE_UNITS units) runs every one of its (b, j) on exactly one of its
    8 warps x 32 lanes, every (b < B, j < H) is run once over the grid, and thread (w, lane) reads element
    w % 4 of its fragment of n tile w / 4 of the block's product (sum_over_warps<2>): dG W_hh at (b, j)."""
    blocks = _tile_blocks(plan_dump(B, H), "wide", B, H, cf.WARPS)
    want, products = _block_products(blocks, "wide", B, H, n_gates)
    for (q, y), threads in blocks.items():
        prod = products[q, y]  # [16 batch, 16 units]: n tiles of 8 units
        for w_, lane, b, j in threads:
            nt = w_ // 4
            assert (b - y * cf.BATCH_TILE, j - q * cf.WIDE_UNITS) == (lane // 4 + 8 * ((w_ % 4) // 2),
                                                                     8 * nt + 2 * (lane % 4) + (w_ % 4) % 2)
            if b < B and j < H:
                assert torch.allclose(_fragment(prod[:, 8 * nt:8 * nt + 8], lane, w_ % 4), want[b, j])


@pytest.mark.parametrize("n_gates", [4, 3], ids=["lstm", "gru"])
@pytest.mark.parametrize("B, H", [(1, 1), (5, 13), (17, 100), (16, 776)])
def test_narrow_cells_cover_each_block_once(plan_dump, B, H, n_gates):
    """Each narrow block (NARROW_BATCH_TILE rows x WIDE_UNITS units) runs every one of its (b, j) on exactly one
    lane of warps 0-3, every (b < B, j < H) is run once over the grid, and thread (w, lane) reads element w of
    its fragment of the block's product W^T dG^T (16 units x 8 rows: sum_over_warps's): dG W_hh at (b, j)."""
    blocks = _tile_blocks(plan_dump(B, H), "narrow", B, H, 4)  # warps 0-3 (CELL_WARPS)
    want, products = _block_products(blocks, "narrow", B, H, n_gates)
    for (q, y), threads in blocks.items():
        for w_, lane, b, j in threads:
            if b < B and j < H:
                assert torch.allclose(_fragment(products[q, y], lane, w_), want[b, j]), (q, y, w_, lane)


@pytest.mark.parametrize("B, H", SHAPES)
def test_ring_cells_are_unchanged(plan_dump, B, H):
    """Blocks of UNITS units (the ring's backward): warps 0-3, the map of before the wide backward."""
    d = plan_dump(B, H)
    for q, y, w, lane, b, j in d["bwd_cells"]:
        assert w < 4
        old = (y * cf.BATCH_TILE + (lane >> 2) + ((w >> 1) & 1) * 8, q * cf.UNITS + 2 * (lane & 3) + (w & 1))
        assert (b, j) == old == cf.bwd_cell(q, y, w, lane) == cf.bwd_cell(q, y, w, lane, "ring")


def test_wide_batches_at_the_flagship(plan_dump):
    """The slots hold the busiest warp's pairs at the flagship (B = 16, H = 768) in 16 bits in one batch (one
    L2 round trip): the LSTM's 4H = 3072 (12 pairs), the GRU's 3H (9); float's 24 and 18 and the LSTM's 16
    pairs at H = 1024 take two."""
    cases = [(768, 2, "4", 12, 1), (768, 2, "3", 9, 1), (768, 4, "4", 24, 2), (768, 4, "3", 18, 2),
             (1024, 2, "4", 16, 2), (1024, 2, "3", 12, 1)]
    for H, elem, gates, longest, batches in cases:
        d = plan_dump(16, H, elem)
        ranges = d["bwd_gate_k" if gates == "4" else "bwd_gru_gate_k"]
        assert d["bwd_gate_k_longest"][gates] == longest == max(e - b for b, e in ranges), (H, elem, gates)
        assert d["bwd_wide_batches"][gates] == batches == -(-longest // d["WIDE_PAIR_SLOTS"]), (H, elem, gates)
        assert cf.bwd_wide_batches(H, elem, int(gates)) == batches
    assert plan_dump(16, 768)["wide_grid"] == [48, 1]  # half the ring's 96 blocks


def _header_backward_smem_bytes(tmp_path):
    """fused_backward.cu's own backward_smem_bytes, cut out of the source and compiled on the host over
    fused_plan.cuh: ``f(H, P, proj, elem, gates, tile) -> int`` (tile: the C API's code), or None without a host
    C++ compiler."""
    import re
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    src = (ROOT / "csrc" / "fused" / "fused_backward.cu").read_text()
    m = re.search(r"^size_t backward_smem_bytes\(.*?^}\n", src, re.S | re.M)
    assert m, "backward_smem_bytes not found in fused_backward.cu"
    prog = tmp_path / "smem.cpp"
    prog.write_text('#include <cstddef>\n#include <cstdio>\n#include <cstdlib>\n#include "fused/fused_plan.cuh"\n'
                    "using namespace lstm::fused;\n" + m.group(0)
                    + "int main(int c, char** v) {\n  std::printf(\"%zu\\n\", backward_smem_bytes(std::atoi(v[1]), "
                    "std::atoi(v[2]), std::atoi(v[3]), std::atoi(v[4]), std::atoi(v[5]), std::atoi(v[6])));\n}\n")
    exe = tmp_path / "smem"
    subprocess.run([cxx, "-std=c++17", f"-I{ROOT / 'csrc'}", str(prog), "-o", str(exe)], check=True)

    def f(H, P, proj, elem, gates, tile):
        args = [str(int(a)) for a in (H, P, proj, elem, gates, tile)]
        return int(subprocess.run([str(exe), *args], capture_output=True, text=True, check=True).stdout)

    return f


def test_wide_backward_shared_memory(tmp_path):
    """The wide block's shared memory: WIDE_UNITS rows of the W^T slice (K = gates H padded to kpad, rows
    padded smem_pad), no ring, and the partial sums of 8 warps x 2 n tiles x 4 elements x 32 lanes (floats):
    at the flagship in 16 bits 16 (3072 + 8) 2 + 8 8 32 4 = 106752 bytes; the Python mirror and
    fused_backward.cu's backward_smem_bytes agree with that layout."""
    def layout(H, elem, gates, tile="wide"):
        row_bytes = (cf.round_up(gates * H, cf.KPAD_BYTES // elem) + cf.SMEM_PAD_BYTES // elem) * elem
        units = cf.UNITS if tile == "ring" else cf.WIDE_UNITS
        ring = cf.WARPS * cf.WARP_RING_BYTES if tile == "ring" else 0
        tiles = 2 if tile == "wide" else 1  # 16 x 8 tiles of a warp's partial sums: the wide warp's two n tiles
        partial_sums = cf.WARPS * 4 * tiles * 32 * 4  # [WARPS][4 NT][32] floats
        return units * row_bytes + ring + partial_sums

    assert layout(768, 2, 4) == 16 * (3072 + 8) * 2 + 8 * 8 * 32 * 4 == 98560 + 8192 == 106752
    assert layout(768, 2, 4, "narrow") == 98560 + 4096 == 102656
    assert cf.backward_smem_bytes(768, elem=2, n_gates=4, tile="wide") == 106752
    assert cf.backward_smem_bytes(768, elem=2, n_gates=4, tile="narrow") == 102656
    header = _header_backward_smem_bytes(tmp_path)
    for H in (1, 13, 100, 768, 776, 1024):
        for elem in ELEMS:
            for gates in (4, 3):
                for tile, code in cf.BWD_TILES.items():
                    want = layout(H, elem, gates, tile)
                    assert cf.backward_smem_bytes(H, None, elem, gates, tile) == want, (H, elem, gates, tile)
                    if header is not None:
                        assert header(H, H, False, elem, gates, code) == want, (H, elem, gates, tile)
    for tile in ("wide", "narrow"):
        assert cf.backward_smem_bytes(768, elem=2, n_gates=4, tile=tile) + cf.STATIC_SMEM_BYTES <= cf.SMEM_OPTIN_SM80
