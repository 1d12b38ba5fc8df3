// arq::lowbit_conv2d on CPU: direct NHWC convolution of low-bit uint8 activation codes with
// int8 weight codes, int16 accumulation where the bit widths make it exact, fused epilogue.
//
// Why: without VNNI, an int8 convolution multiplies u8 x s8 byte pairs with vpmaddubsw (two
// products summed into int16) and widens every pair sum with vpmaddwd before adding in int32
// (oneDNN's AVX2 kernels). With low-bit codes the pair sums are small: a 4-bit activation code
// (<= 15) times a 4-bit weight (|q| <= 8) gives |pair| <= 240, so 136 of them add up exactly in
// int16. Adding in int16 and widening once per chunk halves the multiplies per MAC. On Zen 3 that
// buys less than it suggests: vpmaddubsw issues on fewer pipes than vpmaddwd, so oneDNN's
// widening runs beside it, and the vpmaddubsw + vpaddw loop peaks near 1.35 vpmaddubsw a cycle
// (ad hoc, asm loops). So 3x3 stride-1 layers take integer Winograd where the codes allow (below):
// F(2 x 2, 3 x 3) (4/9 of the multiplies) from 32 input channels, F(2, 3) along the width (2/3)
// below that; the others the direct loop. Epilogue: the sums of one chunk reach it in registers, and
// without a zero point it skips the correction. Measured on a 2-core Zen 3 AVX2 host, paired in one
// process (2026-11-29): F(2, 3) and the epilogue made 16/32/64-channel 3x3 layers (4-bit, 400
// samples, one thread) take 0.87/0.80/0.78 of their time before; F(2 x 2, 3 x 3) then 0.90-0.98 (32)
// and 0.79-0.84 (64) of F(2, 3)'s; end to end docs/performance-log.md.
// IntegerExecutionConfig.conv_kernel="auto" (the default) runs the k x k layers (k > 1) here on
// such CPUs (arq.quant.execution.lowbit_conv_preferred).
//
// With AVX-512 VNNI (and ARQ_CPU_ISA not below it) the op multiplies with vpdpbusd instead: four
// u8 x s8 products added into each int32 lane, 64 MACs an instruction, for any bit widths up to
// 8 x 8 (no int16 bound), 16 output channels a vector. There it competes with oneDNN's own VNNI
// kernels: 1.14-1.25x them on 16-channel ResNet layers, 1.00-1.10x on 32-channel ones, 0.92-0.96x
// on 64-channel ones, where oneDNN is near the multiplier's limit (W8A8, 400 samples, 2-core
// AVX-512 host), so the integer model takes it for k x k layers of 16 or 32 output channels there
// (docs/performance-log.md).
//
// Exactness: with codes c in [0, max_code] and weights |q| <= 2^(w_bits-1) =: W, every int16
// lane of one vpmaddubsw is |c0 q0 + c1 q1| <= 2 max_code W (no saturation when this is <= 32767)
// and a chunk of L of them sums to at most L * 2 max_code W; L = floor(32767 / (2 max_code W)) >= 1
// keeps every partial sum exact. Tighter, from the layer's weights: lane (o, h) adds
// c_{4g+2h} q[o, 4g+2h] + c_{4g+2h+1} q[o, 4g+2h+1] over the steps (tap, group g), so every partial sum
// is at most max_code * S(o, h) with S the sum of those |q| over all steps; where max_code * max S
// <= 32767 all steps run as one chunk (4-bit ResNet layers of K = 576: 144 steps where L = 136).
// The op checks every input code against max_code while it pads the input, so a larger code
// raises instead of overflowing.
//
//   acc[o]  = sum_{taps, c} code[c] * q[o, c]               exact (int16 chunks widened to int32)
//   y[o]    = float(acc[o] - zero_point * sum q[o, :]) * scale[o] + bias[o]     float32, this order
//   y      += residual                     (float32 residual, float32 output), or
//   y      += (float(residual) - residual_zero_point) * residual_scale     (uint8 residual, codes output)
//   y       = max(y, 0) with relu
//   out     = y                                                  (out_scale <= 0: float32), or
//   out     = clamp(round(y * (1 / out_scale)) + out_zero_point, out_min, out_max)   (uint8 codes)
//
// round is half to even; 1 / out_scale is one float32 division; nothing is fused into FMAs
// (-ffp-contract=off), so the AVX2 and portable paths give the same bits as the torch reference
// arq.ops.lowbit_conv2d_reference. Padding taps read the zero point (the value 0), cancelled
// exactly by the correction term. Weights arrive as tiles [ceil(O/8), kh*kw, ceil(C/4), 8, 4] int8
// (arq.ops.lowbit_conv_weight_tiles): 8 output channels x 4 input channels per 32-byte vector,
// zeros on the channels padded up to multiples of 8 and 4.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "cpu/packed_common.h"

namespace arq {
namespace lowbit {
namespace {

constexpr const char* kOp = "lowbit_conv2d";

struct Geometry {
  int64_t batch, in_channels, height, width, kernel, stride, padding;
  int64_t channels;  // in_channels rounded up to a multiple of 4 (zero weights on the extra ones)
  int64_t padded_h, padded_w, out_h, out_w, out_channels, blocks;  // blocks: ceil(O / 8)
  int64_t groups() const { return channels / 4; }
  int64_t steps() const { return kernel * kernel * groups(); }  // 32-byte weight vectors per block
};

struct Epilogue {
  const int32_t* correction;  // zero_point * sum q[o, :], padded to blocks * 8
  const float* scale;         // padded to blocks * 8
  const float* bias;          // padded to blocks * 8 (zeros without bias)
  const float* residual_f = nullptr;
  const uint8_t* residual_u8 = nullptr;
  float residual_scale = 0.0f, residual_zero = 0.0f;
  bool relu = false, codes = false;
  float inv_out_scale = 0.0f;
  int32_t out_zero = 0, out_min = 0, out_max = 255;
  float* out_f = nullptr;
  uint8_t* out_u8 = nullptr;
};

// One output value through the epilogue, in the header's float32 order.
inline void finish_scalar(int32_t acc, int64_t pixel, int64_t o, int64_t out_channels, const Epilogue& e) {
  const int64_t at = pixel * out_channels + o;
  float y = static_cast<float>(acc - e.correction[o]) * e.scale[o];
  y = y + e.bias[o];
  if (e.residual_f) y = y + e.residual_f[at];
  if (e.residual_u8) y = y + (static_cast<float>(e.residual_u8[at]) - e.residual_zero) * e.residual_scale;
  if (e.relu) y = y < 0.0f ? 0.0f : y;  // NaN stays NaN, as torch.relu
  if (!e.codes) {
    e.out_f[at] = y;
    return;
  }
  float t = y * e.inv_out_scale;
  t = t < -1.0e9f ? -1.0e9f : (t > 1.0e9f ? 1.0e9f : t);  // beyond any clamp range; keeps the int conversion defined
  const int32_t q = static_cast<int32_t>(std::nearbyint(t)) + e.out_zero;
  e.out_u8[at] = static_cast<uint8_t>(std::min(std::max(q, e.out_min), e.out_max));
}

// Portable path: int32 accumulation, one output row (all out_w pixels, all channels).
void row_scalar(const uint8_t* padded_row, const int8_t* tiles, const Geometry& g, int64_t first_pixel,
                const Epilogue& e) {
  const int64_t G = g.groups(), T = g.kernel * g.kernel;
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    const uint8_t* origin = padded_row + ow * g.stride * g.channels;
    for (int64_t o = 0; o < g.out_channels; ++o) {
      const int8_t* w = tiles + (o / 8) * T * G * 32 + (o % 8) * 4;
      int32_t acc = 0;
      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* x = origin + ((t / g.kernel) * g.padded_w + (t % g.kernel)) * g.channels;
        for (int64_t c = 0; c < g.channels; ++c)
          acc += static_cast<int32_t>(x[c]) * static_cast<int32_t>(w[(t * G + c / 4) * 32 + (c % 4)]);
      }
      finish_scalar(acc, first_pixel + ow, o, g.out_channels, e);
    }
  }
}

#if defined(__x86_64__) || defined(_M_X64)
// What a tile's epilogue does, fixed at compile time so its inner loop has no branches.
enum class Out { kFloat, kFloatResidual, kCodes, kCodesResidual };

// P x Q int32 sums (total[p][q]: pixel pixel + p, channels o0 + 8q ..) through the epilogue.
// Channel constants are loaded once per block into registers: the uint8 stores may alias any
// memory, so loads left in the loop would be redone after every store. Codes: the quotient is
// clamped to the integers [lo - zero, hi - zero] before rounding, which is clamping the rounded
// codes to [lo, hi] after it (rounding is monotone and keeps integers; NaN gives lo either way,
// vmaxps returning its second operand); with ReLU lo = max(out_min, out_zero): inv_out_scale > 0,
// so round(max(y, 0) / s) + z and round(y / s) + z clamped at z agree exactly. Codes of whole
// blocks are packed four vectors at a time (two packs, one dword permute) before the stores.
template <int P, int Q, Out kOut, bool kCorrect>
__attribute__((target("avx2"), always_inline))
inline void finish_tile(const __m256i (&total)[P][Q], int64_t pixel, int64_t o0, int64_t out_channels,
                        const Epilogue& e) {
  constexpr bool codes = kOut == Out::kCodes || kOut == Out::kCodesResidual;
  const int32_t lo = e.relu && codes ? std::max(e.out_min, e.out_zero) : e.out_min;
  const __m256i zero = _mm256_set1_epi32(e.out_zero);
  const __m256 inv = _mm256_set1_ps(e.inv_out_scale);
  const __m256 t_lo = _mm256_set1_ps(static_cast<float>(lo - e.out_zero));
  const __m256 t_hi = _mm256_set1_ps(static_cast<float>(e.out_max - e.out_zero));
  const __m256 r_zero = _mm256_set1_ps(e.residual_zero), r_scale = _mm256_set1_ps(e.residual_scale);
  const bool relu = e.relu;
  float* const out_f = e.out_f;
  uint8_t* const out_u8 = e.out_u8;
  const float* const residual_f = e.residual_f;
  const uint8_t* const residual_u8 = e.residual_u8;
  if (out_channels - o0 < 8 * Q) {  // a last partial block: one channel at a time there
    alignas(32) int32_t sums[8];
    for (int q = 0; q < Q; ++q)
      for (int p = 0; p < P; ++p) {
        const int64_t oq = o0 + 8 * q;
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums), total[p][q]);
        for (int64_t j = 0; j < std::min<int64_t>(8, out_channels - oq); ++j)
          finish_scalar(sums[j], pixel + p, oq + j, out_channels, e);
      }
    return;
  }
  __m256i correction[Q];
  __m256 scale[Q], bias[Q];
  for (int q = 0; q < Q; ++q) {
    correction[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.correction + o0 + 8 * q));
    scale[q] = _mm256_loadu_ps(e.scale + o0 + 8 * q);
    bias[q] = _mm256_loadu_ps(e.bias + o0 + 8 * q);
  }
  __m256i code[P][Q];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q) {
      const int64_t at = (pixel + p) * out_channels + o0 + 8 * q;
      // without a zero point the correction is 0 and subtracting it changes nothing
      const __m256i acc = kCorrect ? _mm256_sub_epi32(total[p][q], correction[q]) : total[p][q];
      __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale[q]), bias[q]);
      if (kOut == Out::kFloatResidual) y = _mm256_add_ps(y, _mm256_loadu_ps(residual_f + at));
      if (kOut == Out::kCodesResidual) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(residual_u8 + at));
        const __m256 r = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
        y = _mm256_add_ps(y, _mm256_mul_ps(_mm256_sub_ps(r, r_zero), r_scale));
      }
      if (!codes) {
        if (relu) y = _mm256_max_ps(_mm256_setzero_ps(), y);  // second operand on NaN: NaN stays
        _mm256_storeu_ps(out_f + at, y);
        continue;
      }
      const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(y, inv), t_lo), t_hi);
      code[p][q] = _mm256_add_epi32(_mm256_cvtps_epi32(t), zero);  // half to even; in lo..hi
    }
  if constexpr (codes) {
    // vector v = (p, q) = code[v / Q][v % Q] holds the 8 codes for ARQ_ADDRESS(v)
    constexpr int kVectors = P * Q;
    const __m256i* vectors = &code[0][0];
    uint8_t* const first = out_u8 + pixel * out_channels + o0;
#define ARQ_ADDRESS(v) (first + ((v) / Q) * out_channels + 8 * ((v) % Q))
    int v = 0;
    if constexpr (kVectors >= 4) {
      // packs interleave the 128-bit lanes: dword i of the packed bytes holds codes 4 (i % 4 / 2 ..)
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      for (; v + 4 <= kVectors; v += 4) {
        const __m256i words01 = _mm256_packus_epi32(vectors[v], vectors[v + 1]);
        const __m256i words23 = _mm256_packus_epi32(vectors[v + 2], vectors[v + 3]);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words01, words23), order);
        // bytes: vector v's 8 codes, then v + 1's, v + 2's, v + 3's
        if (Q % 2 == 0) {  // v and v + 1 are one pixel's 16 contiguous channels, as v + 2 and v + 3
          _mm_storeu_si128(reinterpret_cast<__m128i*>(ARQ_ADDRESS(v)), _mm256_castsi256_si128(bytes));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(ARQ_ADDRESS(v + 2)), _mm256_extracti128_si256(bytes, 1));
        } else {
          const __m128i low = _mm256_castsi256_si128(bytes), high = _mm256_extracti128_si256(bytes, 1);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(ARQ_ADDRESS(v)), low);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(ARQ_ADDRESS(v + 1)), _mm_unpackhi_epi64(low, low));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(ARQ_ADDRESS(v + 2)), high);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(ARQ_ADDRESS(v + 3)), _mm_unpackhi_epi64(high, high));
        }
      }
    }
    for (; v < kVectors; ++v) {
      const __m256i c = vectors[v];
      const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(ARQ_ADDRESS(v)), _mm_packus_epi16(words, words));
    }
