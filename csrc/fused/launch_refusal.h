// Host side, for bindings.cpp: which runtime errors of a fused kernel's cooperative launch count as a
// refusal. The plan (fused_launch.cuh's kernel_plan) allowed the launch, but the runtime refused it
// (MPS client limits, MIG, green contexts, SMs held by another context): nothing ran, and the same
// kernel can still serve the call one launch per (half-)step. bindings.cpp raises these as
// _C.CooperativeLaunchRefused, which lstm_kernels/backends/cuda/fused.py catches.
#pragma once

#include <cuda_runtime.h>

namespace lstm {

constexpr cudaError_t kCooperativeRefusals[] = {cudaErrorCooperativeLaunchTooLarge, cudaErrorNotSupported,
                                                cudaErrorNotPermitted, cudaErrorLaunchOutOfResources};

inline bool cooperative_launch_refused(cudaError_t err) {
  for (const cudaError_t e : kCooperativeRefusals) {
    if (err == e) return true;
  }
  return false;
}

}  // namespace lstm
