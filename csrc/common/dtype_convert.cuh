// Loads and stores between the storage dtypes (float, __half, __nv_bfloat16)
// and fp32, the dtype of all arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace lstm {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The bits of a 16-bit value, zero-extended (the tagged exchange packs two in a word).
__device__ __forceinline__ uint32_t b16_bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t b16_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Load through L2 (bypassing L1: ld.global.cg), for data other blocks wrote
// before a grid sync. asm volatile with a memory clobber, so the compiler
// cannot move the load across the sync (cuda_fp16/bf16's own __ldcg for the
// 16-bit types is a plain asm without either).
__device__ __forceinline__ float load_cg(const float* p) {
  float r;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p) : "memory");
  return r;
}
__device__ __forceinline__ __half load_cg(const __half* p) {
  unsigned short r;
  asm volatile("ld.global.cg.b16 %0, [%1];" : "=h"(r) : "l"(p) : "memory");
  return __ushort_as_half(r);
}
__device__ __forceinline__ __nv_bfloat16 load_cg(const __nv_bfloat16* p) {
  unsigned short r;
  asm volatile("ld.global.cg.b16 %0, [%1];" : "=h"(r) : "l"(p) : "memory");
  return __ushort_as_bfloat16(r);
}

// x as an S: unchanged when S is x's own type, else through fp32.
template <typename S, typename T>
__device__ __forceinline__ S convert(T x) {
  if constexpr (std::is_same<S, T>::value) {
    return x;
  } else {
    return from_float<S>(to_float(x));
  }
}

}  // namespace lstm
