// Each row's most likely token, as torch.argmax(x, -1) gives it: the first column holding the
// row's max, the first NaN where the row has one (a -inf row: column 0). The fused distillation
// loss reports how often student and teacher agree on it, per chunk of float32 logits; torch's
// CPU argmax walks a row one element at a time, about ten times slower than one vectorized
// pass over memory, which this is: per block of kBlock columns a max, and once the row is done
// a search for the first match in the block that held it first (L1-sized, read again).
#include "kernels.h"

namespace fastalign {
namespace {

// The NaN-propagating max of columns [0, n) of a row block (-inf for n = 0).
float block_max(const float* x, int64_t n) {
  const int64_t step = Vec::size();
  Vec a(-INFINITY), b(-INFINITY), c(-INFINITY), d(-INFINITY);  // four chains: loads overlap
  int64_t j = 0;
  for (; j + 4 * step <= n; j += 4 * step) {
    a = nan_maximum(a, Vec::loadu(x + j));
    b = nan_maximum(b, Vec::loadu(x + j + step));
    c = nan_maximum(c, Vec::loadu(x + j + 2 * step));
    d = nan_maximum(d, Vec::loadu(x + j + 3 * step));
  }
  for (; j + step <= n; j += step) {
    a = nan_maximum(a, Vec::loadu(x + j));
  }
  if (j < n) {
    b = nan_maximum(b, load_tail(x + j, n - j));
  }
  return reduce_max(nan_maximum(nan_maximum(a, b), nan_maximum(c, d)));
}

int64_t argmax_of_row(const float* row, int64_t vocab_size) {
  float best = -INFINITY;
  int64_t best_start = 0;
  for (int64_t start = 0; start < vocab_size; start += kBlock) {
    const float m = block_max(row + start, std::min(kBlock, vocab_size - start));
    if (std::isnan(m)) {  // the first NaN wins, whatever follows
      best = m;
      best_start = start;
      break;
    }
    if (m > best) {  // strictly: a tie keeps the earlier block
      best = m;
      best_start = start;
    }
  }
  const int64_t stop = std::min(best_start + kBlock, vocab_size);
  for (int64_t j = best_start; j < stop; ++j) {
    if (std::isnan(best) ? std::isnan(row[j]) : row[j] == best) {
      return j;
    }
  }
  return best_start;  // every column -inf: the first
}

}  // namespace

at::Tensor row_argmax(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous(),
              "x must be a contiguous 2-d CPU float32 tensor");
  TORCH_CHECK(x.size(1) > 0, "x must have at least one column");
  const int64_t n_rows = x.size(0), vocab_size = x.size(1);
  at::Tensor out = at::empty({n_rows}, x.options().dtype(at::kLong));
  const float* data = x.const_data_ptr<float>();
  int64_t* indices = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      indices[row] = argmax_of_row(data + row * vocab_size, vocab_size);
    }
  });
  return out;
}

}  // namespace fastalign
