// Compile-time switches instead of copied branches (after mamba's
// static_switch.h): DTYPE_SWITCH turns a runtime dtype code into a type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

namespace lstm {

// Dtype codes of the per-step kernels, shared with lstm_kernels/backends/cuda/extension.py.
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace lstm

#define LSTM_DTYPE_SWITCH(CODE, T, ...)                                                  \
  [&] {                                                                                  \
    switch (CODE) {                                                                      \
      case ::lstm::kFloat32: {                                                           \
        using T = float;                                                                 \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      case ::lstm::kFloat16: {                                                           \
        using T = __half;                                                                \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      case ::lstm::kBFloat16: {                                                          \
        using T = __nv_bfloat16;                                                         \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      default:                                                                           \
        throw std::invalid_argument("unknown dtype code " + std::to_string(CODE));       \
    }                                                                                    \
  }()

// BOOL_SWITCH(cond, NAME, ...): a runtime bool as the compile-time constant NAME.
#define LSTM_BOOL_SWITCH(COND, NAME, ...)  \
  [&] {                                    \
    if (COND) {                            \
      constexpr bool NAME = true;          \
      return __VA_ARGS__();                \
    } else {                               \
      constexpr bool NAME = false;         \
      return __VA_ARGS__();                \
    }                                      \
  }()

// GATES_SWITCH(gates, NAME, ...): the cell's gate rows per unit (4: the LSTM, 3: the GRU) as the
// compile-time constant NAME.
#define LSTM_GATES_SWITCH(GATES, NAME, ...)                                                      \
  [&] {                                                                                          \
    if ((GATES) == 3) {                                                                          \
      constexpr int NAME = 3;                                                                    \
      return __VA_ARGS__();                                                                      \
    }                                                                                            \
    if ((GATES) != 4) throw std::invalid_argument("gates must be 4 (LSTM) or 3 (GRU), got " +   \
                                                  std::to_string(GATES));                        \
    constexpr int NAME = 4;                                                                      \
    return __VA_ARGS__();                                                                        \
  }()
