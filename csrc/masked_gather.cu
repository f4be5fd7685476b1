// masked_gather: out[b, n, :] = hidden[b, positions[b, n], :], and its backward, a scatter-add.
//
// Gather: one warp per output row, a plain byte copy in the widest vector (16 down to 1 bytes) that the row
// size and both base pointers allow, so any dtype works and a bf16 row of H = 768 is 1536 bytes = 96 uint4.
//
// Scatter-add (backward): instead of atomics on a zero-filled [B, L, H] buffer, one warp owns each output row
// (b, l): it scans positions[b, :] 32 at a time (a coalesced load and a ballot), adds the gradient rows of
// the matching slots in fp32 registers, in slot order, and writes the row once (zeros when nothing
// matches). So it is deterministic, needs no separate zero-fill, and 16-bit gradients accumulate in fp32.
// The scan costs N/32 loads per row and output tile: small next to the H-wide rows (N ~ 0.15 L).
#include "common.cuh"

namespace electra_fast {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kScatterTile = 4;  // vectors per lane held in registers per pass over the slots

template <typename V>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
masked_gather_kernel(const V* __restrict__ hidden, const int64_t* __restrict__ positions, V* __restrict__ out,
                     int64_t L, int64_t N, int64_t rows, int64_t row_vecs) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = row / N, p = positions[row];
  V* dst = out + row * row_vecs;
  if (p < 0 || p >= L) {  // a zero row rather than an out-of-bounds read
    for (int64_t i = lane; i < row_vecs; i += kWarp) dst[i] = V{};
    return;
  }
  const V* src = hidden + (b * L + p) * row_vecs;
  for (int64_t i = lane; i < row_vecs; i += kWarp) dst[i] = src[i];
}

// kVec elements per access: 16 bytes when H and the pointers allow it, else 1.
template <typename T, int kVec>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarp)
masked_scatter_add_kernel(const T* __restrict__ grad, const int64_t* __restrict__ positions, T* __restrict__ out,
                          int64_t L, int64_t N, int64_t H, int64_t rows) {
  using A = typename Acc<T>::type;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  if (row >= rows) return;  // whole warps leave together, so the ballots below stay full-warp
  const int lane = threadIdx.x % kWarp;
  const int64_t b = row / L, l = row % L;
  const int64_t* pos = positions + b * N;
  const T* g = grad + b * N * H;
  T* dst = out + row * H;
  constexpr int64_t kTileElems = static_cast<int64_t>(kScatterTile) * kWarp * kVec;

  for (int64_t h0 = 0; h0 < H; h0 += kTileElems) {
    A acc[kScatterTile][kVec] = {};
    for (int64_t n0 = 0; n0 < N; n0 += kWarp) {
      const int64_t n = n0 + lane;
      unsigned hits = __ballot_sync(kFullMask, n < N && pos[n] == l);
      while (hits != 0) {  // usually zero or one slot per row
        const int64_t src = n0 + __ffs(hits) - 1;
        hits &= hits - 1;
        const T* gs = g + src * H;
#pragma unroll
        for (int k = 0; k < kScatterTile; ++k) {
          const int64_t h = h0 + (static_cast<int64_t>(k) * kWarp + lane) * kVec;
          if (h >= H) continue;
          if constexpr (kVec == 1) {
            acc[k][0] += to_acc(gs[h]);
          } else {
            A v[kVec];
            load_vec(gs + h, v);
#pragma unroll
            for (int j = 0; j < kVec; ++j) acc[k][j] += v[j];
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kScatterTile; ++k) {
      const int64_t h = h0 + (static_cast<int64_t>(k) * kWarp + lane) * kVec;
      if (h >= H) continue;
      if constexpr (kVec == 1) {
        dst[h] = from_acc<T>(acc[k][0]);
      } else {
        store_vec(dst + h, acc[k]);
      }
    }
  }
}

template <typename V>
const char* gather_typed(const void* hidden, const int64_t* positions, void* out, int64_t L, int64_t N, int64_t rows,
                         int64_t row_bytes, cudaStream_t stream) {
  masked_gather_kernel<V><<<ceil_div(rows, kWarpsPerBlock), kWarpsPerBlock * kWarp, 0, stream>>>(
      static_cast<const V*>(hidden), positions, static_cast<V*>(out), L, N, rows,
      row_bytes / static_cast<int64_t>(sizeof(V)));
  return launch_status();
}

template <typename T>
const char* scatter_typed(const void* grad, const int64_t* positions, void* out, int64_t B, int64_t L, int64_t N,
                          int64_t H, cudaStream_t stream) {
  const int64_t rows = B * L;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kWarpsPerBlock)));
  constexpr int kVec = vec_elems<T>();
  const T* g = static_cast<const T*>(grad);
  T* o = static_cast<T*>(out);
  // Rows are H elements apart, so 16-byte vectors need H % kVec == 0 as well as aligned bases.
  if (H % kVec == 0 && aligned16(grad) && aligned16(out)) {
    masked_scatter_add_kernel<T, kVec><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(g, positions, o, L, N, H, rows);
  } else {
    masked_scatter_add_kernel<T, 1><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(g, positions, o, L, N, H, rows);
  }
  return launch_status();
}

}  // namespace

const char* launch_masked_gather(const void* hidden, const int64_t* positions, void* out, int64_t B, int64_t L,
                                 int64_t N, int64_t H, int64_t elem_size, void* stream) {
  const int64_t rows = B * N, row_bytes = H * elem_size;
  if (rows == 0 || row_bytes == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  // The widest access that divides the row size and both base addresses.
  const uintptr_t align = reinterpret_cast<uintptr_t>(hidden) | reinterpret_cast<uintptr_t>(out) |
                          static_cast<uintptr_t>(row_bytes);
  if ((align & 15) == 0) return gather_typed<uint4>(hidden, positions, out, L, N, rows, row_bytes, s);
  if ((align & 7) == 0) return gather_typed<uint2>(hidden, positions, out, L, N, rows, row_bytes, s);
  if ((align & 3) == 0) return gather_typed<uint32_t>(hidden, positions, out, L, N, rows, row_bytes, s);
  if ((align & 1) == 0) return gather_typed<uint16_t>(hidden, positions, out, L, N, rows, row_bytes, s);
  return gather_typed<uint8_t>(hidden, positions, out, L, N, rows, row_bytes, s);
}

const char* launch_masked_scatter_add(DType dtype, const void* grad, const int64_t* positions, void* out, int64_t B,
                                      int64_t L, int64_t N, int64_t H, void* stream) {
  if (B * L == 0 || H == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return scatter_typed<float>(grad, positions, out, B, L, N, H, s);
    case DType::kFloat16: return scatter_typed<__half>(grad, positions, out, B, L, N, H, s);
    case DType::kBFloat16: return scatter_typed<__nv_bfloat16>(grad, positions, out, B, L, N, H, s);
    case DType::kFloat64: return scatter_typed<double>(grad, positions, out, B, L, N, H, s);
    default: return "masked_scatter_add: grad must be float32, float16, bfloat16 or float64";
  }
}

}  // namespace electra_fast
