// Torch entry points of the CUDA backend: check tensors, allocate outputs, launch on the current stream.
//
// Design: this file includes only torch's device-generic headers. The current CUDA stream comes through
// c10's virtual device-guard interface (Stream::native_handle) rather than c10/cuda/CUDAStream.h, which a
// CPU-only torch wheel cannot compile; kernels get raw pointers (launch.cuh). So CI without a GPU compiles,
// links and imports this module, and only running it needs a GPU.
// Outputs are allocated here with torch's caching allocator and nothing reads device memory back to the
// host, so every op is safe inside CUDA-graph capture. The Python side (csrc/<op>.py, one launcher per op) wraps
// these functions as torch.library custom ops with fake kernels and autograd.
// Only what the bindings use, not <torch/extension.h> (all of libtorch's C++ API): that header alone made this file
// a 50 s compile, here and in every JIT build.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with torch's at::Tensor casters

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <limits>
#include <tuple>

#include "launch.cuh"

namespace ef = electra_fast;

namespace {

ef::DType dtype_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return ef::DType::kFloat32;
    case at::kHalf: return ef::DType::kFloat16;
    case at::kBFloat16: return ef::DType::kBFloat16;
    case at::kDouble: return ef::DType::kFloat64;
    case at::kBool: return ef::DType::kBool;
    case at::kByte: return ef::DType::kUInt8;
    case at::kChar: return ef::DType::kInt8;
    case at::kShort: return ef::DType::kInt16;
    case at::kInt: return ef::DType::kInt32;
    case at::kLong: return ef::DType::kInt64;
    default: TORCH_CHECK_TYPE(false, name, " has unsupported dtype ", t);
  }
  return ef::DType::kFloat32;  // unreachable
}

void check_input(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must have dtype ", want, ", got ", t.scalar_type());
}

void check_logits(const at::Tensor& logits) {
  check_input(logits, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [M, V], got ", logits.sizes());
  const auto t = logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "logits must be float32, float16 or bfloat16 on the CUDA backend, got ", t);
  // One block per row: the grid's x dimension.
  TORCH_CHECK_VALUE(logits.size(0) <= std::numeric_limits<int32_t>::max(), "logits has too many rows: ",
                    logits.size(0));
}

void check_seed(const at::Tensor& seed, const at::Tensor& ref) {
  check_input(seed, "seed", ref);
  check_dtype(seed, "seed", at::kLong);
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must have one element, got shape ", seed.sizes());
}

void check_rows(const at::Tensor& t, const char* name, int64_t m, at::ScalarType want, const at::Tensor& ref) {
  check_input(t, name, ref);
  check_dtype(t, name, want);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == m, name, " must have shape [", m, "], got ", t.sizes());
}

void check_scalar(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  check_input(t, name, ref);
  check_dtype(t, name, at::kFloat);
  TORCH_CHECK_VALUE(t.numel() == 1, name, " must have one element, got shape ", t.sizes());
}

// The caller's current CUDA stream on the tensor's device (the capture stream inside torch.cuda.graph).
void* current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(device).native_handle();
}

void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, "electra_fast CUDA kernel ", op, " failed: ", error == nullptr ? "" : error);
}

