// A row's most likely token, as torch.argmax(x, -1) gives it: the first column holding the row's
// max, the first NaN where the row has one (a row of -inf: column 0). Found from the row's
// per-block maxes (blocks of kBlock columns): the block that holds the answer is the first whose
// max is NaN, else the first with the greatest max, and one search of that block (L1-sized)
// finds the column. The divergence's first pass (divergence.cpp) has the maxes already: the fused
// distillation loss's top-1 agreement costs no pass of its own (torch's CPU argmax, a scalar
// loop, took as long as a whole pass of the divergence's math).
#pragma once

#include "rows.h"

namespace fastalign {

// The NaN-propagating max of columns [0, n) of a row block (-inf for n = 0).
inline float block_max(const float* x, int64_t n) {
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

// Fed each block's max in column order (blocks starting at multiples of kBlock), then asked for
// the column.
class ArgmaxTracker {
 public:
  // Whether later blocks can no longer change the answer (a NaN was seen).
  bool done() const { return std::isnan(best_); }

  void add(float block_max, int64_t start) {
    if (done()) return;  // the first NaN wins, whatever follows
    if (std::isnan(block_max) || block_max > best_) {  // strictly: a tie keeps the earlier block
      best_ = block_max;
      best_start_ = start;
    }
  }

  int64_t column(const float* row, int64_t vocab_size) const {
    const int64_t stop = std::min(best_start_ + kBlock, vocab_size);
    for (int64_t j = best_start_; j < stop; ++j) {
      if (done() ? std::isnan(row[j]) : row[j] == best_) {
        return j;
      }
    }
    return best_start_;  // every column -inf: the first
  }

 private:
  float best_ = -INFINITY;
  int64_t best_start_ = 0;
};

inline int64_t argmax_of_row(const float* row, int64_t vocab_size) {
  ArgmaxTracker tracker;
  for (int64_t start = 0; start < vocab_size && !tracker.done(); start += kBlock) {
    tracker.add(block_max(row + start, std::min(kBlock, vocab_size - start)), start);
  }
  return tracker.column(row, vocab_size);
}

}  // namespace fastalign
