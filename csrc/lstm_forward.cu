// Forward recurrence of one LSTM layer, one direction, two variants sharing
// one tile function (forward_tile): the per-step fused kernel (recurrent
// matmul + cell update, one launch per step, W_hh read from global memory /
// L2) and the persistent cooperative kernel (one launch for all steps, W_hh
// slice in shared memory, grid sync between steps). Same tiles, same
// summation order: both give the same bits.
//
// Legend: T steps, B batch, H hidden units, k the reduction index over H.
// Gate order along 4H: i, f, g, o. gates_t = xg_t + h_{t-1} W_hh^T;
// c_t = f*c_{t-1} + i*g; h_t = o*tanh(c_t), rounded to the storage dtype.
// Accumulation, activations and c in fp32. The recurrent matmul runs on
// tensor cores when MMA is set (fp16/bf16 operands, or tf32 for float, which
// the caller asks for only where TF32 is allowed), else as plain fp32 FMA.
//
// Saved for backward (when asked): the activated gates act [T, B, 4H] fp32
// and the cell states c_all [T, B, H] fp32; backward recomputes only tanh(c).
#include <cooperative_groups.h>

#include <type_traits>

#include "cell.cuh"
#include "dtype_convert.cuh"
#include "lstm_cuda.h"
#include "mma_tile.cuh"
#include "persistent.cuh"
#include "static_switch.h"

