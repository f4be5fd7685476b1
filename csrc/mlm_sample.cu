// Fused generator MLM loss + Gumbel-max replacement sample (and plain gumbel_sample), forward and backward.
//
// Forward, one block per row of logits [M, V], one read of the row: each thread walks its share of the
// row in 16-byte vectors (8 bf16/fp16 or 4 fp32 logits; a scalar head and tail cover rows that do not start
// on a 16-byte boundary, e.g. V = 30522 in bf16) and keeps
//   - an online log-sum-exp (running max m, sum s of exp(x - m)) and the first index of the max (argmax),
//   - the best Gumbel score x / T + g and its index (the sample; g from Philox, see philox.cuh).
// Threads merge by warp shuffles, warps through shared memory. Thread 0 writes the row's sample, lse,
// w * ce and argmax == target; a one-block kernel then reduces sum(w * ce) and sum(w) on the device (no
// host sync, deterministic order) into the loss and the denominator the backward reuses.
//
// Backward, one block per row: grad = (exp(x - lse) - onehot(target)) * w / (sum(w) + 1e-6) * grad_loss,
// recomputed from the saved lse, so nothing of size [M, V] is kept besides the logits and their gradient.
// grad_loss and the denominator are read from device memory, so the step stays capturable in a CUDA graph.
#include <cfloat>
#include <cmath>

#include "common.cuh"
#include "philox.cuh"

namespace electra_fast {
namespace {

constexpr int kMaxRowThreads = 512;
constexpr int kFinalizeThreads = 1024;

// Per-thread (and, after merging, per-row) state of the forward pass. A plain struct (no constructor), so
// it can live in __shared__ memory; empty_state() is the identity of merge().
struct RowState {
  float m;           // running max of the logits
  float s;           // sum of exp(x - m)
  int64_t m_idx;     // first index of the max (-1: nothing seen yet)
  float best;        // best Gumbel score
  int64_t best_idx;  // its index (-1: nothing seen yet)
};

__device__ __forceinline__ RowState empty_state() { return RowState{-INFINITY, 0.0f, -1, -INFINITY, -1}; }

// Larger value wins, equal values go to the smaller index, and -1 (empty) always loses: the same
// first-occurrence rule as torch.argmax, whatever order threads covered the row in.
__device__ __forceinline__ bool wins(float v, int64_t i, float v_ref, int64_t i_ref) {
  if (i < 0) return false;
  if (i_ref < 0) return true;
  return v > v_ref || (v == v_ref && i < i_ref);
}

__device__ __forceinline__ void merge(RowState& a, const RowState& b) {
  const float m = fmaxf(a.m, b.m);
  // exp(-inf - m) is 0, and s is 0 when m is -inf, so an empty side contributes nothing; only both sides
  // -inf (m = -inf) needs the guard, as -inf - -inf is NaN.
  if (m > -INFINITY) a.s = a.s * exp2f((a.m - m) * kLog2e) + b.s * exp2f((b.m - m) * kLog2e);
  if (wins(b.m, b.m_idx, a.m, a.m_idx)) a.m_idx = b.m_idx;
  a.m = m;
  if (wins(b.best, b.best_idx, a.best, a.best_idx)) {
    a.best = b.best;
    a.best_idx = b.best_idx;
  }
}

__device__ __forceinline__ RowState shfl_xor(const RowState& st, int o) {
  RowState r;
  r.m = __shfl_xor_sync(kFullMask, st.m, o);
  r.s = __shfl_xor_sync(kFullMask, st.s, o);
  r.m_idx = __shfl_xor_sync(kFullMask, st.m_idx, o);
  r.best = __shfl_xor_sync(kFullMask, st.best, o);
  r.best_idx = __shfl_xor_sync(kFullMask, st.best_idx, o);
  return r;
}

// Folds N consecutive logits v (columns col0..col0+N-1) and their Gumbel noise g into the state: always the
// sample, and with kLoss also the log-sum-exp and the argmax.
template <int N, bool kLoss>
__device__ __forceinline__ void visit(RowState& st, const float (&v)[N], const float (&g)[N], int64_t col0,
                                      float inv_temperature, int64_t banned) {
  if (kLoss) {
    float m = st.m;
    int64_t idx = st.m_idx;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (v[j] > m || idx < 0) {  // strict '>' over ascending columns keeps the first maximum
        m = v[j];
        idx = col0 + j;
      }
    }
    if (m > st.m) st.s *= exp2f((st.m - m) * kLog2e);  // rescale once per vector, not per element
    st.m = m;
    st.m_idx = idx;
    if (m > -INFINITY) {
#pragma unroll
      for (int j = 0; j < N; ++j) st.s += exp2f((v[j] - m) * kLog2e);
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    // x * (1/T), kept apart from the add (__fmul_rn is never fused into an FMA): torch computes the reference's
    // `logits / T` on CUDA as a multiply by the fp32 reciprocal, so the scores match it bit for bit.
    float score = __fmul_rn(v[j], inv_temperature) + g[j];
    if (col0 + j == banned) score = -INFINITY;
    if (score > st.best || st.best_idx < 0) {
      st.best = score;
      st.best_idx = col0 + j;
    }
  }
}

template <typename T, bool kLoss>
__global__ void __launch_bounds__(kMaxRowThreads)
mlm_sample_rows_kernel(const T* __restrict__ logits, int64_t V, const int64_t* __restrict__ targets,
                       const float* __restrict__ weights, const int64_t* __restrict__ disallow,
                       const int64_t* __restrict__ seed_ptr, float inv_temperature, int64_t* __restrict__ sampled,
                       bool* __restrict__ correct, float* __restrict__ lse, float* __restrict__ row_loss) {
  constexpr int kVec = vec_elems<T>();
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;  // int64 offsets: M * V passes 2^31 at real sizes
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t banned = disallow != nullptr ? disallow[row] : -1;
  const uint64_t e_row = static_cast<uint64_t>(row) * static_cast<uint64_t>(V);  // flat index of column 0

  RowState st = empty_state();
  const int64_t head = head_to_align16(x, V);
  const int64_t nvec = (V - head) / kVec;
  const int64_t tail0 = head + nvec * kVec;
  // Columns are visited in ascending order within a thread: head, vectors, tail.
  for (int64_t c = threadIdx.x; c < head; c += blockDim.x) {
    float v[1] = {to_float(x[c])}, g[1];
    gumbel_noise<1>(seed, e_row + c, g);
    visit<1, kLoss>(st, v, g, c, inv_temperature, banned);
  }
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const int64_t c = head + i * kVec;
    float v[kVec], g[kVec];
    load_vec(x + c, v);
    gumbel_noise<kVec>(seed, e_row + c, g);
    visit<kVec, kLoss>(st, v, g, c, inv_temperature, banned);
  }
  for (int64_t c = tail0 + threadIdx.x; c < V; c += blockDim.x) {
    float v[1] = {to_float(x[c])}, g[1];
    gumbel_noise<1>(seed, e_row + c, g);
    visit<1, kLoss>(st, v, g, c, inv_temperature, banned);
  }

#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) merge(st, shfl_xor(st, o));
  __shared__ RowState warp_states[kMaxRowThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp != 0) return;
  st = lane < static_cast<int>(blockDim.x / kWarp) ? warp_states[lane] : empty_state();
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) merge(st, shfl_xor(st, o));
  if (lane != 0) return;

