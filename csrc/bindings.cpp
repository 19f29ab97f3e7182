// pybind11 module lstm_kernels._C: argument checks, and the calls into both kernel families. No
// libtorch: tensors arrive as device pointers (Python ints), sizes, a dtype code and the CUDA stream
// as an int; lstm_kernels/backends/cuda/ validates shapes, allocates outputs and picks the stream. A
// CUDA error becomes a RuntimeError naming the kernel and cudaGetErrorString; a bad argument a
// ValueError.
//
// The fused kernels at the budget of one step (fused/fused_forward.cu, fused/fused_backward.cu, C
// API in fused/fused_lstm.h): fused_forward, fused_backward and fused_plan; cuda/fused.py prepares
// their layouts. A cooperative launch the runtime refused (fused/launch_refusal.h) becomes
// _C.CooperativeLaunchRefused, a RuntimeError that cuda/fused.py catches to run the same kernel one
// launch per (half-)step.
//
// The per-step kernels (step/step_forward.cu, step/step_backward.cu, API in step/step_kernels.h):
// step_forward and step_backward, the fallback where the fused kernels cannot serve a call.
//
// Also: host entry points running the cell math of common/cell.cuh on numpy arrays (tests check it
// without a GPU) and CUDA queries (runtime status, device count, device properties).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/cell.cuh"
#include "fused/barrier_wait.cuh"
#include "fused/fused_lstm.h"
#include "fused/launch_refusal.h"
#include "step/static_switch.h"
#include "step/step_kernels.h"

namespace py = pybind11;

