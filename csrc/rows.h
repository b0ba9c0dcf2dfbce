// Shared pieces of the native CPU kernels: how rows are addressed, and how a block of a row is
// brought into an fp32 buffer (upcast, soft-capped, scaled) and written back.
//
// Every kernel walks one row at a time in blocks of kBlock columns: the block is upcast and
// transformed into a small fp32 buffer that stays in L1 (fp32 logits without a transform are
// used where they lie), then reduced (or turned into a gradient) from there. The logits are
// therefore read from memory once per pass, whatever their dtype,
// and the transcendental work (exp, tanh) runs on ATen's Vectorized<float> (AVX2 when the build
// enables it, see fastalign/_native.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fastalign {

using Vec = at::vec::Vectorized<float>;

// Columns per block: a few fp32 buffers of this size fit the 32 KiB L1 of a core.
constexpr int64_t kBlock = 2048;
// A finite stand-in for -inf as a running max: (old - new max) stays finite, never -inf - -inf.
constexpr float kFiniteMin = -FLT_MAX;

// Two-level row addressing (fastalign/_layout.py): row r starts at element
// (r / n_inner) * stride_outer + (r % n_inner) * stride_inner. int64 throughout: N * V passes
// 2^31 for real batches.
struct RowLayout {
  int64_t n_inner;
  int64_t stride_outer;
  int64_t stride_inner;

  int64_t offset(int64_t row) const {
    return (row / n_inner) * stride_outer + (row % n_inner) * stride_inner;
  }
};

// (n_inner, stride_outer, stride_inner), as Python passes a RowLayout.
using LayoutArg = std::tuple<int64_t, int64_t, int64_t>;

// The layout of a [..., V] CPU tensor, checked so that a wrong layout from Python fails here
// instead of reading out of bounds: unit vocabulary stride, whole outer blocks, every row
// inside the tensor's storage.
inline RowLayout checked_layout(const at::Tensor& x, const LayoutArg& arg, int64_t n_rows,
                                const char* name) {
  const auto [n_inner, stride_outer, stride_inner] = arg;
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1, name, " needs a unit stride in its last dim");
  TORCH_CHECK(n_rows == 0 || (n_inner > 0 && n_rows % n_inner == 0 && stride_outer >= 0 &&
                               stride_inner >= 0), name, ": bad row layout");
  if (n_rows > 0) {
    const int64_t last = (n_rows / n_inner - 1) * stride_outer + (n_inner - 1) * stride_inner;
    const int64_t available =
        static_cast<int64_t>(x.storage().nbytes() / x.element_size()) - x.storage_offset();
    TORCH_CHECK(last + x.size(-1) <= available, name, ": the row layout reaches past the storage");
  }
  return RowLayout{n_inner, stride_outer, stride_inner};
}

// A contiguous CPU vector of n_rows elements of `dtype`.
inline void check_row_vector(const at::Tensor& t, int64_t n_rows, at::ScalarType dtype,
                             const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
                  t.numel() == n_rows,
              name, " must be a contiguous CPU ", dtype, " tensor of ", n_rows, " elements");
}

// Calls f(scalar_t{}) for the input dtypes the kernels read: float32, bfloat16, float16.
template <typename F>
inline void dispatch_float(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, not ", dtype);
  }
}

// Which column of a row is its target: targets[row] - target_offset (a vocabulary slice of the
// fused-linear path starts at target_offset); rows whose target equals skip_index (when
// has_skip) are not read at all (ignore_index).
struct TargetSpec {
  int64_t target_offset;
  bool has_skip;
  int64_t skip_index;
};

// Rows handled per parallel task: about 32k elements, so tiny-V tiles still split sensibly.
inline int64_t row_grain(int64_t vocab_size) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab_size, 1));
}

// NaN-propagating max (a NaN logit must poison its row, as it does in torch).
inline float nan_max(float a, float b) {
  return (std::isnan(a) || std::isnan(b)) ? NAN : std::max(a, b);
}

inline float upcast(float x) { return x; }
inline float upcast(at::BFloat16 x) { return static_cast<float>(x); }
inline float upcast(at::Half x) { return static_cast<float>(x); }

inline Vec load_vec(const float* src) { return Vec::loadu(src); }
template <typename scalar_t>
inline Vec load_vec(const scalar_t* src) {
  Vec out;
  at::vec::load_to_float<scalar_t>(src, out);
  return out;
}

// The logits transform z' = softcap(z) / T (softcap <= 0 means none).
struct Transform {
  float inv_temperature;
  float softcap;

  bool has_softcap() const { return softcap > 0.0f; }
};

inline Transform checked_transform(double inv_temperature, std::optional<double> softcap) {
  TORCH_CHECK(inv_temperature > 0.0, "inv_temperature must be positive");
  TORCH_CHECK(!softcap || *softcap > 0.0, "softcap must be positive or None");
  return Transform{static_cast<float>(inv_temperature),
                   softcap ? static_cast<float>(*softcap) : 0.0f};
}

