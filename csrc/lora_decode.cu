// Decode-time per-example LoRA: out[s] (+)= sum_k coef_k (x[s] A_{p_k}^T) B_{p_k}^T in one launch.
//
// Why this shape of kernel
// ------------------------
// At decode each sequence brings one row, so the op is two chained batched GEMVs and is
// bound by memory: for one sequence with one rank-r adapter the bytes that must move are
// x (d_in), A (r*d_in), B (d_out*r) and y (d_out); the flops are 2r(d_in + d_out), i.e.
// about one flop per byte in bf16. The floor is therefore "every distinct adapter's A and
// B read once from HBM" and the design goal is to keep enough 16-byte loads in flight to
// reach HBM bandwidth with a few hundred blocks, with no second launch. Example (the
// target shape): S = 64 distinct rank-16 adapters, d_in = d_out = 2048, bf16 moves
// 2 * (64*2048 + 64*16*(2048+2048) + 64*2048) B = 8.9 MB, 2.7 us at H100's 3.35 TB/s;
// 80 % of that bandwidth is 3.3 us for the whole layer, so one launch and a short
// dependency chain (ids -> A -> t -> B) matter as much as the loads themselves.
//
// Grid: S * tiles blocks; block (s, tile) owns output rows [tile*rows, (tile+1)*rows) of
// sequence s. Each block needs the full shrink t = coef * (x A^T) of its sequence before
// it can expand, and a second launch (or a grid-wide wait) is what this kernel avoids:
//
// * cluster == 1 (any arch): every block recomputes the whole shrink. A is read from HBM
//   once and then `tiles - 1` more times from L2; the launcher keeps `tiles` small when S
//   alone fills the GPU (tiles == 1 at large batch: no recompute at all).
// * cluster == C > 1 (sm_90+): the C blocks of a thread-block cluster belong to the same
//   sequence and split d_in C ways; each writes its partial dot products to shared memory,
//   and after one cluster barrier every block sums the C partials through distributed
//   shared memory (a fixed order, so all blocks get bit-identical t). No byte of A is read
//   twice within a cluster; clusters are co-scheduled by hardware, so the dependency is
//   safe where a grid-wide spin would not be.
//
// Shrink: one warp reduces kRowsPerWarp rank rows at a time; lanes stride over the d_in
// slice with 16-byte loads (8 bf16/fp16 or 4 fp32), products in fp32, warp-shuffle sum.
// Expand: one thread per output row walks the adapter list; B's PEFT layout [d_out, r]
// makes each row's r coefficients contiguous, so a warp reads one contiguous stretch of
// 32 * r elements per adapter (16-byte loads again), and t is a shared-memory broadcast.
// The block's B slice is one contiguous range per adapter, prefetched into L2 at kernel
// start so that the expand's reads do not pay HBM latency after the shrink's.
//
// Every index is read on the device, so launches are CUDA-graph capturable and the
// adapter ids may be rewritten in place between replays.

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "lora_decode.h"
#include "vec.cuh"

