// Building blocks of the fused persistent kernels (fused_forward.cu, fused_backward.cu):
// the operand precisions (Op), warp-level tensor-core products (ldmatrix + mma.sync with fp32
// accumulation, one MMA per 32-byte chunk of the reduction), bulk asynchronous copies to shared
// memory (cp.async), and the light grid barrier (one release-add per arriving block, one warp
// acquire-polling), split into arrive and wait so that independent work runs in between.
//
// Legend: T steps, B batch, H hidden units, K the reduction length (H forward, 4H backward),
// Kp = K rounded up to kpad(sizeof(T)). Gate order along 4H: i, f, g, o (PyTorch's).
//
// Op, the kernels' template parameter, is the storage type T and how a chunk is multiplied:
//   Fp16Mma, Bf16Mma: T = __half / __nv_bfloat16, mma.sync m16n8k16 on the stored values
//     (products exact in fp32, fp32 sums);
//   Tf32Mma: T = float, operands rounded to tf32 (to nearest: 10 mantissa bits, 2^-11 relative),
//     m16n8k8; used only where torch allows TF32 (torch.backends.cuda.matmul.allow_tf32);
//   Fp32Mma: T = float, fp32 accuracy on tensor cores ("3xTF32"): each operand x = big + small
//     with big = tf32(x), small = tf32(x - big), and a*b ~ a_small b_big + a_big b_small +
//     a_big b_big (small terms first) by three m16n8k8; the dropped a_small b_small and the
//     rounding of small are each <= 2^-22 |a b|, so a product is within ~2^-20.5 |a b|
//     (tests/test_cuda_plan_host.py emulates it against float64 on a whole BPTT). Not IEEE at the
//     edges: an infinite operand (or one within half a tf32 ulp of FLT_MAX) makes its products NaN
//     (inf - inf in the split, inf * 0 in the cross terms) where fp32 gives +-inf; every finite
//     product in range is as above.
// The dtype codes of the C API (FusedOp, fused_lstm.h) pick the Op: with_op below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fused/barrier_wait.cuh"  // BarrierWatch, barrier_gives_up: the time bound of the wait
#include "common/cell.cuh"  // the cell and its activations
#include "common/dtype_convert.cuh"  // to_float / from_float: storage type <-> fp32
#include "fused/fused_lstm.h"
#include "fused/fused_plan.cuh"

namespace lstm {
namespace fused {

// ---- shared-memory addresses and fragments ---------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices (x4) or two (x2) from shared memory, non-transposed; lane l gives the
// address of row (l % 8) of matrix (l / 8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// d += a (16x16, row) x b (16x8, col), fp32 accumulators. Fragment layout of d (PTX ISA):
// lane l holds d[0], d[1] at row l/4, columns 2*(l%4) and +1; d[2], d[3] at row l/4 + 8.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a (16x8 tf32, row) x b (8x8 tf32, col), fp32 accumulators: the same fragment layouts as
// m16n8k16 with one 32-bit register where that has a pair of b16 (PTX ISA).
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t to_tf32(float x) {  // nearest, ties away from zero; low 13 bits zero
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// ---- operand precisions (see the top of this file) -----------------------------------------

struct Fp16Mma {
  using T = __half;
  static constexpr bool kTf32 = false, kSplit = false;
  using Activations = FastActivations;  // the cell's (common/cell.cuh)
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_16816<__half>(d, a, b);
  }
};
struct Bf16Mma {
  using T = __nv_bfloat16;
  static constexpr bool kTf32 = false, kSplit = false;
  using Activations = FastActivations;  // the cell's (common/cell.cuh)
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_16816<__nv_bfloat16>(d, a, b);
  }
};
struct Tf32Mma {
  using T = float;
  static constexpr bool kTf32 = true, kSplit = false;
  using Activations = FastActivations;  // the cell's (common/cell.cuh)
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_1688_tf32(d, a, b);
  }
};
struct Fp32Mma {
  using T = float;
  static constexpr bool kTf32 = true, kSplit = true;
  using Activations = PreciseActivations;  // the cell's (common/cell.cuh)
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_1688_tf32(d, a, b);
  }
};

// The four registers of one ldmatrix.x4 as Op's MMA takes them: the stored bits (16-bit types),
// rounded to tf32 (Tf32Mma), or split into big and small tf32 parts (Fp32Mma).
template <typename Op>
struct Frag {
  uint32_t big[4];
  uint32_t small[Op::kSplit ? 4 : 1];
};

