// The persistent-or-per-step decision: a persistent kernel (one cooperative
// launch for all T steps, its W_hh slice in shared memory, cooperative_groups
// grid sync between steps) runs only when the device supports cooperative
// launch, the block's shared memory fits, and every block of the grid can be
// co-resident (cudaOccupancyMaxActiveBlocksPerMultiprocessor x SM count).
// The plan is computed once per (device, kernel, grid, shared memory) and cached
// (PlanCache, lstm_cuda.h). Also here: the time-bounded grid barrier of the persistent kernels.
#pragma once

#include <cuda_runtime.h>

#include "barrier_wait.cuh"
#include "dtype_convert.cuh"
#include "lstm_cuda.h"

namespace lstm {

// A failed runtime call stays recorded as the "last error" of the extension's
// runtime; clear it, so that a later cudaGetLastError() after a good launch does
// not report it against another kernel.
inline Status failed(cudaError_t err, const char* where) {
  (void)cudaGetLastError();
  return Status{err, where};
}

// The plan itself (uncached): six runtime queries and the shared-memory attribute.
inline Status compute_persistent_plan(int dev, const void* kernel, int blocks, size_t dynamic_smem, const char* name,
                                      PersistentPlan* plan) {
  *plan = PersistentPlan{};
  plan->blocks = blocks;
  plan->dynamic_smem = dynamic_smem;
  int coop = 0, sms = 0, optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return failed(err, name);
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return failed(err, name);
  plan->static_smem = attr.sharedSizeBytes;
  if (!coop) {
    plan->why = "the device does not support cooperative launch";
    return Status{};
  }
  if (dynamic_smem + attr.sharedSizeBytes > (size_t)optin) {
    plan->why = "W_hh slice does not fit in shared memory";
    return Status{};
  }
  // The attribute is per kernel and process-wide: set it to the most the kernel can
  // take (not to this H's need), so a concurrent plan for another H never lowers it
  // under a launch that is already planned.
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             optin - (int)attr.sharedSizeBytes);
  if (err != cudaSuccess) return failed(err, name);
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, STEP_THREADS, dynamic_smem);
  if (err != cudaSuccess) return failed(err, name);
  plan->blocks_per_sm = per_sm;
  plan->sm_count = sms;
  if ((long long)per_sm * sms < blocks) {
    plan->why = "the grid cannot be co-resident (too many blocks for the SMs)";
    return Status{};
  }
  plan->possible = true;
  plan->why = "";
  return Status{};
}

// The plan of `kernel` on the current device, from the cache (computed on first use).
inline Status persistent_plan(const void* kernel, int blocks, size_t dynamic_smem, const char* name,
                              PersistentPlan* plan) {
  int dev = 0;
  const cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return failed(err, name);
  return plan_cache().get(PlanCache::Key{dev, kernel, blocks, dynamic_smem}, plan, [&](PersistentPlan* p) {
    return compute_persistent_plan(dev, kernel, blocks, dynamic_smem, name, p);
  });
}

// The bounded grid barrier (BarrierWatch, barrier_wait.cuh), used instead of grid.sync() when
// watch.state is set (the Python launch code always sets it); the grid is co-resident (cooperative
// launch). `generation` counts the barriers this kernel has passed, from 1; `step` names the
// barrier in the record. Thread (0, 0) of each block arrives (release: the block's writes, ordered
// by __syncthreads and __threadfence, before its arrival) and polls the counter state[0] until
// every block of this generation arrived (acquire: __threadfence after the wait); after a poll that
// finds it closed it asks barrier_gives_up (the abort flag, then the GPU clock against
// watch.timeout_ns). Returns false to every thread of a block that gave up: the kernel must return.
__device__ __forceinline__ bool bounded_grid_sync(const BarrierWatch& watch, long long generation, int step) {
  __shared__ int passed_s;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    int passed = 1;
    __threadfence();
    atomicAdd(watch.state, 1ull);
    const long long target = generation * (long long)gridDim.x;
    volatile unsigned long long* arrivals = watch.state;
    long long since = -1;
    while ((long long)arrivals[0] < target) {
      if (barrier::barrier_gives_up(watch, &since, step, blockIdx.x)) {
        passed = 0;
        break;
      }
      __nanosleep(128);
    }
    __threadfence();
    passed_s = passed;
  }
  __syncthreads();
  return passed_s != 0;
}

// The one variant decision of both directions. Unless `variant` is kStep, plan the
// persistent kernel (plan_for(&plan)) and, where it can run, launch it cooperatively
// with `args` (pointers to its arguments, in order); a forced kPersistent that cannot
// run is an error. Otherwise run_step() launches the per-step kernels. *used gets
// the variant that ran. A cooperative launch the runtime refuses returns a Status with
// cooperative_refused set, for kAuto too: the caller (cuda.py) retries with kStep.
template <typename PlanFn, typename StepFn>
Status run_variant(int variant, const void* persistent_kernel, const char* name, void** args, PlanFn plan_for,
                   StepFn run_step, int* used, cudaStream_t stream) {
  if (variant != kStep) {
    PersistentPlan plan;
    const Status st = plan_for(&plan);
    if (!st.ok()) return st;
    if (plan.possible) {
      *used = kPersistent;
      const cudaError_t err = cudaLaunchCooperativeKernel(persistent_kernel, dim3(plan.blocks), dim3(TILE_J, TILE_B),
                                                          args, plan.dynamic_smem, stream);
      if (err == cudaSuccess) return Status{};
      Status st = failed(err, name);
      st.cooperative_refused = cooperative_launch_refused(err);
      return st;
    }
    if (variant == kPersistent) {
      return Status{cudaErrorCooperativeLaunchTooLarge,
                    "lstm persistent kernel requested but not possible (see _C.occupancy for why)"};
    }
  }
  *used = kStep;
  return run_step();
}

}  // namespace lstm
