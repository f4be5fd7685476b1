// Fused generator MLM loss + replacement sample (and plain gumbel_sample), forward and backward.
//
// Rows. Logits are [M, W] with the real vocabulary in the first V <= W columns (the model pads W to a multiple of
// 128). A block walks its row in 16-byte vectors (8 bf16/fp16 or 4 fp32 logits); a scalar head and tail cover
// rows that do not start on a 16-byte boundary (W = 30522 in bf16), and there are none when W is a multiple of the
// vector (a padded vocabulary: every row aligned). The real V is applied by a select, columns >= V reading as
// -inf: they never reach the loss, the argmax or the sampler, and the backward writes exactly 0 there. The forward
// reads only the vectors that reach into [0, V).
//
// Forward, one block per row, one read of the row. Each thread keeps, over its share of the row (its "tile"),
// an online log-sum-exp (inverse_cdf.cuh) and the first index of the max (argmax), and the sampler's state:
//   - "cdf" (default): the online log-sum-exp of the scores x / T (a disallowed column is -inf); at T = 1
//     without a disallowed id it is the loss's own, so sampling costs no transcendental per element. After the
//     pass, one Philox call gives four uniforms and warp 0 samples by inverse CDF: a warp by its mass, a thread of
//     it by its tile's mass, then re-reads that one tile (from L2, each lane a share) to pick a share and a column.
//     Exact: P(column) = exp(x / T - lse) up to fp32 rounding (see inverse_cdf.cuh).
//   - "gumbel" (ELECTRA_FAST_SAMPLER=gumbel): the best x / T + g and its index, g Gumbel noise from Philox per
//     element (philox.cuh). Two logs per element: this made the kernel compute-bound; kept for comparison
//     and because tests can replay its samples exactly (gumbel_noise).
// Threads merge by warp shuffles, warps through shared memory. Thread 0 writes the row's sample, lse, w * ce and
// argmax == target; a one-block kernel then reduces sum(w * ce) and sum(w) on the device (no host sync,
// deterministic order) into the loss and the denominator the backward reuses.
//
// Backward, one block per row: grad = (exp(x - lse) - onehot(target)) * w / (sum(w) + 1e-6) * grad_loss,
// recomputed from the saved lse, so nothing of size [M, W] is kept besides the logits and their gradient.
// grad_loss and the denominator are read from device memory, so the step stays capturable in a CUDA graph.
#include <cfloat>
#include <cmath>

#include "common.cuh"
#include "inverse_cdf.cuh"
#include "philox.cuh"

namespace electra_fast {
namespace {

constexpr int kMaxRowThreads = 512;
constexpr int kFinalizeThreads = 1024;

// Per-thread (and, after merging, per-row) state of the forward pass. A plain struct (no constructor), so
// it can live in __shared__ memory; empty_state() is the identity of merge().
struct RowState {
  Lse loss;          // online log-sum-exp of the logits
  int64_t m_idx;     // first index of their max (-1: nothing seen yet)
  Lse smp;           // cdf sampler: online log-sum-exp of the scores
  float best;        // gumbel sampler: best score
  int64_t best_idx;  // its index (-1: nothing seen yet)
};

__device__ __forceinline__ RowState empty_state() { return RowState{lse_empty(), -1, lse_empty(), -INFINITY, -1}; }

// Larger value wins, equal values go to the smaller index, and -1 (empty) always loses: the same
// first-occurrence rule as torch.argmax, whatever order threads covered the row in.
__device__ __forceinline__ bool wins(float v, int64_t i, float v_ref, int64_t i_ref) {
  if (i < 0) return false;
  if (i_ref < 0) return true;
  return v > v_ref || (v == v_ref && i < i_ref);
}

template <bool kLoss, bool kCdf>
__device__ __forceinline__ void merge(RowState& a, const RowState& b) {
  if constexpr (kLoss) {
    if (wins(b.loss.m, b.m_idx, a.loss.m, a.m_idx)) a.m_idx = b.m_idx;
    lse_merge(a.loss, b.loss);
  }
  if constexpr (kCdf) {
    lse_merge(a.smp, b.smp);
  } else if (wins(b.best, b.best_idx, a.best, a.best_idx)) {
    a.best = b.best;
    a.best_idx = b.best_idx;
  }
}

template <bool kLoss, bool kCdf>
__device__ __forceinline__ RowState shfl_xor(const RowState& st, int o) {
  RowState r = st;
  if constexpr (kLoss) {
    r.loss.m = __shfl_xor_sync(kFullMask, st.loss.m, o);
    r.loss.s = __shfl_xor_sync(kFullMask, st.loss.s, o);
    r.m_idx = __shfl_xor_sync(kFullMask, st.m_idx, o);
  }
  if constexpr (kCdf) {
    r.smp.m = __shfl_xor_sync(kFullMask, st.smp.m, o);
    r.smp.s = __shfl_xor_sync(kFullMask, st.smp.s, o);
  } else {
    r.best = __shfl_xor_sync(kFullMask, st.best, o);
    r.best_idx = __shfl_xor_sync(kFullMask, st.best_idx, o);
  }
  return r;
}

template <bool kLoss, bool kCdf>
__device__ __forceinline__ RowState warp_merge(RowState st) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) merge<kLoss, kCdf>(st, shfl_xor<kLoss, kCdf>(st, o));
  return st;
}