namespace {

// Raised (as _C.CooperativeLaunchRefused) when the runtime refuses a planned cooperative launch.
struct CooperativeLaunchRefused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void check_status(const lstm::Status& st) {
  if (!st.ok()) {
    throw std::runtime_error(std::string(st.where) + " failed: " + cudaGetErrorString(st.error) + " (" +
                             cudaGetErrorName(st.error) + ")");
  }
}

// The time bound of a fused persistent launch's grid barrier (fused/barrier_wait.cuh): a per-launch state, the
// device's error record, the bound in ns (0: none) and the kernel's code in the record.
lstm::BarrierWatch barrier_watch(const char* fn, uintptr_t state, uintptr_t record, int64_t timeout_ns,
                                 int64_t kernel) {
  if (state != 0 && (record == 0 || timeout_ns < 0 || kernel < 1)) {
    throw std::invalid_argument(std::string(fn) + ": with barrier_state, barrier_record must be set, "
                                "barrier_timeout_ns >= 0 and barrier_kernel >= 1");
  }
  return lstm::BarrierWatch{reinterpret_cast<unsigned long long*>(state), reinterpret_cast<long long*>(record),
                            (long long)timeout_ns, (long long)kernel};
}

void check_sizes(const char* fn, int64_t T, int64_t B, int64_t H) {
  if (T < 1 || B < 1 || H < 1) {
    throw std::invalid_argument(std::string(fn) + ": T, B and H must be >= 1, got T=" + std::to_string(T) +
                                " B=" + std::to_string(B) + " H=" + std::to_string(H));
  }
  if (4 * H * B > INT32_MAX || H > INT32_MAX / 4) {
    throw std::invalid_argument(std::string(fn) + ": B * 4H must fit in int32");
  }
}

void check_dtype(const char* fn, int dtype) {
  if (dtype != lstm::kFloat32 && dtype != lstm::kFloat16 && dtype != lstm::kBFloat16) {
    throw std::invalid_argument(std::string(fn) + ": unknown dtype code " + std::to_string(dtype) +
                                " (0 float32, 1 float16, 2 bfloat16)");
  }
}

template <typename P>
P* ptr(const char* fn, const char* name, uintptr_t p, bool optional = false) {
  if (p == 0 && !optional) throw std::invalid_argument(std::string(fn) + ": null pointer for " + name);
  return reinterpret_cast<P*>(p);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// The cell of a per-step call: 4 (the LSTM) or 3 (the GRU, which has no cell state).
bool check_gates(const char* fn, int64_t gates) {
  if (gates != 3 && gates != 4) {
    throw std::invalid_argument(std::string(fn) + ": gates must be 4 (LSTM) or 3 (GRU), got " + std::to_string(gates));
  }
  return gates == 3;
}

// The per-step kernels. resets: a uint8 [T, B] device buffer (nonzero: the row starts step t from
// zero state), or 0. gates: 4 (LSTM) or 3 (GRU: c0 and c_T are 0, b_hn the n gate's recurrent bias or 0).
void step_forward(int dtype, uintptr_t xg, uintptr_t w_hh, uintptr_t h0, uintptr_t c0, uintptr_t h_all,
                  uintptr_t c_T, uintptr_t act, uintptr_t c_all, uintptr_t c_work, int64_t T, int64_t B, int64_t H,
                  uintptr_t stream, bool mma, uintptr_t resets, int64_t gates, uintptr_t b_hn) {
  const char* fn = "lstm_kernels._C.step_forward";
  check_dtype(fn, dtype);
  check_sizes(fn, T, B, H);
  const bool gru = check_gates(fn, gates);
  if ((act == 0) != (c_all == 0)) throw std::invalid_argument(std::string(fn) + ": act and c_all go together");
  if (c_all == 0 && c_work == 0) throw std::invalid_argument(std::string(fn) + ": c_work is needed without c_all");
  lstm::Status st;
  {
    py::gil_scoped_release nogil;
    st = lstm::step_forward(dtype, ptr<const void>(fn, "xg", xg), ptr<const void>(fn, "w_hh", w_hh),
                            ptr<const void>(fn, "h0", h0), ptr<const void>(fn, "c0", c0, gru),
                            ptr<void>(fn, "h_all", h_all), ptr<void>(fn, "c_T", c_T, gru),
                            ptr<float>(fn, "act", act, true), ptr<float>(fn, "c_all", c_all, true),
                            ptr<float>(fn, "c_work", c_work, true), (int)T, (int)B, (int)H, mma, stream_of(stream),
                            ptr<const unsigned char>(fn, "resets", resets, true), (int)gates,
                            ptr<const void>(fn, "b_hn", b_hn, true));
  }
  check_status(st);
}

// gates 3 (GRU): c0, dc_T and dc0 are 0; h0 and h_all (the forward's) and d_hn [T, B, H] are given.
void step_backward(int dtype, uintptr_t w_hh, uintptr_t c0, uintptr_t act, uintptr_t c_all, uintptr_t dh_all,
                   uintptr_t dh_T, uintptr_t dc_T, uintptr_t dG, uintptr_t dh0, uintptr_t dc0, uintptr_t dg_work,
                   uintptr_t dc_work, int64_t T, int64_t B, int64_t H, uintptr_t stream, bool mma,
                   uintptr_t resets, int64_t gates, uintptr_t h0, uintptr_t h_all, uintptr_t d_hn) {
  const char* fn = "lstm_kernels._C.step_backward";
  check_dtype(fn, dtype);
  check_sizes(fn, T, B, H);
  const bool gru = check_gates(fn, gates);
  lstm::Status st;
  {
    py::gil_scoped_release nogil;
    st = lstm::step_backward(dtype, ptr<const void>(fn, "w_hh", w_hh), ptr<const void>(fn, "c0", c0, gru),
                             ptr<const float>(fn, "act", act), ptr<const float>(fn, "c_all", c_all),
                             ptr<const void>(fn, "dh_all", dh_all), ptr<const void>(fn, "dh_T", dh_T),
                             ptr<const void>(fn, "dc_T", dc_T, gru), ptr<void>(fn, "dG", dG), ptr<void>(fn, "dh0", dh0),
                             ptr<void>(fn, "dc0", dc0, gru), ptr<float>(fn, "dg_work", dg_work),
                             ptr<float>(fn, "dc_work", dc_work), (int)T, (int)B, (int)H, mma, stream_of(stream),
                             ptr<const unsigned char>(fn, "resets", resets, true), (int)gates,
                             ptr<const void>(fn, "h0", h0, !gru), ptr<const void>(fn, "h_all", h_all, !gru),
                             ptr<void>(fn, "d_hn", d_hn, !gru));
  }
  check_status(st);
}

// A fused kernel's cudaError_t code as an exception (CooperativeLaunchRefused for a refused
// cooperative launch: nothing ran, the per-step mode may still serve the call).
void check_fused(int err, const char* kernel) {
  if (err == 0) return;
  const cudaError_t e = static_cast<cudaError_t>(err);
  (void)cudaGetLastError();
  const std::string msg = std::string("lstm ") + kernel + " failed: " + cudaGetErrorString(e) + " (" +
                          cudaGetErrorName(e) + ")";
  if (lstm::cooperative_launch_refused(e)) throw CooperativeLaunchRefused(msg);
  throw std::runtime_error(msg);
}

void check_fused_args(const char* fn, int dtype, int64_t T, int64_t B, int64_t H, int64_t P, bool proj) {
  if (dtype < kFusedFloat32 || dtype > kFusedTf32) {
    throw std::invalid_argument(std::string(fn) + ": dtype code " + std::to_string(dtype) +
                                " is not served (0 float32, 1 float16, 2 bfloat16, 3 float32 on tf32)");
  }
  check_sizes(fn, T, B, H);
  if (P < 1 || P > H || (proj != (P < H))) {
    throw std::invalid_argument(std::string(fn) + ": P must be H, or proj_size < H with w_hr given");
  }
}

// The backward's tile (fused_lstm.h): 0 the ring's, 1 the wide, 2 the narrow backward's.
void check_backward_tile(const char* fn, int tile) {
  if (tile < 0 || tile > 2)
    throw std::invalid_argument(std::string(fn) + ": tile must be 0 (ring), 1 (wide) or 2 (narrow), got " +
                                std::to_string(tile));
}

// The cell of a fused call (check_gates); the GRU has no projection.
bool check_fused_gates(const char* fn, int gates, bool proj) {
  const bool gru = check_gates(fn, gates);
  if (gru && proj) throw std::invalid_argument(std::string(fn) + ": the GRU has no projection");
  return gru;
}

void fused_forward(int dtype, uintptr_t xg, uintptr_t w_fwd, uintptr_t w_hr, uintptr_t c0, uintptr_t c_work,
                   uintptr_t hx, uintptr_t mx, uintptr_t h_all, uintptr_t h_T, uintptr_t c_T, uintptr_t act,
                   uintptr_t c_all, uintptr_t batch_sizes, uintptr_t counters, int64_t T, int64_t B, int64_t H,
                   int64_t P, int persistent, uintptr_t stream, uintptr_t barrier_state, uintptr_t barrier_record,
            int64_t barrier_timeout_ns, int64_t barrier_kernel, uintptr_t resets, int gates, uintptr_t b_hn,
            int w_registers, uintptr_t hx_tagged) {
  const char* fn = "lstm_kernels._C.fused_forward";
  const lstm::BarrierWatch dbg = barrier_watch(fn, barrier_state, barrier_record, barrier_timeout_ns, barrier_kernel);
  check_fused_args(fn, dtype, T, B, H, P, w_hr != 0);
  if ((act == 0) != (c_all == 0)) throw std::invalid_argument(std::string(fn) + ": act and c_all go together");
  if (w_hr != 0 && mx == 0) throw std::invalid_argument(std::string(fn) + ": mx is needed with w_hr");
  const bool lstm_cell = !check_fused_gates(fn, gates, w_hr != 0);
  int err;
  {
    py::gil_scoped_release nogil;
    err = lstm_fused_forward(dtype, ptr<const void>(fn, "xg", xg), ptr<const void>(fn, "w_fwd", w_fwd),
                             ptr<const void>(fn, "w_hr", w_hr, true), ptr<const void>(fn, "c0", c0, !lstm_cell),
                             ptr<float>(fn, "c_work", c_work, !lstm_cell), ptr<void>(fn, "hx", hx),
                             ptr<void>(fn, "mx", mx, true), ptr<void>(fn, "h_all", h_all), ptr<void>(fn, "h_T", h_T),
                             ptr<void>(fn, "c_T", c_T, !lstm_cell),
                             ptr<float>(fn, "act", act, true), ptr<float>(fn, "c_all", c_all, true),
                             ptr<const int>(fn, "batch_sizes", batch_sizes, true),
                             ptr<const unsigned char>(fn, "resets", resets, true),
                             ptr<unsigned int>(fn, "counters", counters), (int)T, (int)B, (int)H, (int)P,
                             persistent ? 1 : 0, dbg.state, dbg.record, dbg.timeout_ns, dbg.kernel,
                             reinterpret_cast<void*>(stream), gates, ptr<const void>(fn, "b_hn", b_hn, true),
                             w_registers ? 1 : 0, ptr<void>(fn, "hx_tagged", hx_tagged, true));
  }
  check_fused(err, persistent ? "fused_forward_kernel (cooperative launch)" : "fused_forward_kernel");
}

void fused_backward(int dtype, uintptr_t w_bwd, uintptr_t w_hrT, uintptr_t act, uintptr_t c_all, uintptr_t c0,
                    uintptr_t dh_all, uintptr_t dh_T, uintptr_t dc_T, uintptr_t dc_work, uintptr_t dgx,
                    uintptr_t dhx, uintptr_t dG, uintptr_t dh0, uintptr_t dc0, uintptr_t dh_tot,
                    uintptr_t batch_sizes, uintptr_t counters, int64_t T, int64_t B, int64_t H, int64_t P,
                    int persistent, uintptr_t stream, uintptr_t barrier_state, uintptr_t barrier_record,
            int64_t barrier_timeout_ns, int64_t barrier_kernel, uintptr_t resets, int gates, uintptr_t h_all,
            uintptr_t d_hn, int tile) {
  const char* fn = "lstm_kernels._C.fused_backward";
  check_backward_tile(fn, tile);
  const lstm::BarrierWatch dbg = barrier_watch(fn, barrier_state, barrier_record, barrier_timeout_ns, barrier_kernel);
  check_fused_args(fn, dtype, T, B, H, P, w_hrT != 0);
  const bool gru = check_fused_gates(fn, gates, w_hrT != 0);
  if (w_hrT != 0 && (dhx == 0 || dh_tot == 0))
    throw std::invalid_argument(std::string(fn) + ": dhx and dh_tot are needed with w_hrT");
  int err;
  {
    py::gil_scoped_release nogil;
    err = lstm_fused_backward(
        dtype, ptr<const void>(fn, "w_bwd", w_bwd), ptr<const void>(fn, "w_hrT", w_hrT, true),
        ptr<const float>(fn, "act", act), ptr<const float>(fn, "c_all", c_all), ptr<const void>(fn, "c0", c0),
        ptr<const void>(fn, "dh_all", dh_all), ptr<const void>(fn, "dh_T", dh_T),
        ptr<const void>(fn, "dc_T", dc_T, gru), ptr<float>(fn, "dc_work", dc_work), ptr<void>(fn, "dgx", dgx),
        ptr<void>(fn, "dhx", dhx, true), ptr<void>(fn, "dG", dG), ptr<void>(fn, "dh0", dh0),
        ptr<void>(fn, "dc0", dc0, gru),
        ptr<float>(fn, "dh_tot", dh_tot, true), ptr<const int>(fn, "batch_sizes", batch_sizes, true),
        ptr<const unsigned char>(fn, "resets", resets, true), ptr<unsigned int>(fn, "counters", counters), (int)T, (int)B, (int)H, (int)P, persistent ? 1 : 0, dbg.state,
        dbg.record, dbg.timeout_ns, dbg.kernel, reinterpret_cast<void*>(stream), gates,
        ptr<const void>(fn, "h_all", h_all, !gru), ptr<void>(fn, "d_hn", d_hn, !gru), tile);
  }
  check_fused(err, persistent ? "fused_backward_kernel (cooperative launch)" : "fused_backward_kernel");
}

py::dict fused_plan(const std::string& direction, int dtype, int64_t B, int64_t H, int64_t P, bool resets,
                    int gates, int tile, int w_registers) {
  const char* fn = "lstm_kernels._C.fused_plan";
  check_backward_tile(fn, tile);
  check_fused_args(fn, dtype, 1, B, H, P, P < H);
  check_fused_gates(fn, gates, P < H);
  int blocks = 0, possible = 0, tile_serves = 0;
  size_t smem = 0;
  int err;
  if (direction == "forward") {
    err = lstm_fused_forward_plan(dtype, (int)B, (int)H, (int)P, resets ? 1 : 0, &blocks, &smem, &possible, gates,
                                  w_registers ? 1 : 0);
  } else if (direction == "backward") {
    err = lstm_fused_backward_plan(dtype, (int)B, (int)H, (int)P, resets ? 1 : 0, &blocks, &smem, &possible, gates,
                                   tile, &tile_serves);
  } else {
    throw std::invalid_argument("unknown kernel direction '" + direction + "' (forward or backward)");
  }
  check_fused(err, "fused plan (cudaOccupancyMaxActiveBlocksPerMultiprocessor)");
  py::dict d;
  d["blocks"] = blocks;
  d["smem"] = (long long)smem;
  d["possible"] = possible == 1;  // the persistent grid is co-resident
  d["fits"] = possible != 0;      // the block fits in shared memory (per-step launches at least)
  d["tile"] = tile_serves;        // the backward's: the tile of the kernel planned (0 the ring's, the forward's)
  return d;
}

// (count, None) or (0, "why not"): never raises, so import-time probing is safe.
py::tuple device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    return py::make_tuple(0, std::string(cudaGetErrorString(err)));
  }
  return py::make_tuple(n, py::none());
}

