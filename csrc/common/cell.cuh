// The cells' math (the LSTM's, and the GRU's at the end), shared by the forward and backward
// kernels and by the host test entry points of bindings.cpp (compiled by g++ there, by nvcc in
// the kernels): one definition, tested on the host without a GPU.
//
// Dimension names: T steps, B batch, H hidden units.
// Gate order along 4H: i (input), f (forget), g (cell candidate), o (output),
// PyTorch's. All cell math is fp32: pre-activations, activations, the cell
// state. The activations are a template parameter of every cell function, one of two policies:
//   FastActivations     sigmoid and tanh from 2^x and 1/x, one MUFU instruction each on the GPU: the
//                       cell is branch free. For the kernels whose operands are 16-bit or tf32.
//   PreciseActivations  expf, a correctly rounded division, tanhf: the division's slow path sits behind
//                       a branch and a call (one per sigmoid: three per step in the LSTM forward), and
//                       each function is several times the fast one's instructions. For float32
//                       accuracy (float storage without TF32), whose tolerance the fast ones would keep
//                       only with errors of random sign, not with a bias (tests/test_cell_error_budget.py).
#pragma once

#include <math.h>

#include <type_traits>

#if defined(__CUDACC__)
#define LSTM_HD __host__ __device__ __forceinline__
#else
#define LSTM_HD inline
#endif

namespace lstm {

// The fast activations' primitives. On the GPU: ex2.approx.ftz.f32, within 2 ulp (the MUFU.EX2 that the
// precise expf also ends in, after reducing its argument), and rcp.approx.ftz.f32, within 1 ulp; one MUFU
// each, denormals flushed to zero. On the host, where the tests run the cell through bindings.cpp, the
// correctly rounded exp2f and 1/x: the same formulas with exact primitives.
LSTM_HD float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

LSTM_HD float rcp_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}

struct FastActivations {
  static constexpr float kNegLog2e = -1.4426950408889634f;

  // 1 / (1 + 2^(-x log2 e)): exactly 0 for x < -89 (2^(...) is +inf; on the GPU already for x < -87, where
  // the reciprocal is flushed) and 1 for x > 17 (1 + 2^(...) rounds to 1; exactly 1 where rcp.approx(1) is
  // 1, which its 1-ulp bound does not promise). Error about sigmoid(x) (1 - sigmoid(x)) (|x| 2^-24 + 2^-22)
  // + 1.5 ulp: from rounding the product x log2 e (and kNegLog2e itself, |x| 2^-26 of one sign), from ex2,
  // from rounding 1 + 2^(...) and from rcp.
  static LSTM_HD float sigmoid(float x) { return rcp_approx(1.0f + exp2_approx(x * kNegLog2e)); }

  // 2 sigmoid(2x) - 1: exactly -1, 0 and 1 where tanh rounds to them; an absolute error of twice sigmoid's
  // (about 2^-21), not a relative one (near x = 0 it is larger than tanhf's in relative terms). x (2
  // kNegLog2e) is (2x) kNegLog2e to the bit (doubling is exact): one multiply fewer in the chain.
  static LSTM_HD float tanh(float x) {
    return fmaf(2.0f, rcp_approx(1.0f + exp2_approx(x * (2.0f * kNegLog2e))), -1.0f);
  }
};

struct PreciseActivations {
  // exp(-x) overflows to +inf for x < -88, giving exactly 0, and underflows to 0 for large x, giving 1.
  static LSTM_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
  static LSTM_HD float tanh(float x) { return tanhf(x); }
};

// A kernel's activations: precise where it computes at float32 accuracy (float storage, a float32 product),
// fast everywhere else.
template <bool kFloat32Accuracy>
using ActivationsFor = typename std::conditional<kFloat32Accuracy, PreciseActivations, FastActivations>::type;

// Activated gates of one hidden unit of one batch row.
struct Gates {
  float i, f, g, o;
};

// Forward of one cell: pre-activations (i, f, g, o) and c_prev ->
// activations, c = f*c_prev + i*g, h = o*tanh(c) (h before rounding to the
// storage dtype; the kernels round it).
template <class Act>
LSTM_HD Gates cell_activations(float pi, float pf, float pg, float po) {
  Gates a;
  a.i = Act::sigmoid(pi);
  a.f = Act::sigmoid(pf);
  a.g = Act::tanh(pg);
  a.o = Act::sigmoid(po);
  return a;
}

template <class Act>
LSTM_HD void cell_forward(float pi, float pf, float pg, float po, float c_prev, Gates* act, float* c,
                          float* h) {
  const Gates a = cell_activations<Act>(pi, pf, pg, po);
  const float c_new = a.f * c_prev + a.i * a.g;
  *act = a;
  *c = c_new;
  *h = a.o * Act::tanh(c_new);
}

// Backward of one cell. Inputs: dh (gradient of h_t, from the output and from
// step t+1), dc (gradient of c_t from step t+1, already multiplied by f_{t+1}),
// the activations of step t, c_prev = c_{t-1} and c = c_t.
// Outputs: gradients of the four pre-activations, and dc_prev = dc_t * f
// (the cell-state gradient handed to step t-1).
struct GateGrads {
  float i, f, g, o;
};

template <class Act>
LSTM_HD void cell_backward(float dh, float dc, const Gates& a, float c_prev, float c, GateGrads* d,
                           float* dc_prev) {
  const float tanh_c = Act::tanh(c);
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

template <class Act>
LSTM_HD void gru_cell_forward(float pr, float pz, float xn, float hn, float h_prev, GruGates* act, float* h) {
  GruGates a;
  a.r = Act::sigmoid(pr);
  a.z = Act::sigmoid(pz);
  a.n = Act::tanh(xn + a.r * hn);
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
