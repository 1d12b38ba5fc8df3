// arq::packed_conv2d on CPU: NHWC implicit-GEMM convolution of int8/uint8
// activations with 2..8-bit packed weights, the same GEMM and fused epilogue as
// packed_linear (packed_common.h).
//
// Output pixel m = (b, oh, ow) is GEMM row m; its K = KH * KW * C values are the
// input patch in (kh, kw, c) order (docs/design.md), gathered per block of rows
// into the packed activation buffer. Taps outside the image read the zero point,
// 0 for both int8 and uint8 symmetric quantization (stored as 0x80 after the
// int8 +128 offset, so the weight-sum correction cancels it exactly).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/packed_common.h"

namespace arq {
namespace packed {
namespace {

at::Tensor packed_conv2d_cpu(const at::Tensor& x, const at::Tensor& packed_weight, int64_t w_bits,
                             const at::Tensor& scales, const std::optional<at::Tensor>& bias, double x_scale,
                             int64_t kernel_h, int64_t kernel_w, int64_t stride, int64_t padding, bool relu,
                             const std::optional<at::Tensor>& residual, double out_scale) {
  constexpr const char* op = "packed_conv2d";
  TORCH_CHECK(x.scalar_type() == at::kChar || x.scalar_type() == at::kByte, op,
              ": x must be int8 or uint8, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must be NHWC [B, H, W, C], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU");
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1 && kernel_h <= kMaxGeometry && kernel_w <= kMaxGeometry, op,
              ": kernel sizes must be in 1..", kMaxGeometry, ", got ", kernel_h, "x", kernel_w);
  TORCH_CHECK(stride >= 1 && stride <= kMaxGeometry, op, ": stride must be in 1..", kMaxGeometry, ", got ", stride);
  TORCH_CHECK(padding >= 0 && padding <= kMaxGeometry, op, ": padding must be in 0..", kMaxGeometry, ", got ",
              padding);
  const int64_t batch = x.size(0), h = x.size(1), wd = x.size(2), c = x.size(3);
  const int64_t oh = (h + 2 * padding - kernel_h) / stride + 1;
  const int64_t ow = (wd + 2 * padding - kernel_w) / stride + 1;
  TORCH_CHECK(h + 2 * padding >= kernel_h && wd + 2 * padding >= kernel_w, op, ": kernel ", kernel_h, "x", kernel_w,
              " larger than the padded input ", h, "x", wd, " (padding ", padding, ")");
  const int64_t k = checked_product(kernel_h * kernel_w, c, op, "K = kernel_h * kernel_w * C");
  const Panels w = unpack_to_panels(packed_weight, w_bits, k, op);
  std::vector<int64_t> out_shape{batch, oh, ow, w.n};
  Epilogue e;
  at::Tensor scales_c, bias_c, residual_c;
  at::Tensor out = prepare_epilogue(op, x, out_shape, w.n, scales, bias, x_scale, relu, residual, out_scale, e,
                                    scales_c, bias_c, residual_c);
  const at::Tensor xc = x.contiguous();
  const uint8_t* xd = static_cast<const uint8_t*>(xc.data_ptr());
  const bool signed_x = x.scalar_type() == at::kChar;
  const uint8_t zero_code = signed_x ? 0x80 : 0x00;
  const int64_t pixels = oh * ow;
  run_gemm(batch * pixels, w, signed_x, e, [&](int64_t m0, int64_t rows, uint8_t* dst, int64_t lda) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      const int64_t b = m / pixels, pix = m % pixels;
      const int64_t y0 = (pix / ow) * stride - padding, x0 = (pix % ow) * stride - padding;
      uint8_t* d = dst + r * lda;
      for (int64_t i = 0; i < kernel_h; ++i) {
        const int64_t iy = y0 + i;
        for (int64_t j = 0; j < kernel_w; ++j) {
          const int64_t ix = x0 + j;
          uint8_t* dd = d + (i * kernel_w + j) * c;
          if (iy >= 0 && iy < h && ix >= 0 && ix < wd) {
            copy_activations(xd + ((b * h + iy) * wd + ix) * c, dd, c, signed_x);
          } else {
            std::memset(dd, zero_code, static_cast<size_t>(c));
          }
        }
      }
      std::memset(d + k, 0, static_cast<size_t>(lda - k));
    }
  });
  return out;
}

}  // namespace
}  // namespace packed

TORCH_LIBRARY_FRAGMENT(arq, m) {
  m.def(
      "packed_conv2d(Tensor x_nhwc, Tensor packed_weight, int w_bits, Tensor scales, Tensor? bias, float x_scale, "
      "int kernel_h, int kernel_w, int stride, int padding, bool relu, Tensor? residual, float out_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(arq, CPU, m) { m.impl("packed_conv2d", &packed::packed_conv2d_cpu); }

}  // namespace arq
