// Forward KL, reverse KL and the generalized JSD between a student's and a teacher's row of
// logits: the native CPU twin of kernels/divergence.py (kernels/divergence_interface.py holds
// the modes, the statistics' layout and TRL's beta convention).
//
// First pass: both rows streamed once, in blocks of kBlock columns brought into L1-resident fp32
// buffers as keys (softcap(z), z itself without a softcap; their maxes found on the way), with
// two online softmaxes; per row (max, sum_exp, teacher_max, teacher_sum_exp, cross,
// sum_shifted): sums of exp(s) with s = (key - max) / T, the KL's cross term of its weighting
// side sum exp(s_w) (s_w - s_o), and sum exp(s) s for the student's entropy.
// fastalign/ops/_vocab_stats.py merges them (and the slices of the fused-linear form) into the
// divergence, the entropy and the per-row statistics below.
// Second pass (JSD only): with both sides' (max, log S) known, sum q log(q / m) and
// sum p log(p / m) for the mixture m = (1 - beta) p + beta q (jsd_grad.cpp: the same pass
// forming the gradient too, for the fused distillation loss).
// Backward: the gradient w.r.t. the student's logits in one pass per row. Every difference is
// taken relative to its own side's max before the 1 / T scaling (kernels/_math.py says why).
#include "argmax.h"
#include "divergence.h"

namespace fastalign {
namespace {

// Calls f(std::integral_constant<int64_t, mode>{}).
template <typename F>
void dispatch_mode(int64_t mode, F&& f) {
  switch (mode) {
    case kForwardKl: f(std::integral_constant<int64_t, kForwardKl>{}); break;
    case kReverseKl: f(std::integral_constant<int64_t, kReverseKl>{}); break;
    default: f(std::integral_constant<int64_t, kJsd>{}); break;
  }
}

// Calls f(std::true_type{}) or f(std::false_type{}).
template <typename F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// exp(s_w) (s_w - s_o) of the KL's weighting side w: 0 where w has probability 0 (whatever the
// other side says; the tail's -inf padding among them), +inf where only the other side has,
// even where exp(s_w) underflows (0 * inf would be NaN, and dropping it a finite KL).
inline Vec cross_term(const Vec& exp_w, const Vec& s_w, const Vec& s_o) {
  const Vec minus_inf(-INFINITY);
  const Vec term = Vec::blendv(exp_w * (s_w - s_o), Vec(INFINITY), s_o == minus_inf);
  return Vec::blendv(term, Vec(0.0f), s_w == minus_inf);
}

struct FirstPass {
  float max = kFiniteMin, sum_exp = 0.0f, teacher_max = kFiniteMin, teacher_sum_exp = 0.0f;
  float cross = 0.0f, sum_shifted = 0.0f;