inline Vec apply(const Transform& t, const Vec& z) {
  if (t.has_softcap()) {
    // softcap(-inf) = -s: a -inf logit becomes finite here, as in torch.
    return (z * Vec(1.0f / t.softcap)).tanh() * Vec(t.softcap * t.inv_temperature);
  }
  return t.inv_temperature != 1.0f ? z * Vec(t.inv_temperature) : z;
}

// The last, partial vector of a block: its first `count` elements, -inf in the other lanes (so
// that max and sums over whole vectors ignore them).
inline Vec load_tail(const float* src, int64_t count) {
  return Vec::set(Vec(-INFINITY), Vec::loadu(src, count), count);
}

inline Vec nan_maximum(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }

inline float reduce_max(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float out = -INFINITY;
  for (float lane : lanes) {
    out = nan_max(out, lane);
  }
  return out;
}

inline float horizontal_sum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float out = 0.0f;
  for (float lane : lanes) {
    out += lane;
  }
  return out;
}

// z' of columns [0, n) of a row block, in fp32, and (when block_max is given) their max, NaN if
// any is NaN. fp32 logits without temperature or softcap are used where they lie (no copy);
// anything else is upcast and transformed into `buf` (kBlock floats, L1-resident) in the same
// pass that finds the max.
template <typename scalar_t>
inline const float* load_block(const scalar_t* src, int64_t n, const Transform& t, float* buf,
                               float* block_max) {
  const int64_t step = Vec::size();
  Vec max_a(-INFINITY), max_b(-INFINITY);
  const float* out = buf;
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!t.has_softcap() && t.inv_temperature == 1.0f) {
      if (block_max == nullptr) {
        return src;
      }
      for (; j + 2 * step <= n; j += 2 * step) {
        max_a = nan_maximum(max_a, Vec::loadu(src + j));
        max_b = nan_maximum(max_b, Vec::loadu(src + j + step));
      }
      for (; j + step <= n; j += step) {
        max_a = nan_maximum(max_a, Vec::loadu(src + j));
      }
      if (j < n) {
        max_b = nan_maximum(max_b, load_tail(src + j, n - j));
      }
      *block_max = reduce_max(nan_maximum(max_a, max_b));
      return src;
    }
  }
  for (; j + step <= n; j += step) {
    const Vec z = apply(t, load_vec(src + j));
    z.store(buf + j);
    max_a = nan_maximum(max_a, z);
  }
  if (j < n) {
    alignas(64) float tail[Vec::size()] = {};
    for (int64_t k = 0; k < n - j; ++k) {
      tail[k] = upcast(src[j + k]);
    }
    const Vec z = apply(t, Vec::loadu(tail));
    z.store(buf + j, n - j);
    max_b = Vec::set(Vec(-INFINITY), z, n - j);
  }
  if (block_max != nullptr) {
    *block_max = reduce_max(nan_maximum(max_a, max_b));
  }
  return out;
}

// Stores buf[0:n] as scalar_t (round-to-nearest-even, like torch's .to()).
template <typename scalar_t>
inline void store_block(const float* buf, int64_t n, scalar_t* dst) {
  at::vec::convert(buf, dst, n);
}

template <typename scalar_t>
inline void store_zeros(int64_t n, scalar_t* dst) {
  std::fill(dst, dst + n, static_cast<scalar_t>(0.0f));
}

// exp for the kernels, on the vector unit: exp(x) = 2^n exp(f) with n = round(x / ln 2) and
// f = x - n ln 2 in [-ln2/2, ln2/2], exp(f) by a degree-5 polynomial (the coefficients of ATen's
// exp_u20; about 1e-6 relative error, far below the fp32 contract). 2^n is built in the
// exponent bits, with n <= -127 giving +0.0: -inf and anything below about -87.9 map to exactly
// 0 (a column with p = 0 must stay 0). x is clamped to [-88.5, 88] with max(lo, x) / min(hi, x),
// an operand order that keeps NaN, and NaN reaches the result through f: a NaN log-sum-exp
// poisons its row as torch.exp would. Cheaper than exp_u20 plus a NaN fix-up by about a third.
inline Vec fast_exp(const Vec& x) {
  using IntVec = at::vec::Vectorized<int32_t>;
  const Vec clamped = at::vec::clamp_max(at::vec::clamp_min(x, Vec(-88.5f)), Vec(88.0f));
  const Vec n = (clamped * Vec(1.44269504088896341f)).round();
  const Vec f = at::vec::fmadd(n, Vec(-0.693147180559945309f), clamped);
  Vec poly = at::vec::fmadd(f, Vec(0.00828929059f), Vec(0.0418978221f));
  poly = at::vec::fmadd(f, poly, Vec(0.166676521f));
  poly = at::vec::fmadd(f, poly, Vec(0.499991506f));
  poly = at::vec::fmadd(f, poly, Vec(0.999999701f));
  poly = at::vec::fmadd(f, poly, Vec(1.0f));
  const IntVec exponent = at::vec::maximum(at::vec::convert_to_int_of_same_size(n), IntVec(-127));
  const IntVec bits = (exponent + IntVec(127)) << IntVec(23);
  return poly * at::vec::cast<float>(bits);
}

}  // namespace fastalign
