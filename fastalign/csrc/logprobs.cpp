// Per-row softmax statistics (forward) and the log-prob/entropy gradient (backward) over the
// columns of a [rows, V] tensor: the native CPU twins of kernels/token_logprobs.py and of the
// reduction half of kernels/linear_logprobs.py.
//
// Forward, per row, one pass over memory with an online log-sum-exp in blocks of kBlock columns.
// Each block is read once, converted and transformed in registers: its exps are taken relative
// to the running max while its own max is found in the same pass. Only when a block's max
// exceeds the running max by more than kHeadroom (the first block, a NaN, logits that climb
// steeply along the row) is the block redone, from cache, relative to its own max. Maxes are of
// keys (softcap(z), before the temperature: VecTransform in rows.h), exps of (key - max) / T.
// It returns the row's statistics; fastalign/ops/token_logprobs_native.py turns them into
// log-probs, entropy and the (max, log-sum) pair kept for backward.
//
// Backward writes d(go_lp * logprob + go_ent * entropy)/dz in one pass from the saved max and
// log-sum (log p = (key - max) / T - log_sum; never z' - lse, which rounds at |lse|),
// converting in registers to the output's dtype; the output may be the logits themselves (in
// place).
//
// The sampler's support (fastalign/ops/_sampler.py: top_k, min_p) runs the forward again with
// each row's max known: SupportBlock turns the keys of removed columns into -inf as it loads
// them (so the same online sums count kept columns only), and the backward writes 0 there.
// A per-row temperature (row_inv_temperature) gives each row its own VecTransform.
#include "kernels.h"

namespace fastalign {
namespace {

// How far above the running max (in z' = key / T) a block's logits may lie and still have their
// exps taken relative to it: exp(60) * V stays far below FLT_MAX, and fast_exp is exact up to 88.
constexpr float kHeadroom = 60.0f;

// The columns [0, n) of a row block, read a pair of vectors at a time and turned into keys in
// registers by `key`; the lanes past n of the last pair are -inf. Both readers below share it.
template <typename scalar_t, typename Key, typename F>
inline void for_each_key_pair(const scalar_t* src, int64_t n, const Key& key, F&& f) {
  Vec a, b;
  int64_t j = 0;
  for (; j + kPair <= n; j += kPair) {
    load_pair_any(src + j, a, b);  // any order: every caller reduces
    f(key(a), key(b));
  }
  if (j < n) {
    load_pair_partial(src + j, n - j, 0.0f, a, b);
    a = key(a);
    b = key(b);
    mask_pair_tail(n - j, a, b);
    f(a, b);
  }
}

// The max key of a block reader (RowBlock, SupportBlock).
template <typename Block>
float block_max(const Block& block) {
  Vec max_a(-INFINITY), max_b(-INFINITY);
  block.for_each_pair([&](const Vec& a, const Vec& b) {
    max_a = nan_maximum(max_a, a);
    max_b = nan_maximum(max_b, b);
  });
  return reduce_max(nan_maximum(max_a, max_b));
}

// The columns [0, n) of one row block as keys (the row's transform of each logit).
template <typename scalar_t, Kind kKind>
struct RowBlock {
  const scalar_t* src;
  int64_t n;
  const VecTransform<kKind>& transform;

  template <typename F>
  void for_each_pair(F&& f) const {
    for_each_key_pair(src, n, transform, f);
  }

  float max() const { return block_max(*this); }
};

// The sampler's support of one row: a column is kept when its raw logit z >= kth (top-k, ties
// kept) and (key - max) / T >= log_min_p (min-p), the same difference the sums take. -inf
// stands for "no bound" (every number passes).
struct RowSupport {
  Vec kth;
  Vec max;
  Vec log_min_p;

  template <Kind kKind>
  Vec kept(const VecTransform<kKind>& transform, const Vec& z, const Vec& key) const {
    return (z >= kth) & (transform.shifted(key, max) >= log_min_p);
  }

  // One column (the target), bit for bit as the vector loops decide it.
  template <Kind kKind>
  bool kept_scalar(const VecTransform<kKind>& transform, float z) const {
    const Vec zv(z);
    return first_lane(kept(transform, zv, transform(zv))) != 0.0f;  // all-ones bits: NaN
  }
};

// A RowBlock whose removed columns read as -inf keys (p = 0 in every sum).
template <typename scalar_t, Kind kKind>
struct SupportBlock {
  const scalar_t* src;
  int64_t n;
  const VecTransform<kKind>& transform;
  const RowSupport& support;

