// The persistent-or-per-step decision: a persistent kernel (one cooperative
// launch for all T steps, its W_hh slice in shared memory, cooperative_groups
// grid sync between steps) runs only when the device supports cooperative
// launch, the block's shared memory fits, and every block of the grid can be
// co-resident (cudaOccupancyMaxActiveBlocksPerMultiprocessor x SM count).
#pragma once

#include <cuda_runtime.h>

#include "dtype_convert.cuh"
#include "lstm_cuda.h"

namespace lstm {

inline Status persistent_plan(const void* kernel, int blocks, size_t dynamic_smem, const char* name,
                              PersistentPlan* plan) {
  *plan = PersistentPlan{};
  plan->blocks = blocks;
  plan->dynamic_smem = dynamic_smem;
  int dev = 0, coop = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return Status{err, name};
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return Status{err, name};
  plan->static_smem = attr.sharedSizeBytes;
  if (!coop) {
    plan->why = "the device does not support cooperative launch";
    return Status{};
  }
  if (dynamic_smem + attr.sharedSizeBytes > (size_t)optin) {
    plan->why = "W_hh slice does not fit in shared memory";
    return Status{};
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dynamic_smem);
  if (err != cudaSuccess) return Status{err, name};
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, STEP_THREADS, dynamic_smem);
  if (err != cudaSuccess) return Status{err, name};
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

}  // namespace lstm