template <typename Op>
__device__ __forceinline__ Frag<Op> frag_of(const uint32_t (&r)[4]) {
  Frag<Op> f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (!Op::kTf32) {
      f.big[i] = r[i];
    } else {
      const float x = __uint_as_float(r[i]);
      f.big[i] = to_tf32(x);
      if constexpr (Op::kSplit) f.small[i] = to_tf32(x - __uint_as_float(f.big[i]));  // x - big is exact
    }
  }
  return f;
}
template <typename Op>
__device__ __forceinline__ Frag<Op> ldsm_frag(uint32_t addr) {
  uint32_t r[4];
  ldmatrix_x4(r, addr);
  return frag_of<Op>(r);
}

// d += a x (b's n8 tile `half`: registers 2 half, 2 half + 1) over one chunk, in Op's precision. SWAPPED: a and b
// are the operands of a product taken transposed (the narrow backward's W^T x dG^T, where the ring's is dG x W^T),
// whose 3xTF32 cross terms are added in the untransposed product's order (its small A part times the big B part
// first), so that the sums are its bits.
template <typename Op, bool SWAPPED = false>
__device__ __forceinline__ void mma_chunk(float (&d)[4], const Frag<Op>& a, const Frag<Op>& b, int half) {
  const uint32_t b_big[2] = {b.big[2 * half], b.big[2 * half + 1]};
  if constexpr (Op::kSplit) {
    const uint32_t b_small[2] = {b.small[2 * half], b.small[2 * half + 1]};
    if constexpr (SWAPPED) {
      Op::mma(d, a.big, b_small);
      Op::mma(d, a.small, b_big);
    } else {
      Op::mma(d, a.small, b_big);
      Op::mma(d, a.big, b_small);
    }
  }
  Op::mma(d, a.big, b_big);
}

// Calls f(Op{}) for a FusedOp code of the C API (fused_lstm.h).
template <typename F>
cudaError_t with_op(int code, F&& f) {
  switch (code) {
    case kFusedFloat32: return f(Fp32Mma{});
    case kFusedFloat16: return f(Fp16Mma{});
    case kFusedBFloat16: return f(Bf16Mma{});
    case kFusedTf32: return f(Tf32Mma{});
    default: return cudaErrorInvalidValue;
  }
}

// ---- bulk asynchronous copy global -> shared (16 bytes, through L2 only: .cg) ----------------

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
// The same with `bytes` (0 or 16) read from src and the rest of the 16 bytes zero-filled.
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>  // until at most N of this thread's committed groups are pending
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// BATCH_TILE rows x n elements of T from src (row stride src_ld elements, 16-byte aligned rows) into
// dst (row stride dst_ld), by the lanes of one warp: lane c copies the 16-byte column c (and c + 32,
// ...) of every row, so there is no division by the runtime row length; a warp's k range is at
// most 32 columns of 16 bytes in the usual shapes (512 bytes: H <= 2048 in 16 bits), one pass.
// MASK_ROWS: row r lands as zeros where bit r of zero_rows is set (cp.async reading 0 source
// bytes: the same one instruction per 16 bytes, no extra store), the lanes spread over rows
// instead of columns; without it the plain copy.
template <typename T, bool MASK_ROWS = false>
__device__ __forceinline__ void warp_copy_rows_async(T* dst, int dst_ld, const T* src, int src_ld, int n, int lane,
                                                     uint32_t zero_rows = 0) {
  constexpr int per_copy = 16 / sizeof(T);
  const int columns = n / per_copy;
  if constexpr (MASK_ROWS) {
    // lane l copies row l % BATCH_TILE, columns l / BATCH_TILE + 2i: one source size for all its copies
    const int r = lane % BATCH_TILE;
    const uint32_t bytes = (zero_rows >> r) & 1u ? 0u : 16u, d = smem_addr(dst + r * dst_ld);
    const T* from = src + (size_t)r * src_ld;
    for (int c = lane / BATCH_TILE; c < columns; c += 32 / BATCH_TILE) cp_async_16_zfill(d + c * 16, from + c * per_copy, bytes);
  } else {
    for (int c = lane; c < columns; c += 32) {
      const uint32_t d = smem_addr(dst + c * per_copy);
      const T* from = src + c * per_copy;
#pragma unroll
      for (int r = 0; r < BATCH_TILE; ++r) cp_async_16(d + r * dst_ld * (int)sizeof(T), from + (size_t)r * src_ld);
    }
  }
}

