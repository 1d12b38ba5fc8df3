// Shared machinery of the packed low-bit integer ops on CPU (packed_linear.cpp,
// packed_conv.cpp): weight panels, the int8 GEMM micro-kernels and the fused
// float32 epilogue.
//
// The GEMM.  C[m, n] = sum_k x[m, k] * w[n, k], exact in int32.
//   * Weights (docs/design.md packed format, 2..8 bits) are unpacked once per
//     call into int8 panels of kPanelCols = 32 output columns, laid out for
//     VNNI: for each group g of 4 consecutive k, 32 columns x 4 bytes
//     (panel[(g * 32 + j) * 4 + q] = w[n0 + j, 4 g + q]); K is zero-padded to
//     a multiple of 4 and N to a multiple of 32.
//   * Activations are packed per block of rows into unsigned bytes: uint8 as
//     is; int8 with the +128 offset (byte ^ 0x80), and the exact correction
//     acc = sum_k (x + 128) w - 128 * sum_k w per column afterwards. The
//     convolution packs its implicit-GEMM (kh, kw, c) patches the same way.
//   * Micro-kernels compute an MR x 32 int32 tile over all of K:
//       vnni   AVX-512 VNNI _mm512_dpbusd_epi32 (u8 x s8, 4 products a lane), MR = 6
//       avx2   the same u8 x s8 4-term dot per 32-bit lane. b-bit weights
//              (|w| <= 2^(b-1)) for b <= 7: _mm256_maddubs_epi16 pair sums
//              (|.| <= 510 * 2^(b-1) < 2^15: no saturation), summed in int16
//              over L = 2^(7-b) groups (still < 2^15), then _mm256_madd_epi16
//              with ones into int32; 8-bit weights: _mm256_madd_epi16 on even
//              and odd bytes. MR = 4
//       scalar portable C++, MR = 6
//     All three are exact int32 arithmetic, so they give identical results.
//     Chosen per call (select_isa): the best the CPU supports, overridden by
//     ARQ_CPU_ISA=scalar|avx2|vnni|auto; ARQ_DISABLE_VNNI=1 skips vnni.
//   * The epilogue, per element, in float32 and in this order (the torch
//     reference in arq/ops.py uses the same order, so float outputs match
//     bit for bit):
//       y = float(acc) * float(x_scale); y = y * scales[n]; y = y + bias[n];
//       y = y + residual[m, n]; y = relu(y);
//       out_scale > 0: q = clamp(nearbyint(y * (1.0f / float(out_scale))),
//                                 -128, 127) as int8, or [0, 255] as uint8 when relu
//                      (round half to even; NaN -> 0)
//       otherwise the float32 y.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace arq {
namespace packed {

constexpr int64_t kPanelCols = 32;   // output columns per weight panel
constexpr int64_t kGroup = 4;        // k values per int32 lane (one dpbusd)
constexpr int64_t kMaxMR = 6;        // largest micro-kernel row count
// |sum_k (x + 128) w| <= 255 * 128 * K must fit int32.
constexpr int64_t kMaxK = 65535;

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

// c[r * 32 + j] = sum_g sum_q a[r * lda + 4 g + q] * b[(g * 32 + j) * 4 + q],
// r < MR, j < 32, over kgroups groups.
using MicroKernel = void (*)(const uint8_t* a, int64_t lda, const int8_t* b, int64_t kgroups, int32_t* c);

struct Kernel {
  MicroKernel fn;
  int64_t mr;
  Isa isa;
};

// Defined in packed_linear.cpp.
Isa select_isa();
const char* isa_name(Isa isa);
Kernel get_kernel(Isa isa, int64_t bits);

// Weights unpacked into panels, plus per-column sums for the int8 offset correction.
struct Panels {
  int64_t n = 0, k = 0, kp = 0, np = 0, kgroups = 0, bits = 8;
  std::vector<int8_t> data;   // [np / 32][kgroups][32][4]
  std::vector<int32_t> wsum;  // [np]
  const int8_t* panel(int64_t p) const { return data.data() + p * kgroups * kPanelCols * kGroup; }
};

// Defined in packed_linear.cpp. packed: int32 [N, ceil(K / (32 / bits))].
Panels unpack_to_panels(const at::Tensor& packed, int64_t bits, int64_t k, const char* op);

struct Epilogue {
  const float* scales = nullptr;    // [N]
  const float* bias = nullptr;      // [N] or null
  const float* residual = nullptr;  // [M, N] row-major or null
  float x_scale = 1.0f;
  float inv_out_scale = 0.0f;
  bool relu = false;
  bool requant = false;
  float* out_f = nullptr;     // [M, N] when !requant
  int8_t* out_s8 = nullptr;   // [M, N] when requant && !relu
  uint8_t* out_u8 = nullptr;  // [M, N] when requant && relu
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// No convolution has a kernel, stride or padding near this; bounding them keeps every size and
// product computed from them (padded extents, K = kh * kw * C) far inside int64.
constexpr int64_t kMaxGeometry = int64_t(1) << 20;

// a * b, refused (naming `what`) where it would overflow int64.
inline int64_t checked_product(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t product = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &product), op, ": ", what, " overflows int64 (", a, " x ", b, ")");
  return product;
}

