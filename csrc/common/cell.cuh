// The cells' math (the LSTM's, and the GRU's at the end), shared by the forward and backward
// kernels and by the host test entry points of bindings.cpp (compiled by g++ there, by nvcc in
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

// The GRU cell, nn.GRU's equations; gate order along 3H: r (reset), z (update), n (new). Inputs of
// the forward: pr, pz the summed pre-activations of r and z (the input's and the recurrent
// products, both biases); xn the input's pre-activation of n (with b_in); hn the n rows of the
// recurrent product plus b_hn, which r scales; h_prev the state the product read (0 after a
// reset). n = tanh(xn + r*hn), h = (1 - z)*n + z*h_prev (before rounding to the storage dtype).
struct GruGates {
  float r, z, n;
};

LSTM_HD void gru_cell_forward(float pr, float pz, float xn, float hn, float h_prev, GruGates* act, float* h) {
  GruGates a;
  a.r = sigmoidf(pr);
  a.z = sigmoidf(pz);
  a.n = tanh_f(xn + a.r * hn);
  *act = a;
  *h = (1.0f - a.z) * a.n + a.z * h_prev;
}

// Backward of one GRU cell from dh (the gradient of h_t, from the output and from step t+1): the
// gradients of the pre-activations of r and z, of n's (dn: xn's gradient), of hn (the recurrent
// product's n rows: dn * r) and the part of dh_{t-1} that skips W_hh (dh * z).
struct GruGrads {
  float r, z, n, hn, h_prev;
};

LSTM_HD void gru_cell_backward(float dh, const GruGates& a, float hn, float h_prev, GruGrads* d) {
  const float dn = dh * (1.0f - a.z) * (1.0f - a.n * a.n);
  d->n = dn;
  d->r = dn * hn * a.r * (1.0f - a.r);
  d->z = dh * (h_prev - a.n) * a.z * (1.0f - a.z);
  d->hn = dn * a.r;
  d->h_prev = dh * a.z;
}

}  // namespace lstm
