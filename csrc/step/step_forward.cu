// Forward recurrence of one LSTM or GRU layer, one direction: the per-step kernel (recurrent matmul +
// cell update, one launch per step, W_hh read from global memory / L2), the fallback where the
// fused kernels (csrc/fused/) cannot serve a call (step_kernels.h). The cell is the template
// parameter GATES (4: the LSTM, 3: the GRU): the number of gate products and the update after them.
//
// Legend: T steps, B batch, H hidden units, k the reduction index over H.
// LSTM, gate order along 4H: i, f, g, o. gates_t = xg_t + h_{t-1} W_hh^T;
// c_t = f*c_{t-1} + i*g; h_t = o*tanh(c_t), rounded to the storage dtype.
// GRU, gate order along 3H: r, z, n. r, z = sigma(xg_t + h_{t-1} W^T) (rows r, z); hn = h_{t-1} W_n^T
// + b_hn; n = tanh(xg_n + r*hn); h_t = (1-z)*n + z*h_{t-1} (cell.cuh), rounded to the storage dtype.
// Accumulation, activations and c in fp32. The recurrent matmul runs on
// tensor cores when MMA is set (fp16/bf16 operands, or tf32 for float, which
// the caller asks for only where TF32 is allowed), else as plain fp32 FMA.
//
// Saved for backward (when asked): the activated gates act [T, B, GATES*H] fp32 and c_all [T, B, H]
// fp32, the LSTM's cell states (backward recomputes only tanh(c)) or the GRU's hn.
#include <type_traits>

#include "common/cell.cuh"
#include "common/dtype_convert.cuh"
#include "step/mma_tile.cuh"
#include "step/static_switch.h"
#include "step/step_kernels.h"