// A double scale as the float32 the kernels compute with: finite, and > 0 as a float32 (a double
// such as 1e-50 is 0 in float32 and 1e300 is inf: their quotients would be NaN or inf).
inline float float32_scale(double value, const char* op, const char* name) {
  const float as_float = static_cast<float>(value);
  TORCH_CHECK(std::isfinite(value) && value > 0 && std::isnormal(as_float) && std::isfinite(1.0f / as_float), op,
              ": ", name, " must be a positive float32 whose reciprocal is finite, got ", value);
  return as_float;
}

// Per-panel epilogue constants, zero beyond the last column.
struct PanelConstants {
  alignas(64) float scale[kPanelCols];
  alignas(64) float bias[kPanelCols];
  alignas(64) int32_t correction[kPanelCols];  // 128 * sum_k w (int8 activations), else 0
};

inline void panel_constants(const Epilogue& e, const int32_t* wsum, bool signed_x, int64_t n0, int64_t cols,
                            PanelConstants& pc) {
  for (int64_t j = 0; j < kPanelCols; ++j) {
    const bool valid = j < cols;
    pc.scale[j] = valid ? e.scales[n0 + j] : 0.0f;
    pc.bias[j] = valid && e.bias ? e.bias[n0 + j] : 0.0f;
    pc.correction[j] = valid && signed_x ? 128 * wsum[n0 + j] : 0;
  }
}

// Defined in packed_linear.cpp (vectorized, cloned for AVX2): the epilogue of one
// tile, rows [m0, m0 + rows) and columns [n0, n0 + cols) of the [M, n_total] output.
void apply_epilogue(const int32_t* tile, int64_t m0, int64_t rows, int64_t n0, int64_t cols, int64_t n_total,
                    const PanelConstants& pc, const Epilogue& e);

