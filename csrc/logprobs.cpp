// Per-row softmax statistics (forward) and the log-prob/entropy gradient (backward) over the
// columns of a [rows, V] tensor: the native CPU twins of kernels/token_logprobs.py and of the
// reduction half of kernels/linear_logprobs.py.
//
// Forward, per row, one pass over memory with an online log-sum-exp in blocks: the block's max
// first (from L1), a rescale of the running sums only when that max grows, then one exp per
// element. It returns the row's statistics; fastalign/ops/token_logprobs_native.py turns them
// into log-probs, entropy and the log-sum-exp kept for backward.
//
// Backward writes d(go_lp * logprob + go_ent * entropy)/dz in one pass from the saved
// log-sum-exp, in the output's dtype; the output may be the logits themselves (in place).
#include "kernels.h"

namespace fastalign {
namespace {

struct RowStats {
  float max = kFiniteMin;    // running max of z'
  float sum_exp = 0.0f;      // sum exp(z' - max)
  float sum_shifted = 0.0f;  // sum exp(z' - max) * (z' - max), for the entropy
  float target = 0.0f;       // z' at the target column, 0 when the target is not in this row

  // Folds in columns z[0:n] whose max is block_max_value.
  template <bool kEntropy>
  void add_block(const float* z, int64_t n, float block_max_value) {
    if (!(block_max_value <= max)) {  // grows, or NaN: NaN then poisons the row
      const float delta = max - block_max_value;  // <= 0
      const float rescale = std::exp(delta);
      // Sums relative to the new max: exp(s + d) (s + d) = e^d (exp(s) s + d exp(s)).
      sum_shifted = rescale * (sum_shifted + delta * sum_exp);
      sum_exp *= rescale;
      max = block_max_value;
    }
    const Vec row_max(max), finite_min(kFiniteMin);
    Vec sum_a(0.0f), sum_b(0.0f), weighted_a(0.0f), weighted_b(0.0f);
    auto add = [&](const Vec& zv, Vec& sum, Vec& weighted) {
      const Vec s = zv - row_max;
      const Vec e = fast_exp(s);
      sum = sum + e;
      if constexpr (kEntropy) {
        // -inf logits: clamp s so that their term is 0 * finite, not 0 * -inf = NaN.
        weighted = at::vec::fmadd(e, at::vec::maximum(s, finite_min), weighted);
      }
    };
    const int64_t step = Vec::size();
    int64_t j = 0;
    // Two independent chains: one would be bound by the exp's latency, not its throughput.
    for (; j + 2 * step <= n; j += 2 * step) {
      add(Vec::loadu(z + j), sum_a, weighted_a);
      add(Vec::loadu(z + j + step), sum_b, weighted_b);
    }
    for (; j + step <= n; j += step) {
      add(Vec::loadu(z + j), sum_a, weighted_a);
    }
    if (j < n) {
      add(load_tail(z + j, n - j), sum_b, weighted_b);
    }
    sum_exp += horizontal_sum(sum_a + sum_b);
    if constexpr (kEntropy) {
      sum_shifted += horizontal_sum(weighted_a + weighted_b);
    }
  }
};

template <typename scalar_t, bool kEntropy>
void stats_rows(const scalar_t* base, const RowLayout& layout, int64_t n_rows,
                int64_t vocab_size, const int64_t* targets, const TargetSpec& spec,
                const Transform& transform, float* out) {
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t row = begin; row < end; ++row) {
      RowStats stats;
      const int64_t target = targets[row] - spec.target_offset;
      if (spec.has_skip && targets[row] == spec.skip_index) {
        stats.max = 0.0f;
        stats.sum_exp = 1.0f;
      } else {
        const scalar_t* src = base + layout.offset(row);
        for (int64_t start = 0; start < vocab_size; start += kBlock) {
          const int64_t n = std::min(kBlock, vocab_size - start);
          float block_max_value;
          const float* z = load_block(src + start, n, transform, buf, &block_max_value);
          if (target >= start && target < start + n) {
            stats.target = z[target - start];
          }
          stats.add_block<kEntropy>(z, n, block_max_value);
        }
      }
      out[row] = stats.max;
      out[n_rows + row] = stats.sum_exp;
      out[2 * n_rows + row] = stats.sum_shifted;
      out[3 * n_rows + row] = stats.target;
    }
  });
}

