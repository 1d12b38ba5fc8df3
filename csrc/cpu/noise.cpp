// arq::noisy_input on CPU: count noisy copies of one input, x + sigma * z, with
// the counter-based Philox Gaussian noise of csrc/noise_math.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "noise_math.h"

namespace arq {
namespace {

void check_counters(int64_t seed, int64_t input_index, int64_t draw, int64_t sample_start, int64_t count,
                    int64_t num_elements) {
  constexpr int64_t kCounterLimit = int64_t(1) << 32;
  TORCH_CHECK(seed >= 0, "noisy_input: seed must be >= 0, got ", seed);
  TORCH_CHECK(input_index >= 0 && input_index < kCounterLimit, "noisy_input: input_index must be in [0, 2^32), got ",
              input_index);
  TORCH_CHECK(draw >= 0 && draw < kCounterLimit, "noisy_input: draw must be in [0, 2^32), got ", draw);
  TORCH_CHECK(count >= 0 && sample_start >= 0 && sample_start + count <= kCounterLimit,
              "noisy_input: samples [sample_start, sample_start + count) must lie in [0, 2^32), got start ",
              sample_start, " count ", count);
  TORCH_CHECK((num_elements + 1) / 2 <= kCounterLimit, "noisy_input: input too large for the pair counter");
}

// One sample's noise for pairs [0, pairs), written to z (2 * pairs doubles). Kept
// branch-free and free of calls so the compiler vectorizes it; cloned for
// AVX-512 and AVX2 with a portable default, chosen at run time. Contraction to
// FMA stays off (-ffp-contract=off), so every clone gives the same bits.
__attribute__((target_clones("avx512f", "avx2", "default")))
void gaussian_row(double* __restrict__ z_even, double* __restrict__ z_odd, uint32_t pairs, uint64_t seed,
                  uint32_t sample, uint32_t input_index, uint32_t draw) {
#pragma omp simd
  for (uint32_t pair = 0; pair < pairs; ++pair) {
    double z0, z1;
    noise::gaussian_pair(seed, pair, sample, input_index, draw, z0, z1);
    z_even[pair] = z0;
    z_odd[pair] = z1;
  }
}

template <typename scalar_t>
void noisy_input_kernel(const scalar_t* x, scalar_t* out, int64_t num_elements, double sigma, uint64_t seed,
                        uint32_t input_index, uint32_t draw, int64_t sample_start, int64_t count) {
  const int64_t pairs = (num_elements + 1) / 2;
  // At least ~32k pairs per task: below that, waking threads costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(pairs, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> z_even(pairs), z_odd(pairs);
    for (int64_t sample = begin; sample < end; ++sample) {
      gaussian_row(z_even.data(), z_odd.data(), static_cast<uint32_t>(pairs), seed,
                   static_cast<uint32_t>(sample_start + sample), input_index, draw);
      scalar_t* row = out + sample * num_elements;
      for (int64_t e = 0; e < num_elements; ++e) {
        const double z = (e & 1) ? z_odd[e >> 1] : z_even[e >> 1];
        row[e] = static_cast<scalar_t>(static_cast<double>(x[e]) + z * sigma);
      }
    }
  });
}

at::Tensor noisy_input_cpu(const at::Tensor& x, double sigma, int64_t seed, int64_t input_index, int64_t draw,
                           int64_t sample_start, int64_t count) {
  TORCH_CHECK(x.is_floating_point(), "noisy_input: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(sigma > 0, "noisy_input: sigma must be > 0, got ", sigma);
  check_counters(seed, input_index, draw, sample_start, count, x.numel());
  const at::Tensor input = x.contiguous();
  std::vector<int64_t> shape{count};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (count == 0 || x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noisy_input_cpu", [&] {
    noisy_input_kernel<scalar_t>(input.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), sigma,
                                 static_cast<uint64_t>(seed), static_cast<uint32_t>(input_index),
                                 static_cast<uint32_t>(draw), sample_start, count);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(arq, m) {
  m.def("noisy_input(Tensor x, float sigma, int seed, int input_index, int draw, int sample_start, int count) -> Tensor");
}

TORCH_LIBRARY_IMPL(arq, CPU, m) { m.impl("noisy_input", &noisy_input_cpu); }

}  // namespace arq