namespace f2l {
namespace {

constexpr int kWarps = kThreads / 32;
// Rank rows a warp reduces together: more independent loads in flight per lane.
constexpr int kRowsPerWarp = 2;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define F2L_HAS_CLUSTERS 1
#else
#define F2L_HAS_CLUSTERS 0
#endif

template <typename T, int VEC, bool CLUSTER>
__global__ void __launch_bounds__(kThreads) lora_decode_kernel(const LoraDecodeParams p) {
  extern __shared__ float smem[];
  const int r_max = static_cast<int>(p.r_max);
  const int slots = p.max_entries * r_max;
  float* t = smem;                 // [slots] expand coefficients, entry k at k * r_max
  float* part = t + slots;         // [slots] this block's partial shrink (read by peers)
  float* coef = part + slots;      // [max_entries] scale[p_k] * weight_k
  int* ent_p = reinterpret_cast<int*>(coef + p.max_entries);  // [max_entries] pool id
  int* ent_r = ent_p + p.max_entries;                           // [max_entries] rank

  const int64_t s = blockIdx.x / p.tiles;
  const int tile = static_cast<int>(blockIdx.x - s * p.tiles);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  // ---- this sequence's adapter list -> shared memory
  const int e0 = p.adapter_ptr[s];
  const int num_entries = max(0, min(p.adapter_ptr[s + 1] - e0, p.max_entries));
  for (int k = tid; k < num_entries; k += kThreads) {
    int pid = p.adapter_idx[e0 + k];
    int r = 0;
    float c = 0.f;
    // Ids are not host-checked between graph replays: an id outside the pool must not
    // turn into an out-of-bounds read, so it contributes nothing.
    if (pid >= 0 && pid < p.pool_size) {
      r = p.ranks != nullptr ? min(max(p.ranks[pid], 0), r_max) : r_max;
      c = (p.scale_vec != nullptr ? p.scale_vec[pid] : p.scale) * p.adapter_weight[e0 + k];
    } else {
      pid = 0;
    }
    ent_p[k] = pid;
    ent_r[k] = r;
    coef[k] = c;
  }
  __syncthreads();

  // ---- start pulling this block's slice of B into L2 now, so that its HBM latency
  // overlaps the shrink (the expand cannot start before the shrink is complete).
  const int64_t rows = (p.d_out + p.tiles - 1) / p.tiles;
  const int64_t o_lo = min(p.d_out, tile * rows);
  const int64_t o_hi = min(p.d_out, o_lo + rows);
  for (int k = 0; k < num_entries; ++k) {
    if (ent_r[k] == 0) continue;
    // rows o_lo..o_hi of B[p_k] are one contiguous stretch in the [d_out, r_max] layout
    const char* base = static_cast<const char*>(p.lora_b) +
                       (static_cast<int64_t>(ent_p[k]) * p.d_out + o_lo) * r_max * static_cast<int64_t>(sizeof(T));
    const char* end = base + (o_hi - o_lo) * r_max * static_cast<int64_t>(sizeof(T));
    const char* line = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(base) & ~uintptr_t(127));
    for (line += static_cast<int64_t>(tid) * 128; line < end; line += kThreads * 128)
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(line));
  }

  // ---- shrink: part[k * r_max + j] = x . A[p_k, j, slice]
  const T* __restrict__ x = static_cast<const T*>(p.x) + s * p.x_row_stride;
  const T* __restrict__ A = static_cast<const T*>(p.lora_a);
  const int64_t nvec = p.d_in / VEC;
  int64_t v_lo = 0, v_hi = nvec;
  int csize = 1;
  if constexpr (CLUSTER) {
    csize = p.cluster;
    const int crank = tile % csize;  // == cluster block rank: clusters are consecutive blocks
    const int64_t per = (nvec + csize - 1) / csize;
    v_lo = min(nvec, crank * per);
    v_hi = min(nvec, v_lo + per);
  }
  const int used = num_entries * r_max;
  for (int q0 = warp * kRowsPerWarp; q0 < used; q0 += kWarps * kRowsPerWarp) {
    const T* arow[kRowsPerWarp];
    bool live[kRowsPerWarp];
    bool any = false;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int q = q0 + i;
      live[i] = false;
      arow[i] = A;
      if (q < used) {
        const int k = q / r_max;
        const int j = q - k * r_max;
        if (j < ent_r[k]) {
          live[i] = true;
          arow[i] = A + (static_cast<int64_t>(ent_p[k]) * r_max + j) * p.d_in;
          any = true;
        }
      }
    }
    float acc[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = 0.f;
    if (any) {  // warp-uniform: depends on q0 only
#pragma unroll 4
      for (int64_t v = v_lo + lane; v < v_hi; v += 32) {
        const Pack<T, VEC> xv = load_pack<T, VEC>(x + v * VEC);
        Pack<T, VEC> av[kRowsPerWarp];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i)
          if (live[i]) av[i] = load_pack<T, VEC>(arow[i] + v * VEC);
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          if (!live[i]) continue;
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[i] = fmaf(to_float(xv.v[e]), to_float(av[i].v[e]), acc[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = warp_sum(acc[i]);
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i)
        if (q0 + i < used) part[q0 + i] = acc[i];
    }
  }

  // ---- combine: t = coef * (sum of the cluster's partials)
  if constexpr (CLUSTER) {
#if F2L_HAS_CLUSTERS
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every peer's `part` is complete and visible
    for (int q = tid; q < used; q += kThreads) {
      float sum = 0.f;
      for (int c = 0; c < csize; ++c) sum += cluster.map_shared_rank(part, c)[q];
      t[q] = coef[q / r_max] * sum;
    }
    // Peers may still be reading this block's `part`; the matching wait at the end keeps
    // the block (and its shared memory) alive until they are done. (Not the `.aligned`
    // forms: threads leave the loop above at different times.)
    asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");
#else
    __trap();  // the launcher never selects clusters below sm_90
#endif
  } else {
    __syncthreads();
    for (int q = tid; q < used; q += kThreads) t[q] = coef[q / r_max] * part[q];
  }
  __syncthreads();

  // ---- expand: out[s, o] (+)= sum_k sum_{j < r_k} B[p_k, o, j] * t[k * r_max + j]
  const T* __restrict__ B = static_cast<const T*>(p.lora_b);
  T* __restrict__ out = static_cast<T*>(p.out) + s * p.out_row_stride;
  // Two rows per thread per step, so that twice as many B loads are in flight.
  for (int64_t o0 = o_lo + tid; o0 < o_hi; o0 += 2 * kThreads) {
    const int64_t o1 = o0 + kThreads;
    const bool has1 = o1 < o_hi;
    float acc0 = 0.f, acc1 = 0.f;
    for (int k = 0; k < num_entries; ++k) {
      const int r = ent_r[k];
      const T* __restrict__ b0 = B + (static_cast<int64_t>(ent_p[k]) * p.d_out + o0) * r_max;
      // without a second row, re-read the first (a valid address; its result is dropped)
      const T* __restrict__ b1 = has1 ? b0 + static_cast<int64_t>(kThreads) * r_max : b0;
      const float* tk = t + k * r_max;
#pragma unroll 2
      for (int j = 0; j < r; j += VEC) {
        const Pack<T, VEC> v0 = load_pack<T, VEC>(b0 + j);
        const Pack<T, VEC> v1 = load_pack<T, VEC>(b1 + j);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          // Columns past the effective rank may hold anything (even NaN): skip, don't multiply by 0.
          if (j + e < r) {
            acc0 = fmaf(to_float(v0.v[e]), tk[j + e], acc0);
            acc1 = fmaf(to_float(v1.v[e]), tk[j + e], acc1);
          }
        }
      }
    }
    if (p.accumulate) acc0 += to_float(out[o0]);
    out[o0] = from_float<T>(acc0);
    if (has1) {
      if (p.accumulate) acc1 += to_float(out[o1]);
      out[o1] = from_float<T>(acc1);
    }
  }