// Runs the blocked GEMM + epilogue over M rows. pack_a(m0, rows, dst, lda) writes
// rows x lda activation bytes (offset applied for int8; zeros in [K, lda)).
template <typename PackA>
void run_gemm(int64_t m_total, const Panels& w, bool signed_x, const Epilogue& e, const PackA& pack_a) {
  if (m_total == 0 || w.n == 0) return;
  const Kernel kern = get_kernel(select_isa(), w.bits);
  const int64_t mr = kern.mr;
  const int64_t lda = w.kp;
  // Row block: its packed activations (block x Kp bytes) stay in L2 while every
  // weight panel (32 x Kp bytes) streams through L1 against them.
  const int64_t block = mr * std::max<int64_t>(1, std::min<int64_t>(16, (256 * 1024) / std::max<int64_t>(1, mr * lda)));
  const int64_t row_blocks = (m_total + block - 1) / block;
  const int64_t panels = w.np / kPanelCols;
  // Too few row blocks for the threads: split the columns as well.
  const int64_t threads = at::get_num_threads();
  int64_t col_chunks = 1;
  while (row_blocks * col_chunks < 4 * threads && col_chunks < panels) col_chunks *= 2;
  col_chunks = std::min(col_chunks, panels);
  const int64_t panels_per_chunk = (panels + col_chunks - 1) / col_chunks;

  at::parallel_for(0, row_blocks * col_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> abuf(static_cast<size_t>(round_up(block, mr) * lda));
    alignas(64) int32_t tile[kMaxMR * kPanelCols];
    PanelConstants pc;
    int64_t packed_block = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / col_chunks, cc = task % col_chunks;
      const int64_t m0 = rb * block;
      const int64_t rows = std::min(block, m_total - m0);
      const int64_t rows_padded = round_up(rows, mr);
      if (rb != packed_block) {
        pack_a(m0, rows, abuf.data(), lda);
        std::memset(abuf.data() + rows * lda, 0, static_cast<size_t>((rows_padded - rows) * lda));
        packed_block = rb;
      }
      const int64_t p_end = std::min(panels, (cc + 1) * panels_per_chunk);
      for (int64_t p = cc * panels_per_chunk; p < p_end; ++p) {
        const int64_t n0 = p * kPanelCols;
        const int64_t cols = std::min(kPanelCols, w.n - n0);
        const int8_t* b = w.panel(p);
        panel_constants(e, w.wsum.data(), signed_x, n0, cols, pc);
        for (int64_t i = 0; i < rows_padded; i += mr) {
          kern.fn(abuf.data() + i * lda, lda, b, w.kgroups, tile);
          apply_epilogue(tile, m0 + i, std::min(mr, rows - i), n0, cols, w.n, pc, e);
        }
      }
    }
  });
}

// Validates the epilogue tensors and allocates the output [rows..., N]; fills e.
inline at::Tensor prepare_epilogue(const char* op, const at::Tensor& like, std::vector<int64_t> out_shape, int64_t n,
                                   const at::Tensor& scales, const std::optional<at::Tensor>& bias, double x_scale,
                                   bool relu, const std::optional<at::Tensor>& residual, double out_scale,
                                   Epilogue& e, at::Tensor& scales_c, at::Tensor& bias_c, at::Tensor& residual_c) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == n, op,
              ": scales must be float32 [", n, "], got ", scales.scalar_type(), " ", scales.sizes());
  scales_c = scales.contiguous();
  e.scales = scales_c.data_ptr<float>();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n, op,
                ": bias must be float32 [", n, "], got ", bias->scalar_type(), " ", bias->sizes());
    bias_c = bias->contiguous();
    e.bias = bias_c.data_ptr<float>();
  }
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->sizes() == at::IntArrayRef(out_shape), op,
                ": residual must be float32 ", at::IntArrayRef(out_shape), ", got ", residual->scalar_type(), " ",
                residual->sizes());
    residual_c = residual->contiguous();
    e.residual = residual_c.data_ptr<float>();
  }
  TORCH_CHECK(std::isfinite(x_scale) && std::isfinite(static_cast<float>(x_scale)), op,
              ": x_scale must be finite as a float32, got ", x_scale);
  TORCH_CHECK(std::isfinite(out_scale), op, ": out_scale must be finite, got ", out_scale);
  if (out_scale > 0) float32_scale(out_scale, op, "out_scale");
  e.x_scale = static_cast<float>(x_scale);
  e.relu = relu;
  e.requant = out_scale > 0;
  at::Tensor out;
  if (e.requant) {
    e.inv_out_scale = 1.0f / static_cast<float>(out_scale);
    out = at::empty(out_shape, like.options().dtype(relu ? at::kByte : at::kChar));
    if (relu) e.out_u8 = out.data_ptr<uint8_t>();
    else e.out_s8 = out.data_ptr<int8_t>();
  } else {
    out = at::empty(out_shape, like.options().dtype(at::kFloat));
    e.out_f = out.data_ptr<float>();
  }
  return out;
}

// Copies one row of activations to unsigned bytes: int8 gets the +128 offset.
inline void copy_activations(const uint8_t* src, uint8_t* dst, int64_t count, bool signed_x) {
  if (signed_x) {
    for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<uint8_t>(src[i] ^ 0x80u);
  } else {
    std::memcpy(dst, src, static_cast<size_t>(count));
  }
}

}  // namespace packed
}  // namespace arq
