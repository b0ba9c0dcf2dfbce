// Exact KL(softmax(z / T) || softmax(z_ref / T)) per row: the native CPU twin of kernels/kl.py.
//
// Forward streams both rows once, in blocks, with two online softmaxes, and returns per row
// (max, sum_exp, ref_max, ref_sum_exp, cross): maxes of the raw logits, sums of exp(s) with
// s = (z - max) / T and cross = sum exp(s) (s - s_ref); fastalign/ops/_vocab_stats.
// merge_kl_partials turns them into KL = cross / sum_exp - log sum_exp + log ref_sum_exp, and
// the (max, log S, ref max, shift) each row's backward needs. Backward writes
// dKL/dz_j = p_j ((s_j - s_ref,j) - shift) / T. Every difference is taken relative to its own
// side's max before the 1 / T scaling (kernels/_math.py says why).
#include "kernels.h"

namespace fastalign {
namespace {

struct KlStats {
  float max = kFiniteMin, sum_exp = 0.0f, ref_max = kFiniteMin, ref_sum_exp = 0.0f;
  float cross = 0.0f;

  // Folds in columns [0, n) of both rows, whose maxes are block_max_p and block_max_q.
  void add_block(const float* zp, const float* zq, int64_t n, float block_max_p,
                 float block_max_q, float inv_temperature) {
    const float new_max = nan_max(max, block_max_p);
    const float new_ref_max = nan_max(ref_max, block_max_q);
    // (old - new max) / T, clamped to the most negative float (maxes at opposite ends of the
    // range overflow to -inf) so that exp(d) * d is 0, not 0 * -inf; NaN stays NaN.
    const float delta = std::max((max - new_max) * inv_temperature, kFiniteMin);
    const float ref_delta = std::max((ref_max - new_ref_max) * inv_temperature, kFiniteMin);
    const float rescale = std::exp(delta);
    // The running cross term, re-expressed relative to the new maxes.
    cross = rescale * cross + (rescale * (delta - ref_delta)) * sum_exp;
    sum_exp *= rescale;
    ref_sum_exp *= std::exp(ref_delta);
    max = new_max;
    ref_max = new_ref_max;

    const Vec m(max), m_ref(ref_max), inv_t(inv_temperature), zero(0.0f);
    const Vec minus_inf(-INFINITY), plus_inf(INFINITY);
    Vec sum_p(0.0f), sum_q(0.0f), cross_acc(0.0f);
    auto add = [&](const Vec& p, const Vec& q) {
      const Vec sp = (p - m) * inv_t, sq = (q - m_ref) * inv_t;
      const Vec ep = fast_exp(sp);
      // Columns with p = 0 (the tail's padding, -inf logits) add nothing, whatever z_ref is; a
      // finite logit where the reference's is -inf makes the KL +inf, even where exp(s)
      // underflows to 0 (0 * inf would be NaN, and dropping it would give a finite KL).
      const Vec term = Vec::blendv(ep * (sp - sq), plus_inf, sq == minus_inf);
      cross_acc = cross_acc + Vec::blendv(term, zero, sp == minus_inf);
      sum_p = sum_p + ep;
      sum_q = sum_q + fast_exp(sq);
    };
    const int64_t step = Vec::size();
    int64_t j = 0;
    for (; j + step <= n; j += step) {
      add(Vec::loadu(zp + j), Vec::loadu(zq + j));
    }
    if (j < n) {
      add(load_tail(zp + j, n - j), load_tail(zq + j, n - j));
    }
    sum_exp += horizontal_sum(sum_p);
    ref_sum_exp += horizontal_sum(sum_q);
    cross += horizontal_sum(cross_acc);
  }
};

template <typename p_t, typename q_t>
void kl_stats_rows(const p_t* p_base, const RowLayout& p_layout, const q_t* q_base,
                   const RowLayout& q_layout, const bool* mask, int64_t n_rows,
                   int64_t vocab_size, float inv_temperature, float* out) {
  const Transform raw{1.0f, 0.0f};  // raw logits: 1 / T scales differences in add_block
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    alignas(64) float zp[kBlock];
    alignas(64) float zq[kBlock];
    for (int64_t row = begin; row < end; ++row) {
      KlStats stats;
      if (mask && !mask[row]) {
        // Statistics that merge to KL = 0.
        stats = KlStats{0.0f, 1.0f, 0.0f, 1.0f, 0.0f};
      } else {
        const p_t* p_row = p_base + p_layout.offset(row);
        const q_t* q_row = q_base + q_layout.offset(row);
        for (int64_t start = 0; start < vocab_size; start += kBlock) {
          const int64_t n = std::min(kBlock, vocab_size - start);
          float max_p, max_q;
          const float* p = load_block(p_row + start, n, raw, zp, &max_p);
          const float* q = load_block(q_row + start, n, raw, zq, &max_q);
          stats.add_block(p, q, n, max_p, max_q, inv_temperature);
        }
      }
      const float values[5] = {stats.max, stats.sum_exp, stats.ref_max, stats.ref_sum_exp,
                               stats.cross};
      for (int k = 0; k < 5; ++k) {
        out[k * n_rows + row] = values[k];
      }
    }
  });
}

