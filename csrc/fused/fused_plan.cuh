// The tiling plan of the fused kernels (fused_forward.cu, fused_backward.cu) as plain
// arithmetic, __host__ __device__: the kernels index with these functions, and
// tests/test_cuda_plan_host.py compiles them into a host program (tests/cuda_host/plan_dump.cpp)
// to check them without a GPU against lstm_kernels/backends/cuda/fused.py, which interleaves
// the weights on the host with the same maps.
//
// Legend: B batch, H hidden units, g gate (0 i, 1 f, 2 g, 3 o), j unit, b batch row,
// K the reduction length, elem the bytes of the storage type (2: fp16/bf16, 4: float).
//
// The reduction is walked in chunks of 32 bytes of a row: k16 of a 16-bit type (one mma.sync
// m16n8k16) or k8 of float (one m16n8k8 on tf32). ldmatrix moves 16-byte rows of 8x8 b16 (= 8x4
// b32) matrices whatever the type, and the tf32 fragments of m16n8k8 sit where the b16 pairs of
// m16n8k16 sit, so the lane addresses below are in bytes and serve every storage type.
#pragma once

#if defined(__CUDACC__)
#define FUSED_HD __host__ __device__ __forceinline__
#else
#define FUSED_HD inline
#endif

namespace lstm {
namespace fused {

constexpr int WARPS = 8;        // every warp takes 1/WARPS of the reduction (K split across warps)
constexpr int THREADS = WARPS * 32;
constexpr int UNITS = 8;        // hidden units per block (all four gates of each)
constexpr int BATCH_TILE = 16;  // batch rows per block (batch tiles spread over gridDim.y)
constexpr int CELL_WARPS = 4;   // warps 0-3 finish the cross-warp sums, run the cell and store the exchange
constexpr int FWD_ROWS = 4 * UNITS;  // forward: W_hh rows per block, interleaved [gate][unit]
constexpr int CHUNK_BYTES = 32;     // one MMA's k extent: k16 of a 16-bit type, k8 of float
constexpr int KPAD_BYTES = 64;      // K is padded to pairs of chunks
constexpr int SMEM_PAD_BYTES = 16;  // padding per shared row: ldmatrix rows without bank conflicts
// The forward may keep each warp's k range of its resident W slice as MMA register fragments for
// the whole launch (16-bit types and tf32, not 3xTF32, whose small parts would double them): at most
// this many chunks, 8 registers each (2 x 16 rows). 16 bits: 8 chunks, 64 registers, a warp's range
// H / 128 chunks, so H <= 1024; tf32: 12 chunks (k8 each), 96 registers, a warp's range H / 64
// chunks, so H <= 768.
constexpr int W_REG_CHUNKS = 8;
constexpr int W_REG_CHUNKS_TF32 = 12;
FUSED_HD constexpr int w_reg_chunks(int elem) { return elem == 2 ? W_REG_CHUNKS : W_REG_CHUNKS_TF32; }

// The backward streams its dG operand per warp through a ring (fused_common.cuh,
// split_k_mma_16x8_streamed): RING_STAGES slots of STAGE_PAIRS pairs of chunks x BATCH_TILE rows,
// rows padded like every shared tile. 9 KB per warp, 72 KB per block, whatever H and the type.
// A stage of `pairs` pairs of chunks (the GRU's ring takes one: bwd_stage_pairs) is the same rows.
FUSED_HD constexpr int stage_row_bytes(int pairs) { return pairs * 2 * CHUNK_BYTES + SMEM_PAD_BYTES; }
FUSED_HD constexpr int stage_bytes(int pairs) { return BATCH_TILE * stage_row_bytes(pairs); }
constexpr int STAGE_PAIRS = 2;
constexpr int RING_STAGES = 4;
constexpr int STAGE_ROW_BYTES = stage_row_bytes(STAGE_PAIRS);
constexpr int STAGE_BYTES = stage_bytes(STAGE_PAIRS);
constexpr int WARP_RING_BYTES = RING_STAGES * STAGE_BYTES;

FUSED_HD constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }
// In elements of `elem` bytes: K padded to kpad(elem) (32 for 16-bit types, 16 for float), rows
// of shared tiles padded by smem_pad(elem), and the number of 32-byte chunks of a padded K.
FUSED_HD constexpr int kpad(int elem) { return KPAD_BYTES / elem; }
FUSED_HD constexpr int smem_pad(int elem) { return SMEM_PAD_BYTES / elem; }
FUSED_HD constexpr int k_chunks(int Kp, int elem) { return Kp * elem / CHUNK_BYTES; }

// Grid of both kernels: (unit blocks, batch tiles).
FUSED_HD int unit_blocks(int H) { return (H + UNITS - 1) / UNITS; }
FUSED_HD int batch_tiles(int B) { return (B + BATCH_TILE - 1) / BATCH_TILE; }

// Chunks (or pairs of chunks) [*begin, *end) of warp w out of KS (balanced to within one, in order).
FUSED_HD void warp_k_range(int w, int KS, int* begin, int* end) {
  *begin = w * KS / WARPS;
  *end = (w + 1) * KS / WARPS;
}

// The reduction each warp multiplies in each product of the kernels, as [begin, end) of 32-byte
// chunks (fwd_gate_k: the forward's h W_hh^T, K = P) or of pairs of chunks (fwd_proj_k: m W_hr^T,
// K = H; bwd_gate_k: dG W_hh, K = 4H, the GRU's 3H; bwd_proj_k: dh W_hr, K = P), K padded to kpad(elem). The
// kernels take their ranges from these, and tests/cuda_host/plan_dump.cpp prints them for every
// warp, so the structural check's per-warp MMA count follows the kernels' own arithmetic.
struct KRange {
  int begin, end;
};
FUSED_HD KRange warp_k_chunks(int w, int K, int elem, int per_unit) {
  KRange r;
  warp_k_range(w, k_chunks(round_up(K, kpad(elem)), elem) / per_unit, &r.begin, &r.end);
  return r;
}
FUSED_HD KRange fwd_gate_k(int w, int P, int elem) { return warp_k_chunks(w, P, elem, 1); }
FUSED_HD KRange fwd_proj_k(int w, int H, int elem) { return warp_k_chunks(w, H, elem, 2); }
// The longest of the warps' ranges fwd_gate_k: whether every warp's part of the forward's W slice fits
// w_reg_chunks(elem) register slots (the tagged exchange needs every warp on the register path).
FUSED_HD int fwd_gate_k_longest(int P, int elem) {
  return (k_chunks(round_up(P, kpad(elem)), elem) + WARPS - 1) / WARPS;
}
FUSED_HD KRange bwd_gate_k(int w, int H, int elem, int gates = 4) { return warp_k_chunks(w, gates * H, elem, 2); }
FUSED_HD KRange bwd_proj_k(int w, int P, int elem) { return warp_k_chunks(w, P, elem, 2); }

// Forward interleaving: row of w_fwd [unit_blocks(H) * FWD_ROWS, H] that holds W_hh row g*H + j:
// block q = j / UNITS, local row 8g + u (u = j % UNITS). Rows of units >= H are zero.
FUSED_HD int fwd_row(int g, int j) { return (j / UNITS) * FWD_ROWS + g * UNITS + j % UNITS; }

// Forward cell thread: warp w < 4, lane l of block (q, y) runs unit fwd_cell_unit and row fwd_cell_row;
// its accumulators are tile (mt, nt = (w >> 1) & 1), element cc = w & 1 (i, g) and 2 + cc (f, o).
FUSED_HD int fwd_cell_unit(int q, int lane) { return q * UNITS + (lane >> 2); }
FUSED_HD int fwd_cell_row(int y, int w, int lane) {
  return y * BATCH_TILE + ((w >> 1) & 1) * 8 + 2 * (lane & 3) + (w & 1);
}

// The GRU's forward (3 gates): its r, z rows are the LSTM's i, f rows (tile 0 of the interleaving); its n
// rows (w_fwd rows 16-23 of the block) are multiplied as the B operand of a transposed tile, hn^T [16 batch
// rows, 8 units] (accumulator tile (1, 0)). The cell thread of (warp w < 4, lane) reads its (b, j) there
// at fragment element fwd_n_element of lane fwd_n_lane: row (batch) 8 nt + 2 (lane % 4) + cc, column
// (unit) lane / 4, with nt, cc as for fwd_cell_row.
FUSED_HD int fwd_n_lane(int w, int lane) { return ((2 * (lane & 3) + (w & 1)) & 7) * 4 + ((lane >> 2) >> 1); }
FUSED_HD int fwd_n_element(int w, int lane) { return ((lane >> 2) & 1) + 2 * ((w >> 1) & 1); }

// Pairs of chunks per stage of the backward's dG ring (split_k_mma_16x8_streamed): STAGE_PAIRS for the
// LSTM; 1 for the GRU (gates = 3), whose 3H gives each warp an odd count of pairs at the flagship (9),
// which 2-pair stages would round up with a zero pair.
FUSED_HD constexpr int bwd_stage_pairs(int gates) { return gates == 4 ? STAGE_PAIRS : 1; }

// Backward interleaving of the reduction index: r' = 4j + g <-> r = g*H + j, both for the
// columns of w_bwd [bwd_unit_blocks(H, BWD_WIDE) * WIDE_UNITS, 4H] (= W_hh^T, rows of units >= H zero) and the dG
// exchange buffer; the GRU's (gates = 3) r' = 3j + g over 3H.
FUSED_HD int bwd_col(int g, int j, int gates = 4) { return gates * j + g; }

// The fused backward's tiles (the C API's `tile`, LSTM_KERNELS_CUDA_FUSED_BACKWARD; fused_backward_kernel's
// TILE): the ring's blocks (UNITS units x BATCH_TILE rows, dG streamed through a shared ring), the wide
// backward's (WIDE_UNITS x BATCH_TILE) and the narrow backward's (WIDE_UNITS x NARROW_BATCH_TILE), both
// loading dG straight into MMA fragments ("THE WIDE BACKWARD", "THE NARROW BACKWARD" below).
constexpr int BWD_RING = 0;
constexpr int BWD_WIDE = 1;
constexpr int BWD_NARROW = 2;
constexpr int WIDE_UNITS = 16;        // units per block of the wide and the narrow tiles
constexpr int NARROW_BATCH_TILE = 8;  // batch rows per block of the narrow tile

// Backward cell thread: warp w, lane l: element e = w % 4 of the lane's accumulator fragment of n tile
// w / 4. The ring's and the wide blocks' fragments are rows b, columns j (the ring's blocks of UNITS units use
// warps 0-3; the wide blocks of WIDE_UNITS two n tiles, every warp a cell warp); the narrow blocks' are the
// transpose, rows j (16 units), columns b (8 batch rows), warps 0-3.
FUSED_HD int bwd_cell_unit(int q, int w, int lane, int tile = BWD_RING) {
  if (tile == BWD_NARROW) return q * WIDE_UNITS + (lane >> 2) + ((w >> 1) & 1) * 8;
  return q * (tile == BWD_WIDE ? WIDE_UNITS : UNITS) + 8 * (w >> 2) + 2 * (lane & 3) + (w & 1);
}
FUSED_HD int bwd_cell_row(int y, int w, int lane, int tile = BWD_RING) {
  if (tile == BWD_NARROW) return y * NARROW_BATCH_TILE + 2 * (lane & 3) + (w & 1);
  return y * BATCH_TILE + (lane >> 2) + ((w >> 1) & 1) * 8;
}

// THE WIDE BACKWARD (LSTM_KERNELS_CUDA_FUSED_BACKWARD=wide; no projection): blocks of WIDE_UNITS units,
// half the blocks, so the grid reads dG_{t+1} from L2 half as often (every block reads its batch tile's
// whole dG). Each warp loads its k range of dG straight into MMA A fragments (no ring, no shared
// copy): lane l reads, for rows l / 4 and l / 4 + 8, the 16 bytes at byte 16 (l % 4) of each pair of
// chunks, and the exchange is laid out so that these are its A registers of both chunks of the pair,
// in the order ldmatrix delivers them from the natural layout (a0, a2 of chunk 0, then of chunk 1):
// the reduction index's 4-byte word w of a pair (64 bytes: 16 words) is stored at word
// wide_word(w) = 4 (w % 4) + w / 4 (a 4 x 4 transpose, its own inverse). The products then take the
// same operands in the same order as the ring's, so the two give the same bits. A warp takes its range
// WIDE_PAIR_SLOTS pairs at a time (8 registers each, a batch's loads all issued at once): one batch at
// the flagship in 16 bits (12 pairs), bwd_wide_batches of them where the range is longer.
constexpr int WIDE_PAIR_SLOTS = 12;
static_assert(WIDE_UNITS == 16 && NARROW_BATCH_TILE == 8,
              "bwd_cell_unit / bwd_cell_row: two n8 tiles of units (wide); one m16n8 tile, units x rows (narrow)");
FUSED_HD constexpr int bwd_units(int tile) { return tile == BWD_RING ? UNITS : WIDE_UNITS; }
FUSED_HD int bwd_unit_blocks(int H, int tile) { return (H + bwd_units(tile) - 1) / bwd_units(tile); }
FUSED_HD int wide_word(int w) { return (w & 3) * 4 + (w >> 2); }
// Element of a dG exchange row of the wide backward that holds reduction index r' (elements of `elem`
// bytes; a row is whole pairs of chunks, kpad).
FUSED_HD int wide_exchange_pos(int r, int elem) {
  const int per_pair = 2 * CHUNK_BYTES / elem, per_word = 4 / elem, e = r % per_pair;
  return r - e + wide_word(e / per_word) * per_word + e % per_word;
}
// Byte offset, from the batch tile's first row, of the 16 bytes lane `lane` loads of pair `pair` for
// its row `half` (0: row lane / 4, 1: that row + 8), rows of `row_bytes` bytes.
FUSED_HD int wide_lane_byte(int lane, int half, int pair, int row_bytes) {
  return ((lane >> 2) + 8 * half) * row_bytes + pair * 2 * CHUNK_BYTES + 16 * (lane & 3);
}
// The longest of the warps' ranges bwd_gate_k, in pairs (the wide backward's busiest warp).
FUSED_HD int bwd_gate_k_longest(int H, int elem, int gates) {
  return (k_chunks(round_up(gates * H, kpad(elem)), elem) / 2 + WARPS - 1) / WARPS;
}
// Batches of WIDE_PAIR_SLOTS pairs the wide backward's busiest warp loads per step (L2 round trips).
FUSED_HD int bwd_wide_batches(int H, int elem, int gates) {
  return (bwd_gate_k_longest(H, elem, gates) + WIDE_PAIR_SLOTS - 1) / WIDE_PAIR_SLOTS;
}

// THE NARROW BACKWARD (LSTM_KERNELS_CUDA_FUSED_BACKWARD=narrow; no projection): the wide backward's 16 units
// for NARROW_BATCH_TILE = 8 batch rows, with the operands swapped: the resident W^T slice (16 units x K) is the
// MMA's A (ldmatrix, ldsm_a16) and dG_{t+1}^T (K x 8 rows) its B, so a block reads 8 rows of dG, half the
// wide block's bytes (every SM half the ingress per step), and a warp issues half the wide warp's MMAs (one
// 16 x 8 tile per pair of chunks, where the wide warp multiplies two 16 x 8 tiles). The exchange is the wide
// backward's layout: lane l's 16 bytes of row l / 4 of a pair (wide_lane_byte, half 0 of the 8-row tile) are
// the words l % 4 and l % 4 + 4 of both chunks, which are the B fragment registers b0, b1 of both chunks, as
// ldsm_b8x2 delivers them from a natural [n][k] tile. Twice the wide grid's blocks (96 at the flagship), each
// reading 8 x 4H of dG: the grid's 4.7 MB per step in 16 bits, as the wide backward's.
// Batch rows per block of the backward's tile, and the grid's batch tiles (gridDim.y: one grid-barrier counter
// each).
FUSED_HD constexpr int bwd_batch_tile(int tile) { return tile == BWD_NARROW ? NARROW_BATCH_TILE : BATCH_TILE; }
FUSED_HD int bwd_batch_tiles(int B, int tile) { return (B + bwd_batch_tile(tile) - 1) / bwd_batch_tile(tile); }

// The forward's tagged exchange (fused_common.cuh, "the tagged exchange"): h_t as 8-byte words, each
// two consecutive units of one batch row (the low 32 bits: units 2p and 2p + 1 as a b16 pair, the
// lower unit in the low half, as ldmatrix delivers them) and the step's tag (the high 32 bits).
// Within each group of 8 pairs (one 32-byte chunk of a row) pair p sits at word tagged_pos(p):
// the two pairs one mma.sync lane takes from a row of a chunk, p and p + 4 (its B fragment
// registers b0, b1: ldsm_b16's matrices 0 and 1), are adjacent, so the lane reads them with one
// 16-byte load. A row of the buffer is Pk / 2 words (Pk = P padded to kpad(2): whole chunks).
FUSED_HD int tagged_pos(int pair) { return (pair & ~7) | ((pair & 3) << 1) | ((pair >> 2) & 1); }
// The first of the two words (pairs p, p + 4) that `lane` reads of chunk ks for its row `half` (0: row
// lane / 4 of the batch tile, 1: that row + 8), as a word offset from the tile's first row; chunk ks + i's
// are 8 i words further.
FUSED_HD int tagged_lane_word(int lane, int half, int ks, int row_words) {
  return ((lane >> 2) + 8 * half) * row_words + tagged_pos(8 * ks + (lane & 3));
}

// ldmatrix.x4 lane addresses, in bytes into a shared tile of row stride ldb bytes: lane l gives
// row (l % 8) of 8x8 b16 matrix l / 8 (16 bytes), and receives in register i the 32-bit word
// l % 4 of row l / 4 of matrix i (PTX ISA: b16 elements 2 (l % 4) and +1, or one b32). For
// mma.sync (m16n8k16 on b16, m16n8k8 on tf32; tests/test_cuda_plan_host.py emulates both):
//   A tile 16 rows x one chunk of a [row][k] tile: matrices (rows 0-7, bytes 0-15), (8-15, 0-15),
//   (0-7, 16-31), (8-15, 16-31) = the A fragment registers a0..a3;
FUSED_HD int ldsm_a16(int lane, int ldb) { return ((lane & 7) + ((lane >> 3) & 1) * 8) * ldb + (lane >> 4) * 16; }
//   two B tiles n8 x one chunk of an [n][k] tile (n 0-7 and 8-15): matrices (n 0-7, bytes 0-15),
//   (0-7, 16-31), (8-15, 0-15), (8-15, 16-31) = b0, b1 of the first n tile, then of the second;
FUSED_HD int ldsm_b16(int lane, int ldb) { return ((lane & 7) + (lane >> 4) * 8) * ldb + ((lane >> 3) & 1) * 16; }
//   one B strip n8 x two chunks of an [n][k] tile: matrices bytes 0-15, 16-31, 32-47, 48-63 = b0, b1
//   of two consecutive chunks.
FUSED_HD int ldsm_b8x2(int lane, int ldb) { return (lane & 7) * ldb + (lane >> 3) * 16; }

}  // namespace fused
}  // namespace lstm