  Vec key(const Vec& z) const {
    const Vec k = transform(z);
    return Vec::blendv(Vec(-INFINITY), k, support.kept(transform, z, k));
  }

  template <typename F>
  void for_each_pair(F&& f) const {
    for_each_key_pair(src, n, [this](const Vec& z) { return key(z); }, f);
  }

  float max() const { return block_max(*this); }
};

// The per-call transform with row `row`'s own 1 / T when the call gives one per row.
inline Transform row_transform(const Transform& t, const float* row_inv_t, int64_t row) {
  return row_inv_t ? Transform{row_inv_t[row], t.softcap} : t;
}

struct RowStats {
  float max = kFiniteMin;    // running max of the keys
  float sum_exp = 0.0f;      // sum exp(s), s = (key - max) / T
  float sum_shifted = 0.0f;  // sum exp(s) * s, for the entropy
  float target = 0.0f;       // the key at the target column, 0 when it is not in this row

  // Re-expresses the sums relative to a larger max (or poisons them with a NaN one):
  // exp(s + d) (s + d) = e^d exp(s) s + (e^d d) exp(s) with d = (old - new max) / T. d is
  // clamped to the most negative float (maxes at opposite ends of the range overflow to -inf):
  // then e^d d = 0 * finite = 0, where -inf would give 0 * -inf = NaN. NaN stays NaN.
  void raise_max(float new_max, float inv_temperature) {
    const float delta = std::max((max - new_max) * inv_temperature, kFiniteMin);
    const float rescale = std::exp(delta);
    sum_shifted = rescale * sum_shifted + (rescale * delta) * sum_exp;
    sum_exp *= rescale;
    max = new_max;
  }

  // sum exp((key - reference) / T) (and its weighted twin) over a block, and the block's max
  // key when kTrackMax.
  template <bool kEntropy, bool kTrackMax, typename Block>
  static void block_sums(const Block& block, float reference, float& sum, float& weighted,
                         float& block_max) {
    const Vec ref(reference), finite_min(kFiniteMin);
    Vec sum_a(0.0f), sum_b(0.0f), weighted_a(0.0f), weighted_b(0.0f);
    Vec max_a(-INFINITY), max_b(-INFINITY);
    // Two independent chains per pair: one would be bound by the exp's latency.
    auto add = [&](const Vec& z, Vec& acc, Vec& acc_weighted, Vec& acc_max) {
      if constexpr (kTrackMax) {
        acc_max = nan_maximum(acc_max, z);
      }
      const Vec s = block.transform.shifted(z, ref);
      const Vec e = fast_exp(s);
      acc = acc + e;
      if constexpr (kEntropy) {
        // -inf logits: clamp s so that their term is 0 * finite, not 0 * -inf = NaN.
        acc_weighted = at::vec::fmadd(e, at::vec::maximum(s, finite_min), acc_weighted);
      }
    };
    block.for_each_pair([&](const Vec& a, const Vec& b) {
      add(a, sum_a, weighted_a, max_a);
      add(b, sum_b, weighted_b, max_b);
    });
    sum = horizontal_sum(sum_a + sum_b);
    weighted = kEntropy ? horizontal_sum(weighted_a + weighted_b) : 0.0f;
    if constexpr (kTrackMax) {
      block_max = reduce_max(nan_maximum(max_a, max_b));
    }
  }

  // Folds a block in with its max known: the sums move to it if it is larger, then one pass.
  template <bool kEntropy, typename Block>
  void add_block_at_max(const Block& block, float block_max) {
    if (!(block_max <= max)) {  // grows, or NaN: NaN then poisons the row
      raise_max(block_max, block.transform.inv_temperature);
    }
    float sum, weighted, unused;
    block_sums<kEntropy, false>(block, max, sum, weighted, unused);
    sum_exp += sum;
    sum_shifted += weighted;
  }

  template <bool kEntropy, typename Block>
  void add_block(const Block& block) {
    if (max == kFiniteMin) {  // nothing finite seen yet: no reference for a one-pass block
      add_block_at_max<kEntropy>(block, block.max());
      return;
    }
    float sum, weighted, block_max;
    block_sums<kEntropy, true>(block, max, sum, weighted, block_max);
    const float inv_temperature = block.transform.inv_temperature;
    // Exps past the headroom (or a NaN, or a difference that overflows): redo.
    if (!((block_max - max) * inv_temperature <= kHeadroom)) {
      add_block_at_max<kEntropy>(block, block_max);
      return;
    }
    sum_exp += sum;
    sum_shifted += weighted;
    if (block_max > max) {
      raise_max(block_max, inv_temperature);
    }
  }
};

// The sampler's arguments of a call (nullptr / -inf where absent): each row's max key, k-th
// largest raw logit and log(min_p).
struct SupportArgs {
  const float* max;
  const float* kth;
  float log_min_p;

