// arq::argmax_count on CPU: per-class counts of the row-wise argmax of logits.
// Ties go to the lowest index and NaN counts as the maximum, as torch.argmax.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace arq {
namespace {

template <typename scalar_t>
int64_t row_argmax(const scalar_t* row, int64_t width) {
  int64_t best = 0;
  float best_value = static_cast<float>(row[0]);
  if (std::isnan(best_value)) return 0;
  for (int64_t j = 1; j < width; ++j) {
    const float v = static_cast<float>(row[j]);
    if (std::isnan(v)) return j;
    if (v > best_value) {
      best_value = v;
      best = j;
    }
  }
  return best;
}

template <>
int64_t row_argmax<double>(const double* row, int64_t width) {
  int64_t best = 0;
  double best_value = row[0];
  if (std::isnan(best_value)) return 0;
  for (int64_t j = 1; j < width; ++j) {
    const double v = row[j];
    if (std::isnan(v)) return j;
    if (v > best_value) {
      best_value = v;
      best = j;
    }
  }
  return best;
}

at::Tensor argmax_count_cpu(const at::Tensor& logits, int64_t num_classes) {
  TORCH_CHECK(logits.dim() == 2, "argmax_count: logits must be [batch, classes], got ", logits.dim(), " dims");
  TORCH_CHECK(logits.size(1) >= 1, "argmax_count: logits need at least one class column");
  TORCH_CHECK(num_classes >= logits.size(1), "argmax_count: num_classes (", num_classes,
              ") must be >= the number of logit columns (", logits.size(1), ")");
  const at::Tensor input = logits.contiguous();
  const int64_t rows = input.size(0), width = input.size(1);
  at::Tensor counts = at::zeros({num_classes}, logits.options().dtype(at::kLong));
  if (rows == 0) return counts;
  const int num_chunks = std::max<int>(1, std::min<int64_t>(at::get_num_threads(), rows / 256 + 1));
  std::vector<std::vector<int64_t>> partial(num_chunks, std::vector<int64_t>(num_classes, 0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "argmax_count_cpu", [&] {
    const scalar_t* data = input.data_ptr<scalar_t>();
    const int64_t chunk_rows = (rows + num_chunks - 1) / num_chunks;
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t first = chunk * chunk_rows, last = std::min(rows, first + chunk_rows);
        for (int64_t r = first; r < last; ++r) ++partial[chunk][row_argmax<scalar_t>(data + r * width, width)];
      }
    });
  });
  int64_t* out = counts.data_ptr<int64_t>();
  for (const auto& chunk_counts : partial)
    for (int64_t c = 0; c < num_classes; ++c) out[c] += chunk_counts[c];
  return counts;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(arq, m) { m.def("argmax_count(Tensor logits, int num_classes) -> Tensor"); }

TORCH_LIBRARY_IMPL(arq, CPU, m) { m.impl("argmax_count", &argmax_count_cpu); }

}  // namespace arq