  // Folds in columns [0, n) of both rows' keys, whose block maxes are given.
  template <int64_t kMode, bool kEntropy>
  void add_block(const float* keys, const float* teacher_keys, int64_t n, float block_max,
                 float block_teacher_max, float inv_temperature) {
    const float new_max = nan_max(max, block_max);
    const float new_teacher_max = nan_max(teacher_max, block_teacher_max);
    // (old - new max) / T, clamped to the most negative float (maxes at opposite ends of the
    // range overflow to -inf) so that exp(d) * d is 0, not 0 * -inf; NaN stays NaN.
    const float delta = std::max((max - new_max) * inv_temperature, kFiniteMin);
    const float teacher_delta =
        std::max((teacher_max - new_teacher_max) * inv_temperature, kFiniteMin);
    const float rescale = std::exp(delta), teacher_rescale = std::exp(teacher_delta);
    // The running sums, re-expressed relative to the new maxes.
    if constexpr (kMode == kReverseKl) {
      cross = rescale * cross + (rescale * (delta - teacher_delta)) * sum_exp;
    } else if constexpr (kMode == kForwardKl) {
      cross = teacher_rescale * cross + (teacher_rescale * (teacher_delta - delta)) * teacher_sum_exp;
    }
    if constexpr (kEntropy) {
      sum_shifted = rescale * sum_shifted + (rescale * delta) * sum_exp;
    }
    sum_exp *= rescale;
    teacher_sum_exp *= teacher_rescale;
    max = new_max;
    teacher_max = new_teacher_max;

    const Vec m(max), m_teacher(teacher_max), inv_t(inv_temperature), finite_min(kFiniteMin);
    Vec sum_s(0.0f), sum_t(0.0f), cross_acc(0.0f), shifted_acc(0.0f);
    for_each_vec(keys, teacher_keys, n, [&](const Vec& key, const Vec& teacher_key) {
      const Vec s = (key - m) * inv_t, s_t = (teacher_key - m_teacher) * inv_t;
      const Vec exp_s = fast_exp(s), exp_t = fast_exp(s_t);
      if constexpr (kMode == kReverseKl) {
        cross_acc = cross_acc + cross_term(exp_s, s, s_t);
      } else if constexpr (kMode == kForwardKl) {
        cross_acc = cross_acc + cross_term(exp_t, s_t, s);
      }
      if constexpr (kEntropy) {
        // -inf logits: s clamped so that their term is 0 * finite, not 0 * -inf = NaN.
        shifted_acc = at::vec::fmadd(exp_s, at::vec::maximum(s, finite_min), shifted_acc);
      }
      sum_s = sum_s + exp_s;
      sum_t = sum_t + exp_t;
    });
    sum_exp += horizontal_sum(sum_s);
    teacher_sum_exp += horizontal_sum(sum_t);
    cross += horizontal_sum(cross_acc);
    sum_shifted += horizontal_sum(shifted_acc);
  }
};

// With top1 ([2, n_rows]: the student's, then the teacher's argmax of the raw logits; float32
// rows only), each row's most likely token too (argmax.h): from the pass's block maxes where a
// side's keys are its logits, else by a search of the row just read (a softcap's keys tie where
// tanh saturates, the logits do not). Masked rows get -1.
template <typename s_t, typename t_t>
void first_pass_rows(const s_t* base, const RowLayout& layout, const t_t* teacher_base,
                     const RowLayout& teacher_layout, const bool* mask, int64_t n_rows,
                     int64_t vocab_size, const Spec& spec, bool want_entropy, float* out,
                     int64_t* top1) {
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    alignas(64) float teacher_buf[kBlock];
    for (int64_t row = begin; row < end; ++row) {
      FirstPass sums;
      ArgmaxTracker student_top1, teacher_top1;
      const s_t* student = base + layout.offset(row);
      const t_t* teacher = teacher_base + teacher_layout.offset(row);
      if (mask && !mask[row]) {
        sums = FirstPass{0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f};  // merges to 0
      } else {
        for_each_block<true>(
            student, teacher, vocab_size, spec, buf, teacher_buf,
            [&](const float* keys, const float* teacher_keys, int64_t n, int64_t start,
                float block_max, float block_teacher_max) {
              student_top1.add(block_max, start);
              teacher_top1.add(block_teacher_max, start);
              dispatch_mode(spec.mode, [&](auto mode) {
                dispatch_bool(want_entropy, [&](auto entropy) {
                  sums.add_block<decltype(mode)::value, decltype(entropy)::value>(
                      keys, teacher_keys, n, block_max, block_teacher_max,
                      spec.inv_temperature);
                });
              });
            });
      }
      if constexpr (std::is_same_v<s_t, float> && std::is_same_v<t_t, float>) {
        if (top1 != nullptr) {
          const bool masked = mask && !mask[row];
          top1[row] = masked ? -1
                      : spec.student.has_softcap() ? argmax_of_row(student, vocab_size)
                                                   : student_top1.column(student, vocab_size);
          top1[n_rows + row] = masked ? -1
                               : spec.teacher.has_softcap()
                                   ? argmax_of_row(teacher, vocab_size)
                                   : teacher_top1.column(teacher, vocab_size);
        }
      }
      const float values[kPartials] = {sums.max, sums.sum_exp, sums.teacher_max,
                                        sums.teacher_sum_exp, sums.cross, sums.sum_shifted};
      for (int64_t k = 0; k < kPartials; ++k) {
        out[k * n_rows + row] = values[k];
      }
    }
  });
}