// The sampler's score of column c: x / T, or -inf for the disallowed column. x * (1/T) with __fmul_rn (never fused
// into an FMA): torch computes the reference's `logits / T` on CUDA as a multiply by the fp32 reciprocal, so
// scores match it bit for bit.
__device__ __forceinline__ float score_of(float x, int64_t c, float inv_temperature, int64_t banned) {
  return c == banned ? -INFINITY : __fmul_rn(x, inv_temperature);
}

// Folds N consecutive logits v (columns col0..col0+N-1, -inf past V) into the state: the sampler always, and
// with kLoss the log-sum-exp and the argmax. g: the Gumbel noise (gumbel sampler only). share: the cdf sampler's
// scores are the logits themselves (T = 1, nothing disallowed), so it reuses the loss's log-sum-exp.
template <int N, bool kLoss, bool kCdf>
__device__ __forceinline__ void visit(RowState& st, const float (&v)[N], const float (&g)[N], int64_t col0,
                                      float inv_temperature, int64_t banned, bool share) {
  if constexpr (kLoss) {
    float m = st.loss.m;
    int64_t idx = st.m_idx;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (v[j] > m || idx < 0) {  // strict '>' over ascending columns keeps the first maximum
        m = v[j];
        idx = col0 + j;
      }
    }
    st.m_idx = idx;
    lse_fold(st.loss, v, m);  // m: the running max, found by the argmax scan
  }
  if constexpr (kCdf) {
    if (!kLoss || !share) {
      float s[N];
#pragma unroll
      for (int j = 0; j < N; ++j) s[j] = score_of(v[j], col0 + j, inv_temperature, banned);
      lse_fold(st.smp, s);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float score = col0 + j == banned ? -INFINITY : __fmul_rn(v[j], inv_temperature) + g[j];
      if (score > st.best || st.best_idx < 0) {
        st.best = score;
        st.best_idx = col0 + j;
      }
    }
  }
}

// Where a row's vectors lie: scalar columns [0, head) up to the first 16-byte boundary, then nvec whole vectors
// from `head`, then scalar columns [tail0, n). Vectors cover the needed columns [0, n) and may run past n (the
// caller selects those away) but never past the row's width W.
struct RowSpan {
  int64_t head, nvec, tail0;
};

template <typename T>
__device__ __forceinline__ RowSpan row_span(const T* x, int64_t n, int64_t W) {
  constexpr int kVec = vec_elems<T>();
  const int64_t head = head_to_align16(x, n);
  const int64_t needed = (n - head + kVec - 1) / kVec, fit = (W - head) / kVec;
  const int64_t nvec = needed < fit ? needed : fit;
  return RowSpan{head, nvec, head + nvec * kVec};
}

