// Backward recurrence (BPTT) of one LSTM or GRU layer, one direction: the per-step kernel (recurrent
// matmul dh_rec = dG_{t+1} W_hh + cell backward, one launch per step, then one for dh0), the
// fallback where the fused kernels (csrc/fused/) cannot serve a call (step_kernels.h). The cell is
// the template parameter GATES (4: the LSTM, 3: the GRU), as in the forward.
//
// Legend: T steps, B batch, H hidden units, r the reduction index over GATES*H.
// LSTM, gate order along 4H: i, f, g, o. Per step t, from T-1 down to 0:
//   dh  = dh_all[t] + (t == T-1 ? dh_T : dG_{t+1} W_hh)
//   dc  = (t == T-1 ? dc_T : dc_{t+1} * f_{t+1})
//   dG_t, dc*f = cell_backward(dh, dc, act_t, c_{t-1}, c_t)      (cell.cuh)
// dh0 = dG_0 W_hh, dc0 = dc_0 * f_0. dG is kept in fp32 for the recurrence
// (ping-pong dg_work) and stored in the input dtype as the output.
// GRU, gate order along 3H: r, z, n. Per step t, from T-1 down to 0:
//   dh  = dh_all[t] + (t == T-1 ? dh_T : dR_{t+1} W_hh + dh_{t+1} z_{t+1})
//   dR_t = [dr, dz, dn r] (the gradient of the recurrent product, kept in fp32 for the next step),
//   dG_t = [dr, dz, dn] (output), d_hn_t = dn r (output), carried dh z      (cell.cuh)
// dh0 = dR_0 W_hh + dh_0 z_0. dc_work carries dh z between the launches (each thread its own (b, j)).
// Deterministic: every sum is one thread's sequential loop, no atomics.
#include <type_traits>

#include "common/cell.cuh"
#include "common/dtype_convert.cuh"
#include "step/mma_tile.cuh"
#include "step/static_switch.h"
#include "step/step_kernels.h"