  RowSupport row(int64_t r) const {
    return RowSupport{Vec(kth ? kth[r] : -INFINITY), Vec(max ? max[r] : 0.0f), Vec(log_min_p)};
  }
};

template <typename scalar_t, Kind kKind, bool kEntropy, bool kSupport>
void stats_rows(const scalar_t* base, const RowLayout& layout, int64_t n_rows,
                int64_t vocab_size, const int64_t* targets, const TargetSpec& spec,
                const Transform& transform_arg, const float* row_inv_t,
                const SupportArgs& support_args, float* out) {
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      RowStats stats;
      const int64_t target = targets[row] - spec.target_offset;
      if (spec.has_skip && targets[row] == spec.skip_index) {
        stats.max = 0.0f;
        stats.sum_exp = 1.0f;
      } else {
        const VecTransform<kKind> transform(row_transform(transform_arg, row_inv_t, row));
        const scalar_t* src = base + layout.offset(row);
        if constexpr (kSupport) {
          // Sums relative to the known max; a target outside the support reads as -inf.
          const RowSupport support = support_args.row(row);
          stats.max = support_args.max[row];
          if (target >= 0 && target < vocab_size) {
            const float z = upcast(src[target]);
            stats.target = support.kept_scalar(transform, z) ? transform.scalar(z) : -INFINITY;
          }
          for (int64_t start = 0; start < vocab_size; start += kBlock) {
            const SupportBlock<scalar_t, kKind> block{
                src + start, std::min(kBlock, vocab_size - start), transform, support};
            stats.add_block<kEntropy>(block);
          }
        } else {
          if (target >= 0 && target < vocab_size) {
            stats.target = transform.scalar(upcast(src[target]));
          }
          for (int64_t start = 0; start < vocab_size; start += kBlock) {
            const RowBlock<scalar_t, kKind> block{src + start,
                                                  std::min(kBlock, vocab_size - start), transform};
            stats.add_block<kEntropy>(block);
          }
        }
      }
      out[row] = stats.max;
      out[n_rows + row] = stats.sum_exp;
      out[2 * n_rows + row] = stats.sum_shifted;
      out[3 * n_rows + row] = stats.target;
    }
  });
}

// What the gradient needs of one row, as vectors: log p = (key - max) / T - log_sum (max 0 and
// log_sum = lse when the caller gives no max: then log p = z' - lse).
template <Kind kKind, bool kEntropyGrad>
struct RowGradient {
  const VecTransform<kKind>& transform;
  Vec shift, lse, minus_go_lp, go_ent, entropy;
  Vec minus_go_lp_table;  // -go_lp * exp_table(): fast_exp_scaled gives -go_lp * p directly

  // d/dz' = go_lp * (onehot - p) + go_ent * p * (-log p - entropy)
  //       = -p * (go_lp + go_ent * (log p + entropy)) + go_lp * onehot, times dz'/dz; the onehot
  // term is added by the caller. log p is clamped at kLogPFloor (rows.h).
  Vec operator()(const Vec& key) const {
    const Vec log_p = transform.shifted(key, shift) - lse;
    Vec grad;
    if constexpr (kEntropyGrad) {
      const Vec p = fast_exp(log_p);
      grad = p * minus_go_lp - p * go_ent * (at::vec::maximum(log_p, Vec(kLogPFloor)) + entropy);
    } else {
      grad = fast_exp_scaled(log_p, minus_go_lp_table);
    }
    if constexpr (kKind == Kind::kSoftcap) {
      // dz'/dz = (1 - tanh(z / s)^2) / T, and tanh(z / s) = key / s.
      const Vec tanh = key * transform.inv_softcap;
      return grad * ((Vec(1.0f) - tanh * tanh) * transform.inv_t);
    } else if constexpr (kKind == Kind::kScale) {
      return grad * transform.inv_t;
    } else {
      return grad;
    }
  }