// A resident weight slice into shared memory, by the whole block, once per launch: `rows` rows of
// src (n elements each, row stride n) into dst (row stride LD), zero in the padding columns [n, Kp).
template <typename T>
__device__ __forceinline__ void block_load_padded(T* dst, int LD, const T* src, int rows, int n, int Kp) {
  for (int idx = threadIdx.x; idx < rows * Kp; idx += THREADS) {
    const int r = idx / Kp, k = idx % Kp;
    dst[r * LD + k] = k < n ? src[(size_t)r * n + k] : from_float<T>(0.f);
  }
}

// ---- resets inside a sequence ---------------------------------------------------------------
// resets [T, B] uint8 (nonzero: row b starts step t from zero state). A warp reads the flags of its
// batch tile at step t with one byte load per lane (lanes < BATCH_TILE, rows < B) and one vote:
// bit r of the result is row b0 + r. Issued a step ahead (the load in flight across the grid wait),
// so a step pays the load's issue and the vote, not its latency.
__device__ __forceinline__ int reset_flag(const unsigned char* resets, int t, int B, int b0, int lane) {
  return lane < BATCH_TILE && b0 + lane < B ? resets[(size_t)t * B + b0 + lane] : 0;
}
__device__ __forceinline__ uint32_t reset_rows(int flag) { return __ballot_sync(0xffffffffu, flag != 0); }

// ---- the light grid barrier ----------------------------------------------------------------
// One counter per group of blocks that exchange data (blocks with the same batch tile):
// zeroed by the host before the launch, it only grows. After step t every block has added 1 once
// per half-step: the wait for step t's data is "counter >= (t + 1) * gridDim.x".

// Arrive, once per block, by the cell warps (warps 0-3, or CELL_THREADS / 32 of them, which alone store
// what other blocks read)
// right after their exchange stores: they meet at named barrier 1, then thread 0 adds 1 with
// release semantics at GPU scope. That release is the arrival's one fence (MEMBAR.ALL.GPU before
// the add). The barrier orders the other cell threads' stores before thread 0's release, and a
// release is cumulative (PTX memory model: causality order through bar.sync, as cooperative
// groups' grid sync relies on), so a block that acquires the count sees every exchange store.
// The stores no other block reads (h_all, act, c_all, dG, ...) are issued after the arrival,
// so the fence does not wait for them. The other warps, whose reads of the exchange ended
// before the block barrier that precedes the cell, do not take part.
template <int CELL_THREADS = CELL_WARPS * 32>
__device__ __forceinline__ void block_arrive(unsigned int* counter) {
  asm volatile("bar.sync 1, %0;" ::"n"(CELL_THREADS) : "memory");
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}

// Wait: every lane of the calling warp polls with acquire loads (one transaction for the warp)
// until every lane saw the counter reach target (wrap-safe); reads issued after it see the
// releasers' stores. A poll that finds the barrier open costs nothing more; after one that finds
// it closed, lane 0 asks barrier_gives_up (barrier_wait.cuh: the abort flag, then %globaltimer
// against watch.timeout_ns). Returns false (to the whole warp) when the wait gave up.
__device__ __forceinline__ bool grid_wait(const unsigned int* counter, unsigned int target, const BarrierWatch& watch,
                                          int step, int lane) {
  long long since = -1;
  bool ok = true;
  while (true) {
    unsigned int v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
    if (__all_sync(0xffffffffu, (int)(v - target) >= 0)) break;
    int give_up = 0;
    if (lane == 0) give_up = barrier::barrier_gives_up(watch, &since, step, blockIdx.y * gridDim.x + blockIdx.x);
    if (__shfl_sync(0xffffffffu, give_up, 0)) {
      ok = false;
      break;
    }
    __nanosleep(32);
  }
  __syncwarp();
  return ok;
}

// The top of a half-step that reads an exchange buffer: warp 0 waits (when `wait`) for the
// half-step that wrote it, and one block barrier passes the outcome to every warp, which then
// copies the part it reads itself (warp_fetch_columns, or the ring of split_k_mma_16x8_streamed).
// Returns false in every thread when the wait gave up (the block must leave).
__device__ __forceinline__ bool block_wait(const unsigned int* counter, unsigned int target, bool wait,
                                           const BarrierWatch& watch, int step, int warp, int lane, int* abort_s) {
  if (warp == 0) {
    const bool ok = !wait || grid_wait(counter, target, watch, step, lane);
    if (lane == 0) *abort_s = !ok;
  }
  __syncthreads();
  return !*abort_s;
}