// Loads the vector at column c as fp32, -inf past V.
template <typename T>
__device__ __forceinline__ void load_real(const T* x, int64_t c, int64_t V, float (&v)[vec_elems<T>()]) {
  load_vec(x + c, v);
  const int64_t left = V - c;  // > 0: only vectors that reach into [0, V) are read
  const int real = left < vec_elems<T>() ? static_cast<int>(left) : vec_elems<T>();
#pragma unroll
  for (int j = 0; j < vec_elems<T>(); ++j) v[j] = j < real ? v[j] : -INFINITY;
}

// One lane's share of thread t's tile, walked in the order the forward visited it: the vectors t + (lane + 32q) *
// nthreads, and lane 0 also the tile's scalar head and tail columns. Weights exp(score - m_t), m_t the tile's max.
template <typename T>
__device__ __forceinline__ void walk_share(CdfWalk& walk, const T* x, const RowSpan& sp, int64_t V, int t, int lane,
                                           int nthreads, float m_t, float inv_temperature, int64_t banned) {
  constexpr int kVec = vec_elems<T>();
  auto add = [&](float v, int64_t c) { walk.add(exp_le0(score_of(v, c, inv_temperature, banned) - m_t), c); };
  if (lane == 0) {
    for (int64_t c = t; c < sp.head; c += nthreads) add(to_float(x[c]), c);
  }
  const int64_t stride = static_cast<int64_t>(kWarp) * nthreads;
  for (int64_t i = t + static_cast<int64_t>(lane) * nthreads; i < sp.nvec; i += stride) {
    const int64_t c = sp.head + i * kVec;
    float v[kVec];
    load_real(x, c, V, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) add(v[j], c + j);
  }
  if (lane == 0) {
    for (int64_t c = sp.tail0 + t; c < V; c += nthreads) add(to_float(x[c]), c);
  }
}

// The cdf sampler's draw, by warp 0 (every lane returns it): warps, a thread's tile, a lane's share of it, a column,
// each by inverse CDF (inverse_cdf.cuh). `warps`: each warp's merged state; `tiles`: each thread's sampler state;
// `row_max`: the row's maximal score. Returns 0 when no column can be drawn (all disallowed or -inf), as the
// reference's argmax over -inf.
template <typename T>
__device__ __forceinline__ int64_t cdf_draw(const T* x, const RowSpan& sp, int64_t V, uint64_t seed, int64_t row,
                                            const RowState* warps, const Lse* tiles, float row_max,
                                            float inv_temperature, int64_t banned) {
  __shared__ float sel[kWarp];
  const int lane = threadIdx.x, nthreads = blockDim.x, nwarps = nthreads / kWarp;
  const Philox4 r = philox_block(seed, static_cast<uint64_t>(row));
  sel[lane] = lane < nwarps ? tile_mass(warps[lane].smp, row_max) : 0.0f;
  __syncwarp();
  const int k = inverse_cdf(sel, nwarps, uniform24(r.x));
  if (k < 0) return 0;
  __syncwarp();
  sel[lane] = tile_mass(tiles[k * kWarp + lane], warps[k].smp.m);
  __syncwarp();
  const int j = inverse_cdf(sel, kWarp, uniform24(r.y));
  if (j < 0) return 0;  // not reached with finite logits: warp k has mass, so one of its threads has
  const int t = k * kWarp + j;
  const float m_t = tiles[t].m;
  CdfWalk sum = CdfWalk::with_target(INFINITY);
  walk_share(sum, x, sp, V, t, lane, nthreads, m_t, inv_temperature, banned);
  __syncwarp();
  sel[lane] = sum.acc;
  __syncwarp();
  const int l = inverse_cdf(sel, kWarp, uniform24(r.z));
  if (l < 0) return 0;  // not reached: the tile's maximal column has weight 1
  int64_t pick = 0;
  if (lane == l) {  // the same walk again, now to the target: it lands on a column of positive weight
    CdfWalk walk = CdfWalk::with_target(uniform24(r.w) * sum.acc);
    walk_share(walk, x, sp, V, t, lane, nthreads, m_t, inv_temperature, banned);
    pick = walk.result();
  }
  return __shfl_sync(kFullMask, pick, l);
}

