// Host-side API of the CUDA kernels, called by bindings.cpp. Plain C++ types
// and raw device pointers: no libtorch. Every function returns a Status that
// names the kernel that failed (ok() when none did).
//
// Dimension names: T steps, B batch, H hidden units. Gate order along 4H:
// i, f, g, o. Layouts are row-major and contiguous (the Python side ensures it).
#pragma once

#include <cuda_runtime.h>

#include "barrier_wait.cuh"

#include <cstddef>
#include <map>
#include <mutex>
#include <tuple>

namespace lstm {

struct Status {
  cudaError_t error = cudaSuccess;
  const char* where = "";
  // The runtime refused a cooperative launch that the plan allowed (MPS, MIG, green
  // contexts, SMs held elsewhere): nothing ran, and the per-step kernels may still run.
  bool cooperative_refused = false;
  bool ok() const { return error == cudaSuccess; }
};

// The runtime errors of a cooperative launch that the plan allowed but the runtime refused
// (MPS client limits, MIG, green contexts, SMs held by another context): nothing ran, and
// the per-step kernels can still serve the call.
constexpr cudaError_t kCooperativeRefusals[] = {cudaErrorCooperativeLaunchTooLarge, cudaErrorNotSupported,
                                                cudaErrorNotPermitted, cudaErrorLaunchOutOfResources};

inline bool cooperative_launch_refused(cudaError_t err) {
  for (const cudaError_t e : kCooperativeRefusals) {
    if (err == e) return true;
  }
  return false;
}

// Which kernel runs the recurrence: one launch per step, one cooperative
// launch for all steps, or the persistent one when it fits (else per-step).
enum Variant : int { kStep = 0, kPersistent = 1, kAuto = 2 };

// The persistent-or-per-step decision for one kernel, dtype and H (persistent.cuh).
struct PersistentPlan {
  bool possible = false;
  const char* why = "not planned";  // why not, when !possible
  int blocks = 0;                   // grid size of the persistent kernel
  int blocks_per_sm = 0;            // occupancy with its shared memory
  int sm_count = 0;
  size_t dynamic_smem = 0;  // bytes: the block's W_hh slice
  size_t static_smem = 0;   // bytes: the tile buffers
};

// Planning a persistent launch costs six runtime calls and a cudaFuncSetAttribute;
// the plan depends only on (device, kernel, grid size, dynamic shared memory), so it
// is computed once per key and kept (thread-safe; a failed plan is not kept).
class PlanCache {
 public:
  using Key = std::tuple<int, const void*, int, size_t>;  // device, kernel, blocks, dynamic smem

  // The plan of `key`: from the cache, or compute(plan) (under the lock, so one key is
  // planned once even when threads race) and kept when it succeeds.
  template <typename Compute>
  Status get(const Key& key, PersistentPlan* plan, Compute compute) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = plans_.find(key);
    if (it != plans_.end()) {
      ++hits_;
      *plan = it->second;
      return Status{};
    }
    ++planned_;
    const Status st = compute(plan);
    if (st.ok()) plans_.emplace(key, *plan);
    return st;
  }
  void stats(long long* planned, long long* hits, long long* size) {
    std::lock_guard<std::mutex> lock(mu_);
    *planned = planned_;
    *hits = hits_;
    *size = (long long)plans_.size();
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    plans_.clear();
    planned_ = hits_ = 0;
  }

 private:
  std::mutex mu_;
  std::map<Key, PersistentPlan> plans_;
  long long planned_ = 0, hits_ = 0;
};

// The process-wide cache of the persistent plans (defined in lstm_forward.cu).
PlanCache& plan_cache();

