// arq::argmax_count on CUDA: one thread per row, a shared-memory histogram per
// block, then one 64-bit atomic per class per block. No host synchronization.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace arq {
namespace {

template <typename scalar_t>
__global__ void argmax_count_cuda_kernel(const scalar_t* __restrict__ logits, int64_t rows, int64_t width,
                                         int64_t num_classes, unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned long long block_counts[];
  for (int64_t c = threadIdx.x; c < num_classes; c += blockDim.x) block_counts[c] = 0;
  __syncthreads();
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t* row = logits + r * width;
    int64_t best = 0;
    float best_value = static_cast<float>(row[0]);
    if (!isnan(best_value)) {
      for (int64_t j = 1; j < width; ++j) {
        const float v = static_cast<float>(row[j]);
        if (isnan(v)) { best = j; break; }
        if (v > best_value) { best_value = v; best = j; }
      }
    }
    atomicAdd(&block_counts[best], 1ULL);
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < num_classes; c += blockDim.x)
    if (block_counts[c]) atomicAdd(&counts[c], block_counts[c]);
}

at::Tensor argmax_count_cuda(const at::Tensor& logits, int64_t num_classes) {
  TORCH_CHECK(logits.dim() == 2, "argmax_count: logits must be [batch, classes]");
  TORCH_CHECK(logits.size(1) >= 1, "argmax_count: logits need at least one class column");
  TORCH_CHECK(num_classes >= logits.size(1), "argmax_count: num_classes must be >= the number of logit columns");
  TORCH_CHECK(logits.scalar_type() != at::kDouble, "argmax_count (CUDA): float64 logits are not supported; cast them");
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor input = logits.contiguous();
  at::Tensor counts = at::zeros({num_classes}, logits.options().dtype(at::kLong));
  const int64_t rows = input.size(0);
  if (rows == 0) return counts;
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((rows + threads - 1) / threads, 4096);
  const size_t shared = num_classes * sizeof(unsigned long long);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "argmax_count_cuda", [&] {
    argmax_count_cuda_kernel<scalar_t><<<blocks, threads, shared, c10::cuda::getCurrentCUDAStream()>>>(
        input.data_ptr<scalar_t>(), rows, input.size(1), num_classes,
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(arq, CUDA, m) { m.impl("argmax_count", &argmax_count_cuda); }

}  // namespace arq
