// The JSD's second pass and its gradient w.r.t. the student's logits in one call, for the fused
// distillation loss (fastalign/ops/linear_divergence_loss.py): there each row is whole (one
// vocabulary slice) and both rows are float32 buffers that are free once the call returns.
//
// With m = (1 - beta) p + beta q, d JSD / dz'_j = (1 - beta) p_j (log(p_j / m_j) - KL(p || m))
// (beta's and (1 - beta)'s terms of d JSD / dp_j add up to (1 - beta) log(p_j / m_j), and the
// softmax's Jacobian subtracts their p-weighted mean, which is KL(p || m)). KL(p || m) is the
// second pass's own row sum, so no column of the gradient is known until the pass ends. Run as
// a second pass and then a backward pass, each column's p, q and log m (two exps and a log, the
// costly part) were formed twice. Here the second pass leaves log(p_j / m_j) in place of the
// student's key and p_j (times the softcap's derivative) in place of the teacher's, and once the
// row's sums are known one sweep over the same row pair, still in cache (a pair of V = 128k
// rows is 1 MB, one core's L2), writes the gradient from them: a subtraction, two
// multiplications and a select per column. The two values are the float32 ones the backward
// pass formed again, so the gradient is as accurate (only its last multiplications are
// grouped differently); the sums are the second pass's, term for term.
#include "divergence.h"

namespace fastalign {
namespace {

// One row's second pass (kernels/divergence_interface.py's TEACHER_TERM, STUDENT_TERM), leaving
// log(p / m) in `row` and p times d key / dz in `teacher_row`, in place of their logits.
struct SecondPass {
  float teacher_term = 0.0f, student_term = 0.0f;

  void run(float* row, float* teacher_row, int64_t vocab_size, const Spec& spec,
           const float* row_stats, float* buf, float* teacher_buf) {
    const Vec inv_t(spec.inv_temperature), student_weight(spec.student_weight),
        teacher_weight(spec.teacher_weight), zero(0.0f), one(1.0f);
    const bool has_softcap = spec.student.has_softcap();
    const Vec inv_softcap(has_softcap ? 1.0f / spec.student.softcap : 0.0f);
    const Vec m(row_stats[kRowMax]), log_sum(row_stats[kLogSum]),
        m_teacher(row_stats[kTeacherRowMax]), teacher_log_sum(row_stats[kTeacherLogSum]);
    Vec teacher_acc(0.0f), student_acc(0.0f);
    // The keys are read (in place, or from the buffers) before their columns are overwritten.
    for_each_block<false>(
        row, teacher_row, vocab_size, spec, buf, teacher_buf,
        [&](const float* keys, const float* teacher_keys, int64_t n, int64_t start, float,
            float) {
          auto column = [&](const Vec& key, const Vec& teacher_key, Vec& to_p, Vec& p) {
            // As csrc/divergence.cpp's mixture_rows, term for term.
            const Vec log_p = (key - m) * inv_t - log_sum;
            const Vec log_q = (teacher_key - m_teacher) * inv_t - teacher_log_sum;
            const Vec q = fast_exp(log_q);
            p = fast_exp(log_p);
            Vec to_q;
            mixture_log_ratios(log_p, log_q, p, q, student_weight, teacher_weight, to_p, to_q);
            // A side's p = 0 columns (the tail's padding among them) add 0 to its term.
            teacher_acc = teacher_acc + Vec::blendv(q * to_q, zero, q == zero);
            student_acc = student_acc + Vec::blendv(p * to_p, zero, p == zero);
            if (has_softcap) {
              const Vec t = key * inv_softcap;  // tanh(z / s), from the key s tanh(z / s)
              p = p * (one - t * t);
            }
          };
          float* to_p_out = row + start;
          float* p_out = teacher_row + start;
          Vec to_p, p;
          int64_t j = 0;
          for (; j + Vec::size() <= n; j += Vec::size()) {
            column(Vec::loadu(keys + j), Vec::loadu(teacher_keys + j), to_p, p);
            to_p.store(to_p_out + j);
            p.store(p_out + j);
          }
          if (j < n) {
            column(load_tail(keys + j, n - j), load_tail(teacher_keys + j, n - j), to_p, p);
            to_p.store(to_p_out + j, n - j);
            p.store(p_out + j, n - j);
          }
        });
    teacher_term = horizontal_sum(teacher_acc);
    student_term = horizontal_sum(student_acc);
  }
};

// The gradient of go * JSD over `row` from what SecondPass left: (1 - beta) p (log(p / m) - KL)
// / T (times the softcap's derivative, already in p). kl is KL(p || m), made NaN where the JSD
// is NaN or infinite (merge_mixture_partials' AUX): then every column is NaN, p = 0 columns too.
void write_gradient(float* row, const float* scaled_p, int64_t vocab_size, float kl, float go,
                    const Spec& spec) {
  const float scale = static_cast<float>(static_cast<double>(spec.student_weight) * go *
                                         spec.inv_temperature);
  // What a p = 0 column gets: 0 (0 * scale, NaN for a NaN or infinite go), or NaN.
  const Vec poison((kl - kl) * scale), zero(0.0f), kl_v(kl), scale_v(scale);
  auto grad_of = [&](const Vec& to_p, const Vec& p) {
    return Vec::blendv(p * (to_p - kl_v) * scale_v, poison, p == zero);
  };
  int64_t j = 0;
  for (; j + Vec::size() <= vocab_size; j += Vec::size()) {
    grad_of(Vec::loadu(row + j), Vec::loadu(scaled_p + j)).store(row + j);
  }
  if (j < vocab_size) {
    const int64_t n = vocab_size - j;
    grad_of(Vec::loadu(row + j, n), Vec::loadu(scaled_p + j, n)).store(row + j, n);
  }
}

void mixture_grad_rows(float* base, const RowLayout& layout, float* teacher_base,
                       const RowLayout& teacher_layout, const bool* mask, int64_t n_rows,
                       int64_t vocab_size, const Spec& spec, const float* stats,
                       const float* grad_divergence, float* out) {
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    alignas(64) float teacher_buf[kBlock];
    for (int64_t row = begin; row < end; ++row) {
      float* student = base + layout.offset(row);
      SecondPass sums;
      if (mask && !mask[row]) {
        store_zeros(vocab_size, student);
      } else {
        float* teacher = teacher_base + teacher_layout.offset(row);
        sums.run(student, teacher, vocab_size, spec, stats + kRowStats * row, buf, teacher_buf);
        // As ops/_vocab_stats.py's merge_mixture_partials: the JSD's NaN (a NaN teacher logit)
        // or inf poisons the gradient through KL(p || m).
        const float divergence =
            spec.teacher_weight * sums.teacher_term + spec.student_weight * sums.student_term;
        write_gradient(student, teacher, vocab_size,
                       sums.student_term + (divergence - divergence), grad_divergence[row], spec);
      }
      out[row] = sums.teacher_term;
      out[n_rows + row] = sums.student_term;
    }
  });
}

}  // namespace