  sampled[row] = st.best_idx;
  if (kLoss) {
    const float row_lse = st.m + logf(st.s);
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
mlm_backward_kernel(const T* __restrict__ logits, int64_t V, const int64_t* __restrict__ targets,
                    const float* __restrict__ weights, const float* __restrict__ lse,
                    const float* __restrict__ wsum_eps, const float* __restrict__ grad_loss, T* __restrict__ grad,
                    bool vectorize) {
  constexpr int kVec = vec_elems<T>();
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  T* gx = grad + row * V;
  const float scale = weights[row] / *wsum_eps * *grad_loss;  // the reference's order of operations
  const float row_lse = lse[row];
  const int64_t t = targets[row];
  // expf, not the fast intrinsic: this pass is memory bound, and softmax entries keep full fp32 accuracy.
  auto grad_at = [&](float v, int64_t c) {
    const float p = expf(v - row_lse);
    return (c == t ? p - 1.0f : p) * scale;
  };
  // logits and grad share their alignment (checked by the launcher), so one head serves both.
  const int64_t head = vectorize ? head_to_align16(x, V) : V;
  const int64_t nvec = (V - head) / kVec;
  const int64_t tail0 = head + nvec * kVec;
  for (int64_t c = threadIdx.x; c < head; c += blockDim.x) gx[c] = from_float<T>(grad_at(to_float(x[c]), c));
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const int64_t c = head + i * kVec;
    float v[kVec];
    load_vec(x + c, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = grad_at(v[j], c + j);
    store_vec(gx + c, v);
  }
  for (int64_t c = tail0 + threadIdx.x; c < V; c += blockDim.x) gx[c] = from_float<T>(grad_at(to_float(x[c]), c));
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
int row_threads(int64_t V, int vec) {
  const int64_t vectors = ceil_div(V, vec);
  int threads = kWarp;
  while (threads < kMaxRowThreads && threads * 8 < vectors) threads *= 2;
  return threads;
}

template <typename T>
const char* mlm_sample_typed(const void* logits, int64_t M, int64_t V, const int64_t* targets, const float* weights,
                             const int64_t* disallow, const int64_t* seed, float temperature, int64_t* sampled,
                             bool* correct, float* lse, float* row_loss, float* loss, float* wsum_eps,
                             cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  const int threads = row_threads(V, vec_elems<T>());
  const float inv_temperature = 1.0f / temperature;  // as torch rounds it: an fp32 reciprocal of the fp32 T
  const bool with_loss = targets != nullptr;
  if (M > 0) {
    if (with_loss) {
      mlm_sample_rows_kernel<T, true><<<M, threads, 0, stream>>>(x, V, targets, weights, disallow, seed,
                                                                  inv_temperature, sampled, correct, lse, row_loss);
    } else {
      mlm_sample_rows_kernel<T, false><<<M, threads, 0, stream>>>(x, V, nullptr, nullptr, disallow, seed,
                                                                   inv_temperature, sampled, nullptr, nullptr, nullptr);
    }
  }
  // The finalize runs for M == 0 too: the loss of an empty batch is still written (0).
  if (with_loss) mlm_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(row_loss, weights, M, loss, wsum_eps);
  return launch_status();
}

template <typename T>
const char* mlm_backward_typed(const void* logits, int64_t M, int64_t V, const int64_t* targets, const float* weights,
                               const float* lse, const float* wsum_eps, const float* grad_loss, void* grad,
                               cudaStream_t stream) {
  if (M == 0) return nullptr;
  const bool vectorize =
      ((reinterpret_cast<uintptr_t>(logits) - reinterpret_cast<uintptr_t>(grad)) & 15) == 0;
  mlm_backward_kernel<T><<<M, row_threads(V, vec_elems<T>()), 0, stream>>>(
      static_cast<const T*>(logits), V, targets, weights, lse, wsum_eps, grad_loss, static_cast<T*>(grad), vectorize);
  return launch_status();
}

}  // namespace

const char* launch_mlm_sample(DType dtype, const void* logits, int64_t M, int64_t V, const int64_t* targets,
                              const float* weights, const int64_t* disallow, const int64_t* seed, float temperature,
                              int64_t* sampled, bool* correct, float* lse, float* row_loss, float* loss,
                              float* wsum_eps, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return mlm_sample_typed<float>(logits, M, V, targets, weights, disallow, seed, temperature, sampled, correct,
                                     lse, row_loss, loss, wsum_eps, s);
    case DType::kFloat16:
      return mlm_sample_typed<__half>(logits, M, V, targets, weights, disallow, seed, temperature, sampled, correct,
                                      lse, row_loss, loss, wsum_eps, s);
    case DType::kBFloat16:
      return mlm_sample_typed<__nv_bfloat16>(logits, M, V, targets, weights, disallow, seed, temperature, sampled,
                                             correct, lse, row_loss, loss, wsum_eps, s);
    default:
      return "mlm_sample: logits must be float32, float16 or bfloat16";
  }
}

const char* launch_mlm_backward(DType dtype, const void* logits, int64_t M, int64_t V, const int64_t* targets,
                                const float* weights, const float* lse, const float* wsum_eps, const float* grad_loss,
                                void* grad, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return mlm_backward_typed<float>(logits, M, V, targets, weights, lse, wsum_eps, grad_loss, grad, s);
    case DType::kFloat16:
      return mlm_backward_typed<__half>(logits, M, V, targets, weights, lse, wsum_eps, grad_loss, grad, s);
    case DType::kBFloat16:
      return mlm_backward_typed<__nv_bfloat16>(logits, M, V, targets, weights, lse, wsum_eps, grad_loss, grad, s);
    default:
      return "mlm_backward: logits must be float32, float16 or bfloat16";
  }
}

const char* launch_gumbel_noise(const int64_t* seed, int64_t M, int64_t V, float* out, void* stream) {
  const int64_t n = M * V;
  if (n == 0) return nullptr;
  const int64_t blocks = ceil_div(n, 256) < 65536 ? ceil_div(n, 256) : 65536;
  gumbel_noise_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(seed, n, out);
  return launch_status();
}

}  // namespace electra_fast
