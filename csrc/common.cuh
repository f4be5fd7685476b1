// Device helpers shared by the kernels: dtype conversion, 16-byte vector loads/stores, warp and block
// reductions, and launch-error reporting.
//
// Arithmetic is always fp32 (or fp64 for fp64 data): 16-bit inputs are widened on load and rounded once on
// store. torch builds extensions with -D__CUDA_NO_HALF_CONVERSIONS__ and friends, so every conversion here
// goes through the explicit intrinsics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"

namespace electra_fast {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Accumulator type: fp32 for 16/32-bit floats, fp64 for fp64.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
__device__ __forceinline__ double to_acc(double x) { return x; }
template <typename T>
__device__ __forceinline__ float to_acc(T x) { return to_float(x); }
template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type x) { return from_float<T>(x); }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }

// Elements of T in one 16-byte vector (8 for 16-bit types, 4 for fp32, 2 for fp64).
template <typename T>
constexpr int vec_elems() { return 16 / static_cast<int>(sizeof(T)); }

// 16 bytes of T as a uint4, so loads and stores are single 128-bit instructions.
template <typename T>
union Vec16 {
  uint4 raw;
  T v[16 / sizeof(T)];
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, typename Acc<T>::type (&out)[vec_elems<T>()]) {
  Vec16<T> u;
  u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int j = 0; j < vec_elems<T>(); ++j) out[j] = to_acc(u.v[j]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const typename Acc<T>::type (&in)[vec_elems<T>()]) {
  Vec16<T> u;
#pragma unroll
  for (int j = 0; j < vec_elems<T>(); ++j) u.v[j] = from_acc<T>(in[j]);
  // An explicit 16-byte global store (p: global memory): built element by element, the union's plain store was
  // split by the compiler into four 32-bit ones (SASS STG.E x4 instead of STG.E.128).
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.raw.x), "r"(u.raw.y), "r"(u.raw.z),
               "r"(u.raw.w)
               : "memory");
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Elements before `p` reaches a 16-byte boundary (p is T-aligned, so this is exact), capped at n.
template <typename T>
__device__ __forceinline__ int64_t head_to_align16(const T* p, int64_t n) {
  const int64_t bytes = (16 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15)) & 15;
  const int64_t elems = bytes / static_cast<int64_t>(sizeof(T));
  return elems < n ? elems : n;
}

// Reads element i of a tensor of runtime dtype as a float (labels, masks: a uniform branch per launch,
// cheaper than one kernel instance per label x mask dtype).
__device__ __forceinline__ float load_as_float(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat64: return static_cast<float>(static_cast<const double*>(p)[i]);
    case DType::kBool: return static_cast<const bool*>(p)[i] ? 1.0f : 0.0f;
    case DType::kUInt8: return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
    case DType::kInt8: return static_cast<float>(static_cast<const int8_t*>(p)[i]);
    case DType::kInt16: return static_cast<float>(static_cast<const int16_t*>(p)[i]);
    case DType::kInt32: return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    case DType::kInt64: return static_cast<float>(static_cast<const int64_t*>(p)[i]);
  }
  return 0.0f;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in every thread.
// `scratch` holds 32 values; the trailing barrier lets the caller reuse it at once.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nwarps ? scratch[lane] : T(0);
  x = warp_sum(x);
  __syncthreads();
  return x;
}

inline const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace electra_fast
