// arq::packed_linear on CPU: y = epilogue(x @ unpack(packed_weight).T), int8 or
// uint8 activations against 2..8-bit packed weights (docs/design.md), exact
// int32 accumulation. The GEMM, micro-kernels and epilogue are described in
// packed_common.h; this file holds the micro-kernels, the ISA choice, the
// weight unpacking and the op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/packed_common.h"

namespace arq {
namespace packed {
namespace {

// ---- micro-kernels: an MR x 32 int32 tile over all K groups -------------------

inline int32_t load_group(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// AVX-512 VNNI: 6 rows x 2 zmm (16 columns each) accumulators.
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void micro_vnni(const uint8_t* a, int64_t lda, const int8_t* b, int64_t kgroups, int32_t* c) {
  __m512i acc[6][2];
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  for (int64_t g = 0; g < kgroups; ++g) {
    const __m512i b0 = _mm512_loadu_si512(b + g * 128);
    const __m512i b1 = _mm512_loadu_si512(b + g * 128 + 64);
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      const __m512i av = _mm512_set1_epi32(load_group(a + r * lda + 4 * g));
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) {
    _mm512_storeu_si512(c + r * 32, acc[r][0]);
    _mm512_storeu_si512(c + r * 32 + 16, acc[r][1]);
  }
}

// AVX2: the dpbusd 4-term dot per 32-bit lane, exactly, from 16-bit pieces:
// even bytes (k0, k2) and odd bytes (k1, k3) of both operands, two madd_epi16.
// Products are <= 255 * 128 in magnitude, pair sums fit int32: no saturation.
__attribute__((target("avx2")))
void micro_avx2(const uint8_t* a, int64_t lda, const int8_t* b, int64_t kgroups, int32_t* c) {
  const __m256i low_bytes = _mm256_set1_epi16(0x00FF);
  for (int half = 0; half < 2; ++half) {
    const int8_t* bh = b + half * 64;
    __m256i acc[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t g = 0; g < kgroups; ++g) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh + g * 128));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh + g * 128 + 32));
      const __m256i w0e = _mm256_srai_epi16(_mm256_slli_epi16(w0, 8), 8), w0o = _mm256_srai_epi16(w0, 8);
      const __m256i w1e = _mm256_srai_epi16(_mm256_slli_epi16(w1, 8), 8), w1o = _mm256_srai_epi16(w1, 8);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m256i av = _mm256_set1_epi32(load_group(a + r * lda + 4 * g));
        const __m256i ae = _mm256_and_si256(av, low_bytes), ao = _mm256_srli_epi16(av, 8);
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_add_epi32(_mm256_madd_epi16(ae, w0e), _mm256_madd_epi16(ao, w0o)));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_add_epi32(_mm256_madd_epi16(ae, w1e), _mm256_madd_epi16(ao, w1o)));
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * 32 + half * 16), acc[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * 32 + half * 16 + 8), acc[r][1]);
    }
  }
}

// AVX2 for weights of at most 7 bits (|w| <= 64): u8 x s8 pair sums fit int16
// exactly, so maddubs then madd with ones gives the 4-term dot per lane.
__attribute__((target("avx2")))
void micro_avx2_narrow(const uint8_t* a, int64_t lda, const int8_t* b, int64_t kgroups, int32_t* c) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    const int8_t* bh = b + half * 64;
    __m256i acc[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t g = 0; g < kgroups; ++g) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh + g * 128));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh + g * 128 + 32));
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m256i av = _mm256_set1_epi32(load_group(a + r * lda + 4 * g));
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(av, w0), ones));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(av, w1), ones));
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * 32 + half * 16), acc[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * 32 + half * 16 + 8), acc[r][1]);
    }
  }
}

// AVX2 for b-bit weights, b <= 6: as micro_avx2_narrow, but the maddubs pair
// sums (|.| <= 510 * 2^(b-1)) are added in int16 over kL = 2^(7-b) groups before
// one madd with ones widens them (kL * 510 * 2^(b-1) <= 32640: exact). The int32
// partial sums live in the output tile between chunks.
template <int kL>
__attribute__((target("avx2")))
void micro_avx2_lowbit(const uint8_t* a, int64_t lda, const int8_t* b, int64_t kgroups, int32_t* c) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    const int8_t* bh = b + half * 64;
    int32_t* ch = c + half * 16;
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ch + r * 32), _mm256_setzero_si256());
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ch + r * 32 + 8), _mm256_setzero_si256());
    }
    for (int64_t g0 = 0; g0 < kgroups; g0 += kL) {
      const int64_t g1 = std::min<int64_t>(kgroups, g0 + kL);
      __m256i acc[4][2];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      for (int64_t g = g0; g < g1; ++g) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh + g * 128));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh + g * 128 + 32));
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const __m256i av = _mm256_set1_epi32(load_group(a + r * lda + 4 * g));
          acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(av, w0));
          acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(av, w1));
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        for (int v = 0; v < 2; ++v) {
          __m256i* dst = reinterpret_cast<__m256i*>(ch + r * 32 + v * 8);
          _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst), _mm256_madd_epi16(acc[r][v], ones)));
        }
      }
    }
  }
}

