// The time bound of the fused kernels' grid barrier in their persistent launch (fused_common.cuh's
// grid_wait), and the error record a wait that gave up leaves for the host
// (lstm_kernels/backends/barrier_bound.py reads it). Compiles as CUDA and as host C++: the host
// build (tests/cuda_host/barrier_wait_check.cpp) runs the same give-up logic on CPU threads.
//
// A wait polls its barrier; only when a poll finds it closed (the slow path) does it call
// barrier_gives_up, which reads the launch's abort flag and the clock (%globaltimer, ns, on the GPU):
// the first failed poll of a wait takes the start time, a later one gives up once more than
// timeout_ns have passed since. The first block of the launch to give up raises the abort flag,
// so every other block's waits give up at their next failed poll: a stalled launch ends after one
// bound, not one per step. The first give-up on the device since the host last looked also fills
// the device's error record (kernel, step, block, time waited), which the host copies back
// asynchronously and raises on.
#pragma once

#ifdef __CUDACC__
#define LSTM_BARRIER_FN __device__ __forceinline__
#else
#include <atomic>
#include <chrono>
#define LSTM_BARRIER_FN inline
#endif

namespace lstm {

// What a persistent launch's barriers need to give up. state null: no bound and no record (the C
// API's default; the Python launch code always passes one).
struct BarrierWatch {
  unsigned long long* state = nullptr;  // [2] per launch, zeroed by the host: unused, gave up
  long long* record = nullptr;          // [4] per device: kernel code, step, block, ns waited (0: none)
  long long timeout_ns = 0;             // a wait gives up after this long (GPU clock); 0: no bound
  long long kernel = 0;                 // this kernel's code in the record (barrier_bound.KERNELS)
};

namespace barrier {

#ifdef __CUDACC__
__device__ __forceinline__ long long now_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ bool claim(unsigned long long* p) { return atomicCAS(p, 0ull, 1ull) == 0ull; }
__device__ __forceinline__ bool claim_record(long long* p, long long kernel) {
  return atomicCAS(reinterpret_cast<unsigned long long*>(p), 0ull, (unsigned long long)kernel) == 0ull;
}
#else
// The host build's clock, counted (clock_reads) so the host check can tell the open-barrier path
// reads no clock: steady_clock, or the function LSTM_BARRIER_HOST_CLOCK names (declared before
// this header is included: the host check's fake clock).
inline long long clock_reads = 0;
inline long long now_ns() {
  ++clock_reads;
#ifdef LSTM_BARRIER_HOST_CLOCK
  return LSTM_BARRIER_HOST_CLOCK();
#else
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
#endif
}
inline unsigned long long load_acquire(const unsigned long long* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline bool claim(unsigned long long* p) {
  unsigned long long expected = 0;
  return __atomic_compare_exchange_n(p, &expected, 1ull, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
inline bool claim_record(long long* p, long long kernel) {
  long long expected = 0;
  return __atomic_compare_exchange_n(p, &expected, kernel, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
#endif

// The slow path of one wait, called by one thread after a poll found the barrier closed: whether
// the wait gives up. *since is the wait's start (-1 until its first failed poll). The block that
// gives up first in the launch raises the abort flag; the first on the device since the host
// reset the record names itself there (`step`: the step the barrier waited after, `block`).
LSTM_BARRIER_FN bool barrier_gives_up(const BarrierWatch& w, long long* since, long long step, long long block) {
  if (w.state == nullptr) return false;
  if (load_acquire(w.state + 1) != 0ull) return true;  // another block gave up
  if (w.timeout_ns <= 0) return false;
  const long long now = now_ns();
  if (*since < 0) {
    *since = now;
    return false;
  }
  if (now - *since <= w.timeout_ns) return false;
  if (claim(w.state + 1) && w.record != nullptr && claim_record(w.record, w.kernel)) {
    w.record[1] = step;
    w.record[2] = block;
    w.record[3] = now - *since;
  }
  return true;
}

}  // namespace barrier
}  // namespace lstm