// The real vocabulary of [M, W] logits: 1 <= V <= W (columns >= V are padding).
void check_vocab_size(int64_t V, int64_t W) {
  TORCH_CHECK_VALUE(V >= 1 && V <= W, "vocab_size must be in [1, ", W, "] (the logits' width), got ", V);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlm_forward(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weights, const at::Tensor& seed,
    double temperature, bool disallow_correct, int64_t vocab_size, bool gumbel) {
  check_logits(logits);
  const int64_t M = logits.size(0), W = logits.size(1);
  check_vocab_size(vocab_size, W);
  check_rows(targets, "targets", M, at::kLong, logits);
  check_rows(weights, "weights", M, at::kFloat, logits);
  check_seed(seed, logits);
  const c10::DeviceGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32), wsum_eps = at::empty({}, f32);
  at::Tensor lse = at::empty({M}, f32), row_loss = at::empty({M}, f32);
  at::Tensor sampled = at::empty({M}, logits.options().dtype(at::kLong));
  at::Tensor correct = at::empty({M}, logits.options().dtype(at::kBool));
  check_launch(ef::launch_mlm_sample(dtype_code(logits.scalar_type(), "logits"), logits.data_ptr(), M, vocab_size, W,
                                     targets.data_ptr<int64_t>(), weights.data_ptr<float>(),
                                     disallow_correct ? targets.data_ptr<int64_t>() : nullptr,
                                     seed.data_ptr<int64_t>(), static_cast<float>(temperature), gumbel,
                                     sampled.data_ptr<int64_t>(), correct.data_ptr<bool>(), lse.data_ptr<float>(),
                                     row_loss.data_ptr<float>(), loss.data_ptr<float>(), wsum_eps.data_ptr<float>(),
                                     current_stream(logits.device())),
               "mlm_loss_and_sample");
  return {loss, sampled, correct, lse, wsum_eps};
}

at::Tensor mlm_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                        const at::Tensor& weights, const at::Tensor& lse, const at::Tensor& wsum_eps,
                        int64_t vocab_size) {
  check_logits(logits);
  const int64_t M = logits.size(0), W = logits.size(1);
  check_vocab_size(vocab_size, W);
  check_scalar(grad_loss, "grad_loss", logits);
  check_rows(targets, "targets", M, at::kLong, logits);
  check_rows(weights, "weights", M, at::kFloat, logits);
  check_rows(lse, "lse", M, at::kFloat, logits);
  check_scalar(wsum_eps, "wsum_eps", logits);
  const c10::DeviceGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  check_launch(ef::launch_mlm_backward(dtype_code(logits.scalar_type(), "logits"), logits.data_ptr(), M, vocab_size,
                                       W, targets.data_ptr<int64_t>(), weights.data_ptr<float>(),
                                       lse.data_ptr<float>(), wsum_eps.data_ptr<float>(),
                                       grad_loss.data_ptr<float>(), grad.data_ptr(), current_stream(logits.device())),
               "mlm_loss_backward");
  return grad;
}

at::Tensor gumbel_sample(const at::Tensor& logits, const at::Tensor& seed, double temperature,
                         const std::optional<at::Tensor>& disallow, int64_t vocab_size, bool gumbel) {
  check_logits(logits);
  const int64_t M = logits.size(0), W = logits.size(1);
  check_vocab_size(vocab_size, W);
  check_seed(seed, logits);
  if (disallow.has_value()) check_rows(*disallow, "disallow", M, at::kLong, logits);
  const c10::DeviceGuard guard(logits.device());
  at::Tensor sampled = at::empty({M}, logits.options().dtype(at::kLong));
  check_launch(ef::launch_mlm_sample(dtype_code(logits.scalar_type(), "logits"), logits.data_ptr(), M, vocab_size, W,
                                     nullptr, nullptr, disallow.has_value() ? disallow->data_ptr<int64_t>() : nullptr,
                                     seed.data_ptr<int64_t>(), static_cast<float>(temperature), gumbel,
                                     sampled.data_ptr<int64_t>(), nullptr, nullptr, nullptr, nullptr, nullptr,
                                     current_stream(logits.device())),
               "gumbel_sample");
  return sampled;
}

at::Tensor gumbel_noise(const at::Tensor& seed, int64_t M, int64_t W) {
  check_seed(seed, seed);
  TORCH_CHECK_VALUE(M >= 0 && W >= 0, "M and W must be >= 0, got ", M, " and ", W);
  const c10::DeviceGuard guard(seed.device());
  at::Tensor out = at::empty({M, W}, seed.options().dtype(at::kFloat));
  check_launch(ef::launch_gumbel_noise(seed.data_ptr<int64_t>(), M, W, out.data_ptr<float>(),
                                       current_stream(seed.device())),
               "gumbel_noise");
  return out;
}