  if constexpr (CLUSTER) {
#if F2L_HAS_CLUSTERS
    asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
#endif
  }
}

template <typename T, int VEC, bool CLUSTER>
cudaError_t launch_typed(const LoraDecodeParams& p, cudaStream_t stream) {
  const size_t smem = lora_decode_smem_bytes(p.max_entries, p.r_max);
  auto kernel = lora_decode_kernel<T, VEC, CLUSTER>;
  const unsigned grid = static_cast<unsigned>(p.num_seqs * p.tiles);
  if constexpr (CLUSTER) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid, 1, 1);
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(p.cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, p);
  } else {
    kernel<<<grid, kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T>
cudaError_t launch_dtype(const LoraDecodeParams& p, cudaStream_t stream) {
  constexpr int kVec = Vec16<T>::kElems;
  // 16-byte loads need every row start of x, A and B on a 16-byte boundary.
  const bool vec = p.d_in % kVec == 0 && p.r_max % kVec == 0 && p.x_row_stride % kVec == 0 &&
                   aligned16(p.x) && aligned16(p.lora_a) && aligned16(p.lora_b);
  const bool cluster = p.cluster > 1;
  if (vec) return cluster ? launch_typed<T, kVec, true>(p, stream) : launch_typed<T, kVec, false>(p, stream);
  return cluster ? launch_typed<T, 1, true>(p, stream) : launch_typed<T, 1, false>(p, stream);
}

}  // namespace

size_t lora_decode_smem_bytes(int max_entries, int64_t r_max) {
  const size_t slots = static_cast<size_t>(max_entries) * static_cast<size_t>(r_max);
  return (2 * slots + 3 * static_cast<size_t>(max_entries)) * sizeof(float);
}

cudaError_t launch_lora_delta_decode(const LoraDecodeParams& p, cudaStream_t stream) {
  if (p.tiles < 1 || p.cluster < 1 || p.cluster > kMaxCluster || p.tiles % p.cluster != 0 ||
      p.max_entries < 0 || p.max_entries > kMaxEntries ||
      static_cast<int64_t>(p.max_entries) * p.r_max > kMaxSlotRanks ||
      p.num_seqs * static_cast<int64_t>(p.tiles) > INT_MAX)
    return cudaErrorInvalidValue;
  if (p.num_seqs == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_dtype<float>(p, stream);
    case DType::kBFloat16:
      return launch_dtype<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_dtype<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace f2l