template <typename s_t, typename t_t>
void mixture_rows(const s_t* base, const RowLayout& layout, const t_t* teacher_base,
                  const RowLayout& teacher_layout, const bool* mask, int64_t n_rows,
                  int64_t vocab_size, const Spec& spec, const float* stats, float* out) {
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    alignas(64) float teacher_buf[kBlock];
    const Vec inv_t(spec.inv_temperature), student_weight(spec.student_weight),
        teacher_weight(spec.teacher_weight), zero(0.0f);
    for (int64_t row = begin; row < end; ++row) {
      Vec teacher_acc(0.0f), student_acc(0.0f);
      if (!mask || mask[row]) {
        const float* row_stats = stats + kRowStats * row;
        const Vec m(row_stats[kRowMax]), log_sum(row_stats[kLogSum]),
            m_teacher(row_stats[kTeacherRowMax]), teacher_log_sum(row_stats[kTeacherLogSum]);
        for_each_block<false>(
            base + layout.offset(row), teacher_base + teacher_layout.offset(row), vocab_size,
            spec, buf, teacher_buf,
            [&](const float* keys, const float* teacher_keys, int64_t n, int64_t, float, float) {
              for_each_vec(keys, teacher_keys, n, [&](const Vec& key, const Vec& teacher_key) {
                const Vec log_p = (key - m) * inv_t - log_sum;
                const Vec log_q = (teacher_key - m_teacher) * inv_t - teacher_log_sum;
                const Vec p = fast_exp(log_p), q = fast_exp(log_q);
                Vec to_p, to_q;
                mixture_log_ratios(log_p, log_q, p, q, student_weight, teacher_weight, to_p,
                                   to_q);
                // A side's p = 0 columns (the tail's padding among them) add 0 to its term.
                teacher_acc = teacher_acc + Vec::blendv(q * to_q, zero, q == zero);
                student_acc = student_acc + Vec::blendv(p * to_p, zero, p == zero);
              });
            });
      }
      out[row] = horizontal_sum(teacher_acc);
      out[n_rows + row] = horizontal_sum(student_acc);
    }
  });
}

// One row's constants of the backward.
struct GradRow {
  Vec row_max, log_sum, teacher_max, teacher_log_sum, aux, entropy;
  Vec poison;  // 0, or NaN where the divergence is NaN or infinite
  Vec go_divergence, go_entropy;
};

// The gradient of go_div * divergence + go_ent * entropy w.r.t. the student's logits of the
// columns [0, n) of a block pair, written to out (which may be `keys` itself: each vector is
// read before it is written).
template <int64_t kMode, bool kDivergence, bool kEntropy>
void grad_block(const float* keys, const float* teacher_keys, int64_t n, const GradRow& r,
                const Spec& spec, float* out) {
  const Vec inv_t(spec.inv_temperature), zero(0.0f), one(1.0f), log_p_floor(kLogPFloor);
  const Vec student_weight(spec.student_weight), teacher_weight(spec.teacher_weight);
  const bool has_softcap = spec.student.has_softcap();
  const Vec inv_softcap(has_softcap ? 1.0f / spec.student.softcap : 0.0f);
  auto grad_of = [&](const Vec& key, const Vec& teacher_key) {
    const Vec s = (key - r.row_max) * inv_t;
    const Vec log_p = s - r.log_sum;
    const Vec p = fast_exp(log_p);
    Vec grad = zero;
    if constexpr (kDivergence) {
      const Vec s_t = (teacher_key - r.teacher_max) * inv_t;
      Vec d;
      if constexpr (kMode == kReverseKl) {
        // log p - log q - KL = (s - s_t) - shift, each s relative to its own side's max; p = 0
        // columns get 0, not 0 * (-inf - finite) = NaN, unless the row is poisoned. A NaN p (a
        // NaN or +inf logit, a row of only -inf) stays NaN.
        d = Vec::blendv(p * ((s - s_t) - r.aux), r.poison, p == zero);
      } else if constexpr (kMode == kForwardKl) {
        d = p - fast_exp(s_t - r.teacher_log_sum) + r.poison;
      } else {
        const Vec log_q = s_t - r.teacher_log_sum;
        Vec to_p, to_q;
        mixture_log_ratios(log_p, log_q, p, fast_exp(log_q), student_weight, teacher_weight,
                           to_p, to_q);
        d = Vec::blendv(student_weight * p * (to_p - r.aux), r.poison, p == zero);
      }
      grad = d * r.go_divergence;
    }
    if constexpr (kEntropy) {
      // d entropy / dz'_j = -p_j (log p_j + entropy), log p floored (rows.h kLogPFloor).
      grad = grad - r.go_entropy * p * (at::vec::maximum(log_p, log_p_floor) + r.entropy);
    }
    grad = grad * inv_t;
    if (has_softcap) {
      const Vec t = key * inv_softcap;  // tanh(z / s), from the key s tanh(z / s)
      grad = grad * (one - t * t);
    }
    return grad;
  };
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    grad_of(Vec::loadu(keys + j), Vec::loadu(teacher_keys + j)).store(out + j);
  }
  if (j < n) {
    grad_of(Vec::loadu(keys + j, n - j), Vec::loadu(teacher_keys + j, n - j))
        .store(out + j, n - j);
  }
}

