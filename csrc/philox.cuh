// Counter-based randomness for the sampling kernels: Philox4x32-10 and the Gumbel noise built from it.
//
// Design: the noise of logit element e (its flat index row * V + col in the [M, V] logits) is a pure function
// of (seed, e): Philox is run on counter (e / 4) and its 4 output words serve elements 4k..4k+3. So a thread
// that reads 4 or 8 aligned logits spends one or two Philox calls on them, the result does not depend on
// how threads, blocks or vector loads are laid out, and a test can recompute the exact noise a kernel used.
// The seed is read from a device tensor by the kernels (never a host int), so a replayed CUDA graph, which
// redraws that tensor with torch's RNG, samples afresh.
//
// Everything here is __host__ __device__ and uses no CUDA header, so the CPU-only CI compiles this file with
// g++ and checks it against Random123's published known-answer vectors and the Gumbel distribution.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EF_HD __host__ __device__ __forceinline__
#else
#define EF_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define EF_UNROLL _Pragma("unroll")
#else
#define EF_UNROLL
#endif

namespace electra_fast {

struct Philox4 {
  uint32_t x, y, z, w;
};

EF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11), the generator behind curand's Philox4_32_10 and
// torch's CUDA RNG. The key is bumped between rounds (9 bumps), as in Random123.
EF_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  EF_UNROLL
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = mulhi32(kM0, c.x), lo0 = kM0 * c.x;
    const uint32_t hi1 = mulhi32(kM1, c.z), lo1 = kM1 * c.z;
    c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// The 4 random words for elements 4k..4k+3 (k = e / 4) under `seed`.
EF_HD Philox4 philox_block(uint64_t seed, uint64_t k) {
  return philox4x32_10(Philox4{static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32), 0u, 0u},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

EF_HD uint32_t philox_word(const Philox4& r, int i) {
  // Selects rather than indexing, so the words stay in registers.
  return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
}

// A standard Gumbel variate g = -log(E), E = -log(U) ~ Exp(1), from 32 random bits.
// The largest g (the ones that decide an argmax) come from U near 1, where an fp32 U has no resolution
// (ulp 2^-24 caps g at ~16.6). So draw w = 1 - U directly, (bits + 0.5) / 2^32 in (0, 1), which is fine
// near 0, and take E = -log1p(-w) by its series there; g then reaches ~22 and its upper tail is right.
EF_HD float gumbel_from_bits(uint32_t bits) {
  float w = fmaf(static_cast<float>(bits), 0x1p-32f, 0x1p-33f);
  w = fminf(w, 0x1.fffffep-1f);  // float(bits) rounds up to 2^32 for the top few values; keep w < 1
  const float e = w < 0x1p-10f ? w * fmaf(w, fmaf(w, 1.0f / 3.0f, 0.5f), 1.0f)  // rel. error < w^3/4
                               : -logf(1.0f - w);
#if defined(__CUDA_ARCH__)
  return -__logf(e);  // the outer log is well conditioned in e: the fast intrinsic is accurate enough
#else
  return -logf(e);
#endif
}

// Gumbel noise for N consecutive elements starting at flat index e0 (any alignment).
template <int N>
EF_HD void gumbel_noise(uint64_t seed, uint64_t e0, float (&g)[N]) {
  if ((e0 & 3) == 0 && N % 4 == 0) {  // the vector-load case: whole Philox blocks
    EF_UNROLL
    for (int q = 0; q < N / 4; ++q) {
      const Philox4 r = philox_block(seed, (e0 >> 2) + q);
      g[4 * q + 0] = gumbel_from_bits(r.x);
      g[4 * q + 1] = gumbel_from_bits(r.y);
      g[4 * q + 2] = gumbel_from_bits(r.z);
      g[4 * q + 3] = gumbel_from_bits(r.w);
    }
    return;
  }
  uint64_t k = e0 >> 2;
  int lane = static_cast<int>(e0 & 3);
  Philox4 r = philox_block(seed, k);
  EF_UNROLL
  for (int j = 0; j < N; ++j) {
    if (lane == 4) {
      r = philox_block(seed, ++k);
      lane = 0;
    }
    g[j] = gumbel_from_bits(philox_word(r, lane++));
  }
}

}  // namespace electra_fast