#undef ARQ_ADDRESS
  }
}

// The int16 sums of steps i0 .. i1 - 1 into `acc` (zeroed first): P x Q vpmaddubsw + vpaddw a step.
template <int P, int Q>
__attribute__((target("avx2"), always_inline))
inline void accumulate16(__m256i (&acc)[P][Q], const uint8_t* origin, int64_t pixel_stride, const int64_t* offsets,
                         int64_t i0, int64_t i1, const int8_t* w, int64_t block_stride) {
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q) acc[p][q] = _mm256_setzero_si256();
  const int8_t* wi = w + i0 * 32;
  // unrolled: GCC then copies the loop-carried accumulators between registers once per four
  // steps instead of every step (measured 1.2-1.3x on the loop alone)
#pragma GCC unroll 4
  for (int64_t i = i0; i < i1; ++i, wi += 32) {
    __m256i wv[Q];
    for (int q = 0; q < Q; ++q) wv[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wi + q * block_stride));
    const uint8_t* x = origin + offsets[i];
    for (int p = 0; p < P; ++p) {
      int32_t four;
      std::memcpy(&four, x + p * pixel_stride, sizeof(four));
      const __m256i xv = _mm256_set1_epi32(four);
      for (int q = 0; q < Q; ++q) acc[p][q] = _mm256_add_epi16(acc[p][q], _mm256_maddubs_epi16(xv, wv[q]));
    }
  }
}

// P consecutive output pixels x Q blocks of 8 output channels. `offsets[i]` is step i's input
// offset from the tile's first tap (tap (kh, kw), group g: (kh * padded_w + kw) * C + 4 g); the
// weights of block q, step i, are the 32 bytes at w + q * block_stride + 32 i. Steps run in chunks
// of at most `chunk` (the int16 bound), each widened to int32 once (vpmaddwd with ones adds lanes
// 2j and 2j + 1, channel j's two pair sums). One chunk (the usual case): its sums go to the
// epilogue in registers. More: the running int32 sums wait in memory, since P x Q of them in
// registers beside the P x Q accumulators would spill in the step loop.
template <int P, int Q, Out kOut, bool kCorrect>
__attribute__((target("avx2")))
void tile(const uint8_t* origin, int64_t pixel_stride, const int64_t* offsets, int64_t steps, int64_t chunk,
          const int8_t* w, int64_t block_stride, int64_t pixel, int64_t o0, int64_t out_channels,
          const Epilogue& e) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[P][Q], total[P][Q];
  accumulate16<P, Q>(acc, origin, pixel_stride, offsets, 0, std::min(steps, chunk), w, block_stride);
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < Q; ++q) total[p][q] = _mm256_madd_epi16(acc[p][q], ones);
  if (steps > chunk) {
    alignas(32) int32_t sums[P][Q][8];
    for (int p = 0; p < P; ++p)
      for (int q = 0; q < Q; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(sums[p][q]), total[p][q]);
    for (int64_t i0 = chunk; i0 < steps; i0 += chunk) {
      accumulate16<P, Q>(acc, origin, pixel_stride, offsets, i0, std::min(steps, i0 + chunk), w, block_stride);
      for (int p = 0; p < P; ++p)
        for (int q = 0; q < Q; ++q) {
          __m256i* dst = reinterpret_cast<__m256i*>(sums[p][q]);
          _mm256_store_si256(dst, _mm256_add_epi32(_mm256_load_si256(dst), _mm256_madd_epi16(acc[p][q], ones)));
        }
    }
    for (int p = 0; p < P; ++p)
      for (int q = 0; q < Q; ++q) total[p][q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums[p][q]));
  }
  finish_tile<P, Q, kOut, kCorrect>(total, pixel, o0, out_channels, e);
}

// Register tiles: P pixels x Q channel blocks, P * Q <= 8 accumulators.
template <int Q, int P, Out kOut, bool kCorrect>
__attribute__((target("avx2")))
void row_blocks(const uint8_t* padded_row, const int8_t* tiles, const Geometry& g, const int64_t* offsets,
                int64_t chunk, int64_t block, int64_t first_pixel, const Epilogue& e) {
  const int64_t block_stride = g.steps() * 32, pixel_stride = g.stride * g.channels;
  const int8_t* w = tiles + block * block_stride;
  int64_t ow = 0;
  for (; ow + P <= g.out_w; ow += P)
    tile<P, Q, kOut, kCorrect>(padded_row + ow * pixel_stride, pixel_stride, offsets, g.steps(), chunk, w,
                               block_stride, first_pixel + ow, block * 8, g.out_channels, e);
  for (; ow < g.out_w; ++ow)
    tile<1, Q, kOut, kCorrect>(padded_row + ow * pixel_stride, pixel_stride, offsets, g.steps(), chunk, w,
                               block_stride, first_pixel + ow, block * 8, g.out_channels, e);
}

template <Out kOut, bool kCorrect>
__attribute__((target("avx2")))
void row_avx2(const uint8_t* padded_row, const int8_t* tiles, const Geometry& g, const int64_t* offsets,
              int64_t chunk, int64_t first_pixel, const Epilogue& e) {
  int64_t block = 0;
  for (; block + 2 <= g.blocks; block += 2)
    row_blocks<2, 4, kOut, kCorrect>(padded_row, tiles, g, offsets, chunk, block, first_pixel, e);
  for (; block < g.blocks; ++block)
    row_blocks<1, 8, kOut, kCorrect>(padded_row, tiles, g, offsets, chunk, block, first_pixel, e);
}

using RowKernel = void (*)(const uint8_t*, const int8_t*, const Geometry&, const int64_t*, int64_t, int64_t,
                           const Epilogue&);

// Every loop's kernel for an epilogue: `instance(out, correct)` returns the loop instantiated for the
// Out `out` and the zero-point correction `correct` (std::integral_constant / std::bool_constant), so
// the choice among the epilogue's compile-time variants is made in this one place.
template <typename Instance>
auto kernel_for(const Epilogue& e, bool corrected, Instance instance) {
  auto by_output = [&](auto correct) {
    if (e.codes)
      return e.residual_u8 ? instance(std::integral_constant<Out, Out::kCodesResidual>{}, correct)
                           : instance(std::integral_constant<Out, Out::kCodes>{}, correct);
    return e.residual_f ? instance(std::integral_constant<Out, Out::kFloatResidual>{}, correct)
                        : instance(std::integral_constant<Out, Out::kFloat>{}, correct);
  };
  return corrected ? by_output(std::true_type{}) : by_output(std::false_type{});
}

RowKernel row_kernel(const Epilogue& e, bool corrected) {
  return kernel_for(e, corrected, [](auto out, auto correct) -> RowKernel {
    return &row_avx2<decltype(out)::value, decltype(correct)::value>;
  });
}

