// Torch binding of the decode-time per-example LoRA kernel: input checks, then a launch
// on the current stream. Registered as the torch custom op `f2l::lora_delta_decode`
// (with its fake implementation) in f2l_kernels/lora/cuda.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

#include "lora_decode.h"

namespace {

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), " (the device of x), got ",
              t.device());
}

void check_index(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t numel) {
  check_cuda(t, name, x);
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, ": expected a contiguous 1-D tensor, got shape ",
              t.sizes());
  if (numel >= 0) TORCH_CHECK(t.numel() == numel, name, ": expected ", numel, " elements, got ", t.numel());
}

f2l::DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return f2l::DType::kFloat32;
    case at::kBFloat16:
      return f2l::DType::kBFloat16;
    case at::kHalf:
      return f2l::DType::kFloat16;
    default:
      TORCH_CHECK(false, "x: expected dtype float32, bfloat16 or float16, got ", st);
  }
  return f2l::DType::kFloat32;
}

// out[s] (+)= sum over sequence s's adapter list of coef_k (x[s] A_{p_k}^T) B_{p_k}^T.
// Writes `out` in place (accumulate=false overwrites every element).
void lora_delta_decode_out(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           const at::Tensor& adapter_ptr, const at::Tensor& adapter_idx,
                           const at::Tensor& adapter_weight, const std::optional<at::Tensor>& ranks,
                           const std::optional<at::Tensor>& scale_vec, double scale, at::Tensor& out,
                           bool accumulate, int64_t max_entries, int64_t tiles, int64_t cluster) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, "x: expected shape [S, d_in], got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "x: expected unit stride along d_in, got strides ", x.strides());
  const auto dtype = to_dtype(x.scalar_type());
  const int64_t S = x.size(0), d_in = x.size(1);

  check_cuda(lora_a, "lora_a", x);
  check_cuda(lora_b, "lora_b", x);
  TORCH_CHECK(lora_a.scalar_type() == x.scalar_type(), "lora_a: expected dtype ", x.scalar_type(),
              " (the dtype of x), got ", lora_a.scalar_type());
  TORCH_CHECK(lora_b.scalar_type() == x.scalar_type(), "lora_b: expected dtype ", x.scalar_type(),
              " (the dtype of x), got ", lora_b.scalar_type());
  TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(2) == d_in, "lora_a: expected shape [P, r_max, ", d_in, "], got ",
              lora_a.sizes());
  const int64_t P = lora_a.size(0), r_max = lora_a.size(1);
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(0) == P && lora_b.size(2) == r_max, "lora_b: expected shape [", P,
              ", d_out, ", r_max, "], got ", lora_b.sizes());
  const int64_t d_out = lora_b.size(1);
  TORCH_CHECK(lora_a.is_contiguous(), "lora_a: expected a contiguous tensor");
  TORCH_CHECK(lora_b.is_contiguous(), "lora_b: expected a contiguous tensor");

  check_index(adapter_ptr, "adapter_ptr", x, S + 1);
  check_index(adapter_idx, "adapter_idx", x, -1);
  check_cuda(adapter_weight, "adapter_weight", x);
  TORCH_CHECK(adapter_weight.scalar_type() == at::kFloat, "adapter_weight: expected dtype float32, got ",
              adapter_weight.scalar_type());
  TORCH_CHECK(adapter_weight.dim() == 1 && adapter_weight.is_contiguous() &&
                  adapter_weight.numel() == adapter_idx.numel(),
              "adapter_weight: expected a contiguous [", adapter_idx.numel(), "] tensor, got ",
              adapter_weight.sizes());
  if (ranks.has_value()) check_index(*ranks, "ranks", x, P);
  if (scale_vec.has_value()) {
    check_cuda(*scale_vec, "scale", x);
    TORCH_CHECK(scale_vec->scalar_type() == at::kFloat && scale_vec->dim() == 1 && scale_vec->numel() == P &&
                    scale_vec->is_contiguous(),
                "scale: expected a contiguous float32 [", P, "] tensor, got ", scale_vec->scalar_type(), " ",
                scale_vec->sizes());
  }

  check_cuda(out, "out", x);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out: expected dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == S && out.size(1) == d_out, "out: expected shape [", S, ", ", d_out,
              "], got ", out.sizes());
  TORCH_CHECK(out.stride(1) == 1 || d_out <= 1, "out: expected unit stride along d_out, got strides ",
              out.strides());

  TORCH_CHECK(max_entries >= 0 && max_entries <= f2l::kMaxEntries, "max_entries: expected 0..", f2l::kMaxEntries,
              ", got ", max_entries);
  TORCH_CHECK(max_entries * r_max <= f2l::kMaxSlotRanks, "batch: max adapters per sequence (", max_entries,
              ") x r_max (", r_max, ") exceeds the kernel's limit of ", f2l::kMaxSlotRanks, " rank slots");
  TORCH_CHECK(tiles >= 1 && tiles <= (1 << 16), "tiles: expected 1..65536, got ", tiles);
  TORCH_CHECK(cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8, "cluster: expected 1, 2, 4 or 8, got ",
              cluster);
  TORCH_CHECK(tiles % cluster == 0, "tiles: expected a multiple of cluster (", cluster, "), got ", tiles);
  TORCH_CHECK(S * tiles <= INT32_MAX, "x: ", S, " sequences x ", tiles, " tiles exceed the grid limit");

  const c10::cuda::CUDAGuard guard(x.device());
  if (cluster > 1) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
    TORCH_CHECK(major >= 9, "cluster: thread-block clusters need compute capability 9.0+, the device has ", major,
                ".x; pass cluster=1");
  }
  if (S == 0 || d_out == 0) return;

  f2l::LoraDecodeParams p;
  p.x = x.data_ptr();
  p.lora_a = lora_a.data_ptr();
  p.lora_b = lora_b.data_ptr();
  p.out = out.data_ptr();
  p.adapter_ptr = adapter_ptr.data_ptr<int32_t>();
  p.adapter_idx = adapter_idx.numel() > 0 ? adapter_idx.data_ptr<int32_t>() : nullptr;
  p.adapter_weight = adapter_weight.numel() > 0 ? adapter_weight.data_ptr<float>() : nullptr;
  p.ranks = ranks.has_value() ? ranks->data_ptr<int32_t>() : nullptr;
  p.scale_vec = scale_vec.has_value() ? scale_vec->data_ptr<float>() : nullptr;
  p.scale = static_cast<float>(scale);
  p.num_seqs = S;
  p.d_in = d_in;
  p.d_out = d_out;
  p.r_max = r_max;
  p.pool_size = P;
  p.x_row_stride = x.stride(0);
  p.out_row_stride = out.stride(0);
  p.max_entries = static_cast<int>(max_entries);
  p.tiles = static_cast<int>(tiles);
  p.cluster = static_cast<int>(cluster);
  p.accumulate = accumulate;
  p.dtype = dtype;
  const cudaError_t err = f2l::launch_lora_delta_decode(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "lora_delta_decode: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "f2l CUDA kernels (decode-time per-example LoRA)";
  m.def("lora_delta_decode_out", &lora_delta_decode_out, "out (+)= per-example LoRA delta of decode rows",
        py::arg("x"), py::arg("lora_a"), py::arg("lora_b"), py::arg("adapter_ptr"), py::arg("adapter_idx"),
        py::arg("adapter_weight"), py::arg("ranks"), py::arg("scale_vec"), py::arg("scale"), py::arg("out"),
        py::arg("accumulate"), py::arg("max_entries"), py::arg("tiles"), py::arg("cluster"));
  m.attr("MAX_ENTRIES") = f2l::kMaxEntries;
  m.attr("MAX_SLOT_RANKS") = f2l::kMaxSlotRanks;
  m.attr("MAX_CLUSTER") = f2l::kMaxCluster;
  m.attr("THREADS") = f2l::kThreads;
}
