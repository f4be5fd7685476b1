// rtd_bce_loss: mean sigmoid binary cross-entropy over real tokens, with its gradient made in the forward.
//
// Forward, two kernels and no host sync: a grid-stride pass reads logits, labels and mask once, writes the
// unscaled gradient (sigmoid(x) - y) * m in fp32 and a per-block partial (sum of m * bce, sum of m); a
// one-block finalize adds the partials in fp64, in a fixed order (deterministic), into
// loss = sum / max(count, 1) and inv_count = 1 / max(count, 1). The gradient cannot be scaled in the first
// pass (the count is not known yet), so the backward applies grad_loss * inv_count as it casts to the
// logits' dtype: one fused pass over [B, L], and the fp32 gradient is rounded once.
// Labels and mask come in whatever dtype the caller has (bool, ints, floats): read through a runtime dtype
// switch, uniform across the launch, instead of a kernel instance per combination.
#include <cmath>

#include "common.cuh"

namespace electra_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;
constexpr int kFinalizeThreads = 1024;

template <typename T>
__global__ void __launch_bounds__(kThreads)
rtd_bce_forward_kernel(const T* __restrict__ logits, DType label_dtype, const void* __restrict__ labels,
                       DType mask_dtype, const void* __restrict__ mask, int64_t n, float* __restrict__ partials,
                       float* __restrict__ grad_unscaled) {
  __shared__ float scratch[kWarp];
  float loss = 0.0f, count = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float x = to_float(logits[i]);
    const float y = load_as_float(labels, label_dtype, i);
    const float m = load_as_float(mask, mask_dtype, i) != 0.0f ? 1.0f : 0.0f;
    // Stable BCE with logits: max(x, 0) - x * y + log(1 + exp(-|x|)), never exp of a positive number.
    const float bce = fmaxf(x, 0.0f) - x * y + log1pf(expf(-fabsf(x)));
    const float sig = 1.0f / (1.0f + expf(-x));
    loss += bce * m;
    count += m;
    grad_unscaled[i] = (sig - y) * m;
  }
  // Per-block counts stay far below 2^24, so fp32 holds them exactly.
  loss = block_sum(loss, scratch);
  count = block_sum(count, scratch);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = loss;
    partials[2 * blockIdx.x + 1] = count;
  }
}

__global__ void __launch_bounds__(kFinalizeThreads)
rtd_bce_finalize_kernel(const float* __restrict__ partials, int64_t num_partials, float* __restrict__ loss,
                        float* __restrict__ inv_count) {
  __shared__ double scratch[kWarp];
  double sum = 0.0, count = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += kFinalizeThreads) {
    sum += partials[2 * i];
    count += partials[2 * i + 1];
  }
  sum = block_sum(sum, scratch);
  count = block_sum(count, scratch);
  if (threadIdx.x == 0) {
    const double c = count > 1.0 ? count : 1.0;  // no real token: loss 0, not NaN
    *loss = static_cast<float>(sum / c);
    *inv_count = static_cast<float>(1.0 / c);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
rtd_bce_backward_kernel(const float* __restrict__ grad_unscaled, const float* __restrict__ grad_loss,
                        const float* __restrict__ inv_count, int64_t n, T* __restrict__ grad) {
  const float scale = *grad_loss * *inv_count;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    grad[i] = from_float<T>(grad_unscaled[i] * scale);
  }
}

template <typename T>
const char* forward_typed(const void* logits, DType label_dtype, const void* labels, DType mask_dtype, const void* mask,
                          int64_t n, float* partials, float* loss, float* grad_unscaled, float* inv_count,
                          cudaStream_t stream) {
  const int64_t blocks = rtd_bce_num_partials(n);
  if (n > 0) {
    rtd_bce_forward_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(logits), label_dtype, labels,
                                                                mask_dtype, mask, n, partials, grad_unscaled);
  }
  rtd_bce_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, n > 0 ? blocks : 0, loss, inv_count);
  return launch_status();
}

template <typename T>
const char* backward_typed(const float* grad_unscaled, const float* grad_loss, const float* inv_count, int64_t n,
                           void* grad, cudaStream_t stream) {
  if (n == 0) return nullptr;
  const int64_t blocks = ceil_div(n, kThreads) < 4 * kMaxBlocks ? ceil_div(n, kThreads) : 4 * kMaxBlocks;
  rtd_bce_backward_kernel<T><<<blocks, kThreads, 0, stream>>>(grad_unscaled, grad_loss, inv_count, n,
                                                               static_cast<T*>(grad));
  return launch_status();
}

}  // namespace

// A fixed function of n (so the reduction order, hence the result, is reproducible).
int64_t rtd_bce_num_partials(int64_t n) {
  const int64_t blocks = ceil_div(n, kThreads);
  return blocks < 1 ? 1 : (blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

const char* launch_rtd_bce_forward(DType dtype, const void* logits, DType label_dtype, const void* labels,
                                   DType mask_dtype, const void* mask, int64_t n, float* partials, float* loss,
                                   float* grad_unscaled, float* inv_count, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(logits, label_dtype, labels, mask_dtype, mask, n, partials, loss, grad_unscaled,
                                  inv_count, s);
    case DType::kFloat16:
      return forward_typed<__half>(logits, label_dtype, labels, mask_dtype, mask, n, partials, loss, grad_unscaled,
                                   inv_count, s);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(logits, label_dtype, labels, mask_dtype, mask, n, partials, loss,
                                          grad_unscaled, inv_count, s);
    default:
      return "rtd_bce_forward: logits must be float32, float16 or bfloat16";
  }
}

const char* launch_rtd_bce_backward(DType dtype, const float* grad_unscaled, const float* grad_loss,
                                    const float* inv_count, int64_t n, void* grad, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return backward_typed<float>(grad_unscaled, grad_loss, inv_count, n, grad, s);
    case DType::kFloat16: return backward_typed<__half>(grad_unscaled, grad_loss, inv_count, n, grad, s);
    case DType::kBFloat16: return backward_typed<__nv_bfloat16>(grad_unscaled, grad_loss, inv_count, n, grad, s);
    default: return "rtd_bce_backward: grad must be float32, float16 or bfloat16";
  }
}

}  // namespace electra_fast
