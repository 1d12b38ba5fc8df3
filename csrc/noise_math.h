// Counter-based Gaussian noise shared by the C++ and CUDA ops.
//
// The construction and its guarantee are documented in arq/smoothing/noise.py
// and docs/design.md. Every floating-point step below is one IEEE-754
// correctly rounded + - * / or sqrt, in the same order as the torch reference,
// and the build disables FMA contraction (-ffp-contract=off, --fmad=false):
// that is what makes all backends bit-identical.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define ARQ_HD __host__ __device__ __forceinline__
#else
#define ARQ_HD inline
#endif

// Coefficient tables are local constexpr arrays: indexed by fully unrolled
// constants they fold into immediates, on the host and on the device alike.
#define ARQ_COEFF(table, k) (table[k])

namespace arq {
namespace noise {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

constexpr double kLn2 = 0x1.62e42fefa39efp-1;
constexpr double kHalfPi = 0x1.921fb54442d18p+0;
constexpr double kSqrtHalf = 0x1.6a09e667f3bcdp-1;
constexpr double kTwoM52 = 0x1.0p-52;

// log(m) = 2 s (1 + s^2/3 + ... + s^22/23), s = (m - 1)/(m + 1); Horner from 1/23 down to 1/3.
#define ARQ_LOG_COEFFS {0x1.642c8590b2164p-5, 0x1.8618618618618p-5, 0x1.af286bca1af28p-5, \
    0x1.e1e1e1e1e1e1ep-5, 0x1.1111111111111p-4, 0x1.3b13b13b13b14p-4, 0x1.745d1745d1746p-4, \
    0x1.c71c71c71c71cp-4, 0x1.2492492492492p-3, 0x1.999999999999ap-3, 0x1.5555555555555p-2}
// sin x = x + x (x^2 P(x^2)), P from -1/19! up to -1/3!; cos x = 1 + x^2 Q(x^2), Q from -1/18! up to -1/2!.
#define ARQ_SIN_COEFFS {-0x1.2f49b46814157p-57, 0x1.952c77030ad4ap-49, -0x1.ae7f3e733b81fp-41, \
    0x1.6124613a86d09p-33, -0x1.ae64567f544e4p-26, 0x1.71de3a556c734p-19, -0x1.a01a01a01a01ap-13, \
    0x1.1111111111111p-7, -0x1.5555555555555p-3}
#define ARQ_COS_COEFFS {-0x1.6827863b97d97p-53, 0x1.ae7f3e733b81fp-45, -0x1.93974a8c07c9dp-37, \
    0x1.1eed8eff8d898p-29, -0x1.27e4fb7789f5cp-22, 0x1.a01a01a01a01ap-16, -0x1.6c16c16c16c17p-10, \
    0x1.5555555555555p-5, -0x1.0000000000000p-1}