template <typename p_t, typename q_t>
void kl_grad_rows(const p_t* p_base, const RowLayout& p_layout, const q_t* q_base,
                  const RowLayout& q_layout, const bool* mask, p_t* grad_base,
                  const RowLayout& grad_layout, int64_t n_rows, int64_t vocab_size,
                  float inv_temperature, const float* stats, const float* grad_kl) {
  const Transform raw{1.0f, 0.0f};  // scaled below, after z - max
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    alignas(64) float zp[kBlock];
    alignas(64) float zq[kBlock];
    const Vec inv_t(inv_temperature), zero(0.0f);
    for (int64_t row = begin; row < end; ++row) {
      p_t* dst = grad_base + grad_layout.offset(row);
      if (mask && !mask[row]) {
        store_zeros(vocab_size, dst);
        continue;
      }
      const p_t* p_row = p_base + p_layout.offset(row);
      const q_t* q_row = q_base + q_layout.offset(row);
      // (max, log S, ref max, shift) of this row, from merge_kl_partials.
      const float* row_stats = stats + 4 * row;
      const Vec row_max(row_stats[0]), log_sum(row_stats[1]), ref_max(row_stats[2]),
          row_shift(row_stats[3]), coef(grad_kl[row] * inv_temperature);
      const Vec poison((row_stats[3] - row_stats[3]) * grad_kl[row]);  // 0, or NaN
      auto grad_of = [&](const Vec& z, const Vec& z_ref) {
        const Vec s = (z - row_max) * inv_t;
        const Vec p = fast_exp(s - log_sum);
        const Vec log_ratio = (s - (z_ref - ref_max) * inv_t) - row_shift;
        // p = 0 columns get 0, not 0 * (-inf - finite) = NaN, unless the row's KL is NaN or
        // inf (shift - shift is then NaN: the row is poisoned, as log_softmax's backward
        // poisons it). A NaN p (a NaN or +inf logit, a row of only -inf) stays NaN.
        return Vec::blendv(p * log_ratio * coef, poison, p == zero);
      };
      for (int64_t start = 0; start < vocab_size; start += kBlock) {
        const int64_t n = std::min(kBlock, vocab_size - start);
        // Both blocks are read (into zp/zq or in place) before the output block is written.
        const float* p = load_block(p_row + start, n, raw, zp, nullptr);
        const float* q = load_block(q_row + start, n, raw, zq, nullptr);
        float* out = nullptr;
        if constexpr (std::is_same_v<p_t, float>) {
          out = dst + start;
        } else {
          out = zp;
        }
        int64_t j = 0;
        for (; j + Vec::size() <= n; j += Vec::size()) {
          grad_of(Vec::loadu(p + j), Vec::loadu(q + j)).store(out + j);
        }
        if (j < n) {
          grad_of(Vec::loadu(p + j, n - j), Vec::loadu(q + j, n - j)).store(out + j, n - j);
        }
        if constexpr (!std::is_same_v<p_t, float>) {
          store_block(zp, n, dst + start);
        }
      }
    }
  });
}

