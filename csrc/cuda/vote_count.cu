// arq::vote_count on CUDA: last linear layer + argmax + per-class counts, one
// warp per row. Each half-warp computes one class's logit with the 16-lane
// order defined in csrc/cpu/vote_count.cpp (lane l sums features[16 t + l] *
// weight[c, 16 t + l] from +0.0f; then a pairwise tree, here shuffle-xor 8, 4,
// 2, 1), so the logits equal the CPU op's bit for bit. Lane 0 keeps the running
// argmax (ties to the lowest index, NaN as the maximum); a shared-memory
// histogram per block, then one 64-bit atomic per class. No host sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace arq {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxClasses = 4096;  // shared histogram: 32 KiB

__global__ void vote_count_cuda_kernel(const float* __restrict__ features, const float* __restrict__ weight,
                                       const float* __restrict__ bias, int64_t rows, int64_t d, int64_t classes,
                                       unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned long long block_counts[];
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) block_counts[c] = 0;
  __syncthreads();
  const unsigned full_mask = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const int half = lane >> 4, l = lane & 15;
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t warp = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t r = warp; r < rows; r += warp_stride) {
    const float* row = features + r * d;
    int64_t best = 0;
    float best_value = 0.0f;
    bool seen_nan = false;
    for (int64_t c0 = 0; c0 < classes; c0 += 2) {
      const int64_t c = c0 + half;
      float s = 0.0f;
      if (c < classes) {
        const float* wc = weight + c * d;
        for (int64_t j = l; j < d; j += 16) s = __fadd_rn(s, __fmul_rn(row[j], wc[j]));
      }
      // lane l (< s) gets lane[l] + lane[l + s], as the CPU tree; the xor keeps halves apart.
      s = __fadd_rn(s, __shfl_xor_sync(full_mask, s, 8));
      s = __fadd_rn(s, __shfl_xor_sync(full_mask, s, 4));
      s = __fadd_rn(s, __shfl_xor_sync(full_mask, s, 2));
      s = __fadd_rn(s, __shfl_xor_sync(full_mask, s, 1));
      if (bias != nullptr && c < classes) s = __fadd_rn(s, bias[c]);
      const float other = __shfl_sync(full_mask, s, 16);  // class c0 + 1, from the second half
      if (lane == 0 && !seen_nan) {
        // class c0
        if (isnan(s)) {
          best = c0;
          seen_nan = true;
        } else if (c0 == 0 || s > best_value) {
          best = c0;
          best_value = s;
        }
        // class c0 + 1
        if (!seen_nan && c0 + 1 < classes) {
          if (isnan(other)) {
            best = c0 + 1;
            seen_nan = true;
          } else if (other > best_value) {
            best = c0 + 1;
            best_value = other;
          }
        }
      }
    }
    if (lane == 0) atomicAdd(&block_counts[best], 1ULL);
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x)
    if (block_counts[c]) atomicAdd(&counts[c], block_counts[c]);
}

at::Tensor vote_count_cuda(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t num_classes) {
  TORCH_CHECK(features.dim() == 2, "vote_count: features must be [batch, features], got ", features.sizes());
  TORCH_CHECK(features.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "vote_count: features and weight must be float32");
  TORCH_CHECK(num_classes >= 1 && num_classes <= kMaxClasses, "vote_count (CUDA): num_classes must be in 1..",
              kMaxClasses, ", got ", num_classes);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == num_classes && weight.size(1) == features.size(1),
              "vote_count: weight must be [", num_classes, ", ", features.size(1), "], got ", weight.sizes());
  TORCH_CHECK(weight.device() == features.device(), "vote_count: weight must be on the features' device");
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == num_classes,
                "vote_count: bias must be float32 [", num_classes, "]");
    TORCH_CHECK(bias->device() == features.device(), "vote_count: bias must be on the features' device");
    bias_c = bias->contiguous();
  }
  c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor f = features.contiguous(), w = weight.contiguous();
  at::Tensor counts = at::zeros({num_classes}, features.options().dtype(at::kLong));
  const int64_t rows = f.size(0);
  if (rows == 0) return counts;
  const int64_t warps_per_block = kThreads / 32;
  const int64_t blocks = std::min<int64_t>((rows + warps_per_block - 1) / warps_per_block, 8192);
  const size_t shared = static_cast<size_t>(num_classes) * sizeof(unsigned long long);
  vote_count_cuda_kernel<<<blocks, kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(
      f.data_ptr<float>(), w.data_ptr<float>(), bias_c.defined() ? bias_c.data_ptr<float>() : nullptr, rows, f.size(1),
      num_classes, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(arq, CUDA, m) { m.impl("vote_count", &vote_count_cuda); }

}  // namespace arq
