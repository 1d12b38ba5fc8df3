// Activation codes on CPU, in float32 and in the reference's order, rounding half to even:
//
// arq::requantize_codes: uint8 codes of one quantization grid -> uint8 codes of another,
//   out = clamp(round(((c - in_zero) * in_scale) / out_scale) + out_zero, out_min, out_max)
// (arq.ops.requantize_codes_reference). Why an op: torch.compile's generated C++ loads uint8 eight
// at a time through a scalar copy on AVX2, 7-8x slower than this loop
// (benchmarks/bench_cpp_ops.py::test_requantize, 1 and 2 threads). An input code has 256 values,
// so on CPUs with AVX-512 VBMI the op computes the 256 outputs once per call with the scalar
// formula and maps the tensor through that table, 64 codes per two vpermi2b: exact by
// construction, and no division per element (the AVX2 loop is bound by its vdivps). On AVX2 the
// same table is used where it rises in few steps (a low-bit reader of an 8-bit stream: at most 15
// for 4 bits): every float32 step of the formula keeps the order of the codes (subtracting a
// constant, multiplying and dividing by positive scales, rounding, adding, clamping), so the table
// is non-decreasing and table[c] = table[0] + #{steps at or below c}; the op counts them with two
// byte compares each, 128 codes at a time, and checks the table's order before relying on it.
// 2-core Zen 3, 400 x 16 x 32 x 32 codes into a 4-bit reader (15 steps): 1.25 ms with the division,
// 0.75 ms counting (one thread: 2.2 and 0.87 ms); ResNet-110's 56 requantizations went from 45 to 31 ms
// of a 400-sample forward's ~650 (torch.profiler, one run each, ad hoc).
//
// arq::quantize_codes: float32 activations -> an activation quantizer's uint8 codes,
//   out = clamp(round(x / scale) + zero_point, code_min, code_max)
// (arq.ops.quantize_codes_reference). Why an op: eager torch runs it as five passes with four
// float32 temporaries (div, round, add, clamp, to); here it is one pass.
//
// Every output is the reference's bit for bit: the AVX2 loops do the same IEEE operations eight at
// a time; nothing is fused or reassociated. NaN has no code (the reference's uint8 conversion of NaN
// is undefined), so quantize_codes raises on it rather than return a code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "packed_common.h"

namespace arq {
namespace {

struct Grid {
  float in_scale, in_zero, out_scale, out_zero, out_min, out_max;
};

// clamp(q, low, high) as the reference's torch.clamp on float32 (a whole number q then fits uint8)
inline uint8_t clamped_code(float q, float low, float high) {
  return static_cast<uint8_t>(q < low ? low : (q > high ? high : q));
}

inline uint8_t requantize_one(uint8_t code, const Grid& g) {
  const float value = (static_cast<float>(code) - g.in_zero) * g.in_scale;
  // nearbyint in the default mode: half to even
  return clamped_code(std::nearbyint(value / g.out_scale) + g.out_zero, g.out_min, g.out_max);
}

// The op's output for each of the 256 input codes (the table paths map through it).
void fill_table(const Grid& g, uint8_t* table) {
  for (int code = 0; code < 256; ++code) table[code] = requantize_one(static_cast<uint8_t>(code), g);
}

void requantize_portable(const uint8_t* src, uint8_t* dst, int64_t begin, int64_t end, const Grid& g) {
  for (int64_t i = begin; i < end; ++i) dst[i] = requantize_one(src[i], g);
}

#if defined(__x86_64__) || defined(_M_X64)
// Eight clamped whole-number floats (0..255) stored as eight uint8 codes; the conversion is exact.
__attribute__((target("avx2"))) inline void store_codes(uint8_t* dst, __m256 clamped) {
  const __m256i q = _mm256_cvtps_epi32(clamped);
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(words, words));
}

__attribute__((target("avx2")))
void requantize_avx2(const uint8_t* src, uint8_t* dst, int64_t begin, int64_t end, const Grid& g) {
  const __m256 in_scale = _mm256_set1_ps(g.in_scale), in_zero = _mm256_set1_ps(g.in_zero);
  const __m256 out_scale = _mm256_set1_ps(g.out_scale), out_zero = _mm256_set1_ps(g.out_zero);
  const __m256 low = _mm256_set1_ps(g.out_min), high = _mm256_set1_ps(g.out_max);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    v = _mm256_mul_ps(_mm256_sub_ps(v, in_zero), in_scale);
    v = _mm256_round_ps(_mm256_div_ps(v, out_scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    store_codes(dst + i, _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, out_zero), low), high));
  }
  requantize_portable(src, dst, i, end, g);
}

// At most this many steps are counted (three instructions each per 32 codes): below where the division
// loop catches up (one thread, the grid above: 24 steps 1.39 ms, 25 through the division 1.93 ms).
constexpr int kMaxSteps = 24;