// What the extension's own (statically linked) CUDA runtime sees: (error code of
// cudaGetDeviceCount, its "name: description" or None, device count, runtime version,
// driver version (0 without a driver)). Never raises. torch's runtime may see a GPU
// that this one cannot use (a driver older than the nvcc that built the extension:
// cudaErrorInsufficientDriver); the cuda backend then reports itself unavailable.
py::tuple runtime_status() {
  int n = 0, runtime = 0, driver = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    n = 0;
  }
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  (void)cudaGetLastError();
  py::object msg = py::none();
  if (err != cudaSuccess) msg = py::str(std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
  return py::make_tuple((int)err, msg, n, runtime, driver);
}

// Attributes the launch plans depend on, for one device.
py::dict device_properties(int device) {
  py::dict d;
  int v = 0;
  const std::pair<const char*, cudaDeviceAttr> attrs[] = {
      {"multiprocessor_count", cudaDevAttrMultiProcessorCount},
      {"cooperative_launch", cudaDevAttrCooperativeLaunch},
      {"max_shared_memory_per_block_optin", cudaDevAttrMaxSharedMemoryPerBlockOptin},
      {"max_shared_memory_per_multiprocessor", cudaDevAttrMaxSharedMemoryPerMultiprocessor},
      {"compute_capability_major", cudaDevAttrComputeCapabilityMajor},
      {"compute_capability_minor", cudaDevAttrComputeCapabilityMinor},
  };
  for (const auto& a : attrs) {
    check_status(lstm::Status{cudaDeviceGetAttribute(&v, a.second, device), "cudaDeviceGetAttribute"});
    d[a.first] = v;
  }
  return d;
}

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

