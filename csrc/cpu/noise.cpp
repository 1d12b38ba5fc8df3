// arq::noisy_input on CPU: count noisy copies of one input, x + sigma * z, with
// the counter-based Philox Gaussian noise of csrc/noise_math.h.
//
// arq::noisy_input_codes: the same copies written directly as the first integer layer's input
// codes (arq.smoothing.noise.noisy_codes_batch_reference), in float32 and in the order of the
// integer model's own first steps (NormalizeLayer, then the layer's activation quantizer):
//   v = float32(x + sigma z),  u = (v - mean[c]) / std[c],
//   code = clamp(round_half_even(u / scale) + zero_point, code_min, code_max)   (uint8),
// laid out [count, C, H, W] in channels_last memory (NHWC: what oneDNN's convolution reads), so
// no float32 noisy batch is written and read back and no separate quantization pass runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "noise_math.h"
#include "cpu/packed_common.h"

namespace arq {
namespace {

void check_counters(int64_t seed, int64_t input_index, int64_t draw, int64_t sample_start, int64_t count,
                    int64_t num_elements) {
  constexpr int64_t kCounterLimit = int64_t(1) << 32;
  TORCH_CHECK(seed >= 0, "noisy_input: seed must be >= 0, got ", seed);
  TORCH_CHECK(input_index >= 0 && input_index < kCounterLimit, "noisy_input: input_index must be in [0, 2^32), got ",
              input_index);
  TORCH_CHECK(draw >= 0 && draw < kCounterLimit, "noisy_input: draw must be in [0, 2^32), got ", draw);
  // compared without forming sample_start + count, which could overflow int64
  TORCH_CHECK(count >= 0 && sample_start >= 0 && sample_start <= kCounterLimit && count <= kCounterLimit - sample_start,
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
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0, "noisy_input: sigma must be finite and > 0, got ", sigma);
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

// One sample's noisy values v[e] = float32(x[e] + sigma z[e]) from the pair-split noise, then its codes
// plane by plane (planar, in codes), each step one IEEE float32 operation as in the reference; the
// loops are free of calls and branches so the compiler vectorizes them (cloned as gaussian_row).
__attribute__((target_clones("avx512f", "avx2", "default")))
void noisy_values(const float* __restrict__ x, const double* __restrict__ z_even, const double* __restrict__ z_odd,
                  float* __restrict__ values, int64_t num_elements, double sigma) {
  const int64_t full_pairs = num_elements / 2;
#pragma omp simd
  for (int64_t pair = 0; pair < full_pairs; ++pair) {
    values[2 * pair] = static_cast<float>(static_cast<double>(x[2 * pair]) + z_even[pair] * sigma);
    values[2 * pair + 1] = static_cast<float>(static_cast<double>(x[2 * pair + 1]) + z_odd[pair] * sigma);
  }
  if (num_elements & 1) {
    values[num_elements - 1] =
        static_cast<float>(static_cast<double>(x[num_elements - 1]) + z_even[full_pairs] * sigma);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void plane_codes(const float* __restrict__ values, uint8_t* __restrict__ codes, int64_t plane, float shift,
                 float divisor, float scale, float zero_point, float code_min, float code_max) {
#pragma omp simd
  for (int64_t p = 0; p < plane; ++p) {
    const float normalized = (values[p] - shift) / divisor;
    // nearbyint in the default mode: half to even, as torch.round
    const float q = std::nearbyint(normalized / scale) + zero_point;
    codes[p] = static_cast<uint8_t>(std::min(std::max(q, code_min), code_max));
  }
}

// Planar codes [C][plane] -> pixel-interleaved [plane][C] (NHWC). Three channels (images) go 16
// pixels at a time through SSSE3 byte shuffles: each 16-byte output chunk gathers its bytes from
// the three 16-byte plane chunks (shuffle index 0x80 gives a zero byte) and ORs them.
void interleave_scalar(const uint8_t* planar, uint8_t* out, int64_t channels, int64_t plane, int64_t begin) {
  for (int64_t p = begin; p < plane; ++p) {
    for (int64_t c = 0; c < channels; ++c) out[p * channels + c] = planar[c * plane + p];
  }
}

#if defined(__x86_64__) || defined(_M_X64)
struct Interleave3Masks {
  alignas(16) uint8_t index[3][3][16];  // [output chunk][channel][output byte]
  Interleave3Masks() {
    for (int chunk = 0; chunk < 3; ++chunk) {
      for (int channel = 0; channel < 3; ++channel) {
        for (int byte = 0; byte < 16; ++byte) {
          const int position = 16 * chunk + byte;  // in the 48 interleaved bytes of 16 pixels
          index[chunk][channel][byte] = position % 3 == channel ? static_cast<uint8_t>(position / 3) : 0x80;
        }
      }
    }
  }
};

__attribute__((target("ssse3")))
void interleave3_ssse3(const uint8_t* planar, uint8_t* out, int64_t plane) {
  static const Interleave3Masks masks;
  int64_t p = 0;
  for (; p + 16 <= plane; p += 16) {
    const __m128i planes[3] = {_mm_loadu_si128(reinterpret_cast<const __m128i*>(planar + p)),
                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(planar + plane + p)),
                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(planar + 2 * plane + p))};
    for (int chunk = 0; chunk < 3; ++chunk) {
      __m128i bytes = _mm_setzero_si128();
      for (int channel = 0; channel < 3; ++channel) {
        const __m128i index = _mm_load_si128(reinterpret_cast<const __m128i*>(masks.index[chunk][channel]));
        bytes = _mm_or_si128(bytes, _mm_shuffle_epi8(planes[channel], index));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * p + 16 * chunk), bytes);
    }
  }
  interleave_scalar(planar, out, 3, plane, p);
}
#endif

void interleave_channels(const uint8_t* planar, uint8_t* out, int64_t channels, int64_t plane) {
  if (channels == 1) {
    std::copy(planar, planar + plane, out);
    return;
  }
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ssse3 = __builtin_cpu_supports("ssse3");
  if (channels == 3 && ssse3) {
    interleave3_ssse3(planar, out, plane);
    return;
  }
#endif
  interleave_scalar(planar, out, channels, plane, 0);
}

at::Tensor noisy_input_codes_cpu(const at::Tensor& x, double sigma, int64_t seed, int64_t input_index, int64_t draw,
                                 int64_t sample_start, int64_t count, const at::Tensor& mean, const at::Tensor& std_dev,
                                 double scale, int64_t zero_point, int64_t code_min, int64_t code_max) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3,
              "noisy_input_codes: x must be one float32 input [C, H, W], got ", x.scalar_type(), " of shape ",
              x.sizes());
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0, "noisy_input_codes: sigma must be finite and > 0, got ", sigma);
  check_counters(seed, input_index, draw, sample_start, count, x.numel());
  const int64_t channels = x.size(0), plane = x.size(1) * x.size(2);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && std_dev.scalar_type() == at::kFloat && mean.numel() == channels &&
                  std_dev.numel() == channels,
              "noisy_input_codes: mean and std must be float32 with one value per channel (", channels, "), got ",
              mean.sizes(), " and ", std_dev.sizes());
  packed::float32_scale(scale, "noisy_input_codes", "scale");
  TORCH_CHECK(0 <= code_min && code_min <= code_max && code_max <= 255,
              "noisy_input_codes: need 0 <= code_min <= code_max <= 255, got ", code_min, " and ", code_max);
  TORCH_CHECK(0 <= zero_point && zero_point <= 255, "noisy_input_codes: zero_point must be in 0..255, got ",
              zero_point);
  const at::Tensor input = x.contiguous();
  const at::Tensor shift = mean.contiguous(), divisor = std_dev.contiguous();
  // a non-finite input has no codes (the float path's quantize_codes raises on the NaN it makes)
  TORCH_CHECK(input.isfinite().all().item<bool>(), "noisy_input_codes: x must be finite");
  TORCH_CHECK((divisor > 0).all().item<bool>() && divisor.isfinite().all().item<bool>() &&
                  shift.isfinite().all().item<bool>(),
              "noisy_input_codes: std must be finite and > 0 and mean finite");
  at::Tensor out = at::empty({count, channels, x.size(1), x.size(2)},
                             x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
  if (count == 0 || x.numel() == 0) return out;
  const int64_t num_elements = x.numel(), pairs = (num_elements + 1) / 2;
  const float* x_data = input.data_ptr<float>();
  const float* mean_data = shift.data_ptr<float>();
  const float* std_data = divisor.data_ptr<float>();
  uint8_t* out_data = out.data_ptr<uint8_t>();
  const float scale_f = static_cast<float>(scale), zero_f = static_cast<float>(zero_point);
  const float low = static_cast<float>(code_min), high = static_cast<float>(code_max);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(pairs, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> z_even(pairs), z_odd(pairs);
    std::vector<float> values(num_elements);
    std::vector<uint8_t> planar(num_elements);
    for (int64_t sample = begin; sample < end; ++sample) {
      gaussian_row(z_even.data(), z_odd.data(), static_cast<uint32_t>(pairs), static_cast<uint64_t>(seed),
                   static_cast<uint32_t>(sample_start + sample), static_cast<uint32_t>(input_index),
                   static_cast<uint32_t>(draw));
      noisy_values(x_data, z_even.data(), z_odd.data(), values.data(), num_elements, sigma);
      for (int64_t c = 0; c < channels; ++c) {
        plane_codes(values.data() + c * plane, planar.data() + c * plane, plane, mean_data[c], std_data[c], scale_f,
                    zero_f, low, high);
      }
      // NHWC: element (c, p) at p * channels + c
      interleave_channels(planar.data(), out_data + sample * num_elements, channels, plane);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(arq, m) {
  m.def("noisy_input(Tensor x, float sigma, int seed, int input_index, int draw, int sample_start, int count) -> Tensor");
  m.def("noisy_input_codes(Tensor x, float sigma, int seed, int input_index, int draw, int sample_start, int count, "
        "Tensor mean, Tensor std, float scale, int zero_point, int code_min, int code_max) -> Tensor");
}

TORCH_LIBRARY_IMPL(arq, CPU, m) {
  m.impl("noisy_input", &noisy_input_cpu);
  m.impl("noisy_input_codes", &noisy_input_codes_cpu);
}

}  // namespace arq