template <typename s_t, typename t_t>
void grad_rows(const s_t* base, const RowLayout& layout, const t_t* teacher_base,
               const RowLayout& teacher_layout, const bool* mask, s_t* grad_base,
               const RowLayout& grad_layout, int64_t n_rows, int64_t vocab_size,
               const Spec& spec, const float* stats, const float* grad_divergence,
               const float* grad_entropy) {
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    alignas(64) float teacher_buf[kBlock];
    for (int64_t row = begin; row < end; ++row) {
      s_t* dst = grad_base + grad_layout.offset(row);
      if (mask && !mask[row]) {
        store_zeros(vocab_size, dst);
        continue;
      }
      const float* row_stats = stats + kRowStats * row;
      const float aux = row_stats[kAux];
      const GradRow r{Vec(row_stats[kRowMax]), Vec(row_stats[kLogSum]),
                      Vec(row_stats[kTeacherRowMax]), Vec(row_stats[kTeacherLogSum]), Vec(aux),
                      Vec(row_stats[kEntropy]), Vec(aux - aux),
                      Vec(grad_divergence ? grad_divergence[row] : 0.0f),
                      Vec(grad_entropy ? grad_entropy[row] : 0.0f)};
      // Both blocks are read (into the buffers or in place) before the output block is written.
      for_each_block<false>(
          base + layout.offset(row), teacher_base + teacher_layout.offset(row), vocab_size, spec,
          buf, teacher_buf,
          [&](const float* keys, const float* teacher_keys, int64_t n, int64_t start, float,
              float) {
            float* out = nullptr;
            if constexpr (std::is_same_v<s_t, float>) {
              out = dst + start;
            } else {
              out = buf;
            }
            dispatch_mode(spec.mode, [&](auto mode) {
              dispatch_bool(grad_divergence != nullptr, [&](auto divergence) {
                dispatch_bool(grad_entropy != nullptr, [&](auto entropy) {
                  grad_block<decltype(mode)::value, decltype(divergence)::value,
                             decltype(entropy)::value>(keys, teacher_keys, n, r, spec, out);
                });
              });
            });
            if constexpr (!std::is_same_v<s_t, float>) {
              store_block(buf, n, dst + start);
            }
          });
    }
  });
}

// Checks both rows' layouts and calls f(student scalar_t{}, teacher scalar_t{}).
template <typename F>
void dispatch_pair(const at::Tensor& logits, const LayoutArg& layout_arg,
                   const at::Tensor& teacher_logits, const LayoutArg& teacher_layout_arg,
                   int64_t n_rows, RowLayout& layout, RowLayout& teacher_layout, F&& f) {
  layout = checked_layout(logits, layout_arg, n_rows, "logits");
  teacher_layout = checked_layout(teacher_logits, teacher_layout_arg, n_rows, "teacher_logits");
  TORCH_CHECK(teacher_logits.size(-1) == logits.size(-1),
              "teacher_logits must have the logits' vocabulary size");
  dispatch_float(logits.scalar_type(), "logits", [&](auto s_tag) {
    dispatch_float(teacher_logits.scalar_type(), "teacher_logits",
                   [&](auto t_tag) { f(s_tag, t_tag); });
  });
}

}  // namespace

