// Exact sampling from softmax(scores) by inverse CDF over nested tiles: the arithmetic the MLM kernel's default
// sampler (mlm_loss_and_sample.cu) shares with the CPU test program (tests/test_csrc_compile.py).
//
// Design: the forward pass already keeps an online log-sum-exp per thread, i.e. the mass s of the thread's
// columns relative to their max m (a "tile": the thread's share of the row). Sampling then needs no noise per
// element: with U uniform, the first index whose running sum of weights exceeds U * sum(weights) is distributed
// as weights / sum(weights). Applied level by level (a warp by its mass, a thread of it, a lane's share of that
// thread's tile when a warp re-reads it, a column), the product of the choices is exactly
// exp(x_c - lse), up to fp32 rounding: P(warp) * P(thread | warp) * ... * P(column | share) = w_c / sum(w).
// One Philox call gives the four uniforms. Each walk sums its weights in the same order it then scans them, so
// it always lands on an index of positive weight (never a disallowed or padded column); only when U * sum rounds
// up to the sum itself does it fall back to the last positive weight. Each uniform has 24 bits (as in the Triton
// kernel), so each level resolves 2^-24 of its own mass: nested, a column's resolution is far finer than that.
//
// Everything here is __host__ __device__ and uses no CUDA header (see philox.cuh).
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.cuh"

namespace electra_fast {

constexpr float kLog2e = 1.4426950408889634f;

// 32 random bits -> U in [0, 1): the top 24 bits, exact in fp32 (the Triton kernel's `_uniform`).
EF_HD float uniform24(uint32_t bits) { return static_cast<float>(bits >> 8) * 0x1p-24f; }

// e^x for x <= 0 through exp2 (one MUFU.EX2 on the device).
EF_HD float exp_le0(float x) { return exp2f(x * kLog2e); }

// Online log-sum-exp of a stream of scores (-inf = excluded): running max m and s = sum of exp(x - m).
struct Lse {
  float m, s;
};

EF_HD Lse lse_empty() { return Lse{-INFINITY, 0.0f}; }

// Folds N scores into the state, given m = max(st.m, x); rescales once per call rather than once per element.
template <int N>
EF_HD void lse_fold(Lse& st, const float (&x)[N], float m) {
  if (m == -INFINITY) return;  // nothing but excluded scores so far: -inf - -inf would be NaN
  if (m > st.m) st.s *= exp_le0(st.m - m);
  st.m = m;
  EF_UNROLL
  for (int j = 0; j < N; ++j) st.s += exp_le0(x[j] - m);
}

template <int N>
EF_HD void lse_fold(Lse& st, const float (&x)[N]) {
  float m = st.m;
  EF_UNROLL
  for (int j = 0; j < N; ++j) m = fmaxf(m, x[j]);
  lse_fold(st, x, m);
}

EF_HD void lse_merge(Lse& a, const Lse& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return;
  a.s = a.s * exp_le0(a.m - m) + b.s * exp_le0(b.m - m);
  a.m = m;
}

// The mass of a tile in units of exp(ref) (ref >= the tile's max, so no overflow); 0 for an empty tile.
EF_HD float tile_mass(const Lse& t, float ref) { return t.s > 0.0f ? t.s * exp_le0(t.m - ref) : 0.0f; }

// The first i in [0, n) whose running sum of w (>= 0) exceeds u * sum(w); the last positive weight if rounding
// leaves u * sum unreached; -1 if every weight is 0.
EF_HD int inverse_cdf(const float* w, int n, float u) {
  float total = 0.0f;
  for (int i = 0; i < n; ++i) total += w[i];
  const float target = u * total;
  float acc = 0.0f;
  int last = -1;
  for (int i = 0; i < n; ++i) {
    if (w[i] > 0.0f) {
      acc += w[i];
      if (acc > target) return i;
      last = i;
    }
  }
  return last;
}

// The same walk over a stream of (weight, column) pairs whose sum is not known in advance: run it once with
// target = +inf to get the sum (`acc`), then again, in the same order, with target = u * sum.
struct CdfWalk {
  float target;
  float acc;
  int64_t pick;  // the first column past the target, -1 until found
  int64_t last;  // the last column of positive weight (the rounding fallback), -1 if none

  EF_HD static CdfWalk with_target(float target) { return CdfWalk{target, 0.0f, -1, -1}; }
  EF_HD void add(float w, int64_t col) {
    if (w > 0.0f) {
      acc += w;
      if (pick < 0 && acc > target) pick = col;
      last = col;
    }
  }
  EF_HD int64_t result() const { return pick >= 0 ? pick : last; }
};

}  // namespace electra_fast