// The persistent kernels' grid barrier: with watch.state null (the C++ default) cooperative
// groups' grid.sync(), without bound. Otherwise (the Python launch code always) a hand-written
// barrier (persistent.cuh's bounded_grid_sync: an arrival counter in state[0], release before the
// arrival, acquire after the wait) bounded in time by watch.timeout_ns (barrier_wait.cuh): the
// first block to give up raises the abort flag and fills the device's error record, every block
// leaves the kernel, and the host raises at its next look (barrier_bound.py).
// Forward recurrence (the per-step or the persistent kernel, see variant).
//   xg     [T, B, 4H] dtype     input projection + biases
//   w_hh   [4H, H]    dtype
//   h0     [B, H]     dtype
//   c0     [B, H]     dtype
//   h_all  [T, B, H]  dtype     out: h_t for every step
//   c_T    [B, H]     dtype     out: the last cell state
//   act    [T, B, 4H] fp32      out, or null: activated gates (i, f, g, o), for backward
//   c_all  [T, B, H]  fp32      out, or null: cell states c_t, for backward
//   c_work [B, H]     fp32      scratch for the cell state (used when c_all is null)
//   variant           Variant   requested; *used gets the one that ran
//   mma               bool      the recurrent matmul on tensor cores (wmma): fp16/bf16 operands, tf32 for
//                               fp32 (ask for it only where TF32 is allowed)
//   barrier           BarrierWatch  the persistent kernel's grid barrier (default: grid.sync())
//   resets [T, B]     uint8     or null: nonzero where row b starts step t from h_{t-1} = 0, c_{t-1} = 0;
//                               served by the per-step kernel only (kPersistent refused, kAuto runs per-step)
Status forward(int dtype, const void* xg, const void* w_hh, const void* h0, const void* c0, void* h_all,
               void* c_T, float* act, float* c_all, float* c_work, int T, int B, int H, int variant, bool mma,
               int* used, cudaStream_t stream, BarrierWatch barrier = BarrierWatch{},
               const unsigned char* resets = nullptr);

// Backward recurrence (BPTT), one launch per step plus a last one for dh0.
//   w_hh    [4H, H]    dtype
//   c0      [B, H]     dtype
//   act     [T, B, 4H] fp32   saved by forward
//   c_all   [T, B, H]  fp32   saved by forward
//   dh_all  [T, B, H]  dtype  gradient of h_all
//   dh_T    [B, H]     dtype
//   dc_T    [B, H]     dtype
//   dG      [T, B, 4H] dtype  out: gradients of the gate pre-activations
//   dh0     [B, H]     dtype  out
//   dc0     [B, H]     dtype  out
//   dg_work [2, B, 4H] fp32   scratch: dG_t in fp32, ping-pong between steps
//   dc_work [B, H]     fp32   scratch: the cell-state gradient carried between steps
//   variant            Variant  requested; *used gets the one that ran
//   mma                bool     dG_{t+1} W_hh on tf32 tensor cores (dG is fp32; 16-bit W is exact in tf32)
//   barrier            BarrierWatch  the persistent kernel's grid barrier (default: grid.sync())
//   resets [T, B]      uint8    or null, as forward's: nothing flows back across a reset (dh_{t-1}, dc_{t-1}
//                               leave step t as 0 for that row; dG_t unchanged); per-step kernel only
Status backward(int dtype, const void* w_hh, const void* c0, const float* act, const float* c_all,
                const void* dh_all, const void* dh_T, const void* dc_T, void* dG, void* dh0, void* dc0,
                float* dg_work, float* dc_work, int T, int B, int H, int variant, bool mma, int* used,
                cudaStream_t stream, BarrierWatch barrier = BarrierWatch{}, const unsigned char* resets = nullptr);

// Occupancy: resident blocks per SM of the per-step kernel ("forward" or
// "backward") of the given dtype, and the persistent plan for hidden size H
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor with its shared memory);
// mma picks the kernels' tensor-core instantiation.
Status occupancy(const char* direction, int dtype, int H, bool mma, int* step_blocks_per_sm, int* threads_per_block,
                 PersistentPlan* plan);
Status forward_occupancy(int dtype, int H, bool mma, int* blocks_per_sm, PersistentPlan* plan);
Status backward_occupancy(int dtype, int H, bool mma, int* blocks_per_sm, PersistentPlan* plan);

}  // namespace lstm