at::Tensor divergence_mixture_grad(const at::Tensor& logits, const LayoutArg& layout_arg,
                                   const at::Tensor& teacher_logits,
                                   const LayoutArg& teacher_layout_arg, int64_t n_rows,
                                   const std::optional<at::Tensor>& mask, const at::Tensor& stats,
                                   const at::Tensor& grad_divergence, const SpecArg& spec_arg) {
  const Spec spec = checked_spec(spec_arg);
  TORCH_CHECK(spec.mode == kJsd, "divergence_mixture_grad is the JSD's (0 < beta < 1)");
  const bool* mask_data = mask_ptr(mask, n_rows);
  check_stats(stats, n_rows);
  check_row_vector(grad_divergence, n_rows, at::kFloat, "grad_divergence");
  const RowLayout layout = checked_layout(logits, layout_arg, n_rows, "logits");
  const RowLayout teacher_layout =
      checked_layout(teacher_logits, teacher_layout_arg, n_rows, "teacher_logits");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && teacher_logits.scalar_type() == at::kFloat,
              "logits and teacher_logits must be float32 (they are overwritten with float32 "
              "intermediates)");
  TORCH_CHECK(teacher_logits.size(-1) == logits.size(-1),
              "teacher_logits must have the logits' vocabulary size");
  TORCH_CHECK(!logits.storage().is_alias_of(teacher_logits.storage()),
              "logits and teacher_logits must not share memory");
  at::Tensor out = at::empty({2, n_rows}, logits.options());
  mixture_grad_rows(logits.mutable_data_ptr<float>(), layout,
                    teacher_logits.mutable_data_ptr<float>(), teacher_layout, mask_data, n_rows,
                    logits.size(-1), spec, stats.const_data_ptr<float>(),
                    grad_divergence.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  return out;
}

}  // namespace fastalign
