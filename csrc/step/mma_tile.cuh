// Tensor-core products of the per-step tiles (wmma, fp32 accumulation), shared
// by the forward and backward kernels. One warp computes a 16 x 16 block.
//
// Storage type T -> wmma shape and operand type:
//   __half, __nv_bfloat16: m16n16k16 on T (products exact in fp32);
//   float:                 m16n16k8 on tf32 (operands rounded to tf32 after loading:
//                          used only when the caller allows TF32).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

namespace lstm {

namespace wmma = nvcuda::wmma;

template <typename T>
struct MmaTraits {
  static constexpr int K = 16;
  using Operand = T;
};
template <>
struct MmaTraits<float> {
  static constexpr int K = 8;
  using Operand = wmma::precision::tf32;
};

template <typename T>
using MmaAccumulator = wmma::fragment<wmma::accumulator, 16, 16, MmaTraits<T>::K, float>;

// acc += A x B for A [16, K] row-major at a (leading dimension lda) and B [K, 16]
// at b (ldb) in LayoutB; a and b point to shared memory of T's storage type (float
// for tf32), 32-byte aligned, with lda and ldb multiples of 16 bytes. Warp-wide.
template <typename T, typename LayoutB, typename S>
__device__ __forceinline__ void mma_16x16(MmaAccumulator<T>& acc, const S* a, int lda, const S* b, int ldb) {
  using Op = typename MmaTraits<T>::Operand;
  constexpr int K = MmaTraits<T>::K;
  wmma::fragment<wmma::matrix_a, 16, 16, K, Op, wmma::row_major> frag_a;
  wmma::fragment<wmma::matrix_b, 16, 16, K, Op, LayoutB> frag_b;
  wmma::load_matrix_sync(frag_a, a, lda);
  wmma::load_matrix_sync(frag_b, b, ldb);
  if constexpr (std::is_same<Op, wmma::precision::tf32>::value) {
#pragma unroll
    for (int i = 0; i < frag_a.num_elements; ++i) frag_a.x[i] = wmma::__float_to_tf32(frag_a.x[i]);
#pragma unroll
    for (int i = 0; i < frag_b.num_elements; ++i) frag_b.x[i] = wmma::__float_to_tf32(frag_b.x[i]);
  }
  wmma::mma_sync(acc, frag_a, frag_b, acc);
}

// Leading dimension (elements) of a shared tile of `cols` columns: padded by one
// element against bank conflicts for the FMA loops, by 16 bytes for wmma.
template <typename S, bool MMA>
__host__ __device__ constexpr int tile_ld(int cols) {
  return MMA ? cols + 16 / (int)sizeof(S) : cols + 1;
}

}  // namespace lstm