// ---- AVX2, 3x3 stride 1: Winograd F(2, 3) along the width --------------------------------------
// Two adjacent outputs of one kernel row, y0 = d0 g0 + d1 g1 + d2 g2 and y1 = d1 g0 + d2 g1 + d3 g2,
// from four products instead of six (Lavin and Gray, 2016), here in integers:
//   V = (d0 - d2 + M, d1 + d2, d2 - d1 + M, d1 - d3 + M)      input codes d in [0, M]: V in [0, 2M]
//   U = (2 g0, g0 + g1 + g2, g0 - g1 + g2, 2 g2)                 |U| <= 3 2^(w_bits-1)
//   A_j = sum over the 3 kernel rows and the channels of V_j U_j                   (exact, int32)
//   2 y0 = A_0 + A_1 + A_2 - M (S_0 + S_2),   2 y1 = A_1 - A_2 - A_3 + M (S_2 + S_3)
// with S_j[o] = sum of U_j[o, :]: the offsets M keep V unsigned for vpmaddubsw and come out exactly;
// both right-hand sides are even (twice the exact convolution), so the shift by one is exact. Each
// A_j is the direct path's GEMM with 3 C instead of 9 C terms (3 x 4 of them for 2 outputs where
// the direct path has 2 x 9): two thirds of the multiplies. The sums then take the direct path's
// epilogue unchanged, so the outputs are the same bits. Applies where V and U fit the bytes of
// vpmaddubsw (2M <= 255, |U| <= 127) and its int16 pair sums cannot saturate (2 2M max|U| <= 32767);
// int16 chunks are bounded as the direct path's, from the transformed weights.
struct Winograd {
  std::vector<int8_t> weights;   // [blocks, 4, 3, G, 8, 4]: U_j of (kernel row, group), 32 bytes a step
  std::vector<int32_t> offset0;  // M (S_0 + S_2), padded to blocks * 8
  std::vector<int32_t> offset1;  // -M (S_2 + S_3)
  int64_t tiles = 0;                 // out_w / 2 output pairs a row
  int64_t row_stride = 0;            // bytes of one transformed row: tiles * 4 * C
  int64_t steps = 0;                 // 3 G
  int64_t chunk = 0;
  std::vector<int64_t> offsets;      // step (kernel row r, group g): r * row_stride + 4 g
};

// V of kBytes channels of one output pair: d points at its first input pixel, C bytes apart.
// Byte arithmetic wraps, but every V ends in [0, 2M] with M <= 127, so the wrapped steps cancel.
template <int kBytes>
__attribute__((target("avx2"), always_inline))
inline void winograd_channels(const uint8_t* d, int64_t C, uint8_t m, uint8_t* v) {
  typedef uint8_t Bytes __attribute__((vector_size(kBytes)));
  Bytes d0, d1, d2, d3;
  std::memcpy(&d0, d, kBytes);
  std::memcpy(&d1, d + C, kBytes);
  std::memcpy(&d2, d + 2 * C, kBytes);
  std::memcpy(&d3, d + 3 * C, kBytes);
  const Bytes v0 = d0 + m - d2, v1 = d1 + d2, v2 = d2 + m - d1, v3 = d1 + m - d3;
  std::memcpy(v, &v0, kBytes);
  std::memcpy(v + C, &v1, kBytes);
  std::memcpy(v + 2 * C, &v2, kBytes);
  std::memcpy(v + 3 * C, &v3, kBytes);
}

// The padded image's rows as V: row y, output pair t, position j at ((y * tiles + t) * 4 + j) * C
// (C a multiple of 4: 32, 16 and 4 channels at a time).
__attribute__((target("avx2")))
void winograd_input(const uint8_t* padded, const Geometry& g, const Winograd& wg, int64_t max_code, uint8_t* out) {
  const int64_t C = g.channels;
  const uint8_t m = static_cast<uint8_t>(max_code);
  for (int64_t y = 0; y < g.padded_h; ++y) {
    const uint8_t* row = padded + y * g.padded_w * C;
    uint8_t* dst = out + y * wg.row_stride;
    for (int64_t t = 0; t < wg.tiles; ++t) {
      const uint8_t* d = row + 2 * t * C;
      uint8_t* v = dst + t * 4 * C;
      int64_t c = 0;
      for (; c + 32 <= C; c += 32) winograd_channels<32>(d + c, C, m, v + c);
      for (; c + 16 <= C; c += 16) winograd_channels<16>(d + c, C, m, v + c);
      for (; c < C; c += 4) winograd_channels<4>(d + c, C, m, v + c);
    }
  }
}

// P output pairs (t0 .. t0 + P - 1) x Q blocks of 8 output channels of one output row: A_j for each
// position j through the direct path's GEMM loop (the P pairs' V_j are 4 C apart), then the
// output transform and the direct path's epilogue, two pixels a pair.
template <int P, int Q, Out kOut, bool kCorrect>
__attribute__((target("avx2")))
void winograd_tile(const uint8_t* vrow, const Winograd& wg, int64_t channels, const int8_t* w, int64_t block_stride,
                   int64_t pixel, int64_t o0, int64_t out_channels, const Epilogue& e) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t position_stride = wg.steps * 32;
  alignas(32) int32_t sums[4][P][Q][8];
  for (int j = 0; j < 4; ++j) {
    __m256i acc[P][Q];
    const uint8_t* origin = vrow + j * channels;
    const int8_t* wj = w + j * position_stride;
    for (int64_t i0 = 0; i0 < wg.steps; i0 += wg.chunk) {
      accumulate16<P, Q>(acc, origin, 4 * channels, wg.offsets.data(), i0, std::min(wg.steps, i0 + wg.chunk), wj,
                         block_stride);
      for (int p = 0; p < P; ++p)
        for (int q = 0; q < Q; ++q) {
          __m256i* dst = reinterpret_cast<__m256i*>(sums[j][p][q]);
          const __m256i sum = _mm256_madd_epi16(acc[p][q], ones);
          _mm256_store_si256(dst, i0 == 0 ? sum : _mm256_add_epi32(_mm256_load_si256(dst), sum));
        }
    }
  }
  // a partial last block reads offsets past out_channels: they are padded to blocks * 8 (zeros)
  for (int p = 0; p < P; ++p) {
    __m256i total[2][Q];
    for (int q = 0; q < Q; ++q) {
      __m256i a[4];
      for (int j = 0; j < 4; ++j) a[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums[j][p][q]));
      const __m256i off0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg.offset0.data() + o0 + 8 * q));
      const __m256i off1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg.offset1.data() + o0 + 8 * q));
      total[0][q] = _mm256_srai_epi32(_mm256_sub_epi32(_mm256_add_epi32(_mm256_add_epi32(a[0], a[1]), a[2]), off0), 1);
      total[1][q] = _mm256_srai_epi32(_mm256_sub_epi32(_mm256_sub_epi32(_mm256_sub_epi32(a[1], a[2]), a[3]), off1), 1);
    }
    finish_tile<2, Q, kOut, kCorrect>(total, pixel + 2 * p, o0, out_channels, e);
  }
}

// One output row: Q = 2 blocks at a time, P = 2 pairs (4 pixels), then the odd pixel directly.
template <int Q, int P, Out kOut, bool kCorrect>
__attribute__((target("avx2")))
void winograd_blocks(const uint8_t* vrow, const uint8_t* padded_row, const int8_t* tiles, const Geometry& g,
                     const Winograd& wg, const int64_t* offsets, int64_t chunk, int64_t block, int64_t first_pixel,
                     const Epilogue& e) {
  const int64_t block_stride = 4 * wg.steps * 32;
  const int8_t* w = wg.weights.data() + block * block_stride;
  int64_t t = 0;
  for (; t + P <= wg.tiles; t += P)
    winograd_tile<P, Q, kOut, kCorrect>(vrow + t * 4 * g.channels, wg, g.channels, w, block_stride, first_pixel + 2 * t,
                                        block * 8, g.out_channels, e);
  for (; t < wg.tiles; ++t)
    winograd_tile<1, Q, kOut, kCorrect>(vrow + t * 4 * g.channels, wg, g.channels, w, block_stride, first_pixel + 2 * t,
                                        block * 8, g.out_channels, e);
  if (g.out_w % 2 == 1) {  // the last pixel of an odd row
    const int64_t ow = g.out_w - 1, direct_stride = g.steps() * 32;
    tile<1, Q, kOut, kCorrect>(padded_row + ow * g.channels, g.channels, offsets, g.steps(), chunk,
                               tiles + block * direct_stride, direct_stride, first_pixel + ow, block * 8,
                               g.out_channels, e);
  }
}

template <Out kOut, bool kCorrect>
__attribute__((target("avx2")))
void row_winograd(const uint8_t* vrow, const uint8_t* padded_row, const int8_t* tiles, const Geometry& g,
                  const Winograd& wg, const int64_t* offsets, int64_t chunk, int64_t first_pixel, const Epilogue& e) {
  int64_t block = 0;
  for (; block + 2 <= g.blocks; block += 2)
    winograd_blocks<2, 4, kOut, kCorrect>(vrow, padded_row, tiles, g, wg, offsets, chunk, block, first_pixel, e);
  for (; block < g.blocks; ++block)
    winograd_blocks<1, 8, kOut, kCorrect>(vrow, padded_row, tiles, g, wg, offsets, chunk, block, first_pixel, e);
}

using WinogradRow = void (*)(const uint8_t*, const uint8_t*, const int8_t*, const Geometry&, const Winograd&,
                             const int64_t*, int64_t, int64_t, const Epilogue&);

WinogradRow winograd_row_kernel(const Epilogue& e, bool corrected) {
  return kernel_for(e, corrected, [](auto out, auto correct) -> WinogradRow {
    return &row_winograd<decltype(out)::value, decltype(correct)::value>;
  });
}

