// The host interface between the torch binding (bindings.cpp) and the CUDA kernels (*.cu).
//
// Design: launchers take raw pointers, sizes, a dtype code and the stream as `void*`, so the .cu files need
// only the CUDA toolkit (no torch headers: they compile fast and anywhere nvcc runs, CPU-only CI included)
// and bindings.cpp needs only torch's device-generic headers (no CUDA headers: a CPU torch wheel lacks
// c10/cuda's generated config, and the binding compiles there too). Each launcher enqueues its kernels on
// `stream` and returns nullptr, or the CUDA error string if a launch failed.
#pragma once

#include <cstdint>

namespace electra_fast {

// Element type of a tensor, as the binding maps torch's ScalarType.
enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16,
  kBFloat16,
  kFloat64,
  kBool,
  kUInt8,
  kInt8,
  kInt16,
  kInt32,
  kInt64,
};

// Fused MLM loss + sample, one block per row of logits [M, W] (fp32/fp16/bf16) whose first V <= W columns are the
// vocabulary (the others are padding: never read into the loss, the argmax or the sample).
// Writes sampled[M], and when `targets` is non-null also correct[M], lse[M], and the scalars
// loss = sum(w * ce) / (sum(w) + 1e-6) and wsum_eps = sum(w) + 1e-6 (the backward's denominator).
// `disallow` (nullable, [M]): row m may not draw disallow[m] (negative: no restriction).
// `seed`: one int64 on the device, all 64 bits key Philox. `gumbel`: Gumbel-max sampling instead of the default
// inverse CDF. Sample-only mode (gumbel_sample) passes null targets/weights/outputs.
const char* launch_mlm_sample(DType dtype, const void* logits, int64_t M, int64_t V, int64_t W,
                              const int64_t* targets, const float* weights, const int64_t* disallow,
                              const int64_t* seed, float temperature, bool gumbel, int64_t* sampled, bool* correct,
                              float* lse, float* row_loss, float* loss, float* wsum_eps, void* stream);

// grad[M, W] = (softmax(logits) - onehot(targets)) * weights / wsum_eps * grad_loss over the first V columns, exactly
// 0 in the others (all scalars on device).
const char* launch_mlm_backward(DType dtype, const void* logits, int64_t M, int64_t V, int64_t W,
                                const int64_t* targets, const float* weights, const float* lse,
                                const float* wsum_eps, const float* grad_loss, void* grad, void* stream);

// The Gumbel noise the gumbel sampler adds to element (m, c) of [M, W] logits under `seed`, as an [M, W] fp32
// tensor. For tests: it lets them replay a kernel's sample with the PyTorch reference, exactly.
const char* launch_gumbel_noise(const int64_t* seed, int64_t M, int64_t W, float* out, void* stream);

// out[b, n, :] = hidden[b, positions[b, n], :] (a byte copy: any dtype of `elem_size` bytes).
// Out-of-range positions give a zero row rather than an out-of-bounds read.
const char* launch_masked_gather(const void* hidden, const int64_t* positions, void* out, int64_t B, int64_t L,
                                 int64_t N, int64_t H, int64_t elem_size, void* stream);

// out[b, l, :] = sum over n with positions[b, n] == l of grad[b, n, :] (zero where none), fp32 accumulation,
// deterministic (no atomics). dtype fp32/fp16/bf16/fp64.
const char* launch_masked_scatter_add(DType dtype, const void* grad, const int64_t* positions, void* out,
                                      int64_t B, int64_t L, int64_t N, int64_t H, void* stream);

// disc_ids = input_ids with the real slots' samples written in, is_replaced = disc_ids != input_ids.
// ids int32/int64 (`id_dtype`), positions/sampled int64, weights fp32 (real slot: weight > 0).
const char* launch_replace_tokens(DType id_dtype, const void* input_ids, const int64_t* positions,
                                  const float* weights, const int64_t* sampled, void* disc_ids, bool* is_replaced,
                                  int64_t B, int64_t L, int64_t N, void* stream);

// Mean sigmoid BCE over real tokens: loss (scalar), grad_unscaled[n] = (sigmoid(x) - y) * m (fp32) and
// inv_count = 1 / max(sum(m), 1). Labels and mask may have any dtype listed in DType.
// `partials` is scratch of rtd_bce_num_partials(n) * 2 floats.
int64_t rtd_bce_num_partials(int64_t n);
const char* launch_rtd_bce_forward(DType dtype, const void* logits, DType label_dtype, const void* labels,
                                   DType mask_dtype, const void* mask, int64_t n, float* partials, float* loss,
                                   float* grad_unscaled, float* inv_count, void* stream);

// grad[n] = grad_unscaled[n] * grad_loss * inv_count, cast to `dtype` (fp32/fp16/bf16).
const char* launch_rtd_bce_backward(DType dtype, const float* grad_unscaled, const float* grad_loss,
                                    const float* inv_count, int64_t n, void* grad, void* stream);

}  // namespace electra_fast