at::Tensor divergence_stats(const at::Tensor& logits, const LayoutArg& layout_arg,
                            const at::Tensor& teacher_logits, const LayoutArg& teacher_layout_arg,
                            int64_t n_rows, const std::optional<at::Tensor>& mask,
                            const SpecArg& spec_arg, bool want_entropy,
                            const std::optional<at::Tensor>& top1) {
  const Spec spec = checked_spec(spec_arg);
  const bool* mask_data = mask_ptr(mask, n_rows);
  int64_t* top1_data = nullptr;
  if (top1) {
    TORCH_CHECK(logits.scalar_type() == at::kFloat && teacher_logits.scalar_type() == at::kFloat,
                "top1 is found for float32 logits and teacher_logits only");
    TORCH_CHECK(top1->device().is_cpu() && top1->scalar_type() == at::kLong &&
                    top1->is_contiguous() && top1->dim() == 2 && top1->size(0) == 2 &&
                    top1->size(1) == n_rows,
                "top1 must be a contiguous CPU int64 [2, ", n_rows, "] tensor");
    top1_data = top1->mutable_data_ptr<int64_t>();
  }
  at::Tensor out = at::empty({kPartials, n_rows}, logits.options().dtype(at::kFloat));
  RowLayout layout, teacher_layout;
  dispatch_pair(logits, layout_arg, teacher_logits, teacher_layout_arg, n_rows, layout,
                teacher_layout, [&](auto s_tag, auto t_tag) {
    first_pass_rows(logits.const_data_ptr<decltype(s_tag)>(), layout,
                    teacher_logits.const_data_ptr<decltype(t_tag)>(), teacher_layout, mask_data,
                    n_rows, logits.size(-1), spec, want_entropy, out.mutable_data_ptr<float>(),
                    top1_data);
  });
  return out;
}

at::Tensor divergence_mixture(const at::Tensor& logits, const LayoutArg& layout_arg,
                              const at::Tensor& teacher_logits,
                              const LayoutArg& teacher_layout_arg, int64_t n_rows,
                              const std::optional<at::Tensor>& mask, const at::Tensor& stats,
                              const SpecArg& spec_arg) {
  const Spec spec = checked_spec(spec_arg);
  const bool* mask_data = mask_ptr(mask, n_rows);
  check_stats(stats, n_rows);
  at::Tensor out = at::empty({2, n_rows}, logits.options().dtype(at::kFloat));
  RowLayout layout, teacher_layout;
  dispatch_pair(logits, layout_arg, teacher_logits, teacher_layout_arg, n_rows, layout,
                teacher_layout, [&](auto s_tag, auto t_tag) {
    mixture_rows(logits.const_data_ptr<decltype(s_tag)>(), layout,
                 teacher_logits.const_data_ptr<decltype(t_tag)>(), teacher_layout, mask_data,
                 n_rows, logits.size(-1), spec, stats.const_data_ptr<float>(),
                 out.mutable_data_ptr<float>());
  });
  return out;
}

void divergence_grad(const at::Tensor& logits, const LayoutArg& layout_arg,
                     const at::Tensor& teacher_logits, const LayoutArg& teacher_layout_arg,
                     int64_t n_rows, const std::optional<at::Tensor>& mask,
                     const at::Tensor& stats, const std::optional<at::Tensor>& grad_divergence,
                     const std::optional<at::Tensor>& grad_entropy, const at::Tensor& grad_out,
                     const LayoutArg& grad_layout_arg, const SpecArg& spec_arg) {
  const Spec spec = checked_spec(spec_arg);
  const bool* mask_data = mask_ptr(mask, n_rows);
  check_stats(stats, n_rows);
  const RowLayout grad_layout = checked_layout(grad_out, grad_layout_arg, n_rows, "grad_out");
  TORCH_CHECK(grad_out.size(-1) == logits.size(-1) && grad_out.scalar_type() == logits.scalar_type(),
              "grad_out must have the logits' vocabulary size and dtype");
  auto upstream = [&](const std::optional<at::Tensor>& g, const char* name) -> const float* {
    if (!g) return nullptr;
    check_row_vector(*g, n_rows, at::kFloat, name);
    return g->const_data_ptr<float>();
  };
  const float* go_divergence = upstream(grad_divergence, "grad_divergence");
  const float* go_entropy = upstream(grad_entropy, "grad_entropy");
  RowLayout layout, teacher_layout;
  dispatch_pair(logits, layout_arg, teacher_logits, teacher_layout_arg, n_rows, layout,
                teacher_layout, [&](auto s_tag, auto t_tag) {
    using scalar_t = decltype(s_tag);
    grad_rows(logits.const_data_ptr<scalar_t>(), layout,
              teacher_logits.const_data_ptr<decltype(t_tag)>(), teacher_layout, mask_data,
              grad_out.mutable_data_ptr<scalar_t>(), grad_layout, n_rows, logits.size(-1), spec,
              stats.const_data_ptr<float>(), go_divergence, go_entropy);
  });
}

}  // namespace fastalign