namespace lstm {

// One (batch tile, unit tile) of one step (or, with dh_out_t null, of the
// final dh0 pass): dh_rec = dG_{t+1} W_hh for TILE_B rows x TILE_J units, then
// the cell backward. Called by every thread of the block (it holds
// __syncthreads). wload(r, jj) is W_hh[r, j0 + jj] in the storage type (global
// memory); only called in range. dG is fp32, so with MMA the product runs on tf32 tensor cores whatever
// T is (16-bit W is exact in tf32; dG is rounded to tf32): warp w < TILE_K / 8
// sums the w-th 8 columns of every chunk, and the partial sums are added in a
// fixed order. Without MMA each thread sums its own (b, j) in fp32 FMA. RESETS: a row b with
// resets_t[b] started step t from zero state: its c_prev (the GRU's h_prev) is 0 in the cell's
// gradient, and nothing flows back to step t-1 (dc_work and the fp32 exchange dg_cur get 0; dG_t
// is unchanged). The GRU reads c_t as hn and h_prev_t, writes d_hn_t, and has no dc_T, c0 or dc0.
template <typename T, int GATES, bool MMA, bool RESETS, typename WLoad>
__device__ __forceinline__ void backward_tile(WLoad wload, int j0, int b0,
                                              const float* dg_next,  // [B, GATES*H] fp32 dG_{t+1}, or null at t = T-1
                                              const T* __restrict__ dh_T,      // [B, H] used when dg_next is null
                                              const T* __restrict__ dc_T,      // [B, H] used when dg_next is null
                                              const T* __restrict__ dh_out_t,  // [B, H] dh_all[t]; null: dh0 pass
                                              const float* __restrict__ act_t,  // [B, GATES*H] fp32 of step t
                                              const float* __restrict__ c_t,     // [B, H] fp32 (GRU: hn)
                                              const float* __restrict__ c_prev,  // [B, H] fp32 c_{t-1}, or null (c0)
                                              const T* __restrict__ c0,          // [B, H] (LSTM)
                                              const T* __restrict__ h_prev_t,    // [B, H] h_{t-1} (GRU)
                                              float* dc_work,                    // [B, H] fp32 in/out (dc * f; dh * z)
                                              float* dg_cur,                     // [B, GATES*H] fp32 out: dG_t (dR_t)
                                              T* __restrict__ dG_t,              // [B, GATES*H] out
                                              T* __restrict__ d_hn_t,            // [B, H] out (GRU)
                                              T* __restrict__ dh0,               // [B, H] out in the dh0 pass
                                              T* __restrict__ dc0,               // [B, H] out in the dh0 pass (LSTM)
                                              int B, int H,
                                              const unsigned char* __restrict__ resets_t) {  // [B] (RESETS)
  static_assert(GATES == 3 || GATES == 4, "the GRU (3 gates) or the LSTM (4)");
  constexpr int kParts = TILE_K / MmaTraits<float>::K;  // warps that sum a part of each chunk (MMA)
  static_assert(!MMA || (TILE_B == 16 && TILE_J == 16 && kParts <= STEP_THREADS / 32), "wmma tiles are 16 x 16");
  constexpr int LDW = tile_ld<float, MMA>(TILE_J), LDG = tile_ld<float, MMA>(TILE_K);
  __shared__ __align__(32) float w_s[TILE_K][LDW];  // [r, unit]
  __shared__ __align__(32) float g_s[TILE_B][LDG];  // [row, r]
  // dg_next is loaded with load_cg (L2, not L1): the previous launch wrote it.
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TILE_J + tx;
  const int warp = tid / 32;
  const int j = j0 + tx, b = b0 + ty;
  const int GH = GATES * H;

  float acc = 0.f;
  if (dg_next) {
    MmaAccumulator<float> frag_acc;  // used by warps < kParts with MMA
    if constexpr (MMA) wmma::fill_fragment(frag_acc, 0.f);
    for (int r0 = 0; r0 < GH; r0 += TILE_K) {
      for (int idx = tid; idx < TILE_K * TILE_J; idx += STEP_THREADS) {
        const int kk = idx / TILE_J, jj = idx % TILE_J;
        const int r = r0 + kk, unit = j0 + jj;
        w_s[kk][jj] = (r < GH && unit < H) ? to_float(wload(r, jj)) : 0.f;
      }
      for (int idx = tid; idx < TILE_B * TILE_K; idx += STEP_THREADS) {
        const int bb = idx / TILE_K, kk = idx % TILE_K;
        const int row = b0 + bb, r = r0 + kk;
        g_s[bb][kk] = (row < B && r < GH) ? load_cg(dg_next + (size_t)row * GH + r) : 0.f;
      }
      __syncthreads();
      if constexpr (MMA) {
        constexpr int K = MmaTraits<float>::K;
        if (warp < kParts) mma_16x16<float, wmma::row_major>(frag_acc, &g_s[0][warp * K], LDG, &w_s[warp * K][0], LDW);
      } else {
#pragma unroll 8
        for (int kk = 0; kk < TILE_K; ++kk) acc = fmaf(g_s[ty][kk], w_s[kk][tx], acc);
      }
      __syncthreads();
    }
    if constexpr (MMA) {
      __shared__ __align__(32) float part_s[kParts][TILE_B][TILE_J];  // [part, row, unit]
      if (warp < kParts) wmma::store_matrix_sync(&part_s[warp][0][0], frag_acc, TILE_J, wmma::mem_row_major);
      __syncthreads();
#pragma unroll
      for (int p = 0; p < kParts; ++p) acc += part_s[p][ty][tx];
    }
  }
  if (j >= H || b >= B) return;
  const size_t s = (size_t)b * H + j;
  const size_t g_row = (size_t)b * GH;
  const bool cut = RESETS && dh_out_t && resets_t[b];
  if constexpr (GATES == 3) {
    const float dh_in = dg_next ? acc + dc_work[s] : to_float(dh_T[s]);  // + dh_{t+1} z_{t+1}
    if (!dh_out_t) {  // the dh0 pass
      dh0[s] = from_float<T>(dh_in);
      return;
    }
    const GruGates a{act_t[g_row + j], act_t[g_row + H + j], act_t[g_row + 2 * H + j]};
    GruGrads d;
    gru_cell_backward(dh_in + to_float(dh_out_t[s]), a, c_t[s], cut ? 0.f : to_float(h_prev_t[s]), &d);
    dc_work[s] = cut ? 0.f : d.h_prev;
    dg_cur[g_row + j] = cut ? 0.f : d.r;
    dg_cur[g_row + H + j] = cut ? 0.f : d.z;
    dg_cur[g_row + 2 * H + j] = cut ? 0.f : d.hn;
    dG_t[g_row + j] = from_float<T>(d.r);
    dG_t[g_row + H + j] = from_float<T>(d.z);
    dG_t[g_row + 2 * H + j] = from_float<T>(d.n);
    d_hn_t[s] = from_float<T>(d.hn);
  } else {
    const float dh_in = dg_next ? acc : to_float(dh_T[s]);
    const float dc_in = dg_next ? dc_work[s] : to_float(dc_T[s]);
    if (!dh_out_t) {  // the dh0 pass
      dh0[s] = from_float<T>(dh_in);
      dc0[s] = from_float<T>(dc_in);
      return;
    }
    const float dh = dh_in + to_float(dh_out_t[s]);
    const Gates a{act_t[g_row + j], act_t[g_row + H + j], act_t[g_row + 2 * H + j], act_t[g_row + 3 * H + j]};
    const float cp = cut ? 0.f : c_prev ? c_prev[s] : to_float(c0[s]);
    using Act = ActivationsFor<std::is_same<T, float>::value && !MMA>;  // cell.cuh
    GateGrads d;
    float dc_prev;
    cell_backward<Act>(dh, dc_in, a, cp, c_t[s], &d, &dc_prev);
    dc_work[s] = cut ? 0.f : dc_prev;
    dg_cur[g_row + j] = cut ? 0.f : d.i;
    dg_cur[g_row + H + j] = cut ? 0.f : d.f;
    dg_cur[g_row + 2 * H + j] = cut ? 0.f : d.g;
    dg_cur[g_row + 3 * H + j] = cut ? 0.f : d.o;
    dG_t[g_row + j] = from_float<T>(d.i);
    dG_t[g_row + H + j] = from_float<T>(d.f);
    dG_t[g_row + 2 * H + j] = from_float<T>(d.g);
    dG_t[g_row + 3 * H + j] = from_float<T>(d.o);
  }
}

// Per-step kernel: one launch per step (and one for the dh0 pass), W_hh read
// from global memory / L2. Grid (ceil(H / TILE_J), ceil(B / TILE_B)), block (TILE_J, TILE_B).
template <typename T, int GATES, bool MMA, bool RESETS>
__global__ void __launch_bounds__(STEP_THREADS)
    backward_step_kernel(const T* __restrict__ w_hh,        // [GATES*H, H]
                         const float* __restrict__ dg_next,  // [B, GATES*H] fp32 dG_{t+1}, or null at t = T-1
                         const T* __restrict__ dh_T,         // [B, H]
                         const T* __restrict__ dc_T,         // [B, H] (LSTM)
                         const T* __restrict__ dh_out_t,     // [B, H] dh_all[t]; null in the dh0 pass
                         const float* __restrict__ act_t,    // [B, GATES*H] fp32
                         const float* __restrict__ c_t,      // [B, H] fp32 (GRU: hn)
                         const float* __restrict__ c_prev,   // [B, H] fp32, or null at t = 0
                         const T* __restrict__ c0,           // [B, H] (LSTM)
                         const T* __restrict__ h_prev_t,     // [B, H] h_{t-1} (GRU)
                         float* dc_work,                     // [B, H] fp32 in/out
                         float* __restrict__ dg_cur,         // [B, GATES*H] fp32 out
                         T* __restrict__ dG_t,               // [B, GATES*H] out
                         T* __restrict__ d_hn_t,             // [B, H] out (GRU)
                         T* __restrict__ dh0,                // [B, H] out in the dh0 pass
                         T* __restrict__ dc0,                // [B, H] out in the dh0 pass (LSTM)
                         int B, int H,
                         const unsigned char* __restrict__ resets_t) {  // [B] uint8 resets of step t (RESETS)
  const int j0 = blockIdx.x * TILE_J;
  auto wload = [&](int r, int jj) { return w_hh[(size_t)r * H + j0 + jj]; };
  backward_tile<T, GATES, MMA, RESETS>(wload, j0, blockIdx.y * TILE_B, dg_next, dh_T, dc_T, dh_out_t, act_t, c_t,
                                       c_prev, c0, h_prev_t, dc_work, dg_cur, dG_t, d_hn_t, dh0, dc0, B, H, resets_t);
}

template <typename T, int GATES, bool MMA, bool RESETS>
Status backward_step(const T* w_hh, const T* c0, const T* h0, const T* h_all, const float* act, const float* c_all,
                     const T* dh_all, const T* dh_T, const T* dc_T, T* dG, T* d_hn, T* dh0, T* dc0, float* dg_work,
                     float* dc_work, const unsigned char* resets, int T_, int B, int H, cudaStream_t stream) {
  const dim3 grid((H + TILE_J - 1) / TILE_J, (B + TILE_B - 1) / TILE_B), block(TILE_J, TILE_B);
  const size_t bh = (size_t)B * H, bgh = GATES * bh;
  const bool gru = GATES == 3;
  const float* dg_next = nullptr;
  for (int t = T_ - 1; t >= 0; --t) {
    float* dg_cur = dg_work + (t % 2) * bgh;
    backward_step_kernel<T, GATES, MMA, RESETS><<<grid, block, 0, stream>>>(
        w_hh, dg_next, dh_T, dc_T, dh_all + t * bh, act + t * bgh, c_all + t * bh,
        t == 0 ? nullptr : c_all + (t - 1) * bh, c0, gru ? (t == 0 ? h0 : h_all + (t - 1) * bh) : nullptr, dc_work,
        dg_cur, dG + t * bgh, gru ? d_hn + t * bh : nullptr, nullptr, nullptr, B, H,
        RESETS ? resets + (size_t)t * B : nullptr);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return Status{err, "lstm backward_step_kernel"};
    dg_next = dg_cur;
  }
  backward_step_kernel<T, GATES, MMA, RESETS><<<grid, block, 0, stream>>>(
      w_hh, dg_next, dh_T, dc_T, nullptr, nullptr, nullptr, nullptr, c0, nullptr, dc_work, nullptr, nullptr, nullptr,
      dh0, dc0, B, H, nullptr);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status{err, "lstm backward_step_kernel (dh0 pass)"};
  return Status{};
}

Status step_backward(int dtype, const void* w_hh, const void* c0, const float* act, const float* c_all,
                     const void* dh_all, const void* dh_T, const void* dc_T, void* dG, void* dh0, void* dc0,
                     float* dg_work, float* dc_work, int T_, int B, int H, bool mma, cudaStream_t stream,
                     const unsigned char* resets, int gates, const void* h0, const void* h_all, void* d_hn) {
  return LSTM_DTYPE_SWITCH(dtype, scalar_t, [&] {
    return LSTM_GATES_SWITCH(gates, kGates, [&] {
      return LSTM_BOOL_SWITCH(mma, kMma, [&] {
        return LSTM_BOOL_SWITCH(resets != nullptr, kResets, [&] {
          using P = const scalar_t*;
          return backward_step<scalar_t, kGates, kMma, kResets>(
              static_cast<P>(w_hh), static_cast<P>(c0), static_cast<P>(h0), static_cast<P>(h_all), act, c_all,
              static_cast<P>(dh_all), static_cast<P>(dh_T), static_cast<P>(dc_T), static_cast<scalar_t*>(dG),
              static_cast<scalar_t*>(d_hn), static_cast<scalar_t*>(dh0), static_cast<scalar_t*>(dc0), dg_work,
              dc_work, resets, T_, B, H, stream);
        });
      });
    });
  });
}

}  // namespace lstm