// The host runs below take the cell's activations as the kernels do (common/cell.cuh): fast (16-bit and
// tf32 kernels) or precise (float32 accuracy).
template <class Fn>
auto with_activations(bool fast, Fn&& fn) {
  return fast ? fn(lstm::FastActivations{}) : fn(lstm::PreciseActivations{});
}

// Host run of lstm::cell_forward. pre [N, 4] (i, f, g, o), c_prev [N] ->
// (act [N, 4], c [N], h [N]), all float32.
py::tuple cell_forward_host(F32 pre, F32 c_prev, bool fast) {
  if (pre.ndim() != 2 || pre.shape(1) != 4) throw std::invalid_argument("pre must have shape [N, 4]");
  const py::ssize_t n = pre.shape(0);
  if (c_prev.ndim() != 1 || c_prev.shape(0) != n) throw std::invalid_argument("c_prev must have shape [N]");
  F32 act({n, (py::ssize_t)4}), c({n}), h({n});
  const float* p = pre.data();
  const float* cp = c_prev.data();
  float* a = act.mutable_data();
  float* co = c.mutable_data();
  float* ho = h.mutable_data();
  with_activations(fast, [&](auto act_policy) {
    using Act = decltype(act_policy);
    for (py::ssize_t k = 0; k < n; ++k) {
      lstm::Gates g;
      lstm::cell_forward<Act>(p[4 * k], p[4 * k + 1], p[4 * k + 2], p[4 * k + 3], cp[k], &g, &co[k], &ho[k]);
      a[4 * k] = g.i;
      a[4 * k + 1] = g.f;
      a[4 * k + 2] = g.g;
      a[4 * k + 3] = g.o;
    }
  });
  return py::make_tuple(act, c, h);
}