ARQ_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Philox4x32-10 (Salmon et al. 2011); c is the counter in, the four words out.
ARQ_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c[0], hi0, lo0);
    mulhilo32(kPhiloxM1, c[2], hi1, lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

ARQ_HD uint64_t double_bits(double v) {
  uint64_t b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

ARQ_HD double bits_double(uint64_t b) {
  double v;
  memcpy(&v, &b, sizeof(v));
  return v;
}

// An integer 0 <= i < 2^52 as a double, exactly, without an int-to-double
// instruction (which AVX2 lacks for 64-bit integers): 2^52 + i, minus 2^52.
ARQ_HD double small_uint_to_double(uint64_t i) {
  return bits_double(i | 0x4330000000000000ULL) - 4503599627370496.0;
}

ARQ_HD double uniform52(uint32_t hi_word, uint32_t lo_word) {
  const uint64_t bits = (static_cast<uint64_t>(hi_word) << 20) | (lo_word >> 12);
  return (small_uint_to_double(bits) + 0.5) * kTwoM52;
}

// Splits a normal positive x into mantissa in [0.5, 1) and its binary exponent (as a double), exactly.
ARQ_HD double split_exponent(double x, double& exponent) {
  const uint64_t b = double_bits(x);
  exponent = small_uint_to_double(b >> 52) - 1022.0;
  return bits_double((b & 0x000fffffffffffffULL) | 0x3fe0000000000000ULL);
}

// log(u) for normal u in (0, 1].
ARQ_HD double log_unit(double u) {
  constexpr double kLogCoeffs[11] = ARQ_LOG_COEFFS;
  double exponent;
  double mantissa = split_exponent(u, exponent);
  const bool low = mantissa < kSqrtHalf;
  mantissa = low ? mantissa * 2.0 : mantissa;
  exponent = low ? exponent - 1.0 : exponent;
  const double s = (mantissa - 1.0) / (mantissa + 1.0);
  const double s2 = s * s;
  double poly = ARQ_COEFF(kLogCoeffs, 0);
#pragma GCC unroll 16
  for (int k = 1; k < 11; ++k) poly = poly * s2 + ARQ_COEFF(kLogCoeffs, k);
  poly = poly * s2 + 1.0;
  return exponent * kLn2 + (s * 2.0) * poly;
}

// sqrt(x) for normal x > 0: exact range reduction to [0.5, 2), a linear seed and
// six Newton steps, as _sqrt_positive in arq/smoothing/noise.py (the hardware
// sqrt would be correctly rounded, but torch's CPU sqrt is not always, and the
// reference must match).
ARQ_HD double sqrt_positive(double x) {
  double exponent;
  double mantissa = split_exponent(x, exponent);
  const double half = exponent * 0.5;
  const bool odd = floor(half) != half;
  mantissa = odd ? mantissa * 2.0 : mantissa;
  exponent = odd ? exponent - 1.0 : exponent;
  double root = mantissa * 0.5 + 0.5;
#pragma GCC unroll 8
  for (int step = 0; step < 6; ++step) root = (root + mantissa / root) * 0.5;
  // 2^(exponent/2) built from its bits; exponent/2 + 1023 is a small positive integer.
  const double biased = exponent * 0.5 + 1023.0;
  const double scale = bits_double((double_bits(biased + 4503599627370496.0) & 0x000fffffffffffffULL) << 52);
  return root * scale;
}

// (cos 2 pi u, sin 2 pi u) for u in [0, 1), quadrant reduction exact.
ARQ_HD void cos_sin_two_pi(double u, double& cos_theta, double& sin_theta) {
  constexpr double kSinCoeffs[9] = ARQ_SIN_COEFFS;
  constexpr double kCosCoeffs[9] = ARQ_COS_COEFFS;
  const double v = u * 4.0;
  const double quadrant = floor(v);
  const double f = v - quadrant;
  const bool fold = f > 0.5;
  const double x = (fold ? 1.0 - f : f) * kHalfPi;
  const double x2 = x * x;
  double sin_poly = ARQ_COEFF(kSinCoeffs, 0);
#pragma GCC unroll 16
  for (int k = 1; k < 9; ++k) sin_poly = sin_poly * x2 + ARQ_COEFF(kSinCoeffs, k);
  const double sin_x = x + x * (x2 * sin_poly);
  double cos_poly = ARQ_COEFF(kCosCoeffs, 0);
#pragma GCC unroll 16
  for (int k = 1; k < 9; ++k) cos_poly = cos_poly * x2 + ARQ_COEFF(kCosCoeffs, k);
  const double cos_x = 1.0 + x2 * cos_poly;
  const double cos_psi = fold ? sin_x : cos_x;
  const double sin_psi = fold ? cos_x : sin_x;
  cos_theta = quadrant == 0.0 ? cos_psi : (quadrant == 1.0 ? -sin_psi : (quadrant == 2.0 ? -cos_psi : sin_psi));
  sin_theta = quadrant == 0.0 ? sin_psi : (quadrant == 1.0 ? cos_psi : (quadrant == 2.0 ? -sin_psi : -cos_psi));
}

// The two standard normals of element pair `pair` of sample `sample` (design.md).
ARQ_HD void gaussian_pair(uint64_t seed, uint32_t pair, uint32_t sample, uint32_t input_index, uint32_t draw,
                          double& z0, double& z1) {
  uint32_t c[4] = {pair, sample, input_index, draw};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const double u1 = uniform52(c[1], c[0]);
  const double u2 = uniform52(c[3], c[2]);
  const double radius = sqrt_positive(log_unit(u1) * -2.0);
  double cos_t, sin_t;
  cos_sin_two_pi(u2, cos_t, sin_t);
  z0 = radius * cos_t;
  z1 = radius * sin_t;
}

}  // namespace noise
}  // namespace arq
