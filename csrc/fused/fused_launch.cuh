// Host side shared by the fused forward and backward (fused_forward.cu, fused_backward.cu): how a
// fused kernel is planned on the current device and how its half-steps are launched. The two
// directions differ only in the kernel, its arguments and its shared memory.
#pragma once

#include <cuda_runtime.h>

#include <tuple>
#include <type_traits>

#include "fused/fused_common.cuh"

namespace lstm {
namespace fused {

// Whether a block of `kernel` with `smem` bytes of dynamic shared memory fits the current device's
// opt-in (*fits), the kernel's static shared memory (abort_s) counted too.
template <typename... Params>
cudaError_t kernel_smem_fits(void (*kernel)(Params...), size_t smem, bool* fits) {
  *fits = false;
  int dev = 0, optin = 0;
  cudaFuncAttributes attr;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaSuccess) *fits = smem + attr.sharedSizeBytes <= (size_t)optin;
  return err;
}

// Whether `kernel` with `smem` bytes of dynamic shared memory serves a grid of `blocks` blocks on
// the current device: *possible 0 the block's shared memory does not fit, 1 the persistent grid is
// co-resident (one cooperative launch), 2 per-half-step launches only.
template <typename... Params>
cudaError_t kernel_plan(void (*kernel)(Params...), size_t smem, int blocks, int* possible) {
  *possible = 0;
  bool fits = false;
  int dev = 0, sms = 0, coop = 0, per_sm = 0;
  cudaError_t err = kernel_smem_fits(kernel, smem, &fits);
  if (err == cudaSuccess) err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err != cudaSuccess || !fits) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem);
  if (err != cudaSuccess) return err;
  *possible = coop && (long long)per_sm * sms >= blocks ? 1 : 2;
  return cudaSuccess;
}

// f(std::bool_constant<a>{}, std::bool_constant<b>{}): two runtime flags (projection, resets) as
// the compile-time template arguments of one kernel, not copied branches.
template <typename F>
cudaError_t with_flags(bool a, bool b, F&& f) {
  if (a) return b ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  return b ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
}

// Calls f(proj, resets, gates) (std::integral_constant's) for the kernel instances that exist: the
// LSTM's four (gates 4), and the GRU's two (gates 3, no projection); cudaErrorInvalidValue otherwise.
template <typename F>
cudaError_t with_instance(bool proj, bool resets, int gates, F&& f) {
  if (gates != 4 && (gates != 3 || proj)) return cudaErrorInvalidValue;
  return with_flags(proj, resets, [&](auto with_proj, auto with_resets) {
    if constexpr (decltype(with_proj)::value) {
      return f(with_proj, with_resets, std::integral_constant<int, 4>{});
    } else {
      return gates == 3 ? f(with_proj, with_resets, std::integral_constant<int, 3>{})
                        : f(with_proj, with_resets, std::integral_constant<int, 4>{});
    }
  });
}

// Runs half-steps [0, n_half) of `kernel`, whose parameters are `args...` followed by the first
// and the end half-step, a BarrierWatch and the resets pointer: with `persistent`, one cooperative launch that passes
// the grid barrier between half-steps (the per-batch-tile counters, grid.y of them, are zeroed
// first); otherwise one launch per half-step (the launch boundary is the barrier; no watch).
template <typename... Params, typename... Args>
cudaError_t launch_half_steps(void (*kernel)(Params...), dim3 grid, size_t smem, int n_half, bool persistent,
                              unsigned int* counters, BarrierWatch watch, const unsigned char* resets,
                              cudaStream_t stream, Args... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  if (persistent) {
    err = cudaMemsetAsync(counters, 0, grid.y * sizeof(unsigned int), stream);
    if (err != cudaSuccess) return err;
    // The argument array must point at objects of the kernel's exact parameter types.
    std::tuple<Params...> values(args..., 0, n_half, watch, resets);
    return std::apply(
        [&](auto&... v) {
          void* ptrs[] = {&v...};
          return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, dim3(THREADS), ptrs, smem,
                                             stream);
        },
        values);
  }
  for (int hs = 0; hs < n_half; ++hs) {
    kernel<<<grid, THREADS, smem, stream>>>(args..., hs, hs + 1, BarrierWatch{}, resets);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace fused
}  // namespace lstm