  // dz'/dz of one column.
  float dz(float key) const {
    if constexpr (kKind == Kind::kSoftcap) {
      const Vec tanh = Vec(key) * transform.inv_softcap;
      return first_lane((Vec(1.0f) - tanh * tanh) * transform.inv_t);
    }
    return first_lane(transform.inv_t);
  }
};

template <typename scalar_t, Kind kKind, bool kEntropyGrad, bool kSupport>
void grad_rows(const scalar_t* base, const RowLayout& layout, scalar_t* grad_base,
               const RowLayout& grad_layout, int64_t n_rows, int64_t vocab_size,
               const int64_t* targets, const TargetSpec& spec, const Transform& transform_arg,
               const float* row_inv_t, const SupportArgs& support_args,
               const float* row_max, const float* lse, const float* entropy,
               const float* grad_logprobs, const float* grad_entropy) {
  at::parallel_for(0, n_rows, row_grain(vocab_size), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* dst = grad_base + grad_layout.offset(row);
      if (spec.has_skip && targets[row] == spec.skip_index) {
        store_zeros(vocab_size, dst);
        continue;
      }
      const VecTransform<kKind> transform(row_transform(transform_arg, row_inv_t, row));
      // The support's max is the row's max key, the gradient's shift (support_args.max unset).
      const RowSupport support =
          kSupport ? RowSupport{support_args.row(row).kth, Vec(row_max[row]),
                                Vec(support_args.log_min_p)}
                   : RowSupport{};
      // p = 0 off the support: the gradient there is 0.
      auto masked = [&](const Vec& grad, const Vec& z, const Vec& key) {
        if constexpr (kSupport) {
          return Vec::blendv(Vec(0.0f), grad, support.kept(transform, z, key));
        } else {
          return grad;
        }
      };
      const scalar_t* src = base + layout.offset(row);
      const float go_lp = grad_logprobs ? grad_logprobs[row] : 0.0f;
      const RowGradient<kKind, kEntropyGrad> gradient{
          transform, Vec(row_max ? row_max[row] : 0.0f), Vec(lse[row]), Vec(-go_lp),
          Vec(grad_entropy ? grad_entropy[row] : 0.0f), Vec(entropy ? entropy[row] : 0.0f),
          exp_table() * Vec(-go_lp)};
      // The target column is read before the row is overwritten (z and the output may be the
      // same memory), and written last with its onehot term added in fp32.
      const int64_t target = targets[row] - spec.target_offset;
      const bool has_target = grad_logprobs && target >= 0 && target < vocab_size;
      float target_grad = 0.0f;
      if (has_target) {
        const float raw = upcast(src[target]);
        const float z = transform.scalar(raw);
        // A removed target (its upstream gradient is 0 then) gets 0 like any removed column.
        if (!kSupport || support.kept_scalar(transform, raw)) {
          target_grad = first_lane(gradient(Vec(z))) + go_lp * gradient.dz(z);
        }
      }
      Vec a, b;
      int64_t j = 0;
      for (; j + kPair <= vocab_size; j += kPair) {
        load_pair_any(src + j, a, b);
        const Vec key_a = transform(a), key_b = transform(b);
        store_pair_any(masked(gradient(key_a), a, key_a), masked(gradient(key_b), b, key_b),
                       dst + j);
      }
      if (j < vocab_size) {
        load_pair_partial(src + j, vocab_size - j, 0.0f, a, b);
        const Vec key_a = transform(a), key_b = transform(b);
        store_pair_partial(masked(gradient(key_a), a, key_a), masked(gradient(key_b), b, key_b),
                           vocab_size - j, dst + j);
      }
      if (has_target) {
        dst[target] = static_cast<scalar_t>(target_grad);
      }
    }
  });
}

}  // namespace

namespace {

// 1 / T per row (a float32 vector of n_rows) or nullptr.
const float* checked_row_inv_temperature(const std::optional<at::Tensor>& t, int64_t n_rows) {
  if (!t) return nullptr;
  check_row_vector(*t, n_rows, at::kFloat, "row_inv_temperature");
  return t->const_data_ptr<float>();
}

// The kind of a call's transform: a per-row temperature scales every row (kScale at least).
Transform kind_of(Transform t, const float* row_inv_t) {
  if (row_inv_t && !t.has_softcap()) t.inv_temperature = 0.5f;  // anything but 1
  return t;
}

// The sampler's arguments, checked: kth (top-k) per row or none, log_min_p or none.
SupportArgs checked_support(const float* max, const std::optional<at::Tensor>& kth,
                            std::optional<double> log_min_p, int64_t n_rows) {
  if (kth) check_row_vector(*kth, n_rows, at::kFloat, "kth");
  TORCH_CHECK(!log_min_p || *log_min_p <= 0.0, "log_min_p must be <= 0 (min_p <= 1)");
  return SupportArgs{max, kth ? kth->const_data_ptr<float>() : nullptr,
                     log_min_p ? static_cast<float>(*log_min_p) : -INFINITY};
}

}  // namespace