// Host run of lstm::cell_backward. dh, dc [N], act [N, 4], c_prev, c [N] ->
// (d_pre [N, 4], dc_prev [N]), all float32.
py::tuple cell_backward_host(F32 dh, F32 dc, F32 act, F32 c_prev, F32 c, bool fast) {
  if (act.ndim() != 2 || act.shape(1) != 4) throw std::invalid_argument("act must have shape [N, 4]");
  const py::ssize_t n = act.shape(0);
  for (const F32* v : {&dh, &dc, &c_prev, &c}) {
    if (v->ndim() != 1 || v->shape(0) != n) throw std::invalid_argument("dh, dc, c_prev and c must have shape [N]");
  }
  F32 d_pre({n, (py::ssize_t)4}), dc_prev({n});
  const float* a = act.data();
  float* d = d_pre.mutable_data();
  float* dcp = dc_prev.mutable_data();
  with_activations(fast, [&](auto act_policy) {
    using Act = decltype(act_policy);
    for (py::ssize_t k = 0; k < n; ++k) {
      const lstm::Gates g{a[4 * k], a[4 * k + 1], a[4 * k + 2], a[4 * k + 3]};
      lstm::GateGrads gg;
      lstm::cell_backward<Act>(dh.data()[k], dc.data()[k], g, c_prev.data()[k], c.data()[k], &gg, &dcp[k]);
      d[4 * k] = gg.i;
      d[4 * k + 1] = gg.f;
      d[4 * k + 2] = gg.g;
      d[4 * k + 3] = gg.o;
    }
  });
  return py::make_tuple(d_pre, dc_prev);
}

