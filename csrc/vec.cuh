// Element conversion and 16-byte vector loads shared by the csrc kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace f2l {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Elements per 16-byte load.
template <typename T>
struct Vec16 {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

// N consecutive elements, aligned so that a full 16-byte pack is one load instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Read-only load of N elements at `ptr`. With N * sizeof(T) == 16 the caller guarantees
// 16-byte alignment and this is a single LDG.128 through the non-coherent path (the
// adapters and activations are never written while the kernel runs).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* __restrict__ ptr) {
  Pack<T, N> p;
  if constexpr (sizeof(T) * N == 16) {
    *reinterpret_cast<uint4*>(&p) = __ldg(reinterpret_cast<const uint4*>(ptr));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p.v[i] = ptr[i];
  }
  return p;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace f2l