void check_positions(const at::Tensor& positions, int64_t batch, const at::Tensor& ref) {
  check_input(positions, "positions", ref);
  check_dtype(positions, "positions", at::kLong);
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == batch, "positions must have shape [", batch,
                    ", N], got ", positions.sizes());
}

at::Tensor masked_gather(const at::Tensor& hidden, const at::Tensor& positions) {
  check_input(hidden, "hidden", hidden);
  TORCH_CHECK_VALUE(hidden.dim() == 3, "hidden must be 3-D [B, L, H], got ", hidden.sizes());
  const int64_t B = hidden.size(0), L = hidden.size(1), H = hidden.size(2);
  check_positions(positions, B, hidden);
  const int64_t N = positions.size(1);
  const c10::DeviceGuard guard(hidden.device());
  at::Tensor out = at::empty({B, N, H}, hidden.options());
  check_launch(ef::launch_masked_gather(hidden.data_ptr(), positions.data_ptr<int64_t>(), out.data_ptr(), B, L, N, H,
                                        static_cast<int64_t>(hidden.element_size()), current_stream(hidden.device())),
               "masked_gather");
  return out;
}

at::Tensor masked_scatter_add(const at::Tensor& grad, const at::Tensor& positions, int64_t seq_len) {
  check_input(grad, "grad", grad);
  TORCH_CHECK_VALUE(grad.dim() == 3, "grad must be 3-D [B, N, H], got ", grad.sizes());
  const int64_t B = grad.size(0), N = grad.size(1), H = grad.size(2);
  check_positions(positions, B, grad);
  TORCH_CHECK_VALUE(positions.size(1) == N, "positions must have shape [", B, ", ", N, "], got ", positions.sizes());
  TORCH_CHECK_VALUE(seq_len >= 0, "seq_len must be >= 0, got ", seq_len);
  const c10::DeviceGuard guard(grad.device());
  at::Tensor out = at::empty({B, seq_len, H}, grad.options());
  check_launch(ef::launch_masked_scatter_add(dtype_code(grad.scalar_type(), "grad"), grad.data_ptr(),
                                             positions.data_ptr<int64_t>(), out.data_ptr(), B, seq_len, N, H,
                                             current_stream(grad.device())),
               "masked_scatter_add");
  return out;
}