template <typename scalar_t>
void grad_rows(const scalar_t* base, const RowLayout& layout, scalar_t* grad_base,
               const RowLayout& grad_layout, int64_t n_rows, int64_t vocab_size,
               const int64_t* targets, const TargetSpec& spec, const Transform& transform,
               const float* row_max, const float* lse, const float* entropy,
               const float* grad_logprobs, const float* grad_entropy) {
  constexpr bool kFloatOut = std::is_same_v<scalar_t, float>;
  // dz'/dz = (1 - tanh(z / s)^2) / T with softcap s, and tanh(z / s) = z' T / s; else 1 / T.
  const bool softcap = transform.has_softcap();
  const float tanh_per_z = softcap ? 1.0f / (transform.softcap * transform.inv_temperature) : 0.0f;
  auto dz_scalar = [&](float z) {
    const float tanh = z * tanh_per_z;
    return softcap ? (1.0f - tanh * tanh) * transform.inv_temperature : transform.inv_temperature;
  };
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    const int64_t step = Vec::size();
    const Vec inv_t(transform.inv_temperature), tanh_per_z_vec(tanh_per_z), one(1.0f);
    const Vec log_p_floor(-1000.0f);
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* dst = grad_base + grad_layout.offset(row);
      if (spec.has_skip && targets[row] == spec.skip_index) {
        store_zeros(vocab_size, dst);
        continue;
      }
      const scalar_t* src = base + layout.offset(row);
      const int64_t target = targets[row] - spec.target_offset;
      const float go_lp = grad_logprobs ? grad_logprobs[row] : 0.0f;
      // log p = (z' - max) - log_sum when the max is given: z' - max is exact for the columns
      // that matter, so logits near 1000 lose nothing to a rounded max + log_sum.
      const Vec shift(row_max ? row_max[row] : 0.0f), row_lse(lse[row]), minus_go_lp(-go_lp);
      const Vec go_ent(grad_entropy ? grad_entropy[row] : 0.0f);
      const Vec row_entropy(entropy ? entropy[row] : 0.0f);
      // grad wrt z' = go_lp * (onehot - p) + go_ent * p * (-log p - entropy)
      //             = -p * (go_lp + go_ent * (log p + entropy)) + go_lp * onehot, times dz'/dz.
      // log p is clamped at -1000 (exp underflows long before) so a -inf logit gives
      // 0 * finite, not 0 * inf = NaN. The onehot term is added after the vector pass.
      auto grad_of = [&](const Vec& z) {
        const Vec log_p = (z - shift) - row_lse;
        const Vec p = fast_exp(log_p);
        Vec grad = p * minus_go_lp;
        if (grad_entropy) {
          grad = grad - p * go_ent * (at::vec::maximum(log_p, log_p_floor) + row_entropy);
        }
        if (softcap) {
          const Vec tanh = z * tanh_per_z_vec;
          return grad * ((one - tanh * tanh) * inv_t);
        }
        return grad * inv_t;
      };
      for (int64_t start = 0; start < vocab_size; start += kBlock) {
        const int64_t n = std::min(kBlock, vocab_size - start);
        const float* z = load_block(src + start, n, transform, buf, nullptr);
        const bool has_target = grad_logprobs && target >= start && target < start + n;
        // Read before the block is overwritten: z and the output may be the same memory.
        const float target_dz = has_target ? dz_scalar(z[target - start]) : 0.0f;
        // fp32 gradients go straight to their place; others through buf, then one conversion.
        float* out = nullptr;
        if constexpr (kFloatOut) {
          out = dst + start;
        } else {
          out = buf;
        }
        int64_t j = 0;
        for (; j + step <= n; j += step) {
          grad_of(Vec::loadu(z + j)).store(out + j);
        }
        if (j < n) {
          grad_of(Vec::loadu(z + j, n - j)).store(out + j, n - j);
        }
        if (has_target) {
          out[target - start] += go_lp * target_dz;
        }
        if constexpr (!kFloatOut) {
          store_block(buf, n, dst + start);
        }
      }
    }
  });
}

}  // namespace