template <typename T, bool kLoss, bool kCdf>
__global__ void __launch_bounds__(kMaxRowThreads)
mlm_sample_rows_kernel(const T* __restrict__ logits, int64_t V, int64_t W, const int64_t* __restrict__ targets,
                       const float* __restrict__ weights, const int64_t* __restrict__ disallow,
                       const int64_t* __restrict__ seed_ptr, float inv_temperature, bool share,
                       int64_t* __restrict__ sampled, bool* __restrict__ correct, float* __restrict__ lse,
                       float* __restrict__ row_loss) {
  constexpr int kVec = vec_elems<T>();
  const int64_t row = blockIdx.x;
  const T* x = logits + row * W;  // int64 offsets: M * W passes 2^31 at real sizes
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);  // all 64 bits key Philox
  const int64_t banned = disallow != nullptr ? disallow[row] : -1;
  const uint64_t e_row = static_cast<uint64_t>(row) * static_cast<uint64_t>(W);  // flat index of column 0 (noise)

  RowState st = empty_state();
  const RowSpan sp = row_span(x, V, W);
  // Columns are visited in ascending order within a thread: head, vectors, tail.
  for (int64_t c = threadIdx.x; c < sp.head; c += blockDim.x) {
    float v[1] = {to_float(x[c])}, g[1];
    if constexpr (!kCdf) gumbel_noise<1>(seed, e_row + c, g);
    visit<1, kLoss, kCdf>(st, v, g, c, inv_temperature, banned, share);
  }
  // Two vectors in flight per thread; not with the Gumbel noise, whose extra registers would halve occupancy.
#pragma unroll(kCdf ? 2 : 1)
  for (int64_t i = threadIdx.x; i < sp.nvec; i += blockDim.x) {
    const int64_t c = sp.head + i * kVec;
    float v[kVec], g[kVec];
    load_real(x, c, V, v);
    if constexpr (!kCdf) gumbel_noise<kVec>(seed, e_row + c, g);
    visit<kVec, kLoss, kCdf>(st, v, g, c, inv_temperature, banned, share);
  }
  for (int64_t c = sp.tail0 + threadIdx.x; c < V; c += blockDim.x) {
    float v[1] = {to_float(x[c])}, g[1];
    if constexpr (!kCdf) gumbel_noise<1>(seed, e_row + c, g);
    visit<1, kLoss, kCdf>(st, v, g, c, inv_temperature, banned, share);
  }

  __shared__ Lse tiles[kCdf ? kMaxRowThreads : 1];  // each thread's sampler state, for the cdf draw
  if constexpr (kCdf) {
    if (kLoss && share) st.smp = st.loss;
    tiles[threadIdx.x] = st.smp;
  }
  st = warp_merge<kLoss, kCdf>(st);
  __shared__ RowState warp_states[kMaxRowThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp != 0) return;
  st = lane < static_cast<int>(blockDim.x / kWarp) ? warp_states[lane] : empty_state();
  st = warp_merge<kLoss, kCdf>(st);
  int64_t pick = st.best_idx;
  if constexpr (kCdf) pick = cdf_draw(x, sp, V, seed, row, warp_states, tiles, st.smp.m, inv_temperature, banned);
  if (lane != 0) return;

  sampled[row] = pick;
  if constexpr (kLoss) {
    const float row_lse = st.loss.m + logf(st.loss.s);
    const int64_t t = targets[row];
    // An out-of-range target makes the loss NaN instead of reading out of bounds.
    const float target_logit = (t >= 0 && t < V) ? to_float(x[t]) : NAN;
    lse[row] = row_lse;
    // Weight-0 rows add exactly 0 (0 * inf would be NaN), as in the Triton kernel.
    row_loss[row] = weights[row] != 0.f ? weights[row] * (row_lse - target_logit) : 0.f;
    correct[row] = st.m_idx == t;
  }
}

