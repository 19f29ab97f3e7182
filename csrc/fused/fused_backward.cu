// Fused backward recurrence (BPTT) at the budget of one step (issue 13): one launch for all
// T steps and the dh0 pass (persistent, light grid barrier), or with the same tile code (same
// bits) one launch per (half-)step. fp16, bf16 and float (Op, fused_common.cuh), where the W
// slice fits in shared memory (see below). Also serves proj_size (PROJ, see above the kernel)
// and variable lengths (batch_sizes).
//
// Legend: T steps, B batch, H hidden units, r the reduction index over 4H, K4p = 4H rounded up
// to kpad(sizeof(T)); a chunk = 32 bytes of r (fused_plan.cuh). Gate order along 4H: i, f, g, o.
// (The GRU's: 3H, K3p, r, z, n; see "The GRU" below.)
// Per step t from T-1 down to 0, for active rows:
//   dh  = dh_all[t] + (row active at t+1 ? dG_{t+1} W_hh : dh_T)
//   dc  = (row active at t+1 ? dc_{t+1} * f_{t+1} : dc_T)
//   dG_t, dc*f = cell_backward(dh, dc, act_t, c_{t-1}, c_t)                 (cell.cuh)
// then dh0 = dG_0 W_hh, dc0 = dc_0 * f_0. Inactive rows (batch_sizes) get dG_t = 0.
//
// The exchange is in the storage dtype: dG_t is rounded once to it (the value the dG output
// holds anyway) and the next step's product dG_{t+1} W_hh runs on those operands in Op's
// precision with fp32 accumulation, so W_hh stays resident in the storage dtype. In 16 bits the
// added error against an fp32 exchange is one rounding: fp16 2^-11 relative (as tf32), bf16
// 2^-8; tests/test_cuda_plan_host.py bounds its effect on a whole BPTT against float64 (well
// inside DESIGN.md's 1e-2 for 16-bit dtypes). Float exchanges fp32 (nothing added).
//
// Tiling: grid (ceil(H / UNITS), ceil(B / BATCH_TILE)); block q owns units [8q, 8q + 8) for
// batch rows [16y, 16y + 16) and holds W_hh[:, units] in shared memory for the whole launch as
// [unit][r'] with the reduction index interleaved on the host, r' = 4j + g <-> r = g*H + j
// (w_bwd [ceil(H/16)*16, 4H]); the dG exchange buffer dgx uses the same r' order, so a cell
// thread stores its four gate gradients as one 8-byte (float: 16-byte) store. 8 warps split the
// pairs of chunks of K4p (two accumulators per warp to halve the dependent chain); products dG
// (16 x K4p, A operand) x W^T slice (B operand, ldmatrix from the resident slice). dG is not held
// whole: each warp streams its own k range of dG_{t+1} from L2 through a private ring in shared
// memory (split_k_mma_16x8_streamed: 4 slots of 2 pairs of chunks x 16 rows, 3 stages in flight
// while it multiplies the oldest; cp.async issued by every warp, no block barrier). Partial sums
// meet once in shared memory and warps 0-3 finish one (b, j) per lane in the fixed order w = 0..7.
//
// Per step (persistent launch, flagship H100, B = 16, H = 768: 96 blocks):
// | part of one backward step                                              | budget |
// |---|---|
// | grid barrier (one release-add per block after the dG_t exchange stores:  | <= 0.7 us |
// |   one fence; dG, d_hn, dh_tot stored after it; acquire-poll by warp 0)    |           |
// | dG_{t+1}: each warp streams its 16 x 384 slice (12 KB in 16 bits, 24 KB | ~0.9 us |
// |   in float) through its ring, overlapped with its MMAs                   |           |
// | MMA from the resident W^T slice, 8 warps, 24 HMMA per warp (float: 48    | <= 0.5 us |
// |   tf32, or 144 for fp32 accuracy plus the split of each fragment)        |           |
// | reduce partials once through smem; cell backward in registers, dc reg   | <= 0.2 us |
// |   (its one activation, tanh(c_t): the fast formula in 16 bits and tf32,   |           |
// |   one MUFU.EX2 + one MUFU.RCP; tanhf at float32 accuracy)                 |           |
// | act_t, c_t, c_{t-1}, dh_all[t] prefetched before the barrier wait        | hidden |
// | **backward step**                                                        | **<= 3 us** |
// Block barriers per step: 2 (after warp 0's grid wait; after the partial sums), and the cell
// warps' named barrier before the arrival. Grid barriers: 1 (PROJ: 4 + 2 and 2).
// The grid wait's time bound (barrier_wait.cuh) adds nothing to a wait whose first poll finds the
// barrier open; after a closed poll, lane 0 reads the abort flag and %globaltimer (one L2 load and
// one clock read per extra poll, under the poll's own round trip).
// Shared memory per block: 8 * (K4p * e + 16) + 8 * 9216 (rings) + 4096 bytes, e = sizeof(T):
// 124.1 KB at H = 768 in 16 bits, 172.1 KB in float; the largest H served is
// 2408 (16-bit) and 1204 (float) in sm_90's 227 KB, 1384 and 692 in sm_80's 163 KB; PROJ
// + (8 + 16) * (Pk * e + 16).
// The dG_{t+1} stream is the largest part: every block reads the 16 rows x 4H of its batch
// tile, 96 blocks x 98 KB = 9.4 MB of L2 reads per step at the flagship in 16 bits (18.9 MB in
// float); it is the first thing to measure on a GPU.
//
// THE WIDE BACKWARD (TILE = BWD_WIDE, LSTM_KERNELS_CUDA_FUSED_BACKWARD=wide; no PROJ; fused_plan.cuh): blocks of
// WIDE_UNITS = 16 units, two n8 tiles, grid (ceil(H / 16), ceil(B / 16)): 48 blocks at the flagship, so the
// grid reads dG_{t+1} half as often, 48 blocks x 98 KB = 4.7 MB of L2 reads per step in 16 bits. Each warp
// loads its k range (12 pairs at the flagship, WIDE_PAIR_SLOTS at a time) straight into A fragments, one
// 16-byte ld.global.cg per row half and pair, all 24 in flight at once (split_k_mma_wide), from an
// exchange laid out for those loads (wide_exchange_pos: the cell thread's gate gradients land where a
// lane's 16 bytes are its ldmatrix registers of both chunks); so no ring, no cp.async, no shared-memory
// copy of dG, and the W^T slice (16 rows) is the only shared operand: 2 ldmatrix.x4 and 4 HMMA per pair,
// 48 HMMA per warp per step (the ideal for 16 units), the same MMAs on the same operands in the same order
// as the ring's, so the same bits. Every warp runs the cell for one (b, j) per lane (256 per block).
// | part of one backward step (wide, flagship)                               | estimate |
// |---|---|
// | grid barrier, as above                                                   | <= 0.7 us |
// | dG_{t+1}: 12 KB per warp, 98 KB per SM in one round of loads; the grid's | ~0.9 us |
// |   4.7 MB is below L2's bandwidth, the SM's port (~64 B/clk) bounds it     |          |
// | 48 HMMA per warp as the loads land, B by ldmatrix (96 KB of shared reads | <= 0.5 us |
// |   per SM per step, where the ring reads 144 KB and writes 96 KB)          |          |
// | reduce (8 tiles of partial sums) and the cell                            | <= 0.2 us |
// | **backward step**                                                        | **<= 2.3 us** |
// The price: 170 registers (16-bit LSTM on sm_90, no spill; the 24 loads' 96), the slots' unrolled code,
// one L2 round trip per 12 pairs of a warp's range (two in float at the flagship: 24 pairs, 9.4 MB per step
// where the ring reads 18.9), and 16 x (K4p e + 16) + 8 KB of shared memory (106.8 KB at H = 768 in 16
// bits, sm_80 holds it too; 204.9 KB in float, sm_90 only). Which of the two wins is for a GPU to measure; the
// default stays the ring.
//
// THE NARROW BACKWARD (TILE = BWD_NARROW, LSTM_KERNELS_CUDA_FUSED_BACKWARD=narrow; no PROJ; fused_plan.cuh): the
// wide backward's 16 units for NARROW_BATCH_TILE = 8 batch rows, grid (ceil(H / 16), ceil(B / 8)): 96 blocks at
// the flagship, each reading 8 rows of dG_{t+1}, so an SM takes 49 KB per step where a wide or a ring block takes
// 98 KB (the grid's 4.7 MB of L2 reads per step in 16 bits, as the wide backward's). The operands swap: the
// resident W^T slice (16 units x K4p) is the MMA's A (ldmatrix, ldsm_a16), dG_{t+1}^T (K4p x 8 rows) its B, loaded
// straight from the wide backward's exchange layout, where a lane's 16 bytes of row lane / 4 of a pair are its B
// registers b0, b1 of both chunks (split_k_mma_narrow): per pair one 16-byte load and 2 HMMA, 24 HMMA per warp
// per step at the flagship in 16 bits (the ideal for 16 x 8; half the wide warp's), 12 loads in flight at once
// (one batch, one L2 round trip; two in float). In 16 bits a warp whose range fits the WIDE_PAIR_SLOTS slots
// (the LSTM up to H = 768, the GRU up to 1024) holds its A fragments of W^T in registers for the whole
// launch (96 of them), so its step reads no shared memory but the partial sums; otherwise 2 ldmatrix.x4 per
// pair. The accumulators are the transpose of the ring's (rows units, columns batch rows), so warps 0-3 run the
// cell as the ring's do, one (b, j) per lane (bwd_cell_unit / bwd_cell_row), and each sum is the ring's products
// in the ring's order (the same k order inside each MMA, 3xTF32's cross terms in the ring's order, chunk 0 and 1
// of a pair in two chains, the warps in order): the same bits, which the GPU test checks.
// | part of one backward step (narrow, flagship)                              | estimate |
// |---|---|
// | grid barrier, as above (96 arrivals per step, as the ring's)              | <= 0.7 us |
// | dG_{t+1}: 6 KB per warp, 49 KB per SM in one round of loads               | ~0.45 us |
// | 24 HMMA per warp as the loads land, A from registers (float, or a longer | <= 0.3 us |
// |   range: by ldmatrix, 96 KB of shared reads per SM per step)              |          |
// | reduce (one tile of partial sums) and the cell                           | <= 0.2 us |
// | **backward step**                                                        | **<= 1.65 us** |
// The price: ceil(B / 8) batch tiles, twice the wide grid's blocks (192 at B = 32, H = 768: more than an H100
// holds at the one block per SM its registers allow, so the per-step launches serve); 199 to 200 registers on
// sm_90 in 16 bits (W^T's 96 and the loads' 48; no spill), 102 to 121 in float; the register path's unrolled code
// beside the loop; the wide block's shared memory less one tile of partial sums, 16 x (K4p e + 16) + 4 KB
// (102.7 KB at H = 768 in 16 bits; on sm_90 the LSTM up to H = 1776 in 16 bits, 888 in float). Which of the three
// wins is for a GPU to measure; the default stays the ring.
//
// RESETS (resets [T, B] uint8, as the forward's): nothing flows back across a reset. The cell thread
// prefetches its row's flag of step t with the step's other inputs (one byte load, hidden) and, where
// set, takes c_{t-1} = 0 in the forget gate's gradient, keeps dc_{t-1} = 0 and writes zeros to the dG
// exchange (dG_t itself unchanged), so dh_{t-1} = dG_t W_hh is 0 for the row (dh0, dc0 too at t = 0).
// Cost per step: one load and a few selects; nothing in the k loop, no extra barrier.
//
// The GRU (GATES = 3, no PROJ; the equations above the kernel): the reduction over 3H in the order
// r' = 3j + g, the exchange [d_r, d_z, d_hn] (three 16-bit stores per cell thread), the carry
// dh z in the register of the LSTM's dc. Its dG ring takes one pair of chunks per stage (7 stages
// in the warp's ring): 3H = 2304 gives each warp 9 pairs at the flagship in 16 bits, which 2-pair
// stages would round up to 10 (a zero pair multiplied); so 18 HMMA per warp per step, the ideal,
// 3/4 of the LSTM's 24. Shared memory: 8 * (K3p * e + 16) + the rings + 4096 bytes (112.1 KB at
// H = 768 in 16 bits), so the largest H served is 4/3 of the LSTM's.
//
// Structural checks: as fused_forward.cu (tests/test_cuda_step_budget.py).
#include <cuda_runtime.h>