// The table's steps, each listed once per unit of rise, when it is non-decreasing and rises at most
// kMaxSteps times; else 0 steps and false.
bool table_steps(const uint8_t* table, uint8_t* steps, int* count) {
  *count = 0;
  for (int code = 1; code < 256; ++code) {
    if (table[code] < table[code - 1]) return false;
    for (int rise = table[code] - table[code - 1]; rise > 0; --rise) {
      if (*count == kMaxSteps) return false;
      steps[(*count)++] = static_cast<uint8_t>(code);
    }
  }
  return true;
}

// out + 1 where code >= step (max(code, step) == code): a true compare is -1, subtracting it adds one
__attribute__((target("avx2"))) inline __m256i count_step(__m256i out, __m256i code, __m256i step) {
  return _mm256_sub_epi8(out, _mm256_cmpeq_epi8(_mm256_max_epu8(code, step), code));
}

// dst[i] = table[src[i]] for a non-decreasing table with these steps: table[0] plus one for each step
// s <= code, 128 codes at a time (32 in the remainder); the tail through the table itself.
__attribute__((target("avx2")))
void map_by_steps_avx2(const uint8_t* src, uint8_t* dst, int64_t begin, int64_t end, const uint8_t* table,
                       const uint8_t* steps, int count) {
  __m256i step[kMaxSteps];
  for (int j = 0; j < count; ++j) step[j] = _mm256_set1_epi8(static_cast<char>(steps[j]));
  const __m256i base = _mm256_set1_epi8(static_cast<char>(table[0]));
  int64_t i = begin;
  for (; i + 128 <= end; i += 128) {  // four independent sums per step, one load of it
    const __m256i* in = reinterpret_cast<const __m256i*>(src + i);
    const __m256i c0 = _mm256_loadu_si256(in), c1 = _mm256_loadu_si256(in + 1);
    const __m256i c2 = _mm256_loadu_si256(in + 2), c3 = _mm256_loadu_si256(in + 3);
    __m256i o0 = base, o1 = base, o2 = base, o3 = base;
    for (int j = 0; j < count; ++j) {
      o0 = count_step(o0, c0, step[j]);
      o1 = count_step(o1, c1, step[j]);
      o2 = count_step(o2, c2, step[j]);
      o3 = count_step(o3, c3, step[j]);
    }
    __m256i* out = reinterpret_cast<__m256i*>(dst + i);
    _mm256_storeu_si256(out, o0);
    _mm256_storeu_si256(out + 1, o1);
    _mm256_storeu_si256(out + 2, o2);
    _mm256_storeu_si256(out + 3, o3);
  }
  for (; i + 32 <= end; i += 32) {
    const __m256i code = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    __m256i out = base;
    for (int j = 0; j < count; ++j) out = count_step(out, code, step[j]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), out);
  }
  for (; i < end; ++i) dst[i] = table[src[i]];
}

bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

bool has_avx512_vbmi() {
  static const bool has = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
  return has;
}

// dst[i] = table[src[i]]: vpermi2b looks up 128 entries (index bit 6 picks the register), so one
// lookup per table half; the index's top bit then picks the half.
__attribute__((target("avx512f,avx512bw,avx512vbmi")))
void map_through_table_vbmi(const uint8_t* src, uint8_t* dst, int64_t begin, int64_t end, const uint8_t* table) {
  const __m512i t0 = _mm512_loadu_si512(table), t1 = _mm512_loadu_si512(table + 64);
  const __m512i t2 = _mm512_loadu_si512(table + 128), t3 = _mm512_loadu_si512(table + 192);
  int64_t i = begin;
  for (; i + 64 <= end; i += 64) {
    const __m512i index = _mm512_loadu_si512(src + i);
    const __m512i low = _mm512_permutex2var_epi8(t0, index, t1);
    const __m512i high = _mm512_permutex2var_epi8(t2, index, t3);
    _mm512_storeu_si512(dst + i, _mm512_mask_blend_epi8(_mm512_movepi8_mask(index), low, high));
  }
  for (; i < end; ++i) dst[i] = table[src[i]];
}
#endif

struct Quantizer {
  float scale, zero, code_min, code_max;
};

// Returns whether x[begin, end) held a NaN (whose codes are then meaningless: the caller raises).
bool quantize_portable(const float* src, uint8_t* dst, int64_t begin, int64_t end, const Quantizer& g) {
  bool nan = false;
  for (int64_t i = begin; i < end; ++i) {
    nan |= std::isnan(src[i]);
    dst[i] = clamped_code(std::nearbyint(src[i] / g.scale) + g.zero, g.code_min, g.code_max);
  }
  return nan;
}

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx2")))
bool quantize_avx2(const float* src, uint8_t* dst, int64_t begin, int64_t end, const Quantizer& g) {
  const __m256 scale = _mm256_set1_ps(g.scale), zero = _mm256_set1_ps(g.zero);
  const __m256 low = _mm256_set1_ps(g.code_min), high = _mm256_set1_ps(g.code_max);
  __m256 nan = _mm256_setzero_ps();
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    __m256 v = _mm256_round_ps(_mm256_div_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // max(v, low) gives low for NaN: the code is then discarded by the caller's error
    store_codes(dst + i, _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, zero), low), high));
  }
  return quantize_portable(src, dst, i, end, g) || _mm256_movemask_ps(nan) != 0;
}
#endif