// The transformed weights [blocks, 4, 3, G, 8, 4] and offsets of a 3x3 layer, or false where the
// layer is outside the Winograd path's bounds (see above).
bool winograd_weights(const int8_t* tiles, const Geometry& g, int64_t max_code, int64_t w_bits, Winograd& wg) {
  if (g.kernel != 3 || g.stride != 1 || g.out_w < 2 || 2 * max_code > 255) return false;
  // the A_j and offsets may wrap in int32 (two's complement: their sum is still right modulo 2^32),
  // but 2 y itself must fit: |2 y| <= 2 K max_code 2^(w_bits-1) < 2^31, twice the op's bound on K
  if (2 * g.steps() * 4 * max_code * (int64_t{1} << (w_bits - 1)) >= (int64_t{1} << 31)) return false;
  const int64_t G = g.groups(), steps = 3 * G;
  std::vector<int8_t>& weights = wg.weights;
  std::vector<int32_t>& offset0 = wg.offset0;
  std::vector<int32_t>& offset1 = wg.offset1;
  weights.assign(static_cast<size_t>(g.blocks * 4 * steps * 32), 0);
  offset0.assign(static_cast<size_t>(g.blocks * 8), 0);
  offset1.assign(static_cast<size_t>(g.blocks * 8), 0);
  int64_t largest = 0, largest_lane = 0;
  for (int64_t b = 0; b < g.blocks; ++b) {
    int64_t position_sums[4][8] = {};
    for (int j = 0; j < 4; ++j) {
      int64_t lane[16] = {};
      for (int64_t r = 0; r < 3; ++r)
        for (int64_t gi = 0; gi < G; ++gi)
          for (int64_t i = 0; i < 32; ++i) {  // i = o * 4 + c
            auto q = [&](int64_t kw) { return int64_t{tiles[((b * 9 + r * 3 + kw) * G + gi) * 32 + i]}; };
            const int64_t u = j == 0 ? 2 * q(0) : j == 1 ? q(0) + q(1) + q(2) : j == 2 ? q(0) - q(1) + q(2) : 2 * q(2);
            const int64_t magnitude = u < 0 ? -u : u;
            if (magnitude > 127) return false;
            largest = std::max(largest, magnitude);
            lane[i / 2] += magnitude;
            position_sums[j][i / 4] += u;
            weights[static_cast<size_t>((((b * 4 + j) * 3 + r) * G + gi) * 32 + i)] = static_cast<int8_t>(u);
          }
      for (int64_t l : lane) largest_lane = std::max(largest_lane, l);
    }
    for (int64_t o = 0; o < 8; ++o) {
      offset0[b * 8 + o] = static_cast<int32_t>(max_code * (position_sums[0][o] + position_sums[2][o]));
      offset1[b * 8 + o] = static_cast<int32_t>(-max_code * (position_sums[2][o] + position_sums[3][o]));
    }
  }
  const int64_t pair_bound = 2 * (2 * max_code) * largest;
  if (pair_bound > 32767) return false;
  wg.tiles = g.out_w / 2;
  wg.row_stride = wg.tiles * 4 * g.channels;
  wg.steps = steps;
  wg.chunk = largest_lane * 2 * max_code <= 32767 ? steps : std::max<int64_t>(1, 32767 / std::max<int64_t>(1, pair_bound));
  wg.offsets.resize(static_cast<size_t>(steps));
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t gi = 0; gi < G; ++gi) wg.offsets[r * G + gi] = r * wg.row_stride + 4 * gi;
  return true;
}

// ---- AVX2, 3x3 stride 1: Winograd F(2 x 2, 3 x 3) -----------------------------------------------
// A 2 x 2 block of outputs from a 4 x 4 block of inputs d with 16 products a channel instead of 36
// (Lavin and Gray, 2016): Y = A^T [(G g G^T) . (B^T d B)] A, here in integers as F(2, 3) above, applied
// along the width and then down the columns:
//   V = B^T d B + K          the width transform (offset M: [0, 2M]), then the column one (offset 2M):
//                            V in [0, 4M], K = V of an all-zero input (the offsets, a constant)
//   U = (2G) g (2G)^T        2G = [[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]]: |U| <= 9 2^(w_bits-1)
//   M_ij = sum over the channels of U_ij V_ij                                     (exact, int32)
//   4 Y = A^T M A - A^T (K . S) A,   A^T = [[1, 1, 1, 0], [0, 1, -1, -1]],   S_ij[o] = sum of U_ij[o, :]
// Both the transform and its inverse are exact over the integers and 4 Y is four times the exact
// convolution, so the shift by two is exact and the direct path's epilogue gives the same bits. Each
// M_ij is a GEMM of C terms: 16 C multiplies for 4 outputs where F(2, 3) has 24 C and the direct
// loop 36 C. Applies where V and U fit the bytes of vpmaddubsw (4M <= 255, |U| <= 127), its pair sums
// cannot saturate (2 (4M) max|U| <= 32767) and 4 Y fits int32; int16 chunks from the transformed
// weights as the direct path's. The M_ij and the offsets may wrap in int32: the result is right
// modulo 2^32 and fits, so it is exact.
constexpr int kAT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
constexpr int kG2[4][3] = {{2, 0, 0}, {1, 1, 1}, {1, -1, 1}, {0, 0, 2}};

struct Winograd2D {
  std::vector<int8_t> weights;  // [blocks, 16, G, 8, 4]: U_ij (position 4 i + j) of group g, 32 bytes a step
  std::vector<int32_t> offset;  // [4, blocks * 8]: output (a, b) at 2 a + b: (A^T (K . S) A)_ab
  int64_t tiles = 0;            // out_w / 2 blocks a row pair
  int64_t steps = 0;            // G
  int64_t chunk = 0;
};

// V of kBytes channels of one 2 x 2 output block: d points at its 4 x 4 input pixels' first (rows
// row_stride apart, pixels C apart), V_ij goes to v + (4 i + j) C. Along the width first (offset M,
// [0, 2M]), then down the columns (offset 2M, [0, 4M]); byte arithmetic wraps, but every result ends
// in [0, 4M] <= 255, so the wrapped steps cancel. Column j at a time, from two loads a row, so that
// few values live at once. Not inlined: inlined into the block loop, GCC strength-reduced its 32
// addresses into induction variables that spilled (the transform took twice as long).
template <int kBytes>
__attribute__((target("avx2"), noinline))
void winograd2d_channels(const uint8_t* d, int64_t row_stride, int64_t C, uint8_t m, uint8_t* v) {
  typedef uint8_t Bytes __attribute__((vector_size(kBytes)));
  const uint8_t m2 = static_cast<uint8_t>(2 * m);
  // width transform j of row k: (d0 - d2 + M, d1 + d2, d2 - d1 + M, d1 - d3 + M)[j] = d_a + offset -/+ d_b
  constexpr int kA[4] = {0, 1, 2, 1}, kB[4] = {2, 2, 1, 3};
  for (int j = 0; j < 4; ++j) {
    Bytes r[4];
    for (int k = 0; k < 4; ++k) {
      Bytes a, b;
      std::memcpy(&a, d + k * row_stride + kA[j] * C, kBytes);
      std::memcpy(&b, d + k * row_stride + kB[j] * C, kBytes);
      r[k] = j == 1 ? a + b : a + m - b;
    }
    const Bytes v0 = r[0] + m2 - r[2], v1 = r[1] + r[2], v2 = r[2] + m2 - r[1], v3 = r[1] + m2 - r[3];
    std::memcpy(v + j * C, &v0, kBytes);
    std::memcpy(v + (4 + j) * C, &v1, kBytes);
    std::memcpy(v + (8 + j) * C, &v2, kBytes);
    std::memcpy(v + (12 + j) * C, &v3, kBytes);
  }
}

// The 4 x 4 transforms of the 2 x 2 output blocks of output rows 2 s and 2 s + 1 from the padded
// image: block t, position 4 i + j at (t * 16 + 4 i + j) * C. One block row at a time, just before
// its GEMMs, so it stays in L1 (4 KB for the CIFAR ResNets' layers).
__attribute__((target("avx2")))
void winograd2d_input(const uint8_t* padded, const Geometry& g, const Winograd2D& wg, int64_t max_code, int64_t s,
                      uint8_t* out) {
  const int64_t C = g.channels, row_stride = g.padded_w * C;
  const uint8_t m = static_cast<uint8_t>(max_code);
  for (int64_t t = 0; t < wg.tiles; ++t) {
    const uint8_t* d = padded + 2 * s * row_stride + 2 * t * C;
    uint8_t* v = out + t * 16 * C;
    int64_t c = 0;
    for (; c + 32 <= C; c += 32) winograd2d_channels<32>(d + c, row_stride, C, m, v + c);
    for (; c + 16 <= C; c += 16) winograd2d_channels<16>(d + c, row_stride, C, m, v + c);
    for (; c < C; c += 4) winograd2d_channels<4>(d + c, row_stride, C, m, v + c);
  }
}

// P horizontally adjacent 2 x 2 output blocks x Q blocks of 8 output channels: the 16 M_ij through the
// direct path's GEMM loop (the P blocks' V 16 C apart), then 4 Y = A^T M A less the offsets, halved
// twice, and the direct path's epilogue on the two output rows.
template <int P, int Q, Out kOut, bool kCorrect>
__attribute__((target("avx2")))
void winograd2d_tile(const uint8_t* vtile, const Winograd2D& wg, int64_t channels, const int8_t* w,
                     int64_t block_stride, int64_t pixel, int64_t out_w, int64_t o0, int64_t out_channels,
                     const Epilogue& e) {
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) int32_t sums[16][P][Q][8];
  // position p, group g: input bytes at vtile + p C + 4 g = vtile + 4 (p G + g), weights at w + 32 (p G + g):
  // one run of 16 G steps with a plain stride, widened at every position's end (and chunk's). Its own
  // loop rather than accumulate16's offset table (as F(2, 3)'s tile): that took 1.035-1.06x the time on
  // the 32- and 64-channel layers (paired, both orders).
  const int64_t G = wg.steps, pixel_stride = 16 * channels;
  for (int position = 0; position < 16; ++position) {
    for (int64_t g0 = 0; g0 < G; g0 += wg.chunk) {
      const int64_t first = position * G + g0, last = position * G + std::min(G, g0 + wg.chunk);
      __m256i acc[P][Q];
      for (int p = 0; p < P; ++p)
        for (int q = 0; q < Q; ++q) acc[p][q] = _mm256_setzero_si256();
      const uint8_t* x = vtile + 4 * first;
      const int8_t* wi = w + 32 * first;
#pragma GCC unroll 4
      for (int64_t i = first; i < last; ++i, x += 4, wi += 32) {
        __m256i wv[Q];
        for (int q = 0; q < Q; ++q) wv[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wi + q * block_stride));
        for (int p = 0; p < P; ++p) {
          int32_t four;
          std::memcpy(&four, x + p * pixel_stride, sizeof(four));
          const __m256i xv = _mm256_set1_epi32(four);
          for (int q = 0; q < Q; ++q) acc[p][q] = _mm256_add_epi16(acc[p][q], _mm256_maddubs_epi16(xv, wv[q]));
        }
      }
      for (int p = 0; p < P; ++p)
        for (int q = 0; q < Q; ++q) {
          __m256i* dst = reinterpret_cast<__m256i*>(sums[position][p][q]);
          const __m256i sum = _mm256_madd_epi16(acc[p][q], ones);
          _mm256_store_si256(dst, g0 == 0 ? sum : _mm256_add_epi32(_mm256_load_si256(dst), sum));
        }
    }
  }
  // a partial last block reads offsets past out_channels: they are padded to blocks * 8 (zeros)
  const int64_t padded = static_cast<int64_t>(wg.offset.size()) / 4;
  for (int p = 0; p < P; ++p) {
    __m256i rows[2][2][Q];  // [a][b][q]: output row a, column b of the block
    for (int q = 0; q < Q; ++q) {
      __m256i columns[4][2];  // (M A)_ib
      for (int i = 0; i < 4; ++i) {
        __m256i m[4];
        for (int j = 0; j < 4; ++j) m[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums[4 * i + j][p][q]));
        columns[i][0] = _mm256_add_epi32(_mm256_add_epi32(m[0], m[1]), m[2]);
        columns[i][1] = _mm256_sub_epi32(_mm256_sub_epi32(m[1], m[2]), m[3]);
      }
      for (int b = 0; b < 2; ++b) {
        const __m256i y0 = _mm256_add_epi32(_mm256_add_epi32(columns[0][b], columns[1][b]), columns[2][b]);
        const __m256i y1 = _mm256_sub_epi32(_mm256_sub_epi32(columns[1][b], columns[2][b]), columns[3][b]);
        const __m256i off0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg.offset.data() + b * padded + o0 + 8 * q));
        const __m256i off1 =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg.offset.data() + (2 + b) * padded + o0 + 8 * q));
        rows[0][b][q] = _mm256_srai_epi32(_mm256_sub_epi32(y0, off0), 2);
        rows[1][b][q] = _mm256_srai_epi32(_mm256_sub_epi32(y1, off1), 2);
      }
    }
    finish_tile<2, Q, kOut, kCorrect>(rows[0], pixel + 2 * p, o0, out_channels, e);
    finish_tile<2, Q, kOut, kCorrect>(rows[1], pixel + out_w + 2 * p, o0, out_channels, e);
  }
}