std::tuple<at::Tensor, at::Tensor> replace_tokens(const at::Tensor& input_ids, const at::Tensor& positions,
                                                  const at::Tensor& weights, const at::Tensor& sampled) {
  check_input(input_ids, "input_ids", input_ids);
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "input_ids must be 2-D [B, L], got ", input_ids.sizes());
  const int64_t B = input_ids.size(0), L = input_ids.size(1);
  TORCH_CHECK_VALUE(B <= 65535, "input_ids has too many rows for the CUDA kernel's grid: ", B);
  check_positions(positions, B, input_ids);
  for (const auto& [t, name, want] : {std::make_tuple(weights, "weights", at::kFloat),
                                      std::make_tuple(sampled, "sampled", at::kLong)}) {
    check_input(t, name, input_ids);
    check_dtype(t, name, want);
    TORCH_CHECK_VALUE(t.sizes() == positions.sizes(), name, " must have shape ", positions.sizes(), ", got ",
                      t.sizes());
  }
  const c10::DeviceGuard guard(input_ids.device());
  at::Tensor disc_ids = at::empty_like(input_ids);
  at::Tensor is_replaced = at::empty(input_ids.sizes(), input_ids.options().dtype(at::kBool));
  check_launch(ef::launch_replace_tokens(dtype_code(input_ids.scalar_type(), "input_ids"), input_ids.data_ptr(),
                                         positions.data_ptr<int64_t>(), weights.data_ptr<float>(),
                                         sampled.data_ptr<int64_t>(), disc_ids.data_ptr(), is_replaced.data_ptr<bool>(),
                                         B, L, positions.size(1), current_stream(input_ids.device())),
               "replace_tokens");
  return {disc_ids, is_replaced};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rtd_bce_forward(const at::Tensor& logits, const at::Tensor& labels,
                                                                const at::Tensor& mask) {
  check_input(logits, "logits", logits);
  const auto t = logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "logits must be float32, float16 or bfloat16 on the CUDA backend, got ", t);
  for (const auto& [t, name] : {std::make_pair(labels, "labels"), std::make_pair(mask, "attention_mask")}) {
    check_input(t, name, logits);
    TORCH_CHECK_VALUE(t.sizes() == logits.sizes(), name, " must have shape ", logits.sizes(), ", got ", t.sizes());
  }
  const int64_t n = logits.numel();
  const c10::DeviceGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32), inv_count = at::empty({}, f32);
  at::Tensor grad_unscaled = at::empty(logits.sizes(), f32);
  at::Tensor partials = at::empty({ef::rtd_bce_num_partials(n) * 2}, f32);
  check_launch(ef::launch_rtd_bce_forward(dtype_code(logits.scalar_type(), "logits"), logits.data_ptr(),
                                          dtype_code(labels.scalar_type(), "labels"), labels.data_ptr(),
                                          dtype_code(mask.scalar_type(), "attention_mask"), mask.data_ptr(), n,
                                          partials.data_ptr<float>(), loss.data_ptr<float>(),
                                          grad_unscaled.data_ptr<float>(), inv_count.data_ptr<float>(),
                                          current_stream(logits.device())),
               "rtd_bce_loss");
  return {loss, grad_unscaled, inv_count};
}

at::Tensor rtd_bce_backward(const at::Tensor& grad_loss, const at::Tensor& grad_unscaled, const at::Tensor& inv_count,
                            at::ScalarType dtype) {
  check_input(grad_unscaled, "grad_unscaled", grad_unscaled);
  check_dtype(grad_unscaled, "grad_unscaled", at::kFloat);
  check_scalar(grad_loss, "grad_loss", grad_unscaled);
  check_scalar(inv_count, "inv_count", grad_unscaled);
  const c10::DeviceGuard guard(grad_unscaled.device());
  at::Tensor grad = at::empty(grad_unscaled.sizes(), grad_unscaled.options().dtype(dtype));
  check_launch(ef::launch_rtd_bce_backward(dtype_code(dtype, "dtype"), grad_unscaled.data_ptr<float>(),
                                           grad_loss.data_ptr<float>(), inv_count.data_ptr<float>(),
                                           grad_unscaled.numel(), grad.data_ptr(), current_stream(grad.device())),
               "rtd_bce_backward");
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "electra_fast CUDA kernels (csrc/); use them through electra_fast.ops (or electra_fast.csrc.<op>)";
  m.def("mlm_forward", &mlm_forward, "fused MLM loss + sample: (loss, sampled, correct, lse, wsum_eps)");
  m.def("mlm_backward", &mlm_backward, "gradient of the MLM loss w.r.t. the logits (0 in padded columns)");
  m.def("gumbel_sample", &gumbel_sample, "one draw per row from softmax(logits[:, :vocab_size] / T)");
  m.def("gumbel_noise", &gumbel_noise, "the [M, W] noise the Gumbel sampler uses under a seed (for tests)");
  m.def("masked_gather", &masked_gather, "hidden[b, positions[b, n]]");
  m.def("masked_scatter_add", &masked_scatter_add, "backward of masked_gather");
  m.def("replace_tokens", &replace_tokens, "(disc_ids, is_replaced)");
  m.def("rtd_bce_forward", &rtd_bce_forward, "(loss, unscaled grad, 1 / count)");
  m.def("rtd_bce_backward", &rtd_bce_backward, "grad of rtd_bce_loss, cast to dtype");
}