at::Tensor softmax_stats(const at::Tensor& x, const LayoutArg& layout_arg, int64_t n_rows,
                         const at::Tensor& targets, int64_t target_offset,
                         std::optional<int64_t> skip_index, double inv_temperature,
                         std::optional<double> softcap, bool want_entropy,
                         const std::optional<at::Tensor>& row_inv_temperature,
                         const std::optional<at::Tensor>& support_max,
                         const std::optional<at::Tensor>& kth,
                         std::optional<double> log_min_p) {
  const RowLayout layout = checked_layout(x, layout_arg, n_rows, "logits");
  check_row_vector(targets, n_rows, at::kLong, "targets");
  const TargetSpec spec{target_offset, skip_index.has_value(), skip_index.value_or(0)};
  const Transform transform = checked_transform(inv_temperature, softcap);
  const float* row_inv_t = checked_row_inv_temperature(row_inv_temperature, n_rows);
  const bool support = support_max.has_value();
  TORCH_CHECK(support || (!kth && !log_min_p), "kth and log_min_p need support_max");
  if (support) check_row_vector(*support_max, n_rows, at::kFloat, "support_max");
  const SupportArgs support_args = checked_support(
      support ? support_max->const_data_ptr<float>() : nullptr, kth, log_min_p, n_rows);
  at::Tensor out = at::empty({4, n_rows}, x.options().dtype(at::kFloat));
  dispatch_float(x.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_kind(kind_of(transform, row_inv_t), [&](auto kind) {
      constexpr Kind kKind = decltype(kind)::value;
      auto run = want_entropy ? (support ? stats_rows<scalar_t, kKind, true, true>
                                         : stats_rows<scalar_t, kKind, true, false>)
                              : (support ? stats_rows<scalar_t, kKind, false, true>
                                         : stats_rows<scalar_t, kKind, false, false>);
      run(x.const_data_ptr<scalar_t>(), layout, n_rows, x.size(-1),
          targets.const_data_ptr<int64_t>(), spec, transform, row_inv_t, support_args,
          out.mutable_data_ptr<float>());
    });
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
                   const std::optional<at::Tensor>& grad_entropy,
                   const std::optional<at::Tensor>& row_inv_temperature,
                   bool support, const std::optional<at::Tensor>& kth,
                   std::optional<double> log_min_p) {
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
  TORCH_CHECK(!support || row_max.has_value(), "the sampler's support needs row_max");
  TORCH_CHECK(support || (!kth && !log_min_p), "kth and log_min_p need support=True");
  const TargetSpec spec{target_offset, skip_index.has_value(), skip_index.value_or(0)};
  const Transform transform = checked_transform(inv_temperature, softcap);
  const float* row_inv_t = checked_row_inv_temperature(row_inv_temperature, n_rows);
  auto ptr = [](const std::optional<at::Tensor>& t) {
    return t ? t->const_data_ptr<float>() : nullptr;
  };
  const SupportArgs support_args = checked_support(nullptr, kth, log_min_p, n_rows);
  dispatch_float(x.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_kind(kind_of(transform, row_inv_t), [&](auto kind) {
      constexpr Kind kKind = decltype(kind)::value;
      auto run = grad_entropy ? (support ? grad_rows<scalar_t, kKind, true, true>
                                         : grad_rows<scalar_t, kKind, true, false>)
                              : (support ? grad_rows<scalar_t, kKind, false, true>
                                         : grad_rows<scalar_t, kKind, false, false>);
      run(x.const_data_ptr<scalar_t>(), layout, grad_out.mutable_data_ptr<scalar_t>(),
          grad_layout, n_rows, x.size(-1), targets.const_data_ptr<int64_t>(), spec, transform,
          row_inv_t, support_args, ptr(row_max), lse.const_data_ptr<float>(), ptr(entropy),
          ptr(grad_logprobs), ptr(grad_entropy));
    });
  });
}

}  // namespace fastalign