// ---- the tagged exchange: the flag in the data --------------------------------------------
// The forward of the LSTM without projection, with W in registers, may exchange h_t without the grid
// barrier, as NCCL's LL protocol carries its flag: each 8-byte word holds two units of h_t (a b16
// pair) and the tag t + 1 (h0: tag 0), laid out by tagged_pos (fused_plan.cuh), and is written by one
// st.relaxed.gpu.u64. A naturally aligned 64-bit access is single-copy atomic (PTX memory model; a
// vector access is one such access per element), so a consumer that reads a word carrying the tag it
// waits for has that step's two values in the same access. No fence, no counter, no arrival: the
// wait is the operand loads themselves, repeated for the words whose tag is older.
//
// The two slots are reused without a barrier: a block stores h_{t+1} into the slot of h_{t-1} only
// after it has read every block's h_t (the step's wait, over every row active at t + 1, reset or not:
// a tile must not skip it), and each block stored its h_t only after it had read all of h_{t-1} (its
// MMAs consumed those loads before its block barrier, and the cell that stores h_t runs after that
// barrier), so no read of h_{t-1} is outstanding when the slot is overwritten. The PTX memory model
// alone does not order a relaxed load before a later relaxed store of another thread through a
// CTA barrier and a relaxed store (load buffering); what orders them is that the stores depend on the
// loads, on their values through the MMAs and on their tags through the branch that ends the wait (a
// store is not issued before the branch it follows resolves), as in NCCL's LL protocol.
__device__ __forceinline__ void store_tagged(unsigned long long* p, uint32_t data, uint32_t tag) {
  const unsigned long long v = (unsigned long long)tag << 32 | data;
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// Two adjacent words when `load`, else lo and hi unchanged: predicated in the instruction, so that the
// destination registers are the same either way (a branch around the load would make the compiler
// merge two values of each word in fresh registers, twice the registers a wait holds).
__device__ __forceinline__ void load_tagged_pair(const unsigned long long* p, bool load, unsigned long long& lo,
                                                 unsigned long long& hi) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.u32 p, %3, 0;\n@p ld.relaxed.gpu.global.v2.u64 {%0, %1}, [%2];\n}"
      : "+l"(lo), "+l"(hi)
      : "l"(p), "r"((uint32_t)load)
      : "memory");
}

// A stalled wait asks barrier_gives_up once per this many rounds of reloads (not after each, as
// grid_wait does after each closed poll): the abort flag's load would add an L2 round trip to a
// round, and the time bound is seconds.
constexpr int TAGGED_ROUNDS_PER_CHECK = 16;

// h_{t-1}'s B fragments (ldsm_b16's four registers, the ldmatrix of the shared tile they replace) of
// chunks ks_begin + i, i < n <= SLOTS, read by the calling warp from the tagged exchange: `rows` points
// at the batch tile's first row of the slot, `row_words` words per row. Lane l reads rows l/4 and
// l/4 + 8, at word tagged_pos(8 ks + l % 4) and the next one (pairs p, p + 4: registers 0, 1 of a row;
// 2, 3 of the row + 8). It waits for the words of rows in `need` (bit r: row b0 + r is active at the
// step) and pairs below `pairs` (units < P) to carry `tag`; rows outside `need` and rows in `zero`
// (reset at the step: h_{t-1} is zero, though they were waited for) read as zero (an inactive row's
// products are not used). Without `wait` (the first
// half-step of a launch, whose h_{t-1} an earlier launch or the host wrote) it reads once, as the
// counter's wait does not wait there either. Returns false, to the whole warp, when the wait gave up
// (barrier_gives_up: the launch's abort flag or its time bound).
template <int SLOTS>
__device__ __forceinline__ bool tagged_fetch(uint32_t (&h)[SLOTS][4], const unsigned long long* rows, int row_words,
                                             int ks_begin, int n, uint32_t tag, uint32_t need, uint32_t zero,
                                             int pairs, bool wait, const BarrierWatch& watch, int step, int lane) {
  const int r = lane >> 2;
  const bool need_row[2] = {((need >> r) & 1u) != 0, ((need >> (r + 8)) & 1u) != 0};
  const bool keep_row[2] = {need_row[0] && !((zero >> r) & 1u), need_row[1] && !((zero >> (r + 8)) & 1u)};
  // slot i's words sit 8 i words past the lane's words of slot 0 (tagged_lane_word)
  const unsigned long long* base[2] = {rows + tagged_lane_word(lane, 0, ks_begin, row_words),
                                       rows + tagged_lane_word(lane, 1, ks_begin, row_words)};
  const int pair0 = 8 * ks_begin + (lane & 3);  // the lane's first pair of slot 0; slot i's: + 8 i
  unsigned long long w[SLOTS][2][2];
  uint32_t pending = 0;  // bit 2i + half: slot i's row r (half 0) or r + 8 (half 1) not yet arrived
#pragma unroll
  for (int i = 0; i < SLOTS; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const bool load = i < n && need_row[half];
      w[i][half][0] = w[i][half][1] = 0ull;
      load_tagged_pair(base[half] + 8 * i, load, w[i][half][0], w[i][half][1]);
      if (load && wait && pair0 + 8 * i < pairs) pending |= 1u << (2 * i + half);
    }
  long long since = -1;
  for (int round = 1;; ++round) {
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const bool arrived = uint32_t(w[i][half][0] >> 32) == tag &&
                             (pair0 + 8 * i + 4 >= pairs || uint32_t(w[i][half][1] >> 32) == tag);
        if (arrived) pending &= ~(1u << (2 * i + half));
      }
    if (!__any_sync(0xffffffffu, pending != 0)) break;
    if (round % TAGGED_ROUNDS_PER_CHECK == 0) {
      int give_up = 0;
      if (lane == 0) give_up = barrier::barrier_gives_up(watch, &since, step, blockIdx.y * gridDim.x + blockIdx.x);
      if (__shfl_sync(0xffffffffu, give_up, 0)) return false;
    }
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        load_tagged_pair(base[half] + 8 * i, (pending >> (2 * i + half)) & 1u, w[i][half][0], w[i][half][1]);
  }
