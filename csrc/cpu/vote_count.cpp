// arq::vote_count on CPU: the base classifier's last linear layer, its argmax and
// the per-class counts in one pass, without materializing the logits:
//   counts[c] = #{ b : argmax_c' (features[b] . weight[c'] + bias[c']) = c }
// argmax as torch.argmax: ties to the lowest index, NaN counts as the maximum.
//
// The logit is defined to the bit, identically here and in csrc/cuda/vote_count.cu:
//   lane[l] = sum over t (increasing) of features[16 t + l] * weight[c, 16 t + l],
//             from +0.0f, l = 0..15, each * and + rounded separately (no FMA);
//   tree:     lane[l] += lane[l + s] for s = 8, 4, 2, 1 (l < s);
//   logit = lane[0] (+ bias[c] when given).
// It differs from torch's sgemm order by float32 rounding only; it equals the
// reference exactly when the products and sums are exact (integer-valued data).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace arq {
namespace {

constexpr int kLanes = 16;
constexpr int kTileRows = 4;

// logits[r * classes + c] for the kTileRows rows f0..f3 and every class. The
// lanes are explicit, so every clone (and the CUDA kernel) rounds the same way.
__attribute__((target_clones("avx512f", "avx2", "default")))
void tile_logits(const float* __restrict__ f0, const float* __restrict__ f1, const float* __restrict__ f2,
                 const float* __restrict__ f3, const float* __restrict__ weight, const float* __restrict__ bias,
                 int64_t d, int64_t classes, float* __restrict__ logits) {
  const int64_t full = d / kLanes * kLanes;
  for (int64_t c = 0; c < classes; ++c) {
    const float* __restrict__ wc = weight + c * d;
    float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
    for (int64_t j = 0; j < full; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float wv = wc[j + l];
        a0[l] = a0[l] + f0[j + l] * wv;
        a1[l] = a1[l] + f1[j + l] * wv;
        a2[l] = a2[l] + f2[j + l] * wv;
        a3[l] = a3[l] + f3[j + l] * wv;
      }
    }
    for (int64_t l = 0; full + l < d; ++l) {
      const float wv = wc[full + l];
      a0[l] = a0[l] + f0[full + l] * wv;
      a1[l] = a1[l] + f1[full + l] * wv;
      a2[l] = a2[l] + f2[full + l] * wv;
      a3[l] = a3[l] + f3[full + l] * wv;
    }
    for (int s = kLanes / 2; s >= 1; s /= 2) {
      for (int l = 0; l < s; ++l) {
        a0[l] = a0[l] + a0[l + s];
        a1[l] = a1[l] + a1[l + s];
        a2[l] = a2[l] + a2[l + s];
        a3[l] = a3[l] + a3[l + s];
      }
    }
    const float b = bias ? bias[c] : 0.0f;
    logits[0 * classes + c] = bias ? a0[0] + b : a0[0];
    logits[1 * classes + c] = bias ? a1[0] + b : a1[0];
    logits[2 * classes + c] = bias ? a2[0] + b : a2[0];
    logits[3 * classes + c] = bias ? a3[0] + b : a3[0];
  }
}

inline int64_t first_argmax(const float* row, int64_t width) {
  int64_t best = 0;
  float best_value = row[0];
  if (std::isnan(best_value)) return 0;
  for (int64_t j = 1; j < width; ++j) {
    const float v = row[j];
    if (std::isnan(v)) return j;
    if (v > best_value) {
      best_value = v;
      best = j;
    }
  }
  return best;
}

at::Tensor vote_count_cpu(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t num_classes) {
  TORCH_CHECK(features.dim() == 2, "vote_count: features must be [batch, features], got ", features.sizes());
  TORCH_CHECK(features.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "vote_count: features and weight must be float32, got ", features.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(num_classes >= 1, "vote_count: num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == num_classes && weight.size(1) == features.size(1),
              "vote_count: weight must be [", num_classes, ", ", features.size(1), "], got ", weight.sizes());
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == num_classes,
                "vote_count: bias must be float32 [", num_classes, "], got ", bias->scalar_type(), " ", bias->sizes());
    bias_c = bias->contiguous();
  }
  const at::Tensor f = features.contiguous(), w = weight.contiguous();
  const int64_t rows = f.size(0), d = f.size(1);
  at::Tensor counts = at::zeros({num_classes}, features.options().dtype(at::kLong));
  if (rows == 0) return counts;
  const float* fd = f.data_ptr<float>();
  const float* wd = w.data_ptr<float>();
  const float* bd = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const int num_chunks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles / 16 + 1)));
  std::vector<std::vector<int64_t>> partial(num_chunks, std::vector<int64_t>(num_classes, 0));
  const int64_t tiles_per_chunk = (tiles + num_chunks - 1) / num_chunks;
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(static_cast<size_t>(kTileRows * num_classes));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::vector<int64_t>& local = partial[chunk];
      const int64_t t_end = std::min(tiles, (chunk + 1) * tiles_per_chunk);
      for (int64_t t = chunk * tiles_per_chunk; t < t_end; ++t) {
        const int64_t r0 = t * kTileRows;
        const int64_t valid = std::min<int64_t>(kTileRows, rows - r0);
        const float* p[kTileRows];
        for (int r = 0; r < kTileRows; ++r) p[r] = fd + (r0 + std::min<int64_t>(r, valid - 1)) * d;
        tile_logits(p[0], p[1], p[2], p[3], wd, bd, d, num_classes, logits.data());
        for (int64_t r = 0; r < valid; ++r) ++local[first_argmax(logits.data() + r * num_classes, num_classes)];
      }
    }
  });
  int64_t* out = counts.data_ptr<int64_t>();
  for (const auto& chunk_counts : partial)
    for (int64_t c = 0; c < num_classes; ++c) out[c] += chunk_counts[c];
  return counts;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(arq, m) {
  m.def("vote_count(Tensor features, Tensor weight, Tensor? bias, int num_classes) -> Tensor");
}

TORCH_LIBRARY_IMPL(arq, CPU, m) { m.impl("vote_count", &vote_count_cpu); }

}  // namespace arq