// Host run of lstm::gru_cell_forward. pre [N, 4] (pr, pz, xn, hn), h_prev [N] -> (act [N, 3] (r, z, n),
// h [N]), all float32.
py::tuple gru_cell_forward_host(F32 pre, F32 h_prev, bool fast) {
  if (pre.ndim() != 2 || pre.shape(1) != 4) throw std::invalid_argument("pre must have shape [N, 4]");
  const py::ssize_t n = pre.shape(0);
  if (h_prev.ndim() != 1 || h_prev.shape(0) != n) throw std::invalid_argument("h_prev must have shape [N]");
  F32 act({n, (py::ssize_t)3}), h({n});
  const float* p = pre.data();
  float* a = act.mutable_data();
  with_activations(fast, [&](auto act_policy) {
    using Act = decltype(act_policy);
    for (py::ssize_t k = 0; k < n; ++k) {
      lstm::GruGates g;
      lstm::gru_cell_forward<Act>(p[4 * k], p[4 * k + 1], p[4 * k + 2], p[4 * k + 3], h_prev.data()[k], &g,
                                  &h.mutable_data()[k]);
      a[3 * k] = g.r;
      a[3 * k + 1] = g.z;
      a[3 * k + 2] = g.n;
    }
  });
  return py::make_tuple(act, h);
}