#pragma unroll
  for (int i = 0; i < SLOTS; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      h[i][2 * half] = keep_row[half] ? uint32_t(w[i][half][0]) : 0u;
      h[i][2 * half + 1] = keep_row[half] ? uint32_t(w[i][half][1]) : 0u;
    }
  return true;
}

// Columns [k0, k1) (multiples of 16 bytes) of BATCH_TILE rows of an exchange buffer (row stride ld
// elements) into the same columns of the padded shared tile dst (row stride LD), by the calling warp
// alone, which then reads only these columns: every warp copies the k range it multiplies (its
// share of the copies), and waits for its own copies only (cp.async.wait_all, then __syncwarp so
// that every lane sees the other lanes' copies). MASK_ROWS, zero_rows: as warp_copy_rows_async.
template <typename T, bool MASK_ROWS = false>
__device__ __forceinline__ void warp_fetch_columns(T* dst, int LD, const T* src, int ld, int k0, int k1, int lane,
                                                   uint32_t zero_rows = 0) {
  warp_copy_rows_async<T, MASK_ROWS>(dst + k0, LD, src + k0, ld, k1 - k0, lane, zero_rows);
  cp_async_wait_all();
  __syncwarp();
}

// One pair of chunks of a 16 x 8 product: A (16 rows, ldsm_a16 lane address a) x B (8 rows, two
// chunks at ldsm_b8x2 lane address b), chunk 0 into acc0 and chunk 1 into acc1 (two MMA chains).
template <typename Op>
__device__ __forceinline__ void mma_pair(float (&acc0)[4], float (&acc1)[4], uint32_t a, uint32_t b) {
  const Frag<Op> a0 = ldsm_frag<Op>(a), a1 = ldsm_frag<Op>(a + CHUNK_BYTES), bw = ldsm_frag<Op>(b);
  mma_chunk<Op>(acc0, a0, bw, 0);
  mma_chunk<Op>(acc1, a1, bw, 1);
}

// The block's sum of every warp's partial product, NT tiles of 16 x 8 (part: element e of tile n at
// 4 n + e, each acc0 + acc1 of its two MMA chains): through `red` ([WARPS][4 NT][32] floats) and one
// block barrier, added by warps 0 .. 4 NT - 1 in the fixed order w = 0..7 (deterministic). Returns, in
// warp v < 4 NT, the sum of element v % 4 of tile v / 4 of `lane`; 0 in the other warps.
template <int NT = 1>
__device__ __forceinline__ float sum_over_warps(const float (&part)[4 * NT], float* red, int warp, int lane) {
#pragma unroll
  for (int e = 0; e < 4 * NT; ++e) red[(warp * 4 * NT + e) * 32 + lane] = part[e];
  __syncthreads();
  float sum = 0.f;
  if (warp < 4 * NT) {
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += red[(w * 4 * NT + warp) * 32 + lane];
  }
  return sum;
}
__device__ __forceinline__ float sum_over_warps(const float (&acc0)[4], const float (&acc1)[4], float* red, int warp,
                                                int lane) {
  const float part[4] = {acc0[0] + acc1[0], acc0[1] + acc1[1], acc0[2] + acc1[2], acc0[3] + acc1[3]};
  return sum_over_warps<1>(part, red, warp, lane);
}

