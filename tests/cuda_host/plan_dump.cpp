// Host program over csrc/fused_plan.cuh (compiled by g++ in tests/test_cuda_plan_host.py):
// prints the fused kernels' plan for "B H" as JSON, so Python can check it without a GPU.
#include <cstdio>
#include <cstdlib>

#include "fused_plan.cuh"

using namespace lstm::fused;

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  const int B = std::atoi(argv[1]), H = std::atoi(argv[2]);
  std::printf("{\"WARPS\": %d, \"THREADS\": %d, \"UNITS\": %d, \"BATCH_TILE\": %d, \"FWD_ROWS\": %d, \"KPAD\": %d, "
              "\"SMEM_PAD\": %d,\n", WARPS, THREADS, UNITS, BATCH_TILE, FWD_ROWS, KPAD, SMEM_PAD);
  std::printf("\"grid\": [%d, %d],\n\"fwd_row\": [", unit_blocks(H), batch_tiles(B));
  for (int g = 0; g < 4; ++g)
    for (int j = 0; j < H; ++j) std::printf("%s%d", g || j ? ", " : "", fwd_row(g, j));
  std::printf("],\n\"bwd_col\": [");
  for (int g = 0; g < 4; ++g)
    for (int j = 0; j < H; ++j) std::printf("%s%d", g || j ? ", " : "", bwd_col(g, j));
  // cell threads: [q, y, w, lane, b, j] for the forward and the backward
  for (int pass = 0; pass < 2; ++pass) {
    std::printf("],\n\"%s\": [", pass == 0 ? "fwd_cells" : "bwd_cells");
    bool first = true;
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
  // warp k ranges for the forward (KS = Kp/16) and the backward (pairs: Kp4/32)
  const int ks_f = round_up(H, KPAD) / 16, kp_b = round_up(4 * H, KPAD) / 32;
  std::printf("],\n\"ks_fwd\": %d, \"kpairs_bwd\": %d,\n\"fwd_k\": [", ks_f, kp_b);
  for (int w = 0; w < WARPS; ++w) {
    int b, e;
    warp_k_range(w, ks_f, &b, &e);
    std::printf("%s[%d, %d]", w ? ", " : "", b, e);
  }
  std::printf("],\n\"bwd_k\": [");
  for (int w = 0; w < WARPS; ++w) {
    int b, e;
    warp_k_range(w, kp_b, &b, &e);
    std::printf("%s[%d, %d]", w ? ", " : "", b, e);
  }
  // ldmatrix lane offsets for a tile of row stride LD = 40 (any stride: the maps are linear in it)
  const char* names[3] = {"ldsm_a16x16", "ldsm_b2n8k16", "ldsm_bn8k32"};
  for (int f = 0; f < 3; ++f) {
    std::printf("],\n\"%s\": [", names[f]);
    for (int lane = 0; lane < 32; ++lane) {
      const int o = f == 0 ? ldsm_a16x16(lane, 40) : f == 1 ? ldsm_b2n8k16(lane, 40) : ldsm_bn8k32(lane, 40);
      std::printf("%s%d", lane ? ", " : "", o);
    }
  }
  std::printf("]}\n");
  return 0;
}