#include "common/cell.cuh"
#include "fused/fused_common.cuh"
#include "fused/fused_launch.cuh"
#include "fused/fused_lstm.h"

namespace lstm {
namespace fused {

// The cell's gradients of one (b, j), rounded once to T (the values dG holds and the next step
// multiplies): the LSTM's d_i, d_f, d_g, d_o; the GRU's d_r, d_z, d_hn, d_n (the first three are the
// gradient of its recurrent product h_{t-1} W_hh^T's rows).
template <typename T>
struct alignas(4 * sizeof(T)) RoundedGrads {
  T v[4];
};
template <typename T>
__device__ __forceinline__ RoundedGrads<T> round_grads(const GateGrads& d) {
  return {{from_float<T>(d.i), from_float<T>(d.f), from_float<T>(d.g), from_float<T>(d.o)}};
}
template <typename T>
__device__ __forceinline__ RoundedGrads<T> round_grads(const GruGrads& d) {
  return {{from_float<T>(d.r), from_float<T>(d.z), from_float<T>(d.hn), from_float<T>(d.n)}};
}

// The recurrent product's gradient to the exchange (r' order), what other blocks read: the LSTM's
// four at r' = 4j .. 4j + 3 as one 8-byte (float: 16-byte) store, the GRU's three at r' = 3j .. 3j + 2.
// RESETS and `cut` (the row starts step t from zero state): zeros, so dh_{t-1} = dG_t W_hh is 0 for
// the row (dG itself unchanged).
// LOADED (the wide and the narrow backward): their layout (fused_plan.cuh's wide_exchange_pos): each 4-byte word
// where the transpose puts it (ex: the row's first element, j the unit); otherwise ex is the unit's first gate's
// element.
template <typename T>
struct alignas(2 * sizeof(T)) TwoGrads {
  T v[2];
};
template <typename T, int GATES, bool RESETS, bool LOADED = false>
__device__ __forceinline__ void store_exchange(T* ex, int j, const RoundedGrads<T>& g, bool cut) {
  const bool zero_it = RESETS && cut;
  if constexpr (LOADED) {
    const RoundedGrads<T> v = zero_it ? RoundedGrads<T>{} : g;
    if constexpr (GATES == 4 && sizeof(T) == 2) {  // i, f and g, o: one word each
      *reinterpret_cast<TwoGrads<T>*>(ex + wide_exchange_pos(4 * j, 2)) = TwoGrads<T>{{v.v[0], v.v[1]}};
      *reinterpret_cast<TwoGrads<T>*>(ex + wide_exchange_pos(4 * j + 2, 2)) = TwoGrads<T>{{v.v[2], v.v[3]}};
    } else {
#pragma unroll
      for (int g = 0; g < GATES; ++g) ex[wide_exchange_pos(bwd_col(g, j, GATES), (int)sizeof(T))] = v.v[g];
    }
  } else if constexpr (GATES == 4) {
    *reinterpret_cast<RoundedGrads<T>*>(ex) = zero_it ? RoundedGrads<T>{} : g;
  } else {
    const T zero = from_float<T>(0.f);
    ex[0] = zero_it ? zero : g.v[0], ex[1] = zero_it ? zero : g.v[1], ex[2] = zero_it ? zero : g.v[2];
  }
}

// The same gradients to the outputs, issued after the block's arrival (no other block reads them):
// dG (PyTorch gate order, stride H; the GRU's d_r, d_z, d_n) and the GRU's d_hn (d_hn_out). A row
// inactive at the step passes RoundedGrads<T>{}: zeros.
template <typename T, int GATES>
__device__ __forceinline__ void store_outputs(T* dg, int H, T* d_hn_out, const RoundedGrads<T>& g) {
  dg[0] = g.v[0], dg[H] = g.v[1];
  if constexpr (GATES == 4) {
    dg[2 * H] = g.v[2], dg[3 * H] = g.v[3];
  } else {
    dg[2 * H] = g.v[3], *d_hn_out = g.v[2];
  }
}

// PROJ (proj_size P < H): a step has two half-steps, each closed by one grid barrier.
//   A': dh_t = dh_all[t] + dG_{t+1} W_hh (K = 4H) by the blocks q < ceil(P / 8) (8 columns p of
//       W_hh each), to dh_tot (fp32, for dW_hr = sum_t dh_t^T m_t on the host) and the 16-bit
//       exchange dhx; in the dh0 pass this is dh0;
//   B': dm_t = dh_t W_hr (K = P) by every block for its 8 units (W_hr^T slice resident), then
//       the cell backward with dm_t in place of dh.
// Without PROJ, one half-step per step (the cell takes dh = dh_all[t] + dG_{t+1} W_hh).
// Half-steps hs = NPH*it + phase, it = T-1-t from 0 to T (T: the dh0 pass); a launch runs
// [hs_begin, hs_end), all in the persistent launch, one in the per-step mode (same bits).
//
// GATES = 3, the GRU (no PROJ): K = 3H, r' = 3j + g; the exchange holds d_r, d_z, d_hn (the gradient of
// h_{t-1} W_hh^T's rows) and dc_reg the carry dh_{t+1} z_{t+1} (the part of dh_t that skips W_hh):
//   dh  = dh_all[t] + (row active at t+1 ? [d_r, d_z, d_hn]_{t+1} W_hh + carry : dh_T)
//   d_r, d_z, d_n, d_hn, carry = gru_cell_backward(dh, r, z, n, hn, h_{t-1})       (cell.cuh)
// with act = r, z, n and c_all = hn from the forward, h_{t-1} from h_all (h0 at t = 0: the c0 slot);
// dc_T, dc0 unused, d_hn written.
template <typename Op, bool PROJ, bool RESETS, int GATES, int TILE = BWD_RING, typename T = typename Op::T>
__global__ void __launch_bounds__(THREADS, 1)
    fused_backward_kernel(const T* __restrict__ w_bwd,        // [ceil(P/16)*16, GATES*H] W_hh^T, columns interleaved
                          const T* __restrict__ w_hrT,        // [ceil(H/8)*8, P] W_hr^T (PROJ)
                          const float* __restrict__ act,      // [T, B, GATES*H] fp32 activations from forward
                          const float* __restrict__ c_all,    // [T, B, H] fp32 cell states (the GRU's hn)
                          const T* __restrict__ c0,           // [B, H] (the GRU's h0)
                          const T* __restrict__ h_all,        // [T, B, H] the forward's h_t (GRU)
                          T* __restrict__ d_hn,               // [T, B, H] out: d_hn (GRU)
                          const T* __restrict__ dh_all,       // [T, B, P]
                          const T* __restrict__ dh_T,         // [B, P]
                          const T* __restrict__ dc_T,         // [B, H]
                          float* dc_work,                     // [B, H] fp32 carried dc between launches
                          T* dgx,                             // [2, Bp, K4p] dG exchange (r' order), zeroed (K3p)
                          T* dhx,                             // [Bp, Pk] dh exchange (PROJ), zeroed
                          T* __restrict__ dG,                 // [T, B, GATES*H] out (PyTorch gate order)
                          T* __restrict__ dh0,                // [B, P] out (dh0 pass)
                          T* __restrict__ dc0,                // [B, H] out (dh0 pass)
                          float* __restrict__ dh_tot,         // [T, B, P] fp32 out: dh_t (PROJ)
                          const int* __restrict__ batch_sizes,  // [T] int32, or null
                          unsigned int* counters,             // [gridDim.y] zeroed (several half-steps)
                          int T_, int B, int H, int P, int hs_begin, int hs_end,
                          BarrierWatch watch,  // the time bound of the grid wait (barrier_wait.cuh)
                          const unsigned char* __restrict__ resets) {  // [T, B] uint8 (RESETS), else unused
  static_assert(GATES == 4 || (GATES == 3 && !PROJ), "the LSTM, or the GRU without a projection");
  static_assert(TILE == BWD_RING || !PROJ, "the wide and the narrow backward serve no projection");
  constexpr bool WIDE = TILE == BWD_WIDE, NARROW = TILE == BWD_NARROW;
  constexpr bool LOADED = WIDE || NARROW;  // dG loaded straight into MMA fragments, in wide_exchange_pos's layout
  constexpr int NPH = PROJ ? 2 : 1;
  constexpr int BU = bwd_units(TILE), NT = WIDE ? 2 : 1;  // units per block; 16 x 8 tiles of each warp's product
  constexpr int kCellWarps = WIDE ? WARPS : CELL_WARPS;  // warps that run the cell (one (b, j) per lane)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int abort_s;  // the grid wait gave up: every thread of the block leaves
  constexpr int E = sizeof(T);
  const int K4 = GATES * H, Kp = round_up(K4, kpad(E)), LD = Kp + smem_pad(E), Bp = round_up(B, BATCH_TILE);
  const int Pk = round_up(P, kpad(E)), LDP = Pk + smem_pad(E);
  T* w_s = reinterpret_cast<T*>(smem_raw);                      // [BU][LD]
  unsigned char* ring = reinterpret_cast<unsigned char*>(w_s + BU * LD);  // [WARPS][WARP_RING_BYTES] (the ring's)
  float* red = reinterpret_cast<float*>(ring + (LOADED ? 0 : WARPS * WARP_RING_BYTES));  // [WARPS][4 NT][32]
  T* wr_s = reinterpret_cast<T*>(red + WARPS * 4 * NT * 32);    // [UNITS][LDP] (PROJ)
  T* d_s = wr_s + UNITS * LDP;                                   // [BATCH_TILE][LDP] (PROJ)
  const int q = blockIdx.x, b0 = blockIdx.y * bwd_batch_tile(TILE);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const size_t BH = (size_t)B * H, BP = (size_t)B * P, B4H = GATES * BH, gx_slot = (size_t)Bp * Kp;
  const bool w_block = !PROJ || q * UNITS < P;  // owns columns [8q, 8q + 8) of W_hh
  unsigned int* counter = counters + blockIdx.y;

  if (w_block) block_load_padded(w_s, LD, w_bwd + (size_t)q * BU * K4, BU, K4, Kp);
  if (PROJ) block_load_padded(wr_s, LDP, w_hrT + (size_t)q * UNITS * P, UNITS, P, Pk);
  // Cell thread of warps 0-3 (WIDE: of every warp): element warp % 4 of the lane's accumulator fragment
  // of n tile warp / 4 (rows b, cols j; NARROW: rows j, cols b).
  const bool cell_warp = warp < kCellWarps;
  const int j = bwd_cell_unit(q, warp, lane, TILE), b = bwd_cell_row(blockIdx.y, warp, lane, TILE);
  const bool mine = cell_warp && j < H && b < B;
  const bool mine_p = PROJ && cell_warp && j < P && b < B;  // half-step A': column p = j of dh
  const size_t s = (size_t)b * H + j;
  float dc_reg = 0.f;  // the LSTM's dc; the GRU's carry dh_{t+1} z_{t+1}
  if (mine && hs_begin > 0) dc_reg = dc_work[s];
  // Prefetched inputs of the cell at step t: activations (i, f, g, o; r, z, n), c_t (hn), c_{t-1}
  // (h_{t-1}), dh_all[t] (without PROJ), and (RESETS) whether row b starts step t from zero state.
  float p_i = 0.f, p_f = 0.f, p_g = 0.f, p_o = 0.f, p_c = 0.f, p_cp = 0.f, p_dh = 0.f;
  int p_cut = 0;
  auto prefetch = [&](int t) {
    if (!mine || t < 0) return;
    const float* a = act + t * B4H + (size_t)b * K4 + j;
    p_i = a[0], p_f = a[H], p_g = a[2 * H];
    if constexpr (GATES == 4) p_o = a[3 * H];
    p_c = c_all[t * BH + s];
    if constexpr (GATES == 4) {
      p_cp = t > 0 ? c_all[(t - 1) * BH + s] : to_float(c0[s]);
    } else {
      p_cp = to_float(t > 0 ? h_all[(t - 1) * BH + s] : c0[s]);
    }
    if (!PROJ) p_dh = to_float(dh_all[t * BH + s]);
    if constexpr (RESETS) p_cut = resets[(size_t)t * B + b];
  };
  // With a reset at step t (RESETS, p_cut) the cell backward takes c_{t-1} = 0 (the forget gate's
  // gradient) and nothing flows back: dc_{t-1} = 0 (dc_reg), dh_{t-1} = 0 (the zeroed exchange).
  const int it_first = hs_begin / NPH, it_end = (hs_end + NPH - 1) / NPH;
  prefetch(T_ - 1 - it_first);
  const KRange gate_k = bwd_gate_k(warp, H, E, GATES);  // pairs of chunks of K = 4H (3H)
  const KRange proj_k = bwd_proj_k(warp, P, E);  // pairs of chunks of K = P (PROJ)
  const int kp_begin = gate_k.begin, kp_end = gate_k.end, kq_begin = proj_k.begin, kq_end = proj_k.end;
  const unsigned int arrivals = gridDim.x;  // one per block and half-step (block_arrive)
  // Lane addresses of ldmatrix (fused_plan.cuh), in bytes: B = units (p) x r' (A = dG rows x r' is streamed);
  // PROJ half-step B': A = dh rows (batch) x p, B = W_hr^T rows (units) x p.
  const uint32_t w_base = smem_addr(w_s) + ldsm_b8x2(lane, LD * E);
  // NARROW: W^T is the A operand (ldsm_a16); in 16 bits a warp whose range fits WIDE_PAIR_SLOTS pairs holds its
  // fragments in registers for the whole launch, read from shared memory once (float, longer ranges: every step).
  const uint32_t wa_base = smem_addr(w_s) + ldsm_a16(lane, LD * E);
  constexpr int kWSlots = NARROW && !Op::kTf32 ? WIDE_PAIR_SLOTS : 1;
  Frag<Op> w_reg[kWSlots][2];
  const bool w_in_registers = kWSlots == WIDE_PAIR_SLOTS && kp_end - kp_begin <= WIDE_PAIR_SLOTS;
  if constexpr (kWSlots == WIDE_PAIR_SLOTS) {
    __syncthreads();  // the resident slice is in shared memory
    if (w_in_registers) {
#pragma unroll
      for (int i = 0; i < kWSlots; ++i)
        if (i < kp_end - kp_begin) {
          w_reg[i][0] = ldsm_frag<Op>(wa_base + (kp_begin + i) * 2 * CHUNK_BYTES);
          w_reg[i][1] = ldsm_frag<Op>(wa_base + (kp_begin + i) * 2 * CHUNK_BYTES + CHUNK_BYTES);
        }
    }
  }
  const uint32_t d_base = smem_addr(d_s) + ldsm_a16(lane, LDP * E);
  const uint32_t r_base = smem_addr(wr_s) + ldsm_b8x2(lane, LDP * E);

  for (int it = it_first; it < it_end; ++it) {
    const int t = T_ - 1 - it;  // t == -1: the dh0 pass
    const int n_next = t == T_ - 1 ? 0 : (batch_sizes ? __ldg(batch_sizes + t + 1) : B);  // rows active at t+1
    const int n_t = t < 0 ? 0 : (batch_sizes ? __ldg(batch_sizes + t) : B);
    const int hs_a = NPH * it;
    if (hs_a >= hs_begin) {  // ---- dG_{t+1} W_hh (and, without PROJ, the cell) ----
      // [1] dG_{t+1} of every block of this batch tile is stored; each warp streams its k range
      if (!block_wait(counter, (unsigned int)(hs_a - hs_begin) * arrivals, hs_a > hs_begin, watch, t + 1, warp, lane,
                      &abort_s))
        return;
      const T* dg_next = dgx + ((t + 1) & 1) * gx_slot + (size_t)b0 * Kp;
      float rec;  // [2] partial sums in red
      if constexpr (WIDE) {
        rec = split_k_mma_wide<Op, NT, WIDE_PAIR_SLOTS>(reinterpret_cast<const unsigned char*>(dg_next), Kp * E,
                                                         w_base, LD * E, kp_begin, kp_end, b0 < n_next, red, warp,
                                                         lane);
      } else if constexpr (NARROW) {
        rec = split_k_mma_narrow<Op, WIDE_PAIR_SLOTS, kWSlots>(reinterpret_cast<const unsigned char*>(dg_next),
                                                               Kp * E, wa_base, w_reg, w_in_registers, kp_begin,
                                                               kp_end, b0 < n_next, red, warp, lane);
      } else {
        rec = split_k_mma_16x8_streamed<Op, bwd_stage_pairs(GATES)>(dg_next, Kp, ring + warp * WARP_RING_BYTES,
                                                                    w_base, kp_begin, kp_end, w_block && b0 < n_next,
                                                                    red, warp, lane);
      }
      if (cell_warp) {
        // The cell, then the stores other blocks read (dG_t to dgx; PROJ: dh_t to dhx), the block's
        // arrival, and only then the outputs, so the arrival's fence does not wait for them.
        const bool from_next = b < n_next;  // else this row's gradient enters here: dh_T, dc_T
        const bool step_row = !PROJ && mine && t >= 0 && b < n_t;  // the cell runs for this (b, j) at step t
        RoundedGrads<T> g{};
        float dh_in = 0.f, dc_in = 0.f, dh_p = 0.f;  // dh_p: PROJ's dh_t
        if (PROJ) {
          if (mine_p) {
            const size_t sp = (size_t)b * P + j;
            dh_in = from_next ? rec : to_float(dh_T[sp]);
            if (t >= 0 && b < n_t) {
              dh_p = dh_in + to_float(dh_all[t * BP + sp]);
              dhx[(size_t)b * Pk + j] = from_float<T>(dh_p);
            }
          }
        } else if (mine) {
          // the GRU's carry dh_{t+1} z_{t+1} joins dG_{t+1} W_hh (0 where step t + 1 reset the row)
          dh_in = from_next ? rec + (GATES == 3 ? dc_reg : 0.f) : to_float(dh_T[s]);
          dc_in = GATES == 3 ? 0.f : from_next ? dc_reg : to_float(dc_T[s]);
        }
        if (step_row) {
          const bool cut = RESETS && p_cut;
          if constexpr (GATES == 4) {
            GateGrads d;
            float dc_prev;
            cell_backward<typename Op::Activations>(dh_in + p_dh, dc_in, Gates{p_i, p_f, p_g, p_o}, cut ? 0.f : p_cp,
                                                    p_c, &d, &dc_prev);
            dc_reg = cut ? 0.f : dc_prev;
            g = round_grads<T>(d);
          } else {
            GruGrads d;
            gru_cell_backward(dh_in + p_dh, GruGates{p_i, p_f, p_g}, p_c, cut ? 0.f : p_cp, &d);
            dc_reg = cut ? 0.f : d.h_prev;
            g = round_grads<T>(d);
          }
          T* ex_row = dgx + (t & 1) * gx_slot + (size_t)b * Kp;
          store_exchange<T, GATES, RESETS, LOADED>(LOADED ? ex_row : ex_row + bwd_col(0, j, GATES), j, g, cut);
        }
        const bool arrive = hs_a + 1 < hs_end;
        if (arrive) block_arrive<kCellWarps * 32>(counter);  // this block's dG_t (PROJ: dh_t) stored: release
        if (arrive && !PROJ) prefetch(t - 1);  // the next step's inputs, before the wait
        if (PROJ) {
          if (mine_p) {
            const size_t sp = (size_t)b * P + j;
            if (t < 0) {
              dh0[sp] = from_float<T>(dh_in);
            } else {
              dh_tot[t * BP + sp] = b < n_t ? dh_p : 0.f;
            }
          }
        } else if (mine) {
          if (t < 0) {
            dh0[s] = from_float<T>(dh_in);
            if constexpr (GATES == 4) dc0[s] = from_float<T>(dc_in);
          } else {  // g is zero for a row inactive at step t
            store_outputs<T, GATES>(dG + t * B4H + (size_t)b * K4 + j, H, d_hn + t * BH + s, g);
          }
        }
      }
    }
    if (PROJ && hs_a + 1 >= hs_begin && hs_a + 1 < hs_end) {  // ---- dm_t = dh_t W_hr, the cell ----
      const int hs_b = hs_a + 1;
      if (t >= 0) {
        // [3] dh_t of every block of this batch tile is stored; each warp copies its k columns
        if (!block_wait(counter, (unsigned int)(hs_b - hs_begin) * arrivals, hs_b > hs_begin, watch, t, warp, lane,
                        &abort_s))
          return;
        if (b0 < n_t)
          warp_fetch_columns(d_s, LDP, dhx + (size_t)b0 * Pk, Pk, kq_begin * 2 * CHUNK_BYTES / E,
                             kq_end * 2 * CHUNK_BYTES / E, lane);
        const float dm =  // [4] partial sums in red
            split_k_mma_16x8<Op>(d_base, r_base, kq_begin, kq_end, b0 < n_t, red, warp, lane);
        if (cell_warp) {
          const bool step_row = mine && b < n_t;
          RoundedGrads<T> g{};
          if (step_row) {
            const float dc_in = b < n_next ? dc_reg : to_float(dc_T[s]);
            GateGrads d;
            float dc_prev;
            cell_backward<typename Op::Activations>(dm, dc_in, Gates{p_i, p_f, p_g, p_o},
                                                    RESETS && p_cut ? 0.f : p_cp, p_c, &d, &dc_prev);
            dc_reg = RESETS && p_cut ? 0.f : dc_prev;
            g = round_grads<T>(d);
            store_exchange<T, GATES, RESETS>(dgx + (t & 1) * gx_slot + (size_t)b * Kp + bwd_col(0, j), j, g, p_cut);
          }
          if (hs_b + 1 < hs_end) {
            block_arrive(counter);  // this block's dG_t stored: release
            prefetch(t - 1);
          }
          if (mine) store_outputs<T, GATES>(dG + t * B4H + (size_t)b * K4 + j, H, nullptr, g);  // zero if inactive
        }
      } else if (mine) {  // the dh0 pass: dc0
        dc0[s] = from_float<T>(b < n_next ? dc_reg : to_float(dc_T[s]));
      }
    }
  }
  if (mine && dc_work) dc_work[s] = dc_reg;
}

size_t backward_smem_bytes(int H, int P, bool proj, int elem, int gates, int tile = BWD_RING) {
  const int LD = round_up(gates * H, kpad(elem)) + smem_pad(elem), LDP = round_up(P, kpad(elem)) + smem_pad(elem);
  const int nt = tile == BWD_WIDE ? 2 : 1;  // 16 x 8 tiles of a warp's partial sums
  return (size_t)bwd_units(tile) * LD * elem + (tile == BWD_RING ? (size_t)WARPS * WARP_RING_BYTES : 0) +
         (size_t)WARPS * 4 * nt * 32 * sizeof(float) + (proj ? (size_t)(UNITS + BATCH_TILE) * LDP * elem : 0);
}

// Whether the backward's `tile` (BWD_WIDE or BWD_NARROW) serves (H, P) when asked for: no projection, and its
// block's shared memory within the current device's opt-in (on sm_90 the LSTM up to H = 1744 wide and 1776 narrow
// in 16 bits, 872 and 888 in float, where the ring's reaches 2408 and 1204); else the ring serves. The plan and
// the launch ask the same question, so they describe the same kernel.
template <typename Op, bool PROJ, bool RESETS, int GATES, int TILE>
bool serves_tile(int H, int P) {
  if constexpr (PROJ || TILE == BWD_RING) {
    return false;
  } else {
    bool fits = false;
    if (kernel_smem_fits(fused_backward_kernel<Op, false, RESETS, GATES, TILE>,
                         backward_smem_bytes(H, P, false, sizeof(typename Op::T), GATES, TILE), &fits) != cudaSuccess)
      cudaGetLastError();  // not left pending for the launch to report; the ring's plan asks again
    return fits;
  }
}

template <typename Op, bool PROJ, bool RESETS, int GATES, int TILE, typename T = typename Op::T>
cudaError_t backward_launch(const void* w_bwd, const void* w_hrT, const float* act, const float* c_all,
                            const void* c0, const void* h_all, void* d_hn, const void* dh_all, const void* dh_T,
                            const void* dc_T, float* dc_work, void* dgx, void* dhx, void* dG, void* dh0, void* dc0,
                            float* dh_tot, const int* batch_sizes, const unsigned char* resets, unsigned int* counters,
                            int T_, int B, int H, int P, int persistent, BarrierWatch watch, cudaStream_t stream) {
  const dim3 grid(bwd_unit_blocks(H, TILE), bwd_batch_tiles(B, TILE));
  return launch_half_steps(fused_backward_kernel<Op, PROJ, RESETS, GATES, TILE>, grid,
                           backward_smem_bytes(H, P, PROJ, sizeof(T), GATES, TILE), (PROJ ? 2 : 1) * (T_ + 1),
                           persistent, counters, watch, resets, stream, static_cast<const T*>(w_bwd),
                           static_cast<const T*>(w_hrT), act, c_all, static_cast<const T*>(c0),
                           static_cast<const T*>(h_all), static_cast<T*>(d_hn), static_cast<const T*>(dh_all),
                           static_cast<const T*>(dh_T), static_cast<const T*>(dc_T), dc_work, static_cast<T*>(dgx),
                           static_cast<T*>(dhx), static_cast<T*>(dG), static_cast<T*>(dh0), static_cast<T*>(dc0),
                           dh_tot, batch_sizes, counters, T_, B, H, P);
}

template <typename Op, bool PROJ, bool RESETS, int GATES, int TILE>
cudaError_t backward_plan(int B, int H, int P, int* blocks, size_t* smem, int* possible) {
  *smem = backward_smem_bytes(H, P, PROJ, sizeof(typename Op::T), GATES, TILE);
  *blocks = bwd_unit_blocks(H, TILE) * bwd_batch_tiles(B, TILE);
  return kernel_plan(fused_backward_kernel<Op, PROJ, RESETS, GATES, TILE>, *smem, *blocks, possible);
}

// Calls f(proj, resets, gates, tile) (std::integral_constant's) for the backward instance that serves the call:
// with_instance's, with the tile asked for (BWD_WIDE, BWD_NARROW) where serves_tile, else the ring's.
template <typename Op, typename F>
cudaError_t with_backward_instance(bool proj, bool resets, int gates, int tile, int H, int P, F&& f) {
  return with_instance(proj, resets, gates, [&](auto with_proj, auto with_resets, auto cell_gates) {
    constexpr bool kProj = decltype(with_proj)::value, kResets = decltype(with_resets)::value;
    constexpr int kGates = decltype(cell_gates)::value;
    using Wide = std::integral_constant<int, BWD_WIDE>;
    using Narrow = std::integral_constant<int, BWD_NARROW>;
    if (tile == BWD_WIDE && serves_tile<Op, kProj, kResets, kGates, BWD_WIDE>(H, P)) {
      if constexpr (!kProj) return f(with_proj, with_resets, cell_gates, Wide{});
    }
    if (tile == BWD_NARROW && serves_tile<Op, kProj, kResets, kGates, BWD_NARROW>(H, P)) {
      if constexpr (!kProj) return f(with_proj, with_resets, cell_gates, Narrow{});
    }
    return f(with_proj, with_resets, cell_gates, std::integral_constant<int, BWD_RING>{});
  });
}

}  // namespace fused
}  // namespace lstm