at::Tensor softmax_stats(const at::Tensor& x, const LayoutArg& layout_arg, int64_t n_rows,
                         const at::Tensor& targets, int64_t target_offset,
                         std::optional<int64_t> skip_index, double inv_temperature,
                         std::optional<double> softcap, bool want_entropy) {
  const RowLayout layout = checked_layout(x, layout_arg, n_rows, "logits");
  check_row_vector(targets, n_rows, at::kLong, "targets");
  const TargetSpec spec{target_offset, skip_index.has_value(), skip_index.value_or(0)};
  const Transform transform = checked_transform(inv_temperature, softcap);
  at::Tensor out = at::empty({4, n_rows}, x.options().dtype(at::kFloat));
  dispatch_float(x.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = decltype(tag);
    auto run = want_entropy ? stats_rows<scalar_t, true> : stats_rows<scalar_t, false>;
    run(x.const_data_ptr<scalar_t>(), layout, n_rows, x.size(-1),
        targets.const_data_ptr<int64_t>(), spec, transform, out.mutable_data_ptr<float>());
  });
  return out;
}

void logprobs_grad(const at::Tensor& x, const LayoutArg& layout_arg, int64_t n_rows,
                   const at::Tensor& grad_out, const LayoutArg& grad_layout_arg,
                   const at::Tensor& targets, int64_t target_offset,
                   std::optional<int64_t> skip_index, double inv_temperature,
                   std::optional<double> softcap, const std::optional<at::Tensor>& row_max,
                   const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                   const std::optional<at::Tensor>& grad_logprobs,
                   const std::optional<at::Tensor>& grad_entropy) {
  const RowLayout layout = checked_layout(x, layout_arg, n_rows, "logits");
  const RowLayout grad_layout = checked_layout(grad_out, grad_layout_arg, n_rows, "grad_out");
  TORCH_CHECK(grad_out.size(-1) == x.size(-1) && grad_out.scalar_type() == x.scalar_type(),
              "grad_out must have the logits' vocabulary size and dtype");
  check_row_vector(targets, n_rows, at::kLong, "targets");
  check_row_vector(lse, n_rows, at::kFloat, "lse");
  if (row_max) check_row_vector(*row_max, n_rows, at::kFloat, "row_max");
  TORCH_CHECK(grad_logprobs || grad_entropy, "logprobs_grad needs grad_logprobs or grad_entropy");
  if (grad_logprobs) check_row_vector(*grad_logprobs, n_rows, at::kFloat, "grad_logprobs");
  if (grad_entropy) {
    TORCH_CHECK(entropy.has_value(), "grad_entropy needs the forward's entropy");
    check_row_vector(*grad_entropy, n_rows, at::kFloat, "grad_entropy");
    check_row_vector(*entropy, n_rows, at::kFloat, "entropy");
  }
  const TargetSpec spec{target_offset, skip_index.has_value(), skip_index.value_or(0)};
  const Transform transform = checked_transform(inv_temperature, softcap);
  auto ptr = [](const std::optional<at::Tensor>& t) {
    return t ? t->const_data_ptr<float>() : nullptr;
  };
  dispatch_float(x.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = decltype(tag);
    grad_rows(x.const_data_ptr<scalar_t>(), layout, grad_out.mutable_data_ptr<scalar_t>(),
              grad_layout, n_rows, x.size(-1), targets.const_data_ptr<int64_t>(), spec,
              transform, ptr(row_max), lse.const_data_ptr<float>(), ptr(entropy),
              ptr(grad_logprobs), ptr(grad_entropy));
  });
}

}  // namespace fastalign