// Portable: the same sums in plain C++ (the compiler may vectorize the j loop).
// Six rows, as the VNNI kernel, so the tests run the driver with both MR = 4 and 6.
void micro_scalar(const uint8_t* a, int64_t lda, const int8_t* b, int64_t kgroups, int32_t* c) {
  int32_t acc[6][32] = {};
  for (int64_t g = 0; g < kgroups; ++g) {
    const int8_t* bg = b + g * 128;
    for (int r = 0; r < 6; ++r) {
      const uint8_t* ag = a + r * lda + 4 * g;
      for (int j = 0; j < 32; ++j) {
        int32_t s = 0;
        for (int q = 0; q < 4; ++q) s += static_cast<int32_t>(ag[q]) * static_cast<int32_t>(bg[j * 4 + q]);
        acc[r][j] += s;
      }
    }
  }
  std::memcpy(c, acc, sizeof(acc));
}

bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

bool env_true(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0 && std::strcmp(v, "false") != 0;
}

}  // namespace

// Read per call so tests can switch paths: ARQ_CPU_ISA=auto|vnni|avx2|scalar asks
// for a path (falling back to the best supported below it), ARQ_DISABLE_VNNI=1
// rules out vnni.
Isa select_isa() {
  Isa best = cpu_has_vnni() ? Isa::kAvx512Vnni : (cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar);
  if (env_true("ARQ_DISABLE_VNNI") && best == Isa::kAvx512Vnni) best = cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
  const char* want = std::getenv("ARQ_CPU_ISA");
  if (want == nullptr || *want == '\0' || std::strcmp(want, "auto") == 0) return best;
  Isa asked;
  if (std::strcmp(want, "scalar") == 0) asked = Isa::kScalar;
  else if (std::strcmp(want, "avx2") == 0) asked = Isa::kAvx2;
  else if (std::strcmp(want, "vnni") == 0 || std::strcmp(want, "avx512vnni") == 0) asked = Isa::kAvx512Vnni;
  else TORCH_CHECK(false, "ARQ_CPU_ISA must be auto, vnni, avx2 or scalar, got '", want, "'");
  return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni: return "vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Kernel get_kernel(Isa isa, int64_t bits) {
  switch (isa) {
    case Isa::kAvx512Vnni: return {&micro_vnni, 6, isa};
    case Isa::kAvx2:
      switch (bits) {
        case 2: return {&micro_avx2_lowbit<32>, 4, isa};
        case 3: return {&micro_avx2_lowbit<16>, 4, isa};
        case 4: return {&micro_avx2_lowbit<8>, 4, isa};
        case 5: return {&micro_avx2_lowbit<4>, 4, isa};
        case 6: return {&micro_avx2_lowbit<2>, 4, isa};
        case 7: return {&micro_avx2_narrow, 4, isa};
        default: return {&micro_avx2, 4, isa};
      }
    default: return {&micro_scalar, 6, Isa::kScalar};
  }
}

// Vectorized over the 32 columns of a tile; rows of the output are written in
// full. Cloned for AVX2 (no FMA anywhere: -ffp-contract=off), so every clone
// gives the same bits. round_half_even(v) for |v| <= 1024 is (v + 1.5 * 2^23) -
// 1.5 * 2^23 in the default rounding mode.
__attribute__((target_clones("avx2", "default")))
void apply_epilogue(const int32_t* tile, int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t n_total,
                    const PanelConstants& pc, const Epilogue& e) {
  constexpr int64_t J = kPanelCols;
  const float xs = e.x_scale, inv = e.inv_out_scale;
  const bool has_bias = e.bias != nullptr, relu = e.relu, requant = e.requant;
  const float lo = relu ? 0.0f : -128.0f, hi = relu ? 255.0f : 127.0f;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    const int32_t* t = tile + r * J;
    alignas(64) float y[J];
    for (int64_t j = 0; j < J; ++j) y[j] = static_cast<float>(t[j] - pc.correction[j]) * xs;
    for (int64_t j = 0; j < J; ++j) y[j] = y[j] * pc.scale[j];
    if (has_bias)
      for (int64_t j = 0; j < J; ++j) y[j] = y[j] + pc.bias[j];
    if (e.residual) {
      const float* res = e.residual + m * n_total + n0;
      for (int64_t j = 0; j < cols; ++j) y[j] = y[j] + res[j];
    }
    if (relu)
      for (int64_t j = 0; j < J; ++j) y[j] = y[j] < 0.0f ? 0.0f : y[j];  // NaN stays NaN, as torch.relu
    if (!requant) {
      std::memcpy(e.out_f + m * n_total + n0, y, static_cast<size_t>(cols) * sizeof(float));
      continue;
    }
    alignas(64) int32_t q[J];
    for (int64_t j = 0; j < J; ++j) {
      float v = y[j] * inv;
      v = v == v ? v : 0.0f;
      v = v < -1024.0f ? -1024.0f : (v > 1024.0f ? 1024.0f : v);
      v = (v + kMagic) - kMagic;
      v = v < lo ? lo : (v > hi ? hi : v);
      q[j] = static_cast<int32_t>(v);
    }
    if (relu) {
      uint8_t* out = e.out_u8 + m * n_total + n0;
      for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<uint8_t>(q[j]);
    } else {
      int8_t* out = e.out_s8 + m * n_total + n0;
      for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<int8_t>(q[j]);
    }
  }
}