// loss = sum(w * ce) / (sum(w) + 1e-6) over all rows, in fp64 and a fixed order (deterministic).
__global__ void __launch_bounds__(kFinalizeThreads)
mlm_finalize_kernel(const float* __restrict__ row_loss, const float* __restrict__ weights, int64_t M,
                    float* __restrict__ loss, float* __restrict__ wsum_eps) {
  __shared__ double scratch[kWarp];
  double num = 0.0, den = 0.0;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    num += row_loss[i];
    den += weights[i];
  }
  num = block_sum(num, scratch);
  den = block_sum(den, scratch);
  if (threadIdx.x == 0) {
    den += 1e-6;  // the reference's guard: no real slot gives loss 0, not NaN
    *loss = static_cast<float>(num / den);
    *wsum_eps = static_cast<float>(den);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
mlm_backward_kernel(const T* __restrict__ logits, int64_t V, int64_t W, const int64_t* __restrict__ targets,
                    const float* __restrict__ weights, const float* __restrict__ lse,
                    const float* __restrict__ wsum_eps, const float* __restrict__ grad_loss, T* __restrict__ grad,
                    bool vectorize) {
  constexpr int kVec = vec_elems<T>();
  const int64_t row = blockIdx.x;
  const T* x = logits + row * W;
  T* gx = grad + row * W;
  const float scale = weights[row] / *wsum_eps * *grad_loss;  // the reference's order of operations
  const float row_lse = lse[row];
  const int64_t t = targets[row];
  // expf, not the fast intrinsic: this pass is memory bound, and softmax entries keep full fp32 accuracy.
  // Padded columns (c >= V) get exactly 0, selected whatever they hold.
  auto grad_at = [&](float v, int64_t c) {
    const float p = expf(v - row_lse);
    return c < V ? (c == t ? p - 1.0f : p) * scale : 0.0f;
  };
  // logits and grad share their alignment (checked by the launcher), so one head serves both.
  const RowSpan sp = vectorize ? row_span(x, W, W) : RowSpan{W, 0, W};
  for (int64_t c = threadIdx.x; c < sp.head; c += blockDim.x) gx[c] = from_float<T>(grad_at(to_float(x[c]), c));
  for (int64_t i = threadIdx.x; i < sp.nvec; i += blockDim.x) {
    const int64_t c = sp.head + i * kVec;
    float v[kVec];
    load_vec(x + c, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = grad_at(v[j], c + j);
    store_vec(gx + c, v);
  }
  for (int64_t c = sp.tail0 + threadIdx.x; c < W; c += blockDim.x) gx[c] = from_float<T>(grad_at(to_float(x[c]), c));
}

__global__ void gumbel_noise_kernel(const int64_t* __restrict__ seed_ptr, int64_t n, float* __restrict__ out) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float g[1];
    gumbel_noise<1>(seed, static_cast<uint64_t>(e), g);
    out[e] = g[0];
  }
}

// Enough threads that each walks ~8 vectors of its row, at least one warp, at most kMaxRowThreads.
int row_threads(int64_t n, int vec) {
  const int64_t vectors = ceil_div(n, vec);
  int threads = kWarp;
  while (threads < kMaxRowThreads && threads * 8 < vectors) threads *= 2;
  return threads;
}

template <typename T, bool kLoss, bool kCdf>
void launch_rows(const T* x, int64_t M, int64_t V, int64_t W, const int64_t* targets, const float* weights,
                 const int64_t* disallow, const int64_t* seed, float inv_temperature, bool share, int64_t* sampled,
                 bool* correct, float* lse, float* row_loss, cudaStream_t stream) {
  mlm_sample_rows_kernel<T, kLoss, kCdf><<<M, row_threads(V, vec_elems<T>()), 0, stream>>>(
      x, V, W, targets, weights, disallow, seed, inv_temperature, share, sampled, correct, lse, row_loss);
}

