// What the divergence kernels (csrc/divergence.cpp, csrc/jsd_grad.cpp) share: the numbers of
// kernels/divergence_interface.py, the math options of a call, the JSD's log and mixture, and how
// a row pair is walked in blocks and vectors.
#pragma once

#include "kernels.h"

namespace fastalign {

// kernels/divergence_interface.py: the modes, and the columns of the [n_rows, kRowStats]
// statistics the second pass and the backward read.
constexpr int64_t kForwardKl = 0, kReverseKl = 1, kJsd = 2;
constexpr int64_t kPartials = 6, kRowStats = 6;
constexpr int64_t kRowMax = 0, kLogSum = 1, kTeacherRowMax = 2, kTeacherLogSum = 3, kAux = 4,
                  kEntropy = 5;

struct Spec {
  int64_t mode;
  float student_weight;  // the JSD's mixture weights: 1 - beta (formed in double), beta
  float teacher_weight;
  float inv_temperature;
  Transform student;  // keys: softcap(z) before the temperature (inv_temperature 1 here)
  Transform teacher;
};

inline Spec checked_spec(const SpecArg& arg) {
  const auto [mode, beta, inv_temperature, softcap, teacher_softcap] = arg;
  TORCH_CHECK(mode == kForwardKl || mode == kReverseKl || mode == kJsd, "unknown mode ", mode);
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "beta must be in [0, 1]");
  checked_transform(inv_temperature, softcap);
  checked_transform(inv_temperature, teacher_softcap);
  return Spec{mode, static_cast<float>(1.0 - beta), static_cast<float>(beta),
              static_cast<float>(inv_temperature),
              Transform{1.0f, softcap ? static_cast<float>(*softcap) : 0.0f},
              Transform{1.0f, teacher_softcap ? static_cast<float>(*teacher_softcap) : 0.0f}};
}

#if defined(CPU_CAPABILITY_AVX2)
// log(x) for x in [FLT_MIN, FLT_MAX] (callers clamp) or NaN (kept): the exponent read from the
// bits, the mantissa moved into [sqrt(1/2), sqrt(2)) and log(1 + f) there, |f| <= 0.415, by the
// classic single-precision polynomial (relative error about 1e-7), ln 2 split in two so that
// e * ln 2 adds no rounding of its own. The JSD takes one log per column; ATen's (Sleef's) is
// exact to an ulp but several times slower.
inline Vec fast_log(const Vec& x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 mantissa = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_castps_si256(one)));
  const __m256 halve = _mm256_cmp_ps(mantissa, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  const __m256 f = _mm256_sub_ps(
      _mm256_blendv_ps(mantissa, _mm256_mul_ps(mantissa, _mm256_set1_ps(0.5f)), halve), one);
  const __m256 e = _mm256_add_ps(
      _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127))),
      _mm256_and_ps(halve, one));
  __m256 poly = _mm256_fmadd_ps(_mm256_set1_ps(7.0376836292e-2f), f, _mm256_set1_ps(-1.1514610310e-1f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(1.1676998740e-1f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(-1.2420140846e-1f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(1.4249322787e-1f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(-1.6668057665e-1f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(2.0000714765e-1f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(-2.4999993993e-1f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(3.3333331174e-1f));
  const __m256 f2 = _mm256_mul_ps(f, f);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(poly, f), f2);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), f2, y);
  const __m256 log_x = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
  return _mm256_blendv_ps(log_x, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#else
inline Vec fast_log(const Vec& x) { return x.log(); }
#endif

// (log(p / m), log(q / m)) for the mixture m = (1 - beta) p + beta q of two probabilities (and
// their logs). m is clamped to the smallest normal float: below it, where the log has no
// precision left, either term is ~1e-22 at most (m >= (1 - beta) p, 1 - beta >= 1.1e-16).
inline void mixture_log_ratios(const Vec& log_p, const Vec& log_q, const Vec& p, const Vec& q,
                               const Vec& student_weight, const Vec& teacher_weight, Vec& to_p,
                               Vec& to_q) {
  const Vec mixture = at::vec::fmadd(student_weight, p, teacher_weight * q);
  const Vec log_m = fast_log(at::vec::maximum(mixture, Vec(FLT_MIN)));
  to_p = log_p - log_m;
  to_q = log_q - log_m;
}

// Calls f(vec_s, vec_t) on the columns [0, n) of two fp32 blocks; the last, partial vectors are
// padded with -inf (exp 0, and every term selects 0 there).
template <typename F>
inline void for_each_vec(const float* s, const float* t, int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    f(Vec::loadu(s + j), Vec::loadu(t + j));
  }
  if (j < n) {
    f(load_tail(s + j, n - j), load_tail(t + j, n - j));
  }
}

// Walks a row pair in blocks: f(keys, teacher_keys, n, start, block_max, block_teacher_max),
// the keys in fp32 (in place for fp32 logits without a softcap, else in the buffers), the
// maxes only when kMaxes.
template <bool kMaxes, typename s_t, typename t_t, typename F>
inline void for_each_block(const s_t* row, const t_t* teacher_row, int64_t vocab_size,
                           const Spec& spec, float* buf, float* teacher_buf, F&& f) {
  for (int64_t start = 0; start < vocab_size; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab_size - start);
    float block_max = 0.0f, block_teacher_max = 0.0f;
    const float* keys = load_block(row + start, n, spec.student, buf, kMaxes ? &block_max : nullptr);
    const float* teacher_keys = load_block(teacher_row + start, n, spec.teacher, teacher_buf,
                                           kMaxes ? &block_teacher_max : nullptr);
    f(keys, teacher_keys, n, start, block_max, block_teacher_max);
  }
}

inline const bool* mask_ptr(const std::optional<at::Tensor>& mask, int64_t n_rows) {
  if (!mask) return nullptr;
  check_row_vector(*mask, n_rows, at::kBool, "mask");
  return mask->const_data_ptr<bool>();
}

inline void check_stats(const at::Tensor& stats, int64_t n_rows) {
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kFloat &&
                  stats.is_contiguous() && stats.dim() == 2 && stats.size(0) == n_rows &&
                  stats.size(1) == kRowStats,
              "stats must be a contiguous CPU float [", n_rows, ", ", kRowStats, "] tensor");
}

}  // namespace fastalign