namespace lstm {

// One (batch tile, unit tile) of one step: gates = xg_t + h_prev W^T for
// TILE_B rows x TILE_J units (all GATES gates), then the cell update. Called by
// every thread of the block (it holds __syncthreads). wload(g, jj, k) is
// W_hh[g*H + j0 + jj, k] in the storage type (from global memory); it is only
// called in range.
//
// The k loop stages TILE_K columns of h_prev and of the four gates' W rows in
// shared memory. With MMA, warps 0 to GATES-1 each own one gate's 16 x 16 accumulator
// (rows b, units j) on tensor cores (mma_tile.cuh: fp16/bf16 operands, or tf32
// for float) and the tiles keep the storage type; without, each thread sums its
// own (b, j) for the GATES gates in fp32 FMA. Either way the sums end in
// acc[] of thread (j, b). RESETS: rows b with resets_t[b] start the step from zero state: their
// h_prev row is staged as zeros and their c_prev (the GRU's h_prev in the update) is 0 (one byte
// load per staged element and per cell; the per-step kernels are the fallback, not held to the
// budget of one step). The GRU's c_out is hn, and it has no c_prev, c0 or c_last.
template <typename T, int GATES, bool MMA, bool RESETS, typename WLoad>
__device__ __forceinline__ void forward_tile(WLoad wload, int j0, int b0,
                                             const T* __restrict__ xg_t,    // [B, GATES*H]
                                             const T* h_prev,  // [B, H]; no __restrict__: other blocks write it
                                             const float* c_prev,           // [B, H] fp32, or null at t = 0 (then c0)
                                             const T* __restrict__ c0,      // [B, H] (LSTM)
                                             const T* __restrict__ b_hn,    // [H], or null (GRU)
                                             T* __restrict__ h_out,         // [B, H]
                                             float* c_out,                  // [B, H] fp32 (may alias c_prev)
                                             float* __restrict__ act_out,   // [B, GATES*H] fp32, or null
                                             T* __restrict__ c_last,        // [B, H], or null
                                             int B, int H,
                                             const unsigned char* __restrict__ resets_t) {  // [B] (RESETS)
  static_assert(GATES == 3 || GATES == 4, "the GRU (3 gates) or the LSTM (4)");
  static_assert(!MMA || (TILE_B == 16 && TILE_J == 16 && TILE_K % MmaTraits<T>::K == 0), "wmma tiles are 16 x 16");
  using Smem = typename std::conditional<MMA, T, float>::type;
  constexpr int LD = tile_ld<Smem, MMA>(TILE_K);
  __shared__ __align__(32) Smem w_s[GATES][TILE_J][LD];  // [gate, unit, k]
  __shared__ __align__(32) Smem h_s[TILE_B][LD];     // [row, k]
  // h_prev is loaded with load_cg (L2, not L1): the previous launch wrote it.
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TILE_J + tx;
  const int warp = tid / 32;
  const int j = j0 + tx, b = b0 + ty;
  const Smem zero = from_float<Smem>(0.f);

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  MmaAccumulator<T> frag_acc;  // used by warps 0-3 with MMA
  if constexpr (MMA) wmma::fill_fragment(frag_acc, 0.f);
  for (int k0 = 0; k0 < H; k0 += TILE_K) {
    for (int idx = tid; idx < GATES * TILE_J * TILE_K; idx += STEP_THREADS) {
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
      if (warp < GATES) {  // warp g: gates[:, g-th 16 units] += h_s (row-major) x w_s[g]^T (col-major B)
#pragma unroll
        for (int kk = 0; kk < TILE_K; kk += MmaTraits<T>::K) {
          mma_16x16<T, wmma::col_major>(frag_acc, &h_s[0][kk], LD, &w_s[warp][0][kk], LD);
        }
      }
    } else {
#pragma unroll 8
      for (int kk = 0; kk < TILE_K; ++kk) {
        const float hv = h_s[ty][kk];
#pragma unroll
        for (int g = 0; g < GATES; ++g) acc[g] = fmaf(hv, w_s[g][tx][kk], acc[g]);
      }
    }
    __syncthreads();
  }
  if constexpr (MMA) {
    __shared__ __align__(32) float gates_s[GATES][TILE_B][TILE_J];  // [gate, row, unit]
    if (warp < GATES) wmma::store_matrix_sync(&gates_s[warp][0][0], frag_acc, TILE_J, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int g = 0; g < GATES; ++g) acc[g] = gates_s[g][ty][tx];
  }
  if (j >= H || b >= B) return;

  const size_t g_row = (size_t)b * GATES * H;
  using Act = ActivationsFor<std::is_same<T, float>::value && !MMA>;  // cell.cuh
  const size_t s = (size_t)b * H + j;
  if constexpr (GATES == 3) {
    const float hp = RESETS && resets_t[b] ? 0.f : to_float(load_cg(h_prev + s));
    const float hn = acc[2] + (b_hn ? to_float(b_hn[j]) : 0.f);
    GruGates a;
    float h;
    gru_cell_forward<Act>(acc[0] + to_float(xg_t[g_row + j]), acc[1] + to_float(xg_t[g_row + H + j]),
                          to_float(xg_t[g_row + 2 * H + j]), hn, hp, &a, &h);
    h_out[s] = from_float<T>(h);
    c_out[s] = hn;
    if (act_out) {
      act_out[g_row + j] = a.r;
      act_out[g_row + H + j] = a.z;
      act_out[g_row + 2 * H + j] = a.n;
    }
  } else {
    const float cp = RESETS && resets_t[b] ? 0.f : c_prev ? c_prev[s] : to_float(c0[s]);
    Gates a;
    float c, h;
    cell_forward<Act>(acc[0] + to_float(xg_t[g_row + j]), acc[1] + to_float(xg_t[g_row + H + j]),
                      acc[2] + to_float(xg_t[g_row + 2 * H + j]), acc[3] + to_float(xg_t[g_row + 3 * H + j]), cp,
                      &a, &c, &h);
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
}

// Per-step kernel: one launch per step, W_hh read from global memory / L2.
// Grid (ceil(H / TILE_J), ceil(B / TILE_B)), block (TILE_J, TILE_B).
template <typename T, int GATES, bool MMA, bool RESETS>
__global__ void __launch_bounds__(STEP_THREADS)
    forward_step_kernel(const T* __restrict__ xg_t,    // [B, GATES*H]
                        const T* __restrict__ w_hh,    // [GATES*H, H]
                        const T* __restrict__ h_prev,  // [B, H]
                        const float* c_prev,           // [B, H] fp32, or null at t = 0 (then c0)
                        const T* __restrict__ c0,      // [B, H] (LSTM)
                        const T* __restrict__ b_hn,    // [H], or null (GRU)
                        T* __restrict__ h_out,         // [B, H]
                        float* c_out,                  // [B, H] fp32 (may alias c_prev)
                        float* __restrict__ act_out,   // [B, GATES*H] fp32, or null
                        T* __restrict__ c_last,        // [B, H], or null (written at the last step)
                        int B, int H,
                        const unsigned char* __restrict__ resets_t) {  // [B] uint8 resets of step t (RESETS)
  const int j0 = blockIdx.x * TILE_J;
  auto wload = [&](int g, int jj, int k) { return w_hh[(size_t)(g * H + j0 + jj) * H + k]; };
  forward_tile<T, GATES, MMA, RESETS>(wload, j0, blockIdx.y * TILE_B, xg_t, h_prev, c_prev, c0, b_hn, h_out, c_out,
                                      act_out, c_last, B, H, resets_t);
}

template <typename T, int GATES, bool MMA, bool RESETS>
Status forward_step(const T* xg, const T* w_hh, const T* h0, const T* c0, const T* b_hn, T* h_all, T* c_T,
                    float* act, float* c_all, float* c_work, const unsigned char* resets, int T_, int B, int H,
                    cudaStream_t stream) {
  const dim3 grid((H + TILE_J - 1) / TILE_J, (B + TILE_B - 1) / TILE_B), block(TILE_J, TILE_B);
  const size_t bh = (size_t)B * H, bgh = GATES * bh;
  for (int t = 0; t < T_; ++t) {
    const T* h_prev = t == 0 ? h0 : h_all + (t - 1) * bh;
    float* c_out = c_all ? c_all + t * bh : c_work;
    const float* c_prev = t == 0 ? nullptr : (c_all ? c_all + (t - 1) * bh : c_work);
    forward_step_kernel<T, GATES, MMA, RESETS><<<grid, block, 0, stream>>>(
        xg + t * bgh, w_hh, h_prev, c_prev, c0, b_hn, h_all + t * bh, c_out, act ? act + t * bgh : nullptr,
        t == T_ - 1 ? c_T : nullptr, B, H, RESETS ? resets + (size_t)t * B : nullptr);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return Status{err, "lstm forward_step_kernel"};
  }
  return Status{};
}

Status step_forward(int dtype, const void* xg, const void* w_hh, const void* h0, const void* c0, void* h_all,
                    void* c_T, float* act, float* c_all, float* c_work, int T_, int B, int H, bool mma,
                    cudaStream_t stream, const unsigned char* resets, int gates, const void* b_hn) {
  return LSTM_DTYPE_SWITCH(dtype, scalar_t, [&] {
    return LSTM_GATES_SWITCH(gates, kGates, [&] {
      return LSTM_BOOL_SWITCH(mma, kMma, [&] {
        return LSTM_BOOL_SWITCH(resets != nullptr, kResets, [&] {
          using P = const scalar_t*;
          return forward_step<scalar_t, kGates, kMma, kResets>(
              static_cast<P>(xg), static_cast<P>(w_hh), static_cast<P>(h0), static_cast<P>(c0), static_cast<P>(b_hn),
              static_cast<scalar_t*>(h_all), static_cast<scalar_t*>(c_T), act, c_all, c_work, resets, T_, B, H,
              stream);
        });
      });
    });
  });
}

}  // namespace lstm
