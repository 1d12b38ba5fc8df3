// arq::noisy_input on CUDA: one thread per (sample, element pair), the same
// float64 arithmetic as the CPU op (csrc/noise_math.h), built with --fmad=false.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "noise_math.h"

namespace arq {
namespace {

template <typename scalar_t>
__global__ void noisy_input_cuda_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                        int64_t num_elements, int64_t pairs, int64_t count, double sigma,
                                        uint64_t seed, uint32_t input_index, uint32_t draw, int64_t sample_start) {
  const int64_t total = count * pairs;
  for (int64_t task = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; task < total;
       task += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t sample = task / pairs;
    const int64_t pair = task - sample * pairs;
    double z0, z1;
    noise::gaussian_pair(seed, static_cast<uint32_t>(pair), static_cast<uint32_t>(sample_start + sample),
                         input_index, draw, z0, z1);
    const int64_t element = 2 * pair;
    scalar_t* row = out + sample * num_elements;
    row[element] = static_cast<scalar_t>(static_cast<double>(x[element]) + z0 * sigma);
    if (element + 1 < num_elements) row[element + 1] = static_cast<scalar_t>(static_cast<double>(x[element + 1]) + z1 * sigma);
  }
}

at::Tensor noisy_input_cuda(const at::Tensor& x, double sigma, int64_t seed, int64_t input_index, int64_t draw,
                            int64_t sample_start, int64_t count) {
  constexpr int64_t kCounterLimit = int64_t(1) << 32;
  TORCH_CHECK(x.is_floating_point(), "noisy_input: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0, "noisy_input: sigma must be finite and > 0, got ", sigma);
  TORCH_CHECK(seed >= 0, "noisy_input: seed must be >= 0");
  TORCH_CHECK(input_index >= 0 && input_index < kCounterLimit, "noisy_input: input_index must be in [0, 2^32)");
  TORCH_CHECK(draw >= 0 && draw < kCounterLimit, "noisy_input: draw must be in [0, 2^32)");
  TORCH_CHECK(count >= 0 && sample_start >= 0 && sample_start <= kCounterLimit && count <= kCounterLimit - sample_start,
              "noisy_input: samples must lie in [0, 2^32)");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  std::vector<int64_t> shape{count};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t pairs = (x.numel() + 1) / 2;
  const int64_t total = count * pairs;
  if (total == 0) return out;
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535 * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noisy_input_cuda", [&] {
    noisy_input_cuda_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), pairs, count, sigma,
        static_cast<uint64_t>(seed), static_cast<uint32_t>(input_index), static_cast<uint32_t>(draw), sample_start);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(arq, CUDA, m) { m.impl("noisy_input", &noisy_input_cuda); }

}  // namespace arq
