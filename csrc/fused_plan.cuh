// The tiling plan of the fused kernels (fused_forward.cu, fused_backward.cu) as plain
// arithmetic, __host__ __device__: the kernels index with these functions, and
// tests/test_cuda_plan_host.py compiles them into a host program (tests/cuda_host/plan_dump.cpp)
// to check them without a GPU against lstm_kernels/backends/cuda_fused.py, which interleaves
// the weights on the host with the same maps.
//
// Legend: B batch, H hidden units, g gate (0 i, 1 f, 2 g, 3 o), j unit, b batch row,
// K the reduction length, KS = Kp / 16 k16 steps.
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
constexpr int FWD_ROWS = 4 * UNITS;  // forward: W_hh rows per block, interleaved [gate][unit]
constexpr int KPAD = 32;        // K is padded to a multiple of KPAD (pairs of k16 steps)
constexpr int SMEM_PAD = 8;     // elements (16 bytes) of padding per shared row: ldmatrix without conflicts

FUSED_HD constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Grid of both kernels: (unit blocks, batch tiles).
FUSED_HD int unit_blocks(int H) { return (H + UNITS - 1) / UNITS; }
FUSED_HD int batch_tiles(int B) { return (B + BATCH_TILE - 1) / BATCH_TILE; }

// k16 steps [*begin, *end) of warp w out of KS (balanced to within one step, in order).
FUSED_HD void warp_k_range(int w, int KS, int* begin, int* end) {
  *begin = w * KS / WARPS;
  *end = (w + 1) * KS / WARPS;
}

// Forward interleaving: row of w_fwd [unit_blocks(H) * FWD_ROWS, H] that holds W_hh row g*H + j:
// block q = j / UNITS, local row 8g + u (u = j % UNITS). Rows of units >= H are zero.
FUSED_HD int fwd_row(int g, int j) { return (j / UNITS) * FWD_ROWS + g * UNITS + j % UNITS; }

// Forward cell thread: warp w < 4, lane l of block (q, y) runs unit fwd_cell_unit and row fwd_cell_row;
// its accumulators are tile (mt, nt = (w >> 1) & 1), element cc = w & 1 (i, g) and 2 + cc (f, o).
FUSED_HD int fwd_cell_unit(int q, int lane) { return q * UNITS + (lane >> 2); }
FUSED_HD int fwd_cell_row(int y, int w, int lane) {
  return y * BATCH_TILE + ((w >> 1) & 1) * 8 + 2 * (lane & 3) + (w & 1);
}

// Backward interleaving of the reduction index: r' = 4j + g <-> r = g*H + j, both for the
// columns of w_bwd [unit_blocks(H) * UNITS, 4H] (= W_hh^T, rows of units >= H zero) and the dG
// exchange buffer.
FUSED_HD int bwd_col(int g, int j) { return 4 * j + g; }

// Backward cell thread: warp w < 4, lane l: accumulator element e = w (rows b, columns j).
FUSED_HD int bwd_cell_unit(int q, int w, int lane) { return q * UNITS + 2 * (lane & 3) + (w & 1); }
FUSED_HD int bwd_cell_row(int y, int w, int lane) { return y * BATCH_TILE + (lane >> 2) + ((w >> 1) & 1) * 8; }

// ldmatrix.x4 lane addresses (element offsets into a shared tile of row stride ld): lane l gives
// row (l % 8) of 8x8 matrix l / 8, and receives in register i the elements (l / 4, 2 (l % 4) + {0, 1})
// of matrix i (PTX ISA). For mma.sync m16n8k16 (tests/test_cuda_plan_host.py emulates both):
//   A tile 16 x k16 of a [row][k] tile: matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
//   = the A fragment registers a0..a3;
FUSED_HD int ldsm_a16x16(int lane, int ld) { return ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8; }
//   two B tiles n8 x k16 of an [n][k] tile (n 0-7 and 8-15): matrices (n 0-7, k 0-7), (0-7, 8-15),
//   (8-15, 0-7), (8-15, 8-15) = b0, b1 of the first n tile, then of the second;
FUSED_HD int ldsm_b2n8k16(int lane, int ld) { return ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8; }
//   one B strip n8 x k32 of an [n][k] tile: matrices k 0-7, 8-15, 16-23, 24-31 = b0, b1 of two k16 steps.
FUSED_HD int ldsm_bn8k32(int lane, int ld) { return (lane & 7) * ld + (lane >> 3) * 8; }

}  // namespace fused
}  // namespace lstm