namespace lstm {

// One (batch tile, unit tile) of one step: gates = xg_t + h_prev W^T for
// TILE_B rows x TILE_J units (all four gates), then the cell update. Called by
// every thread of the block (it holds __syncthreads). wload(g, jj, k) is
// W_hh[g*H + j0 + jj, k] in the storage type (from global memory, or from the
// block's shared copy in the persistent kernel); it is only called in range.
//
// The k loop stages TILE_K columns of h_prev and of the four gates' W rows in
// shared memory. With MMA, warps 0-3 each own one gate's 16 x 16 accumulator
// (rows b, units j) on tensor cores (mma_tile.cuh: fp16/bf16 operands, or tf32
// for float) and the tiles keep the storage type; without, each thread sums its
// own (b, j) for the four gates in fp32 FMA. Either way the four sums end in
// acc[] of thread (j, b). RESETS: rows b with resets_t[b] start the step from zero state: their
// h_prev row is staged as zeros and their c_prev is 0 (one byte load per staged element and per
// cell; the per-step kernels are the fallback, not held to the budget of one step).
template <typename T, bool MMA, bool RESETS, typename WLoad>
__device__ __forceinline__ void forward_tile(WLoad wload, int j0, int b0,
                                             const T* __restrict__ xg_t,    // [B, 4H]
                                             const T* h_prev,  // [B, H]; no __restrict__: other blocks write it
                                             const float* c_prev,           // [B, H] fp32, or null at t = 0 (then c0)
                                             const T* __restrict__ c0,      // [B, H]
                                             T* __restrict__ h_out,         // [B, H]
                                             float* c_out,                  // [B, H] fp32 (may alias c_prev)
                                             float* __restrict__ act_out,   // [B, 4H] fp32, or null
                                             T* __restrict__ c_last,        // [B, H], or null
                                             int B, int H,
                                             const unsigned char* __restrict__ resets_t) {  // [B] (RESETS)
  static_assert(!MMA || (TILE_B == 16 && TILE_J == 16 && TILE_K % MmaTraits<T>::K == 0), "wmma tiles are 16 x 16");
  using Smem = typename std::conditional<MMA, T, float>::type;
  constexpr int LD = tile_ld<Smem, MMA>(TILE_K);
  __shared__ __align__(32) Smem w_s[4][TILE_J][LD];  // [gate, unit, k]
  __shared__ __align__(32) Smem h_s[TILE_B][LD];     // [row, k]
  // h_prev is loaded with load_cg (L2, not L1): in the persistent kernel other
  // blocks wrote it before the grid sync, and a stale L1 line must not serve it.
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TILE_J + tx;
  const int warp = tid / 32;
  const int j = j0 + tx, b = b0 + ty;
  const Smem zero = from_float<Smem>(0.f);

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  MmaAccumulator<T> frag_acc;  // used by warps 0-3 with MMA
  if constexpr (MMA) wmma::fill_fragment(frag_acc, 0.f);
  for (int k0 = 0; k0 < H; k0 += TILE_K) {
    for (int idx = tid; idx < 4 * TILE_J * TILE_K; idx += STEP_THREADS) {
      const int g = idx / (TILE_J * TILE_K), rem = idx % (TILE_J * TILE_K);
      const int jj = rem / TILE_K, kk = rem % TILE_K;
      const int unit = j0 + jj, k = k0 + kk;
      w_s[g][jj][kk] = (unit < H && k < H) ? convert<Smem>(wload(g, jj, k)) : zero;
    }
    for (int idx = tid; idx < TILE_B * TILE_K; idx += STEP_THREADS) {
      const int bb = idx / TILE_K, kk = idx % TILE_K;
      const int row = b0 + bb, k = k0 + kk;
      h_s[bb][kk] = (row < B && k < H && !(RESETS && resets_t[row])) ? convert<Smem>(load_cg(h_prev + (size_t)row * H + k))
                                                                    : zero;
    }
    __syncthreads();
    if constexpr (MMA) {
      if (warp < 4) {  // warp g: gates[:, g-th 16 units] += h_s (row-major) x w_s[g]^T (col-major B)
#pragma unroll
        for (int kk = 0; kk < TILE_K; kk += MmaTraits<T>::K) {
          mma_16x16<T, wmma::col_major>(frag_acc, &h_s[0][kk], LD, &w_s[warp][0][kk], LD);
        }
      }
    } else {
#pragma unroll 8
      for (int kk = 0; kk < TILE_K; ++kk) {
        const float hv = h_s[ty][kk];
        acc[0] = fmaf(hv, w_s[0][tx][kk], acc[0]);
        acc[1] = fmaf(hv, w_s[1][tx][kk], acc[1]);
        acc[2] = fmaf(hv, w_s[2][tx][kk], acc[2]);
        acc[3] = fmaf(hv, w_s[3][tx][kk], acc[3]);
      }
    }
    __syncthreads();
  }
  if constexpr (MMA) {
    __shared__ __align__(32) float gates_s[4][TILE_B][TILE_J];  // [gate, row, unit]
    if (warp < 4) wmma::store_matrix_sync(&gates_s[warp][0][0], frag_acc, TILE_J, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int g = 0; g < 4; ++g) acc[g] = gates_s[g][ty][tx];
    __syncthreads();  // gates_s is rewritten by the next batch tile of a persistent block
  }
  if (j >= H || b >= B) return;

  const size_t g_row = (size_t)b * 4 * H;
  const size_t s = (size_t)b * H + j;
  const float cp = RESETS && resets_t[b] ? 0.f : c_prev ? c_prev[s] : to_float(c0[s]);
  Gates a;
  float c, h;
  cell_forward(acc[0] + to_float(xg_t[g_row + j]), acc[1] + to_float(xg_t[g_row + H + j]),
               acc[2] + to_float(xg_t[g_row + 2 * H + j]), acc[3] + to_float(xg_t[g_row + 3 * H + j]), cp, &a,
               &c, &h);
  h_out[s] = from_float<T>(h);
  c_out[s] = c;
  if (act_out) {
    act_out[g_row + j] = a.i;
    act_out[g_row + H + j] = a.f;
    act_out[g_row + 2 * H + j] = a.g;
    act_out[g_row + 3 * H + j] = a.o;
  }
  if (c_last) c_last[s] = from_float<T>(c);
}

// Per-step kernel: one launch per step, W_hh read from global memory / L2.
// Grid (ceil(H / TILE_J), ceil(B / TILE_B)), block (TILE_J, TILE_B).
template <typename T, bool MMA, bool RESETS>
__global__ void __launch_bounds__(STEP_THREADS)
    forward_step_kernel(const T* __restrict__ xg_t,    // [B, 4H]
                        const T* __restrict__ w_hh,    // [4H, H]
                        const T* __restrict__ h_prev,  // [B, H]
                        const float* c_prev,           // [B, H] fp32, or null at t = 0 (then c0)
                        const T* __restrict__ c0,      // [B, H]
                        T* __restrict__ h_out,         // [B, H]
                        float* c_out,                  // [B, H] fp32 (may alias c_prev)
                        float* __restrict__ act_out,   // [B, 4H] fp32, or null
                        T* __restrict__ c_last,        // [B, H], or null (written at the last step)
                        int B, int H,
                        const unsigned char* __restrict__ resets_t) {  // [B] uint8 resets of step t (RESETS)
  const int j0 = blockIdx.x * TILE_J;
  auto wload = [&](int g, int jj, int k) { return w_hh[(size_t)(g * H + j0 + jj) * H + k]; };
  forward_tile<T, MMA, RESETS>(wload, j0, blockIdx.y * TILE_B, xg_t, h_prev, c_prev, c0, h_out, c_out, act_out, c_last,
                               B, H, resets_t);
}

// Persistent kernel: one cooperative launch for all T steps. Block x owns the
// TILE_J units [x*TILE_J, x*TILE_J + TILE_J) (the 4*TILE_J rows of W_hh of its
// gates, copied once into dynamic shared memory as [gate, unit, H] in the
// storage dtype) and loops over the batch tiles; a grid-wide sync separates
// the steps (h_{t-1} is written by every block). Grid ceil(H / TILE_J) blocks,
// all co-resident (checked with the occupancy API before the launch).
template <typename T, bool MMA>
__global__ void __launch_bounds__(STEP_THREADS, 1)
    forward_persistent_kernel(const T* __restrict__ xg,    // [T, B, 4H]
                              const T* __restrict__ w_hh,  // [4H, H]
                              const T* __restrict__ h0,    // [B, H]
                              const T* __restrict__ c0,    // [B, H]
                              T* h_all,                    // [T, B, H] (read back by other blocks: no __restrict__)
                              T* __restrict__ c_T,         // [B, H]
                              float* __restrict__ act,     // [T, B, 4H] fp32, or null
                              float* __restrict__ c_all,   // [T, B, H] fp32, or null
                              float* __restrict__ c_work,  // [B, H] fp32 (used when c_all is null)
                              int T_, int B, int H,
                              BarrierWatch dbg) {  // state null: grid.sync(); else the time-bounded barrier
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* w_blk = reinterpret_cast<T*>(smem_raw);  // [4, TILE_J, H]
  const int j0 = blockIdx.x * TILE_J;
  const int tid = threadIdx.y * TILE_J + threadIdx.x;
  for (int idx = tid; idx < 4 * TILE_J * H; idx += STEP_THREADS) {
    const int g = idx / (TILE_J * H), rem = idx % (TILE_J * H);
    const int jj = rem / H, k = rem % H;
    const int unit = j0 + jj;
    w_blk[idx] = unit < H ? w_hh[(size_t)(g * H + unit) * H + k] : from_float<T>(0.f);
  }
  __syncthreads();
  auto wload = [&](int g, int jj, int k) { return w_blk[(g * TILE_J + jj) * H + k]; };
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const size_t bh = (size_t)B * H, b4h = 4 * bh;
  for (int t = 0; t < T_; ++t) {
    const T* h_prev = t == 0 ? h0 : h_all + (t - 1) * bh;
    float* c_out = c_all ? c_all + t * bh : c_work;
    const float* c_prev = t == 0 ? nullptr : (c_all ? c_all + (t - 1) * bh : c_work);
    for (int b0 = 0; b0 < B; b0 += TILE_B) {
      forward_tile<T, MMA, false>(wload, j0, b0, xg + t * b4h, h_prev, c_prev, c0, h_all + t * bh, c_out,
                                  act ? act + t * b4h : nullptr, t == T_ - 1 ? c_T : nullptr, B, H, nullptr);
      __syncthreads();  // the tile's shared buffers are reused by the next batch tile
    }
    // h_t complete (and visible) before any block reads it at t + 1
    if (dbg.state == nullptr) {
      grid.sync();
    } else if (!bounded_grid_sync(dbg, t + 1, t)) {
      return;  // a wait gave up (the device's error record says where): leave, the host raises
    }
  }
}

template <typename T, bool MMA, bool RESETS>
Status forward_step(const T* xg, const T* w_hh, const T* h0, const T* c0, T* h_all, T* c_T, float* act,
                    float* c_all, float* c_work, const unsigned char* resets, int T_, int B, int H,
                    cudaStream_t stream) {
  const dim3 grid((H + TILE_J - 1) / TILE_J, (B + TILE_B - 1) / TILE_B), block(TILE_J, TILE_B);
  const size_t bh = (size_t)B * H, b4h = 4 * bh;
  for (int t = 0; t < T_; ++t) {
    const T* h_prev = t == 0 ? h0 : h_all + (t - 1) * bh;
    float* c_out = c_all ? c_all + t * bh : c_work;
    const float* c_prev = t == 0 ? nullptr : (c_all ? c_all + (t - 1) * bh : c_work);
    forward_step_kernel<T, MMA, RESETS><<<grid, block, 0, stream>>>(
        xg + t * b4h, w_hh, h_prev, c_prev, c0, h_all + t * bh, c_out, act ? act + t * b4h : nullptr,
        t == T_ - 1 ? c_T : nullptr, B, H, RESETS ? resets + (size_t)t * B : nullptr);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return Status{err, "lstm forward_step_kernel"};
  }
  return Status{};
}

template <typename T, bool MMA>
Status forward_persistent_plan(int H, PersistentPlan* plan) {
  return persistent_plan(reinterpret_cast<const void*>(forward_persistent_kernel<T, MMA>), (H + TILE_J - 1) / TILE_J,
                         (size_t)4 * TILE_J * H * sizeof(T), "lstm forward_persistent_kernel", plan);
}

// With resets (RESETS) only the per-step kernel serves: the persistent variant is refused (the
// bindings raise before a launch), auto runs per-step.
template <typename T, bool MMA, bool RESETS>
Status forward_impl(const T* xg, const T* w_hh, const T* h0, const T* c0, T* h_all, T* c_T, float* act,
                    float* c_all, float* c_work, const unsigned char* resets, int T_, int B, int H, int variant,
                    int* used, cudaStream_t stream, BarrierWatch barrier) {
  if constexpr (RESETS) {
    if (variant == kPersistent) return failed(cudaErrorInvalidValue, "lstm forward_persistent_kernel (resets)");
    *used = kStep;
    return forward_step<T, MMA, true>(xg, w_hh, h0, c0, h_all, c_T, act, c_all, c_work, resets, T_, B, H, stream);
  }
  void* args[] = {&xg, &w_hh, &h0, &c0, &h_all, &c_T, &act, &c_all, &c_work, &T_, &B, &H, &barrier};
  return run_variant(
      variant, reinterpret_cast<const void*>(forward_persistent_kernel<T, MMA>),
      "lstm forward_persistent_kernel (cooperative launch)", args,
      [&](PersistentPlan* plan) { return forward_persistent_plan<T, MMA>(H, plan); },
      [&] {
        return forward_step<T, MMA, false>(xg, w_hh, h0, c0, h_all, c_T, act, c_all, c_work, nullptr, T_, B, H,
                                           stream);
      },
      used,
      stream);
}

Status forward(int dtype, const void* xg, const void* w_hh, const void* h0, const void* c0, void* h_all,
               void* c_T, float* act, float* c_all, float* c_work, int T_, int B, int H, int variant, bool mma,
               int* used, cudaStream_t stream, BarrierWatch barrier, const unsigned char* resets) {
  return LSTM_DTYPE_SWITCH(dtype, scalar_t, [&] {
    return LSTM_BOOL_SWITCH(mma, kMma, [&] {
      return LSTM_BOOL_SWITCH(resets != nullptr, kResets, [&] {
        return forward_impl<scalar_t, kMma, kResets>(
            static_cast<const scalar_t*>(xg), static_cast<const scalar_t*>(w_hh), static_cast<const scalar_t*>(h0),
            static_cast<const scalar_t*>(c0), static_cast<scalar_t*>(h_all), static_cast<scalar_t*>(c_T), act, c_all,
            c_work, resets, T_, B, H, variant, used, stream, barrier);
      });
    });
  });
}

PlanCache& plan_cache() {
  static PlanCache cache;
  return cache;
}

Status forward_occupancy(int dtype, int H, bool mma, int* blocks_per_sm, PersistentPlan* plan) {
  return LSTM_DTYPE_SWITCH(dtype, scalar_t, [&] {
    return LSTM_BOOL_SWITCH(mma, kMma, [&] {
      const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          blocks_per_sm, forward_step_kernel<scalar_t, kMma, false>, STEP_THREADS, 0);
      if (err != cudaSuccess)
        return failed(err, "cudaOccupancyMaxActiveBlocksPerMultiprocessor(lstm forward_step_kernel)");
      return forward_persistent_plan<scalar_t, kMma>(H, plan);
    });
  });
}

}  // namespace lstm