// Host run of lstm::gru_cell_backward. dh [N], act [N, 3], hn [N], h_prev [N] -> grads [N, 5]
// (r, z, n, hn, h_prev: the gradients of pr, pz, xn, hn and the direct part of h_prev's), float32.
F32 gru_cell_backward_host(F32 dh, F32 act, F32 hn, F32 h_prev) {
  if (act.ndim() != 2 || act.shape(1) != 3) throw std::invalid_argument("act must have shape [N, 3]");
  const py::ssize_t n = act.shape(0);
  for (const F32* v : {&dh, &hn, &h_prev}) {
    if (v->ndim() != 1 || v->shape(0) != n) throw std::invalid_argument("dh, hn and h_prev must have shape [N]");
  }
  F32 grads({n, (py::ssize_t)5});
  const float* a = act.data();
  float* d = grads.mutable_data();
  for (py::ssize_t k = 0; k < n; ++k) {
    lstm::GruGrads g;
    lstm::gru_cell_backward(dh.data()[k], lstm::GruGates{a[3 * k], a[3 * k + 1], a[3 * k + 2]}, hn.data()[k],
                            h_prev.data()[k], &g);
    d[5 * k] = g.r;
    d[5 * k + 1] = g.z;
    d[5 * k + 2] = g.n;
    d[5 * k + 3] = g.hn;
    d[5 * k + 4] = g.h_prev;
  }
  return grads;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "LSTM recurrence kernels (CUDA): the fused kernels and the per-step fallback; pointers, sizes and"
            " streams as Python ints";
  m.attr("DTYPE_FLOAT32") = (int)lstm::kFloat32;
  m.attr("DTYPE_FLOAT16") = (int)lstm::kFloat16;
  m.attr("DTYPE_BFLOAT16") = (int)lstm::kBFloat16;
  m.attr("FUSED_FLOAT32") = (int)kFusedFloat32;  // the fused kernels' codes (fused/fused_lstm.h)
  m.attr("FUSED_FLOAT16") = (int)kFusedFloat16;
  m.attr("FUSED_BFLOAT16") = (int)kFusedBFloat16;
  m.attr("FUSED_TF32") = (int)kFusedTf32;
  m.attr("CUDA_RUNTIME_VERSION") = CUDART_VERSION;
  py::register_exception<CooperativeLaunchRefused>(m, "CooperativeLaunchRefused", PyExc_RuntimeError);
  {
    py::dict refusals;  // cudaError_t code -> name, of the errors raised as CooperativeLaunchRefused
    for (const cudaError_t e : lstm::kCooperativeRefusals) refusals[py::int_((int)e)] = cudaGetErrorName(e);
    m.attr("COOPERATIVE_REFUSALS") = refusals;
  }
  m.def("step_forward", &step_forward,
        "Forward recurrence by the per-step kernels (csrc/step/step_kernels.h), one launch per step; mma: the"
        " matmul on tensor cores (wmma), else fp32 FMA; resets: a uint8 [T, B] device buffer or 0",
        py::arg("dtype"), py::arg("xg"), py::arg("w_hh"), py::arg("h0"), py::arg("c0"), py::arg("h_all"),
        py::arg("c_T"), py::arg("act"), py::arg("c_all"), py::arg("c_work"), py::arg("T"), py::arg("B"),
        py::arg("H"), py::arg("stream"), py::arg("mma") = false, py::arg("resets") = 0, py::arg("gates") = 4,
        py::arg("b_hn") = 0);
  m.def("step_backward", &step_backward,
        "Backward recurrence by the per-step kernels, one launch per step and one for dh0; mma: tf32 tensor"
        " cores; resets: as for step_forward; see csrc/step/step_kernels.h",
        py::arg("dtype"), py::arg("w_hh"), py::arg("c0"), py::arg("act"), py::arg("c_all"), py::arg("dh_all"),
        py::arg("dh_T"), py::arg("dc_T"), py::arg("dG"), py::arg("dh0"), py::arg("dc0"), py::arg("dg_work"),
        py::arg("dc_work"), py::arg("T"), py::arg("B"), py::arg("H"), py::arg("stream"), py::arg("mma") = false,
        py::arg("resets") = 0, py::arg("gates") = 4, py::arg("h0") = 0, py::arg("h_all") = 0, py::arg("d_hn") = 0);
  m.def("fused_forward", &fused_forward,
        "Fused forward at the budget of one step (dtype: a FusedOp code; csrc/fused/fused_lstm.h); persistent:"
        " one cooperative launch, else one launch per half-step; barrier_state (a zeroed int64 [2] device"
        " buffer, or 0: no bound), barrier_record (the device's int64 [4] error record), barrier_timeout_ns (0:"
        " no bound) and barrier_kernel (its code in the record): the time bound of the grid wait, see"
        " csrc/fused/barrier_wait.cuh; resets: a uint8 [T, B] device buffer or 0; gates: 4 the LSTM, 3 the GRU"
        " (c0, c_work, c_T 0; b_hn [H] or 0); w_registers: 1 the instance that keeps the W slice in registers where"
        " it fits (0: the one without that path, fewer registers); hx_tagged:"
        " 0, or the tagged exchange of h (uint64 [2, Bp, Pk / 2], slot 1 h0 with tag 0) used where it serves",
        py::arg("dtype"), py::arg("xg"), py::arg("w_fwd"), py::arg("w_hr"), py::arg("c0"), py::arg("c_work"),
        py::arg("hx"), py::arg("mx"), py::arg("h_all"), py::arg("h_T"), py::arg("c_T"), py::arg("act"),
        py::arg("c_all"), py::arg("batch_sizes"), py::arg("counters"), py::arg("T"), py::arg("B"), py::arg("H"),
        py::arg("P"), py::arg("persistent"), py::arg("stream"), py::arg("barrier_state") = 0,
        py::arg("barrier_record") = 0, py::arg("barrier_timeout_ns") = 0, py::arg("barrier_kernel") = 0,
        py::arg("resets") = 0, py::arg("gates") = 4, py::arg("b_hn") = 0, py::arg("w_registers") = 0,
        py::arg("hx_tagged") = 0);
  m.def("fused_backward", &fused_backward,
        "Fused backward at the budget of one step (dtype: a FusedOp code, dG exchanged in the storage dtype;"
        " csrc/fused/fused_lstm.h; barrier_*, resets, gates: as for fused_forward; the GRU: c0 its h0, dc_T and"
        " dc0 0, h_all and d_hn; tile: 1 the wide, 2 the narrow backward where it serves, 0 the ring's)",
        py::arg("dtype"), py::arg("w_bwd"), py::arg("w_hrT"), py::arg("act"), py::arg("c_all"), py::arg("c0"),
        py::arg("dh_all"), py::arg("dh_T"), py::arg("dc_T"), py::arg("dc_work"), py::arg("dgx"), py::arg("dhx"),
        py::arg("dG"), py::arg("dh0"), py::arg("dc0"), py::arg("dh_tot"), py::arg("batch_sizes"),
        py::arg("counters"), py::arg("T"), py::arg("B"), py::arg("H"), py::arg("P"), py::arg("persistent"),
        py::arg("stream"), py::arg("barrier_state") = 0, py::arg("barrier_record") = 0,
        py::arg("barrier_timeout_ns") = 0, py::arg("barrier_kernel") = 0, py::arg("resets") = 0, py::arg("gates") = 4,
        py::arg("h_all") = 0, py::arg("d_hn") = 0, py::arg("tile") = 0);
  m.def("fused_plan", &fused_plan,
        "The fused kernels' plan on the current device: {'blocks', 'smem', 'possible' (persistent grid"
        " co-resident), 'fits' (the block's shared memory fits), 'tile' (the backward's: the tile of the"
        " kernel planned)}; resets: of the kernel that serves resets; tile: the backward's tile asked for;"
        " w_registers: the forward's, of its instance with the register path",
        py::arg("direction"), py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("P"), py::arg("resets") = false,
        py::arg("gates") = 4, py::arg("tile") = 0, py::arg("w_registers") = 0);
  m.def("runtime_status", &runtime_status,
        "(error code, 'name: description' or None, device count, runtime version, driver version) of the"
        " extension's own CUDA runtime (cudaGetDeviceCount, cudaRuntimeGetVersion, cudaDriverGetVersion)");
  m.def("device_count", &device_count, "(number of CUDA devices, None) or (0, reason)");
  m.def("device_properties", &device_properties, "SM count, cooperative launch, shared memory of a device",
        py::arg("device"));
  m.def("cell_forward_host", &cell_forward_host, "common/cell.cuh forward on the host (tests)", py::arg("pre"),
        py::arg("c_prev"), py::arg("fast"));
  m.def("cell_backward_host", &cell_backward_host, "common/cell.cuh backward on the host (tests)", py::arg("dh"),
        py::arg("dc"), py::arg("act"), py::arg("c_prev"), py::arg("c"), py::arg("fast"));
  m.def("gru_cell_forward_host", &gru_cell_forward_host, "common/cell.cuh GRU forward on the host (tests)",
        py::arg("pre"), py::arg("h_prev"), py::arg("fast"));
  m.def("gru_cell_backward_host", &gru_cell_backward_host, "common/cell.cuh GRU backward on the host (tests)",
        py::arg("dh"), py::arg("act"), py::arg("hn"), py::arg("h_prev"));
}