// One output row pair (tile row): Q blocks of 8 output channels at a time, P output blocks at a time,
// then fewer; an odd last column through the direct loop.
template <int Q, int P, Out kOut, bool kCorrect>
__attribute__((target("avx2")))
void winograd2d_blocks(const uint8_t* vrow, const uint8_t* padded_row, const int8_t* tiles, const Geometry& g,
                       const Winograd2D& wg, const int64_t* offsets, int64_t chunk, int64_t block,
                       int64_t first_pixel, const Epilogue& e) {
  const int64_t block_stride = 16 * wg.steps * 32, tile_stride = 16 * g.channels;
  const int8_t* w = wg.weights.data() + block * block_stride;
  int64_t t = 0;
  for (; t + P <= wg.tiles; t += P)
    winograd2d_tile<P, Q, kOut, kCorrect>(vrow + t * tile_stride, wg, g.channels, w, block_stride, first_pixel + 2 * t,
                                          g.out_w, block * 8, g.out_channels, e);
  if constexpr (P > 2) {
    for (; t + 2 <= wg.tiles; t += 2)
      winograd2d_tile<2, Q, kOut, kCorrect>(vrow + t * tile_stride, wg, g.channels, w, block_stride,
                                            first_pixel + 2 * t, g.out_w, block * 8, g.out_channels, e);
  }
  for (; t < wg.tiles; ++t)
    winograd2d_tile<1, Q, kOut, kCorrect>(vrow + t * tile_stride, wg, g.channels, w, block_stride, first_pixel + 2 * t,
                                          g.out_w, block * 8, g.out_channels, e);
  if (g.out_w % 2 == 1) {  // the last pixel of both rows of an odd width
    const int64_t ow = g.out_w - 1, direct_stride = g.steps() * 32;
    for (int64_t r = 0; r < 2; ++r)
      tile<1, Q, kOut, kCorrect>(padded_row + (r * g.padded_w + ow) * g.channels, g.channels, offsets, g.steps(),
                                 chunk, tiles + block * direct_stride, direct_stride, first_pixel + r * g.out_w + ow,
                                 block * 8, g.out_channels, e);
  }
}

template <Out kOut, bool kCorrect>
__attribute__((target("avx2")))
void row_pair_winograd2d(const uint8_t* vrow, const uint8_t* padded_row, const int8_t* tiles, const Geometry& g,
                         const Winograd2D& wg, const int64_t* offsets, int64_t chunk, int64_t first_pixel,
                         const Epilogue& e) {
  int64_t block = 0;
  for (; block + 2 <= g.blocks; block += 2)
    winograd2d_blocks<2, 4, kOut, kCorrect>(vrow, padded_row, tiles, g, wg, offsets, chunk, block, first_pixel, e);
  for (; block < g.blocks; ++block)
    winograd2d_blocks<1, 8, kOut, kCorrect>(vrow, padded_row, tiles, g, wg, offsets, chunk, block, first_pixel, e);
}

using Winograd2DRowPair = void (*)(const uint8_t*, const uint8_t*, const int8_t*, const Geometry&, const Winograd2D&,
                                   const int64_t*, int64_t, int64_t, const Epilogue&);

Winograd2DRowPair winograd2d_kernel(const Epilogue& e, bool corrected) {
  return kernel_for(e, corrected, [](auto out, auto correct) -> Winograd2DRowPair {
    return &row_pair_winograd2d<decltype(out)::value, decltype(correct)::value>;
  });
}

// The transformed weights [blocks, 16, G, 8, 4] and offsets of a 3x3 layer, or false where the layer
// is outside the F(2 x 2, 3 x 3) path's bounds (see above).
bool winograd2d_weights(const int8_t* tiles, const Geometry& g, int64_t max_code, int64_t w_bits, Winograd2D& wg) {
  if (g.kernel != 3 || g.stride != 1 || g.out_w < 2 || g.out_h < 2 || 4 * max_code > 255) return false;
  // |4 Y| <= 4 K max_code 2^(w_bits-1) < 2^31 (four times the op's bound on K)
  if (4 * g.steps() * 4 * max_code * (int64_t{1} << (w_bits - 1)) >= (int64_t{1} << 31)) return false;
  // K: the transform of an all-zero block through both offset transforms
  auto transform = [](const int64_t (&d)[4], int64_t r, int64_t (&v)[4]) {
    v[0] = d[0] - d[2] + r, v[1] = d[1] + d[2], v[2] = d[2] - d[1] + r, v[3] = d[1] - d[3] + r;
  };
  int64_t zero_rows[4];
  transform({0, 0, 0, 0}, max_code, zero_rows);
  int64_t constant[4][4];  // [i][j]
  for (int j = 0; j < 4; ++j) {
    int64_t column[4];
    transform({zero_rows[j], zero_rows[j], zero_rows[j], zero_rows[j]}, 2 * max_code, column);
    for (int i = 0; i < 4; ++i) constant[i][j] = column[i];
  }
  const int64_t G = g.groups(), padded = g.blocks * 8;
  wg.weights.assign(static_cast<size_t>(g.blocks * 16 * G * 32), 0);
  wg.offset.assign(static_cast<size_t>(4 * padded), 0);
  int64_t largest = 0, largest_lane = 0;
  for (int64_t b = 0; b < g.blocks; ++b) {
    int64_t position_sums[16][8] = {}, lane[16][16] = {};
    for (int64_t gi = 0; gi < G; ++gi)
      for (int64_t x = 0; x < 32; ++x) {  // x = o * 4 + c
        int64_t across[3][4] = {};  // (g (2G)^T)[kh][j]
        for (int kh = 0; kh < 3; ++kh)
          for (int kw = 0; kw < 3; ++kw) {
            const int64_t q = tiles[((b * 9 + kh * 3 + kw) * G + gi) * 32 + x];
            for (int j = 0; j < 4; ++j) across[kh][j] += kG2[j][kw] * q;
          }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) {
            const int64_t u = kG2[i][0] * across[0][j] + kG2[i][1] * across[1][j] + kG2[i][2] * across[2][j];
            const int64_t magnitude = u < 0 ? -u : u;
            if (magnitude > 127) return false;
            largest = std::max(largest, magnitude);
            lane[4 * i + j][x / 2] += magnitude;
            position_sums[4 * i + j][x / 4] += u;
            wg.weights[static_cast<size_t>(((b * 16 + 4 * i + j) * G + gi) * 32 + x)] = static_cast<int8_t>(u);
          }
      }
    for (const auto& position : lane)
      for (int64_t l : position) largest_lane = std::max(largest_lane, l);
    for (int a = 0; a < 2; ++a)
      for (int bb = 0; bb < 2; ++bb)
        for (int64_t o = 0; o < 8; ++o) {
          int64_t total = 0;
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) total += kAT[a][i] * kAT[bb][j] * constant[i][j] * position_sums[4 * i + j][o];
          wg.offset[static_cast<size_t>((2 * a + bb) * padded + b * 8 + o)] = static_cast<int32_t>(total);
        }
  }
  const int64_t pair_bound = 2 * (4 * max_code) * largest;
  if (pair_bound > 32767) return false;
  wg.tiles = g.out_w / 2;
  wg.steps = G;
  wg.chunk = largest_lane * 4 * max_code <= 32767 ? G : std::max<int64_t>(1, 32767 / std::max<int64_t>(1, pair_bound));
  return true;
}

// ---- transformed weights, kept across calls ----------------------------------------------------
// A certification calls each layer hundreds of times with the same weights; deriving their Winograd
// transform took about 4 % of a 400-sample call (64 channels, Zen 3). Each entry keeps a copy of the
// weight tiles it was derived from and the parameters it depends on, and a lookup compares both in
// full (the hash only picks candidates), so an entry found is the transform of exactly these weights,
// whatever the tensor, its address or its version. The oldest entries go past kMaxEntries entries or
// kMaxBytes (a search through many fine-tuned candidates, or ImageNet-sized layers, would otherwise
// keep growing).
inline size_t footprint(const Winograd& w) {
  return w.weights.size() + 4 * (w.offset0.size() + w.offset1.size()) + 8 * w.offsets.size();
}
inline size_t footprint(const Winograd2D& w) { return w.weights.size() + 4 * w.offset.size(); }

template <typename Transform>
class TransformCache {
 public:
  struct Entry {
    std::vector<int64_t> params;
    std::vector<int8_t> tiles;
    bool applies = false;  // false: the layer is outside the path's bounds (cached too)
    Transform value;
    size_t bytes = 0;  // this entry's memory: the tiles' copy and the transform
  };