// One 16 x 8 product A[16, K] . B[K, 8] with K split over the block's warps: each warp runs its
// pairs of chunks [kp_begin, kp_end) (two accumulators, so two MMA chains overlap) from the
// ldmatrix addresses a_base (ldsm_a16) and b_base (ldsm_b8x2), 64 bytes per pair, in Op's
// precision, when `active`; the partial sums
// meet in `red` ([WARPS][4][32] floats) and warps 0-3 add them in the fixed order w = 0..7
// (deterministic). Every thread of the block must call it: it passes one block barrier. Returns,
// in warp w < 4, the sum of fragment element w of `lane`; 0 in the other warps.
template <typename Op>
__device__ __forceinline__ float split_k_mma_16x8(uint32_t a_base, uint32_t b_base, int kp_begin, int kp_end,
                                                  bool active, float* red, int warp, int lane) {
  float acc0[4] = {}, acc1[4] = {};
  if (active) {
#pragma unroll 1
    for (int kp = kp_begin; kp < kp_end; ++kp)
      mma_pair<Op>(acc0, acc1, a_base + kp * 2 * CHUNK_BYTES, b_base + kp * 2 * CHUNK_BYTES);
  }
  return sum_over_warps(acc0, acc1, red, warp, lane);
}

// split_k_mma_16x8 with A (16 rows x K) streamed from an exchange buffer in global memory (src:
// row b0, row stride ld elements) instead of a whole shared tile: each warp copies its own pairs of
// chunks [kp_begin, kp_end) through a private ring of RING_STAGES slots (ring: WARP_RING_BYTES of
// shared memory), STAGE_PAIRS pairs per stage, RING_STAGES - 1 stages in flight while it multiplies
// the oldest. The backward's dG tile (16 x 4H) is the large operand: streamed, it needs a fixed
// 9 KB per warp instead of 16 x 4H x sizeof(T) per block, so float fits at the flagship. Every
// thread of the block must call it (one block barrier); the result is split_k_mma_16x8's.
//
// Every stage is multiplied whole: the pairs of a short last stage that lie past kp_end are
// zero-filled by their copies (cp.async with 0 source bytes) and multiplied with the W pair at
// the stage's start (finite values), adding exact zeros, so the loop body has no predicated MMA.
// A lane's copies keep their ring and source offsets from stage to stage (4 rows x one 16-byte
// column per lane), so a stage costs 4 cp.async and a few address additions.
//
// PAIRS: pairs of chunks per stage (STAGE_PAIRS, or 1 where a warp's count of pairs is odd at the
// design shape, so that no zero pair is multiplied: the GRU's 3H); the ring holds as many stages of
// PAIRS as fit in WARP_RING_BYTES (RING_STAGES of STAGE_PAIRS; 7 of one pair), RING_STAGES - 1 or more
// in flight.
template <typename Op, int PAIRS = STAGE_PAIRS, typename T = typename Op::T>
__device__ __forceinline__ float split_k_mma_16x8_streamed(const T* src, int ld, unsigned char* ring, uint32_t b_base,
                                                           int kp_begin, int kp_end, bool active, float* red,
                                                           int warp, int lane) {
  constexpr int kStageRowBytes = stage_row_bytes(PAIRS), kStageBytes = stage_bytes(PAIRS);
  constexpr int kStages = WARP_RING_BYTES / kStageBytes;
  static_assert(kStages >= RING_STAGES, "at least RING_STAGES - 1 stages in flight");
  constexpr int kRow = PAIRS * 2 * CHUNK_BYTES / 16;  // 16-byte copies per row of a stage
  constexpr int kRowsPerPass = 32 / kRow;                   // rows the warp copies per cp.async instruction
  static_assert(32 % kRow == 0 && BATCH_TILE % kRowsPerPass == 0, "a stage is whole passes of the warp");
  float acc0[4] = {}, acc1[4] = {};
  if (active) {
    const int n_stages = (kp_end - kp_begin + PAIRS - 1) / PAIRS;
    const int col = lane % kRow, row = lane / kRow;  // this lane's 16-byte column and first row
    const uint32_t ring_lane = smem_addr(ring) + row * kStageRowBytes + col * 16;
    const size_t row_bytes = (size_t)ld * sizeof(T);
    const unsigned char* src_row = reinterpret_cast<const unsigned char*>(src) + row * row_bytes +
                                   (size_t)kp_begin * 2 * CHUNK_BYTES;
    auto issue = [&](int s) {  // stage s into slot s % kStages; one commit group per stage, empty past the end
      if (s < n_stages) {
        const int pairs = min(PAIRS, kp_end - kp_begin - s * PAIRS);
        const bool copy = col < pairs * (2 * CHUNK_BYTES / 16);  // else zero-fill, from the stage's column 0
        const uint32_t dst = ring_lane + (s % kStages) * kStageBytes;
        const unsigned char* from = src_row + (size_t)s * PAIRS * 2 * CHUNK_BYTES + (copy ? col * 16 : 0);
#pragma unroll
        for (int r = 0; r < BATCH_TILE; r += kRowsPerPass)
          cp_async_16_zfill(dst + r * kStageRowBytes, from + r * row_bytes, copy ? 16u : 0u);
      }
      cp_async_commit();
    };
    const uint32_t a_lane = ldsm_a16(lane, kStageRowBytes);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) issue(s);
#pragma unroll 1
    for (int s = 0; s < n_stages; ++s) {
      issue(s + kStages - 1);  // into the slot multiplied in iteration s - 1 (its __syncwarp below)
      cp_async_wait_group<kStages - 1>();
      __syncwarp();  // stage s has landed, copied by every lane
      const uint32_t slot = smem_addr(ring) + (s % kStages) * kStageBytes + a_lane;
      const int p0 = kp_begin + s * PAIRS;
#pragma unroll
      for (int i = 0; i < PAIRS; ++i) {
        const int p = p0 + i < kp_end ? p0 + i : p0;  // past kp_end: zeros times the stage's first W pair
        mma_pair<Op>(acc0, acc1, slot + i * 2 * CHUNK_BYTES, b_base + p * 2 * CHUNK_BYTES);
      }
      __syncwarp();  // every lane has read slot s % kStages before it is refilled
    }
    cp_async_wait_all();  // the empty groups
  }
  return sum_over_warps(acc0, acc1, red, warp, lane);
}

