// Host interface of the decode-time per-example LoRA kernel (csrc/lora_decode.cu).
//
// Plain C++ on purpose: the torch binding (bindings.cpp) is compiled by the host compiler
// and must not see CUDA device code; the kernel translation unit must not see torch.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace f2l {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One decode step of S sequences, one row each. Row s of `x` belongs to sequence s, whose
// adapter list is entries adapter_ptr[s]..adapter_ptr[s+1] of adapter_idx/adapter_weight.
//
//   out[s] (+)= sum_k coef_k * (x[s] . A[p_k, :r_k]^T) B[p_k, :, :r_k]^T,
//   coef_k = scale[p_k] * adapter_weight[k]
//
// Every index is read on the device, so a launch is CUDA-graph capturable and the ids may
// change between replays. Pool ids outside [0, pool_size) contribute nothing; ranks are
// clamped to [0, r_max].
struct LoraDecodeParams {
  const void* x = nullptr;        // [S, d_in], row stride x_row_stride (elements)
  const void* lora_a = nullptr;   // [P, r_max, d_in], contiguous
  const void* lora_b = nullptr;   // [P, d_out, r_max], contiguous
  void* out = nullptr;            // [S, d_out], row stride out_row_stride (elements)
  const int32_t* adapter_ptr = nullptr;    // [S+1]
  const int32_t* adapter_idx = nullptr;    // [K]
  const float* adapter_weight = nullptr;   // [K]
  const int32_t* ranks = nullptr;          // [P] or null (r_max for every entry)
  const float* scale_vec = nullptr;        // [P] or null (use `scale`)
  float scale = 1.0f;
  int64_t num_seqs = 0, d_in = 0, d_out = 0, r_max = 0, pool_size = 0;
  int64_t x_row_stride = 0, out_row_stride = 0;
  int max_entries = 0;   // bound on adapter_ptr[s+1]-adapter_ptr[s]; sizes shared memory
  int tiles = 1;         // output tiles per sequence (blocks per sequence)
  int cluster = 1;       // thread-block cluster size along the tiles (sm_90+), divides tiles
  bool accumulate = false;
  DType dtype = DType::kFloat32;
};

// Largest max_entries * r_max the kernel accepts (its shrink result lives in shared memory).
constexpr int64_t kMaxSlotRanks = 4096;
// Largest adapter list per sequence (entry metadata lives in shared memory).
constexpr int kMaxEntries = 256;
// Largest cluster size used (the portable maximum on sm_90).
constexpr int kMaxCluster = 8;
// Threads per block.
constexpr int kThreads = 256;

// Dynamic shared memory one block needs.
size_t lora_decode_smem_bytes(int max_entries, int64_t r_max);

// Launches the kernel on `stream`. Returns cudaSuccess or the launch error; the caller
// validates shapes (this function trusts them).
cudaError_t launch_lora_delta_decode(const LoraDecodeParams& p, cudaStream_t stream);

}  // namespace f2l