const bool* mask_ptr(const std::optional<at::Tensor>& mask, int64_t n_rows) {
  if (!mask) return nullptr;
  check_row_vector(*mask, n_rows, at::kBool, "mask");
  return mask->const_data_ptr<bool>();
}

}  // namespace

at::Tensor kl_stats(const at::Tensor& logits, const LayoutArg& layout_arg,
                    const at::Tensor& ref_logits, const LayoutArg& ref_layout_arg,
                    int64_t n_rows, const std::optional<at::Tensor>& mask,
                    double inv_temperature) {
  const RowLayout layout = checked_layout(logits, layout_arg, n_rows, "logits");
  const RowLayout ref_layout = checked_layout(ref_logits, ref_layout_arg, n_rows, "ref_logits");
  TORCH_CHECK(ref_logits.size(-1) == logits.size(-1), "ref_logits must have the logits' vocabulary size");
  checked_transform(inv_temperature, std::nullopt);
  const bool* mask_data = mask_ptr(mask, n_rows);
  at::Tensor out = at::empty({5, n_rows}, logits.options().dtype(at::kFloat));
  dispatch_float(logits.scalar_type(), "logits", [&](auto p_tag) {
    dispatch_float(ref_logits.scalar_type(), "ref_logits", [&](auto q_tag) {
      kl_stats_rows(logits.const_data_ptr<decltype(p_tag)>(), layout,
                    ref_logits.const_data_ptr<decltype(q_tag)>(), ref_layout, mask_data, n_rows,
                    logits.size(-1), static_cast<float>(inv_temperature),
                    out.mutable_data_ptr<float>());
    });
  });
  return out;
}

void kl_grad(const at::Tensor& logits, const LayoutArg& layout_arg, const at::Tensor& ref_logits,
             const LayoutArg& ref_layout_arg, int64_t n_rows,
             const std::optional<at::Tensor>& mask, const at::Tensor& stats,
             const at::Tensor& grad_kl, const at::Tensor& grad_out,
             const LayoutArg& grad_layout_arg, double inv_temperature) {
  const RowLayout layout = checked_layout(logits, layout_arg, n_rows, "logits");
  const RowLayout ref_layout = checked_layout(ref_logits, ref_layout_arg, n_rows, "ref_logits");
  const RowLayout grad_layout = checked_layout(grad_out, grad_layout_arg, n_rows, "grad_out");
  TORCH_CHECK(ref_logits.size(-1) == logits.size(-1) && grad_out.size(-1) == logits.size(-1),
              "ref_logits and grad_out must have the logits' vocabulary size");
  TORCH_CHECK(grad_out.scalar_type() == logits.scalar_type(), "grad_out must have the logits' dtype");
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kFloat &&
                  stats.is_contiguous() && stats.dim() == 2 && stats.size(0) == n_rows &&
                  stats.size(1) == 4,
              "stats must be a contiguous CPU float [", n_rows, ", 4] tensor");
  check_row_vector(grad_kl, n_rows, at::kFloat, "grad_kl");
  checked_transform(inv_temperature, std::nullopt);
  const bool* mask_data = mask_ptr(mask, n_rows);
  dispatch_float(logits.scalar_type(), "logits", [&](auto p_tag) {
    dispatch_float(ref_logits.scalar_type(), "ref_logits", [&](auto q_tag) {
      kl_grad_rows(logits.const_data_ptr<decltype(p_tag)>(), layout,
                   ref_logits.const_data_ptr<decltype(q_tag)>(), ref_layout, mask_data,
                   grad_out.mutable_data_ptr<decltype(p_tag)>(), grad_layout, n_rows,
                   logits.size(-1), static_cast<float>(inv_temperature),
                   stats.const_data_ptr<float>(), grad_kl.const_data_ptr<float>());
    });
  });
}

}  // namespace fastalign
