// The LSTM cell math, shared by the forward and backward kernels and by the
// host test entry points of bindings.cpp (compiled by g++ there, by nvcc in
// the kernels): one definition, tested on the host without a GPU.
//
// Dimension names: T steps, B batch, H hidden units.
// Gate order along 4H: i (input), f (forget), g (cell candidate), o (output),
// PyTorch's. All cell math is fp32: pre-activations, activations, the cell
// state. Precise expf/tanhf (no --use_fast_math), to match the reference.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define LSTM_HD __host__ __device__ __forceinline__
#else
#define LSTM_HD inline
#endif

namespace lstm {

// sigmoid(x) = 1 / (1 + exp(-x)); exp(-x) overflows to +inf for x < -88,
// giving exactly 0, and underflows to 0 for large x, giving exactly 1.
LSTM_HD float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

LSTM_HD float tanh_f(float x) { return tanhf(x); }

// Activated gates of one hidden unit of one batch row.
struct Gates {
  float i, f, g, o;
};

// Forward of one cell: pre-activations (i, f, g, o) and c_prev ->
// activations, c = f*c_prev + i*g, h = o*tanh(c) (h before rounding to the
// storage dtype; the kernels round it).
LSTM_HD Gates cell_activations(float pi, float pf, float pg, float po) {
  Gates a;
  a.i = sigmoidf(pi);
  a.f = sigmoidf(pf);
  a.g = tanh_f(pg);
  a.o = sigmoidf(po);
  return a;
}

LSTM_HD void cell_forward(float pi, float pf, float pg, float po, float c_prev, Gates* act, float* c,
                          float* h) {
  const Gates a = cell_activations(pi, pf, pg, po);
  const float c_new = a.f * c_prev + a.i * a.g;
  *act = a;
  *c = c_new;
  *h = a.o * tanh_f(c_new);
}

// Backward of one cell. Inputs: dh (gradient of h_t, from the output and from
// step t+1), dc (gradient of c_t from step t+1, already multiplied by f_{t+1}),
// the activations of step t, c_prev = c_{t-1} and c = c_t.
// Outputs: gradients of the four pre-activations, and dc_prev = dc_t * f
// (the cell-state gradient handed to step t-1).
struct GateGrads {
  float i, f, g, o;
};

LSTM_HD void cell_backward(float dh, float dc, const Gates& a, float c_prev, float c, GateGrads* d,
                           float* dc_prev) {
  const float tanh_c = tanh_f(c);
  const float dc_t = dc + dh * a.o * (1.0f - tanh_c * tanh_c);
  d->i = dc_t * a.g * a.i * (1.0f - a.i);
  d->f = dc_t * c_prev * a.f * (1.0f - a.f);
  d->g = dc_t * a.i * (1.0f - a.g * a.g);
  d->o = dh * tanh_c * a.o * (1.0f - a.o);
  *dc_prev = dc_t * a.f;
}

}  // namespace lstm