  // The transform of `tiles` (`bytes` long) under `params`, made by make(Transform&) -> bool on a miss;
  // null where make returned false.
  template <typename Make>
  std::shared_ptr<const Entry> get(const int8_t* tiles, size_t bytes, std::vector<int64_t> params, Make make) {
    const size_t key = hash(tiles, bytes, params);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto range = entries_.equal_range(key);
      for (auto it = range.first; it != range.second; ++it) {
        const Entry& entry = *it->second;
        if (entry.params == params && entry.tiles.size() == bytes &&
            std::memcmp(entry.tiles.data(), tiles, bytes) == 0)
          return entry.applies ? it->second : nullptr;
      }
    }
    auto entry = std::make_shared<Entry>();
    entry->params = std::move(params);
    entry->tiles.assign(tiles, tiles + bytes);
    entry->applies = make(entry->value);
    entry->bytes = bytes + footprint(entry->value);
    std::lock_guard<std::mutex> lock(mutex_);
    while (!order_.empty() && (order_.size() >= kMaxEntries || total_bytes_ + entry->bytes > kMaxBytes)) {
      const auto [oldest_key, oldest] = order_.front();
      order_.erase(order_.begin());
      auto range = entries_.equal_range(oldest_key);
      for (auto it = range.first; it != range.second; ++it)
        if (it->second.get() == oldest) {
          total_bytes_ -= oldest->bytes;
          entries_.erase(it);
          break;
        }
    }
    entries_.emplace(key, entry);
    order_.emplace_back(key, entry.get());
    total_bytes_ += entry->bytes;
    return entry->applies ? entry : nullptr;
  }

 private:
  static constexpr size_t kMaxEntries = 512;                // ResNet-110 has 106 such layers
  static constexpr size_t kMaxBytes = size_t{256} << 20;    // ResNet-110's take ~5 MB

  static size_t hash(const int8_t* tiles, size_t bytes, const std::vector<int64_t>& params) {
    uint64_t h = 1469598103934665603ull ^ bytes;  // FNV-1a over the parameters and a sample of the bytes
    auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    for (int64_t p : params) mix(static_cast<uint64_t>(p));
    const size_t step = std::max<size_t>(1, bytes / 256);
    for (size_t i = 0; i < bytes; i += step) mix(static_cast<uint8_t>(tiles[i]));
    return static_cast<size_t>(h);
  }

  std::mutex mutex_;
  std::unordered_multimap<size_t, std::shared_ptr<Entry>> entries_;
  std::vector<std::pair<size_t, const Entry*>> order_;  // oldest first
  size_t total_bytes_ = 0;
};

// ---- AVX-512 VNNI: int32 accumulation, no bound on the codes ---------------------------------
// vpdpbusd adds four u8 x s8 products into each int32 lane without saturation: exact for every
// bit width up to 8 x 8 while K * 255 * 128 < 2^31 (checked). Weights are re-tiled per call into
// [ceil(O / 16), steps, 16, 4] (vnni_tiles): one 64-byte vector per (16 output channels, tap,
// group of 4 input channels). P consecutive output pixels x Q such vectors: the P broadcasts of
// an input group are each used Q times, the Q weight vectors P times.

// P x 16 sums (channels o .. o + 15 of pixels pixel .. pixel + P - 1) through the epilogue: the
// AVX2 path's operations in its order on 16 lanes (vmaxps / vminps return their second operand on
// NaN there as here). Channel constants are loaded once, before the stores (which may alias them).
template <int P, int Q, Out kOut>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline void finish16(const __m512i (&acc)[P][Q], int q, int64_t pixel, int64_t o, int64_t out_channels,
                     const Epilogue& e) {
  const bool codes = kOut == Out::kCodes || kOut == Out::kCodesResidual;
  const __m512i correction = _mm512_loadu_si512(e.correction + o);
  const __m512 scale = _mm512_loadu_ps(e.scale + o), bias = _mm512_loadu_ps(e.bias + o);
  const __m512 r_zero = _mm512_set1_ps(e.residual_zero), r_scale = _mm512_set1_ps(e.residual_scale);
  // clamping the quotient to the integers [lo - zero, hi - zero] before rounding is clamping the
  // rounded codes to [lo, hi] after it (rounding is monotone and keeps integers; NaN -> lo either
  // way, vmaxps returning its second operand): the AVX2 path's two clamps in one
  const int64_t lo = e.relu && codes ? std::max(e.out_min, e.out_zero) : e.out_min;
  const __m512 inv = _mm512_set1_ps(e.inv_out_scale), t_lo = _mm512_set1_ps(static_cast<float>(lo - e.out_zero));
  const __m512 t_hi = _mm512_set1_ps(static_cast<float>(e.out_max - e.out_zero));
  const __m512i zero = _mm512_set1_epi32(e.out_zero);
  const bool relu = e.relu;
  float* const out_f = e.out_f;
  uint8_t* const out_u8 = e.out_u8;
  const float* const residual_f = e.residual_f;
  const uint8_t* const residual_u8 = e.residual_u8;
  for (int p = 0; p < P; ++p) {
    const int64_t at = (pixel + p) * out_channels + o;
    __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[p][q], correction)), scale), bias);
    if (kOut == Out::kFloatResidual) y = _mm512_add_ps(y, _mm512_loadu_ps(residual_f + at));
    if (kOut == Out::kCodesResidual) {
      const __m512 r = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(residual_u8 + at))));
      y = _mm512_add_ps(y, _mm512_mul_ps(_mm512_sub_ps(r, r_zero), r_scale));
    }
    if (!codes) {
      if (relu) y = _mm512_max_ps(_mm512_setzero_ps(), y);
      _mm512_storeu_ps(out_f + at, y);
      continue;
    }
    const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(y, inv), t_lo), t_hi);
    const __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(t), zero);  // half to even
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out_u8 + at), _mm512_cvtepi32_epi8(c));  // in 0..255: exact
  }
}

// The P x Q (<= 16) int32 accumulators of a tile, as named members rather than an array: GCC -O3
// keeps an array of _mm512_dpbusd_epi32 accumulators in registers but copies every one of them
// twice a step (the intrinsic's destination is a new value), and through an asm operand it keeps
// the array in memory; named members that the asm below updates in place compile to the bare
// vpdpbusd loop (ad hoc, 16 x 16 tile, loop alone: 146-157 -> 195-200 GMAC/s a core).
struct Accumulators {
  __m512i r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15;
};

template <int I>
__attribute__((target("avx512f"), always_inline)) inline __m512i& accumulator(Accumulators& a) {
  static_assert(I >= 0 && I < 16, "at most 16 accumulators a tile");
  if constexpr (I == 0) return a.r0; else if constexpr (I == 1) return a.r1;
  else if constexpr (I == 2) return a.r2; else if constexpr (I == 3) return a.r3;
  else if constexpr (I == 4) return a.r4; else if constexpr (I == 5) return a.r5;
  else if constexpr (I == 6) return a.r6; else if constexpr (I == 7) return a.r7;
  else if constexpr (I == 8) return a.r8; else if constexpr (I == 9) return a.r9;
  else if constexpr (I == 10) return a.r10; else if constexpr (I == 11) return a.r11;
  else if constexpr (I == 12) return a.r12; else if constexpr (I == 13) return a.r13;
  else if constexpr (I == 14) return a.r14; else return a.r15;
}

// accumulator I = p * Q + q += the four input codes of pixel p (broadcast) . weight vector q
template <int Q, int I>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))
inline void multiply_add(Accumulators& a, const uint8_t* x, int64_t pixel_stride, const __m512i* wv) {
  constexpr int p = I / Q, q = I % Q;
  int32_t four;
  std::memcpy(&four, x + p * pixel_stride, sizeof(four));
  const __m512i xv = _mm512_set1_epi32(four);  // the same for every q of p: CSE'd
  asm("vpdpbusd %2, %1, %0" : "+v"(accumulator<I>(a)) : "v"(xv), "v"(wv[q]));  // u8 x, s8 w
}

template <int Q, size_t... I>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))
inline void multiply_add_all(Accumulators& a, const uint8_t* x, int64_t pixel_stride, const __m512i* wv,
                             std::index_sequence<I...>) {
  (multiply_add<Q, int(I)>(a, x, pixel_stride, wv), ...);
}

template <size_t... I>
__attribute__((target("avx512f"), always_inline))
inline void unpack(Accumulators& a, __m512i* flat, std::index_sequence<I...>) {
  ((flat[I] = accumulator<int(I)>(a)), ...);
}

template <int P, int Q, Out kOut>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void tile_vnni(const uint8_t* origin, int64_t pixel_stride, const int64_t* offsets, int64_t steps, const int8_t* w,
               int64_t block_stride, int64_t pixel, int64_t o0, int64_t out_channels, const Epilogue& e) {
  static_assert(P * Q <= 16, "at most 16 accumulators a tile");
  Accumulators a;
  a.r0 = a.r1 = a.r2 = a.r3 = a.r4 = a.r5 = a.r6 = a.r7 = _mm512_setzero_si512();
  a.r8 = a.r9 = a.r10 = a.r11 = a.r12 = a.r13 = a.r14 = a.r15 = a.r0;
  const int8_t* wi = w;
  for (int64_t i = 0; i < steps; ++i, wi += 64) {
    __m512i wv[Q];
    for (int q = 0; q < Q; ++q) wv[q] = _mm512_loadu_si512(wi + q * block_stride);
    multiply_add_all<Q>(a, origin + offsets[i], pixel_stride, wv, std::make_index_sequence<P * Q>{});
  }
  __m512i acc[P][Q];
  unpack(a, &acc[0][0], std::make_index_sequence<P * Q>{});
  for (int q = 0; q < Q; ++q) {
    const int64_t oq = o0 + 16 * q;
    if (oq >= out_channels) break;
    if (out_channels - oq >= 16) {
      finish16<P, Q, kOut>(acc, q, pixel, oq, out_channels, e);
      continue;
    }
    for (int p = 0; p < P; ++p) {  // a last partial block: one channel at a time
      alignas(64) int32_t sums[16];
      _mm512_store_si512(sums, acc[p][q]);
      for (int64_t j = 0; j < out_channels - oq; ++j) finish_scalar(sums[j], pixel + p, oq + j, out_channels, e);
    }
  }
}

