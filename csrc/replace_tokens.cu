// replace_tokens: the discriminator's input and labels in one kernel (docs/algorithm.md#replacement-and-labels).
//
// disc_ids[b, l] = input_ids[b, l] + sum over real slots n (weights[b, n] > 0) with positions[b, n] == l of
// (sampled[b, n] - input_ids[b, l]); is_replaced = disc_ids != input_ids. With distinct real positions (what
// mask_tokens produces) that is "write the sample in", and a sample equal to the original is labelled 0.
// The delta form is the reference's: a padding slot may share a position with a real slot and adds 0.
//
// Each thread owns one output position l and every output element is written by its owner, so there is no
// copy-then-scatter race and no second kernel. A block stages a chunk of slots (position, delta) in shared
// memory and its threads scan it: B * L * N comparisons from shared memory, trivial at N ~ 0.15 L.
// Ids are summed as uint64 (wrapping, no signed overflow), which is the reference's arithmetic modulo 2^32
// for int32 ids and exact for int64.
#include "common.cuh"

namespace electra_fast {
namespace {

constexpr int kThreads = 256;

template <typename Id>
__global__ void __launch_bounds__(kThreads)
replace_tokens_kernel(const Id* __restrict__ input_ids, const int64_t* __restrict__ positions,
                      const float* __restrict__ weights, const int64_t* __restrict__ sampled,
                      Id* __restrict__ disc_ids, bool* __restrict__ is_replaced, int64_t L, int64_t N) {
  __shared__ int64_t slot_pos[kThreads];
  __shared__ uint64_t slot_delta[kThreads];
  const int64_t b = blockIdx.y;
  const int64_t l = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const Id* ids = input_ids + b * L;
  uint64_t delta = 0;
  for (int64_t n0 = 0; n0 < N; n0 += kThreads) {
    const int64_t n = n0 + threadIdx.x;
    int64_t p = -1;
    uint64_t d = 0;
    if (n < N) {
      p = positions[b * N + n];
      // Only real, in-range slots count; the others can never match (p = -1), so nothing reads out of bounds.
      if (weights[b * N + n] > 0.0f && p >= 0 && p < L) {
        d = static_cast<uint64_t>(static_cast<int64_t>(static_cast<Id>(sampled[b * N + n]))) -
            static_cast<uint64_t>(static_cast<int64_t>(ids[p]));
      } else {
        p = -1;
      }
    }
    __syncthreads();  // the previous chunk has been scanned by every thread
    slot_pos[threadIdx.x] = p;
    slot_delta[threadIdx.x] = d;
    __syncthreads();
    const int count = static_cast<int>(N - n0 < kThreads ? N - n0 : kThreads);
    for (int j = 0; j < count; ++j) {
      if (slot_pos[j] == l) delta += slot_delta[j];
    }
  }
  if (l < L) {
    const Id original = ids[l];
    const Id out = static_cast<Id>(static_cast<uint64_t>(static_cast<int64_t>(original)) + delta);
    disc_ids[b * L + l] = out;
    is_replaced[b * L + l] = out != original;
  }
}

template <typename Id>
const char* replace_typed(const void* input_ids, const int64_t* positions, const float* weights,
                          const int64_t* sampled, void* disc_ids, bool* is_replaced, int64_t B, int64_t L, int64_t N,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(L, kThreads)), static_cast<unsigned>(B));
  replace_tokens_kernel<Id><<<grid, kThreads, 0, stream>>>(static_cast<const Id*>(input_ids), positions, weights,
                                                           sampled, static_cast<Id*>(disc_ids), is_replaced, L, N);
  return launch_status();
}

}  // namespace

const char* launch_replace_tokens(DType id_dtype, const void* input_ids, const int64_t* positions,
                                  const float* weights, const int64_t* sampled, void* disc_ids, bool* is_replaced,
                                  int64_t B, int64_t L, int64_t N, void* stream) {
  if (B * L == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  switch (id_dtype) {
    case DType::kInt64:
      return replace_typed<int64_t>(input_ids, positions, weights, sampled, disc_ids, is_replaced, B, L, N, s);
    case DType::kInt32:
      return replace_typed<int32_t>(input_ids, positions, weights, sampled, disc_ids, is_replaced, B, L, N, s);
    default:
      return "replace_tokens: input_ids must be int64 or int32";
  }
}

}  // namespace electra_fast