Panels unpack_to_panels(const at::Tensor& packed, int64_t bits, int64_t k, const char* op) {
  TORCH_CHECK(bits >= 2 && bits <= 8, op, ": w_bits must be in 2..8, got ", bits);
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 2, op,
              ": packed_weight must be a 2-D int32 tensor, got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(packed.device().is_cpu(), op, ": packed_weight must be on the CPU");
  const int64_t per_word = 32 / bits;
  const int64_t words = (k + per_word - 1) / per_word;
  TORCH_CHECK(packed.size(1) == words, op, ": packed_weight has ", packed.size(1), " words a row; K = ", k, " at ",
              bits, " bits needs ", words);
  TORCH_CHECK(k <= kMaxK, op, ": K = ", k, " exceeds ", kMaxK, " (int32 accumulator range)");
  Panels w;
  w.n = packed.size(0);
  w.k = k;
  w.bits = bits;
  w.kp = round_up(std::max<int64_t>(k, 1), kGroup);
  w.kgroups = w.kp / kGroup;
  w.np = round_up(w.n, kPanelCols);
  w.data.assign(static_cast<size_t>(w.np * w.kp), 0);
  w.wsum.assign(static_cast<size_t>(w.np), 0);
  const at::Tensor src_t = packed.contiguous();
  const uint32_t* src = reinterpret_cast<const uint32_t*>(src_t.data_ptr<int32_t>());
  const uint32_t mask = (1u << bits) - 1u;
  const int shift = 32 - static_cast<int>(bits);
  at::parallel_for(0, w.n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int8_t* base = w.data.data() + (n / kPanelCols) * w.kgroups * kPanelCols * kGroup + (n % kPanelCols) * kGroup;
      const uint32_t* row = src + n * words;
      int32_t sum = 0;
      int64_t kk = 0;
      for (int64_t wi = 0; wi < words; ++wi) {
        const uint32_t word = row[wi];
        for (int64_t j = 0; j < per_word && kk < k; ++j, ++kk) {
          const uint32_t field = (word >> (j * bits)) & mask;
          const int32_t v = static_cast<int32_t>(field << shift) >> shift;  // sign-extend the b-bit field
          base[(kk / kGroup) * kPanelCols * kGroup + (kk % kGroup)] = static_cast<int8_t>(v);
          sum += v;
        }
      }
      w.wsum[n] = sum;
    }
  });
  return w;
}

namespace {

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed_weight, int64_t w_bits,
                             const at::Tensor& scales, const std::optional<at::Tensor>& bias, double x_scale,
                             bool relu, const std::optional<at::Tensor>& residual, double out_scale) {
  constexpr const char* op = "packed_linear";
  TORCH_CHECK(x.scalar_type() == at::kChar || x.scalar_type() == at::kByte, op,
              ": x must be int8 or uint8, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU");
  const int64_t k = x.size(-1);
  const Panels w = unpack_to_panels(packed_weight, w_bits, k, op);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.n;
  Epilogue e;
  at::Tensor scales_c, bias_c, residual_c;
  at::Tensor out = prepare_epilogue(op, x, out_shape, w.n, scales, bias, x_scale, relu, residual, out_scale, e,
                                    scales_c, bias_c, residual_c);
  const at::Tensor xc = x.contiguous();
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  const uint8_t* xd = static_cast<const uint8_t*>(xc.data_ptr());
  const bool signed_x = x.scalar_type() == at::kChar;
  run_gemm(m, w, signed_x, e, [&](int64_t m0, int64_t rows, uint8_t* dst, int64_t lda) {
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* d = dst + r * lda;
      copy_activations(xd + (m0 + r) * k, d, k, signed_x);
      std::memset(d + k, 0, static_cast<size_t>(lda - k));
    }
  });
  return out;
}

std::string packed_cpu_isa() { return isa_name(select_isa()); }

}  // namespace
}  // namespace packed

TORCH_LIBRARY_FRAGMENT(arq, m) {
  m.def(
      "packed_linear(Tensor x, Tensor packed_weight, int w_bits, Tensor scales, Tensor? bias, float x_scale, "
      "bool relu, Tensor? residual, float out_scale) -> Tensor");
  m.def("packed_cpu_isa() -> str");
}

TORCH_LIBRARY_IMPL(arq, CPU, m) { m.impl("packed_linear", &packed::packed_linear_cpu); }

TORCH_LIBRARY_IMPL(arq, CompositeExplicitAutograd, m) { m.impl("packed_cpu_isa", &packed::packed_cpu_isa); }

}  // namespace arq