// 16 bytes from global memory through L2 only (ld.global.cg) when `load`, else v unchanged (predicated in the
// instruction, as load_tagged_pair). Volatile keeps the loads in program order before the compiler's back end;
// ptxas may still sink a load to its use, which the caller's __syncwarp after its loads rules out.
__device__ __forceinline__ void load_cg_16(uint4& v, const void* p, bool load) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.u32 p, %5, 0;\n@p ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
               : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
               : "l"(p), "r"((uint32_t)load)
               : "memory");
}

// The wide backward's product (fused_plan.cuh, "the wide backward"): dG (16 rows x K) x the resident
// W^T slice of 8 NT units, K split over the warps as split_k_mma_16x8's. Each warp loads its pairs of
// chunks [kp_begin, kp_end) of dG straight from the exchange (src: the batch tile's first row, rows of
// row_bytes bytes, laid out by wide_exchange_pos) into A fragments, SLOTS pairs at a time: one 16-byte
// load per row half and pair, a batch's loads all issued before its first MMA (8 SLOTS registers: a range
// of at most SLOTS pairs in flight at once, one L2 round trip; a longer one in ceil(range / SLOTS)),
// through L2 only (ld.global.cg: the slot is rewritten two steps later, and L1 is not coherent). B comes
// from the W^T slice by ldmatrix (b_base: ldsm_b8x2's lane address of n tile 0; tile n is 8 n rows of ldb
// bytes further). The MMAs of each tile
// run in split_k_mma_16x8's order (chunk 0 of a pair into acc0, chunk 1 into acc1), on the operands the
// ring's ldmatrix would give, so the sums are the ring's bits. Every thread of the block must call it
// (one block barrier). Returns sum_over_warps<NT>'s.
template <typename Op, int NT, int SLOTS>
__device__ __forceinline__ float split_k_mma_wide(const unsigned char* src, int row_bytes, uint32_t b_base, int ldb,
                                                  int kp_begin, int kp_end, bool active, float* red, int warp,
                                                  int lane) {
  float acc[NT][2][4] = {};
  if (active) {
#pragma unroll 1
    for (int base = kp_begin; base < kp_end; base += SLOTS) {  // one trip where the range fits the slots
      const int n = min(SLOTS, kp_end - base);
      uint4 a[SLOTS][2] = {};
#pragma unroll
      for (int i = 0; i < SLOTS; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          load_cg_16(a[i][half], src + wide_lane_byte(lane, half, base + i, row_bytes), i < n);
      __syncwarp();  // a memory-ordering point ptxas keeps the loads above: all in flight, none sunk to its MMA
#pragma unroll
      for (int i = 0; i < SLOTS; ++i) {
        if (i < n) {
          // chunk 0: a0 = row r word 0, a1 = row r + 8 word 0, a2, a3 = words 1; chunk 1: words 2, 3
          const uint32_t r0[4] = {a[i][0].x, a[i][1].x, a[i][0].y, a[i][1].y};
          const uint32_t r1[4] = {a[i][0].z, a[i][1].z, a[i][0].w, a[i][1].w};
          const Frag<Op> a0 = frag_of<Op>(r0), a1 = frag_of<Op>(r1);
          const uint32_t b_pair = b_base + (base + i) * 2 * CHUNK_BYTES;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const Frag<Op> bw = ldsm_frag<Op>(b_pair + nt * 8 * ldb);
            mma_chunk<Op>(acc[nt][0], a0, bw, 0);
            mma_chunk<Op>(acc[nt][1], a1, bw, 1);
          }
        }
      }
    }
  }
  float part[4 * NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) part[4 * nt + e] = acc[nt][0][e] + acc[nt][1][e];
  return sum_over_warps<NT>(part, red, warp, lane);
}