// One output row: Q vectors of output channels at a time, P pixels at a time, narrower P for the
// pixels left over.
template <int Q, int P, Out kOut>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void row_blocks_vnni(const uint8_t* padded_row, const int8_t* vnni_tiles, const Geometry& g, const int64_t* offsets,
                     int64_t block16, int64_t first_pixel, const Epilogue& e) {
  const int64_t block_stride = g.steps() * 64, pixel_stride = g.stride * g.channels;
  const int8_t* w = vnni_tiles + block16 * block_stride;
  int64_t ow = 0;
  for (; ow + P <= g.out_w; ow += P)
    tile_vnni<P, Q, kOut>(padded_row + ow * pixel_stride, pixel_stride, offsets, g.steps(), w, block_stride,
                          first_pixel + ow, block16 * 16, g.out_channels, e);
  if constexpr (P > 4) {
    for (; ow + 4 <= g.out_w; ow += 4)
      tile_vnni<4, Q, kOut>(padded_row + ow * pixel_stride, pixel_stride, offsets, g.steps(), w, block_stride,
                            first_pixel + ow, block16 * 16, g.out_channels, e);
  }
  for (; ow < g.out_w; ++ow)
    tile_vnni<1, Q, kOut>(padded_row + ow * pixel_stride, pixel_stride, offsets, g.steps(), w, block_stride,
                          first_pixel + ow, block16 * 16, g.out_channels, e);
}

template <Out kOut>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void row_vnni(const uint8_t* padded_row, const int8_t* vnni_tiles, const Geometry& g, const int64_t* offsets,
              int64_t /*chunk*/, int64_t first_pixel, const Epilogue& e) {
  const int64_t blocks16 = (g.out_channels + 15) / 16;
  int64_t block = 0;
  for (; block + 4 <= blocks16; block += 4) row_blocks_vnni<4, 4, kOut>(padded_row, vnni_tiles, g, offsets, block, first_pixel, e);
  for (; block + 2 <= blocks16; block += 2) row_blocks_vnni<2, 8, kOut>(padded_row, vnni_tiles, g, offsets, block, first_pixel, e);
  for (; block < blocks16; ++block) row_blocks_vnni<1, 16, kOut>(padded_row, vnni_tiles, g, offsets, block, first_pixel, e);
}

// [ceil(O / 8), T, G, 8, 4] (arq.ops.lowbit_conv_weight_tiles) to [ceil(O / 16), T * G, 16, 4].
std::vector<int8_t> vnni_tiles(const int8_t* tiles, const Geometry& g) {
  const int64_t blocks16 = (g.out_channels + 15) / 16, steps = g.steps();
  std::vector<int8_t> out(static_cast<size_t>(blocks16 * steps * 64), 0);
  for (int64_t b = 0; b < blocks16; ++b)
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t half = 0; half < 2 && 2 * b + half < g.blocks; ++half)
        std::memcpy(out.data() + (b * steps + s) * 64 + half * 32, tiles + ((2 * b + half) * steps + s) * 32, 32);
  return out;
}

RowKernel row_kernel_vnni(const Epilogue& e) {  // its loop always subtracts the correction: no kCorrect
  return kernel_for(e, false, [](auto out, auto) -> RowKernel { return &row_vnni<decltype(out)::value>; });
}
#endif

// Image b of the NHWC input into `dst` [padded_h, padded_w, channels], padded with the zero
// point's code (also on the channels added up to a multiple of 4, whose weights are zero);
// returns the image's largest code (checked against max_code: the int16 accumulation's exactness
// rests on that bound).
uint8_t pad_image(const uint8_t* x, const Geometry& g, int64_t b, uint8_t pad_code, uint8_t* dst) {
  const int64_t row = g.width * g.in_channels, padded_row = g.padded_w * g.channels, side = g.padding * g.channels;
  uint8_t largest = 0;
  std::memset(dst, pad_code, static_cast<size_t>(g.padding * padded_row));
  std::memset(dst + (g.padding + g.height) * padded_row, pad_code, static_cast<size_t>(g.padding * padded_row));
  for (int64_t y = 0; y < g.height; ++y) {
    const uint8_t* s = x + (b * g.height + y) * row;
    uint8_t* d = dst + (y + g.padding) * padded_row;
    std::memset(d, pad_code, static_cast<size_t>(side));
    if (g.channels == g.in_channels) {
      std::memcpy(d + side, s, static_cast<size_t>(row));
    } else {
      for (int64_t px = 0; px < g.width; ++px) {
        uint8_t* dp = d + side + px * g.channels;
        std::memcpy(dp, s + px * g.in_channels, static_cast<size_t>(g.in_channels));
        std::memset(dp + g.in_channels, pad_code, static_cast<size_t>(g.channels - g.in_channels));
      }
    }
    std::memset(d + side + g.width * g.channels, pad_code, static_cast<size_t>(side));
    for (int64_t i = 0; i < row; ++i) largest = std::max(largest, s[i]);
  }
  return largest;
}

at::Tensor lowbit_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight_tiles, const at::Tensor& weight_sums,
                             const at::Tensor& scale, const std::optional<at::Tensor>& bias, int64_t out_channels,
                             int64_t kernel_size, int64_t stride, int64_t padding, int64_t zero_point,
                             int64_t max_code, int64_t w_bits, bool relu, const std::optional<at::Tensor>& residual,
                             double residual_scale, int64_t residual_zero_point, double out_scale,
                             int64_t out_zero_point, int64_t out_min, int64_t out_max) {
  TORCH_CHECK(x.scalar_type() == at::kByte && x.dim() == 4 && x.device().is_cpu(), kOp,
              ": x must be uint8 codes [B, C, H, W] on the CPU, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(w_bits >= 2 && w_bits <= 8, kOp, ": w_bits must be in 2..8, got ", w_bits);
  TORCH_CHECK(max_code >= 1 && max_code <= 255, kOp, ": max_code must be in 1..255, got ", max_code);
  TORCH_CHECK(zero_point >= 0 && zero_point <= max_code, kOp, ": zero_point must be in 0..max_code = ", max_code,
              ", got ", zero_point);
  // the AVX2 path adds vpmaddubsw pair sums in int16: exact only under this bound; the VNNI and
  // portable paths add in int32 (bounded below, with K)
  const packed::Isa isa = packed::select_isa();
  const int64_t pair_bound = 2 * max_code * (int64_t{1} << (w_bits - 1));
  TORCH_CHECK(pair_bound <= 32767 || isa != packed::Isa::kAvx2, kOp, ": ", w_bits, "-bit weights with codes up to ",
              max_code, " can overflow int16 on this CPU's AVX2 path (2 * max_code * 2^(w_bits-1) = ", pair_bound,
              " > 32767); use oneDNN");
  constexpr int64_t kMax = packed::kMaxGeometry;
  TORCH_CHECK(kernel_size >= 1 && stride >= 1 && padding >= 0 && kernel_size <= kMax && stride <= kMax &&
                  padding <= kMax, kOp, ": need kernel_size and stride in 1..", kMax, " and padding in 0..", kMax,
              ", got ", kernel_size, ", ", stride, ", ", padding);
  Geometry g;
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.channels = (g.in_channels + 3) / 4 * 4;
  g.height = x.size(2);
  g.width = x.size(3);
  g.kernel = kernel_size;
  g.stride = stride;
  g.padding = padding;
  g.padded_h = g.height + 2 * padding;
  g.padded_w = g.width + 2 * padding;
  TORCH_CHECK(g.in_channels > 0, kOp, ": x must have at least one channel");
  TORCH_CHECK(g.padded_h >= kernel_size && g.padded_w >= kernel_size, kOp, ": kernel ", kernel_size,
              " larger than the padded input ", g.padded_h, "x", g.padded_w);
  g.out_h = (g.padded_h - kernel_size) / stride + 1;
  g.out_w = (g.padded_w - kernel_size) / stride + 1;
  g.out_channels = out_channels;
  g.blocks = (out_channels + 7) / 8;
  TORCH_CHECK(g.steps() * 4 * max_code * (int64_t{1} << (w_bits - 1)) < (int64_t{1} << 31), kOp, ": K = ",
              kernel_size * kernel_size * g.channels, " terms of codes up to ", max_code, " and ", w_bits,
              "-bit weights can overflow the int32 sums");
  TORCH_CHECK(out_channels >= 1, kOp, ": out_channels must be >= 1, got ", out_channels);
  TORCH_CHECK(weight_tiles.scalar_type() == at::kChar && weight_tiles.dim() == 5 && weight_tiles.is_contiguous() &&
                  weight_tiles.size(0) == g.blocks && weight_tiles.size(1) == kernel_size * kernel_size &&
                  weight_tiles.size(2) == g.groups() && weight_tiles.size(3) == 8 && weight_tiles.size(4) == 4,
              kOp, ": weight_tiles must be contiguous int8 [", g.blocks, ", ", kernel_size * kernel_size, ", ",
              g.groups(), ", 8, 4] (arq.ops.lowbit_conv_weight_tiles), got ", weight_tiles.scalar_type(), " ",
              weight_tiles.sizes());
  // the int16 chunking (AVX2) and the int32 bound above assume |q| <= 2^(w_bits-1): checked, not
  // trusted. largest_lane: the largest sum of |q| over all steps that one int16 lane of the AVX2
  // accumulators collects (block b, output channel o, input channels 2h and 2h + 1 of every group).
  int64_t largest_lane = 0;
  {
    const int8_t* q = weight_tiles.data_ptr<int8_t>();
    const int64_t limit = int64_t{1} << (w_bits - 1), steps = g.steps();
    int64_t largest = 0;
    for (int64_t b = 0; b < g.blocks; ++b) {
      const int8_t* block = q + b * steps * 32;
      int64_t lane[16] = {};
      for (int64_t i = 0; i < steps * 32; ++i) {
        const int64_t v = block[i] < 0 ? -int64_t{block[i]} : int64_t{block[i]};
        largest = std::max(largest, v);
        lane[(i % 32) / 2] += v;  // byte o * 4 + c of a step's 32: lane 2 o + c / 2
      }
      for (int64_t l : lane) largest_lane = std::max(largest_lane, l);
    }
    TORCH_CHECK(largest <= limit, kOp, ": weight_tiles hold a code of magnitude ", largest, ", outside ", w_bits,
                "-bit weights' range (|q| <= ", limit, ")");
  }
  // the per-channel vectors padded to whole blocks of 8 in plain vectors: ATen ops here (zeros,
  // narrow, copy, mul) took about 4 % of the op's time in torch.profiler (W4A4 ResNet-20)
  const int64_t padded_channels = g.blocks * 8;
  auto contiguous_vector = [&](const at::Tensor& t, at::ScalarType dtype, const char* name) {
    TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.numel() == out_channels && t.device().is_cpu(), kOp,
                ": ", name, " must be ", dtype, " [", out_channels, "] on the CPU, got ", t.scalar_type(), " ",
                t.sizes());
    return t.contiguous();
  };
  const at::Tensor sums_c = contiguous_vector(weight_sums, at::kInt, "weight_sums");
  const at::Tensor scale_c = contiguous_vector(scale, at::kFloat, "scale");
  const at::Tensor bias_c = bias.has_value() ? contiguous_vector(*bias, at::kFloat, "bias") : at::Tensor();
  const int32_t* sums_d = sums_c.data_ptr<int32_t>();
  const float* scale_d = scale_c.data_ptr<float>();
  const float* bias_d = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  std::vector<int32_t> correction(static_cast<size_t>(padded_channels), 0);
  std::vector<float> scale_p(static_cast<size_t>(padded_channels), 0.0f);
  std::vector<float> bias_p(static_cast<size_t>(padded_channels), 0.0f);
  for (int64_t o = 0; o < out_channels; ++o) {
    correction[o] = sums_d[o] * static_cast<int32_t>(zero_point);
    scale_p[o] = scale_d[o];
    if (bias_d != nullptr) bias_p[o] = bias_d[o];
  }

  Epilogue e;
  e.correction = correction.data();
  e.scale = scale_p.data();
  e.bias = bias_p.data();
  e.relu = relu;
  e.codes = out_scale > 0;
  const auto out_options = at::TensorOptions().dtype(e.codes ? at::kByte : at::kFloat);
  at::Tensor out = at::empty({g.batch, out_channels, g.out_h, g.out_w}, out_options.memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor residual_c;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == out.sizes() && (r.scalar_type() == at::kFloat || r.scalar_type() == at::kByte) &&
                    r.device().is_cpu(), kOp, ": residual must be float32 or uint8 ", out.sizes(), " on the CPU, got ",
                r.scalar_type(), " ", r.sizes());
    TORCH_CHECK((r.scalar_type() == at::kFloat) == !e.codes, kOp, ": a float32 residual goes with float32 output "
                "(out_scale <= 0), uint8 residual codes with codes output (out_scale > 0); got a ", r.scalar_type(),
                " residual and out_scale = ", out_scale);
    residual_c = r.contiguous(at::MemoryFormat::ChannelsLast);
    if (r.scalar_type() == at::kFloat) {
      e.residual_f = residual_c.data_ptr<float>();
    } else {
      TORCH_CHECK(residual_zero_point >= 0 && residual_zero_point <= 255, kOp,
                  ": uint8 residual needs residual_zero_point in 0..255, got ", residual_zero_point);
      packed::float32_scale(residual_scale, kOp, "residual_scale");
      e.residual_u8 = residual_c.data_ptr<uint8_t>();
      e.residual_scale = static_cast<float>(residual_scale);
      e.residual_zero = static_cast<float>(residual_zero_point);
    }
  }
  if (e.codes) {
    packed::float32_scale(out_scale, kOp, "out_scale");
    TORCH_CHECK(0 <= out_min && out_min <= out_max && out_max <= 255 && out_zero_point >= 0 && out_zero_point <= 255,
                kOp, ": need 0 <= out_min <= out_max <= 255 and out_zero_point in 0..255, got ", out_min, ", ", out_max,
                ", ", out_zero_point);
    e.inv_out_scale = 1.0f / static_cast<float>(out_scale);
    e.out_zero = static_cast<int32_t>(out_zero_point);
    e.out_min = static_cast<int32_t>(out_min);
    e.out_max = static_cast<int32_t>(out_max);
    e.out_u8 = out.data_ptr<uint8_t>();
  } else {
    e.out_f = out.data_ptr<float>();
  }
  if (out.numel() == 0) return out;

  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const uint8_t* xd = xc.data_ptr<uint8_t>();
  const int8_t* tiles = weight_tiles.data_ptr<int8_t>();  // re-tiled below for VNNI
  std::vector<int64_t> offsets(static_cast<size_t>(g.steps()));
  for (int64_t t = 0; t < kernel_size * kernel_size; ++t)
    for (int64_t gi = 0; gi < g.groups(); ++gi)
      offsets[t * g.groups() + gi] = ((t / kernel_size) * g.padded_w + t % kernel_size) * g.channels + 4 * gi;
  // int16 lane sums stay exact while max_code * (sum of the lane's |q| over the chunk) <= 32767: the
  // layer's own weights often allow all steps in one chunk where the worst case (|q| = 2^(w_bits-1)
  // everywhere, 32767 / pair_bound steps) does not
  const int64_t chunk = largest_lane * max_code <= 32767 ? g.steps() : std::max<int64_t>(1, 32767 / pair_bound);
