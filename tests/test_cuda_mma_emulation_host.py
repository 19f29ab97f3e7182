"""The fused kernels' tensor-core k loops emulated on the host, without a GPU: ldmatrix + mma.sync with
the lane addresses of csrc/fused/fused_plan.cuh (tests/cuda_host/plan_dump.cpp prints them) compute each
block's product, for every operand precision (the kernels' Op, csrc/fused/fused_common.cuh), the
forward's and the pair k loops and the backward's streamed ring; a wrong address is seen.
"""
from __future__ import annotations

import pytest
import torch

from lstm_kernels.backends.cuda import fused as cf

ELEMS = [2, 4]  # bytes of the storage type: 16-bit (fp16 / bf16) and float


# ---- ldmatrix + mma.sync emulated on the host, with the header's lane addresses ----------------
# Shared tiles are row-major values of `elem` bytes at byte 0; the lane addresses are byte offsets
# (fused_plan.cuh's ldsm_*), taken from the header dump. The kernels' Op (csrc/fused/fused_common.cuh):
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


def test_tagged_exchange_words_are_the_ldmatrix_fragments(plan_dump):
    """The tagged exchange (csrc/fused/fused_common.cuh): a lane's two 16-byte loads of chunk ks
    (tagged_lane_word, words w and w + 1, for rows lane/4 and lane/4 + 8) from an h tile packed as the
    producers store it (cf.pack_tagged: word tagged_pos(p) of row b holds units 2p, 2p + 1) deliver, in
    their low 32 bits, exactly the four registers ldmatrix gives at ldsm_b16 from the same tile in shared
    memory, for every lane and chunk; tagged_pos agrees with the header."""
    torch.manual_seed(8)
    d = plan_dump(1, 1)
    assert d["tagged_pos"] == [cf.tagged_pos(p) for p in range(32)]
    assert sorted(d["tagged_pos"]) == list(range(32)), "tagged_pos is a permutation within each chunk"
    row_words, chunks = 24, 3  # the header's dump: rows of 24 words, chunks 0-2
    Pk = 2 * row_words
    h = torch.randn(cf.BATCH_TILE, Pk).half()
    words = cf.pack_tagged(h, cf.BATCH_TILE, Pk)[1].reshape(-1)  # slot 1: [16 rows * 24 words]
    assert torch.equal(words >> 32, torch.zeros_like(words)), "h0 goes in under tag 0"
    low = (words & 0xFFFFFFFF).to(torch.int32)  # the b16 pairs, as a lane's registers hold them
    h_off = _lane_offsets(plan_dump, "ldsm_b16", Pk * 2)
    seen = {}
    for lane, half, ks, w in d["tagged_lane_word"]:
        seen[(lane, half, ks)] = w
    assert len(seen) == 32 * 2 * chunks
    for ks in range(chunks):
        regs = _ldmatrix_x4(h, 2, [o + ks * cf.CHUNK_BYTES for o in h_off])  # [32 lanes, 4 registers, 2 halves]
        want = regs.contiguous().view(torch.int32).reshape(32, 4)
        for lane in range(32):
            w0, w1 = seen[(lane, 0, ks)], seen[(lane, 1, ks)]
            assert w0 % 2 == 0 and w1 % 2 == 0, "a lane's pair of words is 16-byte aligned"
            assert seen[(lane, 0, ks)] == seen[(lane, 0, 0)] + 8 * ks, "slot i's words sit 8 i further"
            got = torch.stack([low[w0], low[w0 + 1], low[w1], low[w1 + 1]])
            assert torch.equal(got, want[lane]), (ks, lane, got, want[lane])


def test_tagged_exchange_producer_lanes_pair_consecutive_units():
    """The tagged store: the cell thread of an even unit j takes unit j + 1 of the same row from lane ^ 4
    (fused_forward.cu), so every word's two units come from one shuffle; a cell thread's unit is even
    exactly when bit 2 of its lane is clear."""
    for w in range(4):
        for lane in range(32):
            b, j = cf.fwd_cell(0, 0, w, lane)
            b2, j2 = cf.fwd_cell(0, 0, w, lane ^ 4)
            assert b2 == b and j2 == j ^ 1
            assert (j % 2 == 0) == ((lane >> 2) & 1 == 0)
