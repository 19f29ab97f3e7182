// Host-side API of the per-step kernels (step_forward.cu, step_backward.cu), called by bindings.cpp:
// one launch per time step, W_hh read from global memory / L2. They are the fallback where the fused
// kernels (csrc/fused/) cannot serve a call: H beyond the fused blocks' shared memory, the
// tensor-core switch off (fp32 FMA), or LSTM_KERNELS_CUDA_VARIANT=step. Plain C++ types and raw
// device pointers: no libtorch. Every function returns a Status that names the kernel that failed
// (ok() when none did).
//
// Dimension names: T steps, B batch, H hidden units. The cell: gates = 4 (the LSTM, gate order along
// 4H: i, f, g, o) or 3 (the GRU, along 3H: r, z, n; no cell state: c0, c_T, dc_T and dc0 are null).
// G = gates. Layouts are row-major and contiguous (the Python side ensures it).
#pragma once

#include <cuda_runtime.h>

namespace lstm {

// Tile sizes of the per-step kernels: a block computes TILE_J hidden units (all gates of each)
// for TILE_B batch rows, looping over the reduction dimension in chunks of TILE_K. One thread per
// (batch row, hidden unit); grid (ceil(H / TILE_J), ceil(B / TILE_B)).
constexpr int TILE_J = 16;
constexpr int TILE_B = 16;
constexpr int TILE_K = 32;
constexpr int STEP_THREADS = TILE_J * TILE_B;

struct Status {
  cudaError_t error = cudaSuccess;
  const char* where = "";
  bool ok() const { return error == cudaSuccess; }
};

// Forward recurrence, one launch per step.
//   dtype             DtypeCode (static_switch.h)
//   xg     [T, B, GH] dtype     input projection + biases (the GRU's: all but b_hn)
//   w_hh   [GH, H]    dtype
//   h0     [B, H]     dtype
//   c0     [B, H]     dtype     (LSTM)
//   h_all  [T, B, H]  dtype     out: h_t for every step
//   c_T    [B, H]     dtype     out: the last cell state (LSTM)
//   act    [T, B, GH] fp32      out, or null: activated gates (i, f, g, o; r, z, n), for backward
//   c_all  [T, B, H]  fp32      out, or null: cell states c_t (the GRU's hn = h_{t-1} W_n^T + b_hn), for backward
//   c_work [B, H]     fp32      scratch for the cell state (used when c_all is null)
//   mma               bool      the recurrent matmul on tensor cores (wmma): fp16/bf16 operands, tf32 for
//                               fp32 (ask for it only where TF32 is allowed); else fp32 FMA
//   resets [T, B]     uint8     or null: nonzero where row b starts step t from h_{t-1} = 0, c_{t-1} = 0
//   gates             int       4 (LSTM) or 3 (GRU)
//   b_hn   [H]        dtype     or null: the GRU's recurrent bias of n
Status step_forward(int dtype, const void* xg, const void* w_hh, const void* h0, const void* c0, void* h_all,
                    void* c_T, float* act, float* c_all, float* c_work, int T, int B, int H, bool mma,
                    cudaStream_t stream, const unsigned char* resets = nullptr, int gates = 4,
                    const void* b_hn = nullptr);

// Backward recurrence (BPTT), one launch per step plus a last one for dh0.
//   w_hh    [GH, H]    dtype
//   c0      [B, H]     dtype  (LSTM)
//   act     [T, B, GH] fp32   saved by forward
//   c_all   [T, B, H]  fp32   saved by forward
//   dh_all  [T, B, H]  dtype  gradient of h_all
//   dh_T    [B, H]     dtype
//   dc_T    [B, H]     dtype  (LSTM)
//   dG      [T, B, GH] dtype  out: gradients of the gate pre-activations (of xg)
//   dh0     [B, H]     dtype  out
//   dc0     [B, H]     dtype  out (LSTM)
//   dg_work [2, B, GH] fp32   scratch: dG_t (the GRU's: the gradient of the recurrent product) in fp32,
//                             ping-pong between steps
//   dc_work [B, H]     fp32   scratch: the cell-state gradient carried between steps (the GRU's: dh_t z_t)
//   mma                bool     dG_{t+1} W_hh on tf32 tensor cores (dG is fp32; 16-bit W is exact in tf32)
//   resets [T, B]      uint8    or null, as forward's: nothing flows back across a reset (dh_{t-1}, dc_{t-1}
//                               leave step t as 0 for that row; dG_t unchanged)
//   gates              int      4 (LSTM) or 3 (GRU)
//   h0      [B, H]     dtype    the forward's h0 (GRU)
//   h_all   [T, B, H]  dtype    the forward's h_t (GRU: h_{t-1} of the update)
//   d_hn    [T, B, H]  dtype    out (GRU): the gradient of the recurrent product's n rows (+ b_hn), r * dn
Status step_backward(int dtype, const void* w_hh, const void* c0, const float* act, const float* c_all,
                     const void* dh_all, const void* dh_T, const void* dc_T, void* dG, void* dh0, void* dc0,
                     float* dg_work, float* dc_work, int T, int B, int H, bool mma, cudaStream_t stream,
                     const unsigned char* resets = nullptr, int gates = 4, const void* h0 = nullptr,
                     const void* h_all = nullptr, void* d_hn = nullptr);

}  // namespace lstm