// The narrow backward's product (fused_plan.cuh, "THE NARROW BACKWARD"): the resident W^T slice (16 units x K, the
// MMA's A) x dG^T (K x 8 batch rows, B), K split over the warps as split_k_mma_16x8's. Each warp loads its pairs
// of chunks [kp_begin, kp_end) of dG straight from the exchange (src: the 8-row tile's first row, rows of
// row_bytes bytes, wide_exchange_pos's layout) into B fragments, SLOTS pairs at a time as split_k_mma_wide does:
// one 16-byte load per pair (row lane / 4: the b0, b1 of both chunks), a batch's loads all issued before its
// first MMA (4 SLOTS registers). A comes from w_reg (W_SLOTS == SLOTS and w_in_registers: the warp's fragments
// of pair kp_begin + i in w_reg[i], held for the whole launch; the range is one batch) or else by 2 ldmatrix.x4
// per pair from the slice (a_base: ldsm_a16's lane address of chunk 0). One MMA per chunk into the pair's two
// chains, chunk 0 into acc0, chunk 1 into acc1, as split_k_mma_16x8 orders them (3xTF32's cross terms in the
// ring's order: mma_chunk's SWAPPED). Every thread of the block must
// call it (one block barrier). Returns sum_over_warps's: in warp w < 4, element w of the lane's fragment of the
// 16 x 8 (units x rows) sum.
template <typename Op, int SLOTS, int W_SLOTS>
__device__ __forceinline__ float split_k_mma_narrow(const unsigned char* src, int row_bytes, uint32_t a_base,
                                                    const Frag<Op> (&w_reg)[W_SLOTS][2], bool w_in_registers,
                                                    int kp_begin, int kp_end, bool active, float* red, int warp,
                                                    int lane) {
  float acc0[4] = {}, acc1[4] = {};
  auto batch = [&](int base, int n, auto a_frag) {  // pairs [base, base + n), n <= SLOTS; a_frag(i, chunk)
    uint4 v[SLOTS] = {};
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) load_cg_16(v[i], src + wide_lane_byte(lane, 0, base + i, row_bytes), i < n);
    __syncwarp();  // as split_k_mma_wide's: the loads all in flight, none sunk to its MMA
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
      if (i < n) {
        const uint32_t r[4] = {v[i].x, v[i].y, v[i].z, v[i].w};  // b0, b1 of chunk 0, then of chunk 1
        const Frag<Op> bw = frag_of<Op>(r);
        mma_chunk<Op, true>(acc0, a_frag(i, 0), bw, 0);
        mma_chunk<Op, true>(acc1, a_frag(i, 1), bw, 1);
      }
    }
  };
  if (active) {
    bool done = false;
    if constexpr (W_SLOTS == SLOTS) {
      if (w_in_registers) {
        batch(kp_begin, kp_end - kp_begin, [&](int i, int c) { return w_reg[i][c]; });
        done = true;
      }
    }
    if (!done) {
#pragma unroll 1
      for (int base = kp_begin; base < kp_end; base += SLOTS)  // one trip where the range fits the slots
        batch(base, min(SLOTS, kp_end - base),
              [&](int i, int c) { return ldsm_frag<Op>(a_base + (base + i) * 2 * CHUNK_BYTES + c * CHUNK_BYTES); });
    }
  }
  return sum_over_warps(acc0, acc1, red, warp, lane);
}

}  // namespace fused
}  // namespace lstm