at::Tensor requantize_codes_cpu(const at::Tensor& codes, double in_scale, int64_t in_zero, double out_scale,
                                int64_t out_zero, int64_t out_min, int64_t out_max) {
  TORCH_CHECK(codes.scalar_type() == at::kByte, "requantize_codes: codes must be uint8, got ", codes.scalar_type());
  packed::float32_scale(in_scale, "requantize_codes", "in_scale");
  packed::float32_scale(out_scale, "requantize_codes", "out_scale");
  TORCH_CHECK(0 <= out_min && out_min <= out_max && out_max <= 255,
              "requantize_codes: need 0 <= out_min <= out_max <= 255, got ", out_min, " and ", out_max);
  TORCH_CHECK(0 <= in_zero && in_zero <= 255 && 0 <= out_zero && out_zero <= 255,
              "requantize_codes: zero points must be in 0..255, got ", in_zero, " and ", out_zero);
  // dense in its own memory format (contiguous or channels_last): map the storage in order
  const at::Tensor input = codes.is_non_overlapping_and_dense() ? codes : codes.contiguous();
  at::Tensor out = at::empty_like(input);
  const Grid grid{static_cast<float>(in_scale), static_cast<float>(in_zero), static_cast<float>(out_scale),
                  static_cast<float>(out_zero), static_cast<float>(out_min), static_cast<float>(out_max)};
  const uint8_t* src = input.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  // ARQ_CPU_ISA (packed_common.h) picks the path, so tests reach all three on one CPU
  const packed::Isa isa = packed::select_isa();
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == packed::Isa::kAvx512Vnni && has_avx512_vbmi()) {
    uint8_t table[256];
    fill_table(grid, table);
    at::parallel_for(0, input.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      map_through_table_vbmi(src, dst, begin, end, table);
    });
    return out;
  }
  if (isa != packed::Isa::kScalar && has_avx2()) {
    uint8_t table[256], steps[kMaxSteps];
    fill_table(grid, table);
    int count = 0;
    if (table_steps(table, steps, &count)) {
      at::parallel_for(0, input.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
        map_by_steps_avx2(src, dst, begin, end, table, steps, count);
      });
      return out;
    }
  }
#endif
  at::parallel_for(0, input.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) || defined(_M_X64)
    if (isa != packed::Isa::kScalar && has_avx2()) return requantize_avx2(src, dst, begin, end, grid);
#endif
    requantize_portable(src, dst, begin, end, grid);
  });
  return out;
}

at::Tensor quantize_codes_cpu(const at::Tensor& x, double scale, int64_t zero_point, int64_t code_min,
                              int64_t code_max) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantize_codes: x must be float32, got ", x.scalar_type());
  packed::float32_scale(scale, "quantize_codes", "scale");
  TORCH_CHECK(0 <= code_min && code_min <= code_max && code_max <= 255,
              "quantize_codes: need 0 <= code_min <= code_max <= 255, got ", code_min, " and ", code_max);
  TORCH_CHECK(0 <= zero_point && zero_point <= 255, "quantize_codes: zero_point must be in 0..255, got ",
              zero_point);
  const at::Tensor input = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  at::Tensor out = at::empty_like(input, input.options().dtype(at::kByte));
  const Quantizer quantizer{static_cast<float>(scale), static_cast<float>(zero_point),
                            static_cast<float>(code_min), static_cast<float>(code_max)};
  const float* src = input.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::atomic<bool> nan{false};
  at::parallel_for(0, input.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    auto kernel = quantize_portable;
#if defined(__x86_64__) || defined(_M_X64)
    if (has_avx2()) kernel = quantize_avx2;
#endif
    if (kernel(src, dst, begin, end, quantizer)) nan.store(true, std::memory_order_relaxed);
  });
  TORCH_CHECK(!nan.load(), "quantize_codes: x holds NaN, which has no quantization code (the model's "
              "activations are not finite)");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(arq, m) {
  m.def("requantize_codes(Tensor codes, float in_scale, int in_zero, float out_scale, int out_zero, int out_min, "
        "int out_max) -> Tensor");
  m.def("quantize_codes(Tensor x, float scale, int zero_point, int code_min, int code_max) -> Tensor");
}

TORCH_LIBRARY_IMPL(arq, CPU, m) {
  m.impl("requantize_codes", &requantize_codes_cpu);
  m.impl("quantize_codes", &quantize_codes_cpu);
}

}  // namespace arq