template <typename T>
const char* mlm_sample_typed(const void* logits, int64_t M, int64_t V, int64_t W, const int64_t* targets,
                             const float* weights, const int64_t* disallow, const int64_t* seed, float temperature,
                             bool gumbel, int64_t* sampled, bool* correct, float* lse, float* row_loss, float* loss,
                             float* wsum_eps, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  const float inv_temperature = 1.0f / temperature;  // as torch rounds it: an fp32 reciprocal of the fp32 T
  const bool with_loss = targets != nullptr;
  const bool share = with_loss && temperature == 1.0f && disallow == nullptr;
  if (M > 0) {
    if (with_loss && gumbel) {
      launch_rows<T, true, false>(x, M, V, W, targets, weights, disallow, seed, inv_temperature, share, sampled,
                                  correct, lse, row_loss, stream);
    } else if (with_loss) {
      launch_rows<T, true, true>(x, M, V, W, targets, weights, disallow, seed, inv_temperature, share, sampled,
                                 correct, lse, row_loss, stream);
    } else if (gumbel) {
      launch_rows<T, false, false>(x, M, V, W, nullptr, nullptr, disallow, seed, inv_temperature, share, sampled,
                                   nullptr, nullptr, nullptr, stream);
    } else {
      launch_rows<T, false, true>(x, M, V, W, nullptr, nullptr, disallow, seed, inv_temperature, share, sampled,
                                  nullptr, nullptr, nullptr, stream);
    }
  }
  // The finalize runs for M == 0 too: the loss of an empty batch is still written (0).
  if (with_loss) mlm_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(row_loss, weights, M, loss, wsum_eps);
  return launch_status();
}

template <typename T>
const char* mlm_backward_typed(const void* logits, int64_t M, int64_t V, int64_t W, const int64_t* targets,
                               const float* weights, const float* lse, const float* wsum_eps, const float* grad_loss,
                               void* grad, cudaStream_t stream) {
  if (M == 0) return nullptr;
  const bool vectorize =
      ((reinterpret_cast<uintptr_t>(logits) - reinterpret_cast<uintptr_t>(grad)) & 15) == 0;
  mlm_backward_kernel<T><<<M, row_threads(W, vec_elems<T>()), 0, stream>>>(
      static_cast<const T*>(logits), V, W, targets, weights, lse, wsum_eps, grad_loss, static_cast<T*>(grad),
      vectorize);
  return launch_status();
}

}  // namespace

const char* launch_mlm_sample(DType dtype, const void* logits, int64_t M, int64_t V, int64_t W,
                              const int64_t* targets, const float* weights, const int64_t* disallow,
                              const int64_t* seed, float temperature, bool gumbel, int64_t* sampled, bool* correct,
                              float* lse, float* row_loss, float* loss, float* wsum_eps, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return mlm_sample_typed<float>(logits, M, V, W, targets, weights, disallow, seed, temperature, gumbel, sampled,
                                     correct, lse, row_loss, loss, wsum_eps, s);
    case DType::kFloat16:
      return mlm_sample_typed<__half>(logits, M, V, W, targets, weights, disallow, seed, temperature, gumbel, sampled,
                                      correct, lse, row_loss, loss, wsum_eps, s);
    case DType::kBFloat16:
      return mlm_sample_typed<__nv_bfloat16>(logits, M, V, W, targets, weights, disallow, seed, temperature, gumbel,
                                             sampled, correct, lse, row_loss, loss, wsum_eps, s);
    default:
      return "mlm_sample: logits must be float32, float16 or bfloat16";
  }
}

const char* launch_mlm_backward(DType dtype, const void* logits, int64_t M, int64_t V, int64_t W,
                                const int64_t* targets, const float* weights, const float* lse,
                                const float* wsum_eps, const float* grad_loss, void* grad, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return mlm_backward_typed<float>(logits, M, V, W, targets, weights, lse, wsum_eps, grad_loss, grad, s);
    case DType::kFloat16:
      return mlm_backward_typed<__half>(logits, M, V, W, targets, weights, lse, wsum_eps, grad_loss, grad, s);
    case DType::kBFloat16:
      return mlm_backward_typed<__nv_bfloat16>(logits, M, V, W, targets, weights, lse, wsum_eps, grad_loss, grad, s);
    default:
      return "mlm_backward: logits must be float32, float16 or bfloat16";
  }
}

const char* launch_gumbel_noise(const int64_t* seed, int64_t M, int64_t W, float* out, void* stream) {
  const int64_t n = M * W;
  if (n == 0) return nullptr;
  const int64_t blocks = ceil_div(n, 256) < 65536 ? ceil_div(n, 256) : 65536;
  gumbel_noise_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(seed, n, out);
  return launch_status();
}

}  // namespace electra_fast