#if defined(__x86_64__) || defined(_M_X64)
  // select_isa() is above kScalar only where the CPU has AVX2 (and not asked for scalar)
  std::vector<int8_t> tiles16;
  RowKernel vector_kernel = nullptr;
  if (isa == packed::Isa::kAvx512Vnni) {
    tiles16 = vnni_tiles(tiles, g);
    tiles = tiles16.data();
    vector_kernel = row_kernel_vnni(e);
  } else if (isa == packed::Isa::kAvx2) {
    vector_kernel = row_kernel(e, zero_point != 0);
  }
  // 3x3 stride 1 on AVX2: Winograd F(2 x 2, 3 x 3) for 32 input channels or more, else F(2, 3), where
  // the layer is within their bounds. Below 32 channels F(2 x 2, 3 x 3)'s per-output work (16 widenings
  // and the inverse transform per block, the input transform) outweighs its saved multiplies: paired
  // per layer (4-bit, 400 samples, one thread, Zen 3) it took 1.05-1.17x F(2, 3)'s time at 16 channels,
  // 0.90-0.98x at 32 and 0.79-0.84x at 64. ARQ_LOWBIT_WINOGRAD=2d: F(2 x 2, 3 x 3) wherever it fits;
  // =row: F(2, 3) only; =0: the direct loop (for tests and comparisons).
  static TransformCache<Winograd> row_transforms;
  static TransformCache<Winograd2D> block_transforms;
  std::shared_ptr<const TransformCache<Winograd>::Entry> row_entry;
  std::shared_ptr<const TransformCache<Winograd2D>::Entry> block_entry;
  WinogradRow winograd_kernel = nullptr;
  Winograd2DRowPair winograd2d = nullptr;
  const char* winograd_env = std::getenv("ARQ_LOWBIT_WINOGRAD");
  const std::string winograd_mode = winograd_env != nullptr ? winograd_env : "";
  if (isa == packed::Isa::kAvx2 && winograd_mode != "0") {
    const bool wide_enough = g.channels >= 32 || winograd_mode == "2d";
    // what the transforms read besides the tiles: the geometry's fields and the code and weight bounds
    const std::vector<int64_t> params{g.kernel, g.stride, g.channels, g.blocks, g.out_h, g.out_w, max_code, w_bits};
    const size_t tile_bytes = static_cast<size_t>(g.blocks * g.steps() * 32);
    if (winograd_mode != "row" && wide_enough) {
      block_entry = block_transforms.get(tiles, tile_bytes, params, [&](Winograd2D& wg) {
        return winograd2d_weights(tiles, g, max_code, w_bits, wg);
      });
    }
    if (block_entry != nullptr) {
      winograd2d = winograd2d_kernel(e, zero_point != 0);
    } else {
      row_entry = row_transforms.get(tiles, tile_bytes, params, [&](Winograd& wg) {
        return winograd_weights(tiles, g, max_code, w_bits, wg);
      });
      if (row_entry != nullptr) winograd_kernel = winograd_row_kernel(e, zero_point != 0);
    }
  }
  static const Winograd no_row_transform;
  static const Winograd2D no_block_transform;
  const Winograd& wg = row_entry != nullptr ? row_entry->value : no_row_transform;
  const Winograd2D& wg2 = block_entry != nullptr ? block_entry->value : no_block_transform;
#endif
  std::atomic<int> too_large{0};
  // one image at a time per thread, padded into a buffer that stays in L1/L2 while its rows run
  at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> padded(static_cast<size_t>(g.padded_h * g.padded_w * g.channels));
#if defined(__x86_64__) || defined(_M_X64)
    // F(2, 3): the image's width-transformed rows; F(2 x 2, 3 x 3): one block row's transforms
    std::vector<uint8_t> transformed(winograd_kernel != nullptr ? static_cast<size_t>(g.padded_h * wg.row_stride) : 0);
    std::vector<uint8_t> block_transforms(winograd2d != nullptr ? static_cast<size_t>(wg2.tiles * 16 * g.channels) : 0);
#endif
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t largest = pad_image(xd, g, b, static_cast<uint8_t>(zero_point), padded.data());
      if (largest > max_code) {
        too_large.store(largest);
        return;
      }
      int64_t oh = 0;
#if defined(__x86_64__) || defined(_M_X64)
      if (winograd_kernel != nullptr) winograd_input(padded.data(), g, wg, max_code, transformed.data());
      if (winograd2d != nullptr) {
        for (; oh + 2 <= g.out_h; oh += 2) {
          winograd2d_input(padded.data(), g, wg2, max_code, oh / 2, block_transforms.data());
          winograd2d(block_transforms.data(), padded.data() + oh * g.padded_w * g.channels, tiles, g, wg2,
                     offsets.data(), chunk, (b * g.out_h + oh) * g.out_w, e);
        }
      }
#endif
      for (; oh < g.out_h; ++oh) {  // every row, or the last of an odd height after F(2 x 2, 3 x 3)
        const uint8_t* row = padded.data() + oh * g.stride * g.padded_w * g.channels;
        const int64_t first_pixel = (b * g.out_h + oh) * g.out_w;
#if defined(__x86_64__) || defined(_M_X64)
        if (winograd_kernel != nullptr) {
          winograd_kernel(transformed.data() + oh * wg.row_stride, row, tiles, g, wg, offsets.data(), chunk,
                          first_pixel, e);
          continue;
        }
        if (vector_kernel != nullptr) {
          vector_kernel(row, tiles, g, offsets.data(), chunk, first_pixel, e);
          continue;
        }
#endif
        row_scalar(row, tiles, g, first_pixel, e);
      }
    }
  });
  TORCH_CHECK(too_large.load() == 0, kOp, ": an input code is ", too_large.load(), ", above max_code = ", max_code,
              " (the bound the int16 and int32 sums are checked against)");
  return out;
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(arq, m) {
  m.def(
      "lowbit_conv2d(Tensor x, Tensor weight_tiles, Tensor weight_sums, Tensor scale, Tensor? bias, int out_channels, "
      "int kernel_size, int stride, int padding, int zero_point, int max_code, int w_bits, bool relu, "
      "Tensor? residual, float residual_scale, int residual_zero_point, float out_scale, int out_zero_point, "
      "int out_min, int out_max) -> Tensor");
}

TORCH_LIBRARY_IMPL(arq, CPU, m) { m.impl("lowbit_conv2d", &lowbit::lowbit_conv2d_cpu); }

}  // namespace arq
