// Host program over csrc/fused/fused_plan.cuh (compiled by g++ in tests/test_cuda_plan_host.py):
// prints the fused kernels' plan for "B H [elem [P]]" as JSON, so Python can check it without a GPU.
// elem: bytes of the storage type (2: fp16/bf16, default; 4: float), for the reduction's chunks;
// P: the state size (proj_size; default H), for the warps' k ranges.
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

#include "fused/fused_plan.cuh"

using namespace lstm::fused;

int main(int argc, char** argv) {
  if (argc < 3 || argc > 5) return 2;
  const int B = std::atoi(argv[1]), H = std::atoi(argv[2]), elem = argc >= 4 ? std::atoi(argv[3]) : 2;
  const int P = argc == 5 ? std::atoi(argv[4]) : H;
  if (elem != 2 && elem != 4) return 2;
  std::printf("{\"WARPS\": %d, \"THREADS\": %d, \"UNITS\": %d, \"BATCH_TILE\": %d, \"FWD_ROWS\": %d, "
              "\"CHUNK_BYTES\": %d, \"KPAD_BYTES\": %d, \"SMEM_PAD_BYTES\": %d,\n",
              WARPS, THREADS, UNITS, BATCH_TILE, FWD_ROWS, CHUNK_BYTES, KPAD_BYTES, SMEM_PAD_BYTES);
  std::printf("\"STAGE_PAIRS\": %d, \"RING_STAGES\": %d, \"STAGE_ROW_BYTES\": %d, \"STAGE_BYTES\": %d, "
              "\"WARP_RING_BYTES\": %d,\n", STAGE_PAIRS, RING_STAGES, STAGE_ROW_BYTES, STAGE_BYTES, WARP_RING_BYTES);
  // W_REG_CHUNKS: the forward's register slots for this elem (w_reg_chunks: 16 bits, or tf32)
  std::printf("\"bwd_stage_pairs\": {\"4\": %d, \"3\": %d}, \"W_REG_CHUNKS\": %d,\n", bwd_stage_pairs(4),
              bwd_stage_pairs(3), w_reg_chunks(elem));
  // kpad / smem_pad per element size, and k_chunks of a few padded K
  std::printf("\"kpad\": {\"2\": %d, \"4\": %d}, \"smem_pad\": {\"2\": %d, \"4\": %d},\n\"k_chunks\": [", kpad(2),
              kpad(4), smem_pad(2), smem_pad(4));
  bool first = true;
  for (int e = 2; e <= 4; e += 2)
    for (int Kp = kpad(e); Kp <= 8 * kpad(e); Kp += kpad(e)) {
      std::printf("%s[%d, %d, %d]", first ? "" : ", ", Kp, e, k_chunks(Kp, e));
      first = false;
    }
  std::printf("],\n\"tagged_pos\": [");
  for (int p = 0; p < 32; ++p) std::printf("%s%d", p ? ", " : "", tagged_pos(p));
  // tagged_lane_word at a row of 24 words (3 chunks): [lane, half, ks, word]
  std::printf("],\n\"tagged_lane_word\": [");
  for (int lane = 0; lane < 32; ++lane)
    for (int half = 0; half < 2; ++half)
      for (int ks = 0; ks < 3; ++ks)
        std::printf("%s[%d, %d, %d, %d]", lane || half || ks ? ", " : "", lane, half, ks,
                    tagged_lane_word(lane, half, ks, 24));
  std::printf("],\n\"elem\": %d,\n\"grid\": [%d, %d],\n\"fwd_row\": [", elem, unit_blocks(H), batch_tiles(B));
  for (int g = 0; g < 4; ++g)
    for (int j = 0; j < H; ++j) std::printf("%s%d", g || j ? ", " : "", fwd_row(g, j));
  std::printf("],\n\"bwd_col\": [");
  for (int g = 0; g < 4; ++g)
    for (int j = 0; j < H; ++j) std::printf("%s%d", g || j ? ", " : "", bwd_col(g, j));
  // cell threads: [q, y, w, lane, b, j] for the forward and the backward
  for (int pass = 0; pass < 2; ++pass) {
    std::printf("],\n\"%s\": [", pass == 0 ? "fwd_cells" : "bwd_cells");
    first = true;
    for (int q = 0; q < unit_blocks(H); ++q)
      for (int y = 0; y < batch_tiles(B); ++y)
        for (int w = 0; w < 4; ++w)
          for (int lane = 0; lane < 32; ++lane) {
            const int b = pass == 0 ? fwd_cell_row(y, w, lane) : bwd_cell_row(y, w, lane);
            const int j = pass == 0 ? fwd_cell_unit(q, lane) : bwd_cell_unit(q, w, lane);
            std::printf("%s[%d, %d, %d, %d, %d, %d]", first ? "" : ", ", q, y, w, lane, b, j);
            first = false;
          }
  }
  // the GRU forward's n product: [w, lane, source lane, element] of every cell thread
  std::printf("],\n\"fwd_n_fragment\": [");
  for (int w = 0; w < 4; ++w)
    for (int lane = 0; lane < 32; ++lane)
      std::printf("%s[%d, %d, %d, %d]", w || lane ? ", " : "", w, lane, fwd_n_lane(w, lane), fwd_n_element(w, lane));
  // warp k ranges as the kernels take them (fused_plan.cuh's fwd_gate_k, fwd_proj_k, bwd_gate_k,
  // bwd_proj_k, called by fused_forward.cu / fused_backward.cu), at state size P (default H): the
  // forward's gate product in chunks of K = P, the rest in pairs of chunks
  const int ks_f = k_chunks(round_up(H, kpad(elem)), elem), kp_b = k_chunks(round_up(4 * H, kpad(elem)), elem) / 2;
  std::printf("],\n\"ks_fwd\": %d, \"kpairs_bwd\": %d,\n\"P\": %d, \"fwd_gate_k_longest\": %d", ks_f, kp_b, P,
              fwd_gate_k_longest(P, elem));
  // (bwd_gru_gate_k: the GRU's, K = 3H)
  const char* products[5] = {"fwd_gate_k", "fwd_proj_k", "bwd_gate_k", "bwd_proj_k", "bwd_gru_gate_k"};
  for (int k = 0; k < 5; ++k) {
    std::printf(",\n\"%s\": [", products[k]);
    for (int w = 0; w < WARPS; ++w) {
      const KRange r = k == 0 ? fwd_gate_k(w, P, elem) : k == 1 ? fwd_proj_k(w, H, elem)
                     : k == 2 ? bwd_gate_k(w, H, elem) : k == 3 ? bwd_proj_k(w, P, elem) : bwd_gate_k(w, H, elem, 3);
      std::printf("%s[%d, %d]", w ? ", " : "", r.begin, r.end);
    }
    std::printf("]");
  }
  // the same at P = H, under the names the layout tests use
  std::printf(",\n\"fwd_k\": [");
  for (int w = 0; w < WARPS; ++w) {
    const KRange r = fwd_gate_k(w, H, elem);
    std::printf("%s[%d, %d]", w ? ", " : "", r.begin, r.end);
  }
  std::printf("],\n\"bwd_k\": [");
  for (int w = 0; w < WARPS; ++w) {
    const KRange r = bwd_gate_k(w, H, elem);
    std::printf("%s[%d, %d]", w ? ", " : "", r.begin, r.end);
  }
  // ldmatrix lane byte offsets for tiles of row stride 80 and 208 bytes (the maps are
  // row * ldb + byte column: two strides let Python recover both and apply any stride)
  const char* names[3] = {"ldsm_a16", "ldsm_b16", "ldsm_b8x2"};
  const int strides[2] = {80, 208};
  for (int f = 0; f < 3; ++f)
    for (int s = 0; s < 2; ++s) {
      std::printf("],\n\"%s@%d\": [", names[f], strides[s]);
      for (int lane = 0; lane < 32; ++lane) {
        const int ldb = strides[s];
        const int o = f == 0 ? ldsm_a16(lane, ldb) : f == 1 ? ldsm_b16(lane, ldb) : ldsm_b8x2(lane, ldb);
        std::printf("%s%d", lane ? ", " : "", o);
      }
    }
  // the wide backward (fused_plan.cuh, "THE WIDE BACKWARD"): its constants and grid at this B, H; the busiest
  // warp's pairs of the dG product and its batches of WIDE_PAIR_SLOTS pairs, for the LSTM (4) and the GRU (3)
  std::printf("],\n\"WIDE_UNITS\": %d, \"WIDE_PAIR_SLOTS\": %d, \"wide_grid\": [%d, %d],\n", WIDE_UNITS,
              WIDE_PAIR_SLOTS, bwd_unit_blocks(H, BWD_WIDE), bwd_batch_tiles(B, BWD_WIDE));
  std::printf("\"bwd_units\": {\"ring\": %d, \"wide\": %d, \"narrow\": %d}, \"ring_grid\": [%d, %d],\n",
              bwd_units(BWD_RING), bwd_units(BWD_WIDE), bwd_units(BWD_NARROW), bwd_unit_blocks(H, BWD_RING),
              bwd_batch_tiles(B, BWD_RING));
  // the narrow backward (fused_plan.cuh, "THE NARROW BACKWARD"): its batch tile and grid at this B, H
  std::printf("\"NARROW_BATCH_TILE\": %d, \"narrow_grid\": [%d, %d],\n", NARROW_BATCH_TILE,
              bwd_unit_blocks(H, BWD_NARROW), bwd_batch_tiles(B, BWD_NARROW));
  std::printf("\"bwd_tiles\": {\"ring\": %d, \"wide\": %d, \"narrow\": %d},\n", BWD_RING, BWD_WIDE, BWD_NARROW);
  std::printf("\"bwd_gate_k_longest\": {\"4\": %d, \"3\": %d}, \"bwd_wide_batches\": {\"4\": %d, \"3\": %d},\n",
              bwd_gate_k_longest(H, elem, 4), bwd_gate_k_longest(H, elem, 3), bwd_wide_batches(H, elem, 4),
              bwd_wide_batches(H, elem, 3));
  // the word transpose of a pair of chunks, and the exchange element of reduction index r over WIDE_DUMP_PAIRS
  // pairs at this elem
  const int WIDE_DUMP_PAIRS = 4, per_pair = 2 * CHUNK_BYTES / elem;
  std::printf("\"wide_word\": [");
  for (int w = 0; w < 16; ++w) std::printf("%s%d", w ? ", " : "", wide_word(w));
  std::printf("],\n\"wide_exchange_pos\": [");
  for (int r = 0; r < WIDE_DUMP_PAIRS * per_pair; ++r) std::printf("%s%d", r ? ", " : "", wide_exchange_pos(r, elem));
  // a lane's 16-byte loads, [lane, half, pair, byte], from rows of WIDE_DUMP_PAIRS whole pairs (the exchange's rows)
  const int wide_row_bytes = WIDE_DUMP_PAIRS * 2 * CHUNK_BYTES;
  std::printf("],\n\"wide_lane_row_bytes\": %d,\n\"wide_lane_byte\": [", wide_row_bytes);
  for (int lane = 0; lane < 32; ++lane)
    for (int half = 0; half < 2; ++half)
      for (int pair = 0; pair < WIDE_DUMP_PAIRS; ++pair)
        std::printf("%s[%d, %d, %d, %d]", lane || half || pair ? ", " : "", lane, half, pair,
                    wide_lane_byte(lane, half, pair, wide_row_bytes));
  // the cell threads [q, y, w, lane, b, j] of the wide backward (every warp, blocks of WIDE_UNITS units x
  // BATCH_TILE rows) and of the narrow one (warps 0 .. CELL_WARPS - 1, 16 units x NARROW_BATCH_TILE rows)
  for (const int tile : {BWD_WIDE, BWD_NARROW}) {
    std::printf("],\n\"bwd_%s_cells\": [", tile == BWD_WIDE ? "wide" : "narrow");
    first = true;
    for (int q = 0; q < bwd_unit_blocks(H, tile); ++q)
      for (int y = 0; y < bwd_batch_tiles(B, tile); ++y)
        for (int w = 0; w < (tile == BWD_WIDE ? WARPS : CELL_WARPS); ++w)
          for (int lane = 0; lane < 32; ++lane) {
            std::printf("%s[%d, %d, %d, %d, %d, %d]", first ? "" : ", ", q, y, w, lane,
                        bwd_cell_row(y, w, lane, tile), bwd_cell_unit(q, w, lane, tile));
            first = false;
          }
  }
  std::printf("]}\n");
  return 0;
}