// C entry points (dtype: with_op's codes, as lstm_fused_forward; proj: P < H with w_hrT, dhx and
// dh_tot; gates 4 the LSTM, 3 the GRU with h_all and d_hn; tile: BWD_WIDE or BWD_NARROW (fused_plan.cuh) where it
// serves, BWD_RING (0) the ring's).
// Return a cudaError_t code.
extern "C" int lstm_fused_backward(int dtype, const void* w_bwd, const void* w_hrT, const float* act,
                                   const float* c_all, const void* c0, const void* dh_all, const void* dh_T,
                                   const void* dc_T, float* dc_work, void* dgx, void* dhx, void* dG, void* dh0,
                                   void* dc0, float* dh_tot, const int* batch_sizes, const unsigned char* resets,
                                   unsigned int* counters, int T, int B, int H, int P, int persistent,
                                   unsigned long long* barrier_state, long long* barrier_record,
                                   long long barrier_timeout_ns, long long barrier_kernel, void* stream, int gates,
                                   const void* h_all, void* d_hn, int tile) {
  using namespace lstm::fused;
  const lstm::BarrierWatch watch{barrier_state, barrier_record, barrier_timeout_ns, barrier_kernel};
  return with_op(dtype, [&](auto op) {
    using Op = decltype(op);
    return with_backward_instance<Op>(
        w_hrT != nullptr, resets != nullptr, gates, tile, H, P,
        [&](auto proj, auto with_resets, auto cell_gates, auto served) {
          return backward_launch<Op, decltype(proj)::value, decltype(with_resets)::value,
                                 decltype(cell_gates)::value, decltype(served)::value>(
              w_bwd, w_hrT, act, c_all, c0, h_all, d_hn, dh_all, dh_T, dc_T, dc_work, dgx, dhx, dG, dh0, dc0,
              dh_tot, batch_sizes, resets, counters, T, B, H, P, persistent, watch,
              static_cast<cudaStream_t>(stream));
        });
  });
}

extern "C" int lstm_fused_backward_plan(int dtype, int B, int H, int P, int resets, int* blocks, size_t* smem,
                                        int* possible, int gates, int tile, int* tile_serves) {
  using namespace lstm::fused;
  return with_op(dtype, [&](auto op) {
    using Op = decltype(op);
    return with_backward_instance<Op>(P != H, resets != 0, gates, tile, H, P,
                                      [&](auto proj, auto with_resets, auto cell_gates, auto served) {
                                        *tile_serves = decltype(served)::value;
                                        return backward_plan<Op, decltype(proj)::value, decltype(with_resets)::value,
                                                             decltype(cell_gates)::value, decltype(served)::value>(
                                            B, H, P, blocks, smem, possible);
                                      });
  });
}
