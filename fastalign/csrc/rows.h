// Shared pieces of the native CPU kernels: how rows are addressed, how vectors of a row are
// loaded (upcast, soft-capped, scaled) and stored in any input dtype, and the exp they all use.
//
// Every kernel walks one row at a time and reads it from memory once per pass, whatever its
// dtype. logprobs.cpp converts and transforms pairs of vectors in registers (VecTransform,
// load_pair_any / store_pair_any); divergence.cpp still brings each block of kBlock columns into
// a small L1-resident fp32 buffer first (load_block / store_block). Vector code is ATen's
// Vectorized<float> plus AVX2 intrinsics where the build enables them (fastalign/_native.py).
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
// The entropy gradient clamps log p here (exp underflows long before), so that a -inf logit gives
// 0 * finite, not 0 * inf = NaN (the same constant: kernels/_math.py, fastalign/ops/_tiles.py).
constexpr float kLogPFloor = -1000.0f;

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
  // A one-column row reads one element: its stride does not matter (and torch's contiguous()
  // keeps any stride on a size-1 dim, so a [..., ::2] slice of V = 2 arrives with stride 2).
  TORCH_CHECK(x.dim() >= 1 && (x.stride(-1) == 1 || x.size(-1) == 1), name,
              " needs a unit stride in its last dim");
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

inline float first_lane(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  return lanes[0];
}

// Which transform a call applies, fixed per call: the inner loops are instantiated per kind
// so that they carry no branch on it (and no reload of its constants after each store).
enum class Kind { kIdentity, kScale, kSoftcap };

template <Kind kKind>
using KindTag = std::integral_constant<Kind, kKind>;

// Calls f(KindTag<kind>{}) for the kind of `t`.
template <typename F>
inline void dispatch_kind(const Transform& t, F&& f) {
  if (t.has_softcap()) {
    f(KindTag<Kind::kSoftcap>{});
  } else if (t.inv_temperature != 1.0f) {
    f(KindTag<Kind::kScale>{});
  } else {
    f(KindTag<Kind::kIdentity>{});
  }
}

// v rounded to float32 here, as an opaque value. GCC contracts a * b - c into one fused
// multiply-add by default (-ffp-contract=fast): a soft-capped key tanh(z / s) * s could then be
// rounded where a max is taken and fused into the subtraction of that max elsewhere, and the
// difference of the two, one rounding of the key, becomes anything once 1 / T (up to 8.5e37)
// scales it. Through this barrier every pass sees the same key.
inline Vec rounded(Vec v) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  __asm__("" : "+x"(r));
  return Vec(r);
#else
  __asm__("" : "+m"(v));
  return v;
#endif
}

// The logits transform on vectors, its constants held in registers, split in two so that no
// z' = softcap(z) / T is ever formed: operator() gives the key softcap(z) (z itself without a
// softcap), maxes are taken of keys, and shifted() scales a difference of keys by 1 / T. A
// large |z| then loses nothing before the subtraction cancels it (key - max is exact near the
// max), and a tiny T cannot overflow a finite logit.
template <Kind kKind>
struct VecTransform {
  Vec inv_softcap;
  Vec softcap;
  Vec inv_t;
  float inv_temperature;

  explicit VecTransform(const Transform& t)
      : inv_softcap(t.has_softcap() ? 1.0f / t.softcap : 0.0f),
        softcap(t.softcap),
        inv_t(t.inv_temperature),
        inv_temperature(t.inv_temperature) {}

  Vec operator()(const Vec& z) const {
    if constexpr (kKind == Kind::kSoftcap) {
      // softcap(-inf) = -s, finite, as in torch.
      return rounded((z * inv_softcap).tanh() * softcap);
    } else {
      return z;
    }
  }

  // (key - reference) / T.
  Vec shifted(const Vec& key, const Vec& reference) const {
    if constexpr (kKind == Kind::kIdentity) {
      return key - reference;
    } else {
      return (key - reference) * inv_t;
    }
  }

  // The key of one value (lane 0 of a broadcast), so a column computed alone (the target)
  // agrees bit for bit with the vector loops.
  float scalar(float z) const { return first_lane((*this)(Vec(z))); }
};

// Pairs of vectors (kPair = 2 * Vec::size() columns) in and out of any input dtype, converted
// in registers: a bf16/fp16 pair is one 256-bit load or store.
constexpr int64_t kPair = 2 * Vec::size();

inline void load_pair(const float* src, Vec& a, Vec& b) {
  a = Vec::loadu(src);
  b = Vec::loadu(src + Vec::size());
}
template <typename scalar_t>
inline void load_pair(const scalar_t* src, Vec& a, Vec& b) {
  at::vec::load_to_float<scalar_t>(src, a, b);
}

inline void store_pair(const Vec& a, const Vec& b, float* dst) {
  a.store(dst);
  b.store(dst + Vec::size());
}
template <typename scalar_t>
inline void store_pair(const Vec& a, const Vec& b, scalar_t* dst) {
  at::vec::convert_from_float<scalar_t>(a, b).store(dst);  // round to nearest even, as .to()
}

// A pair in any column order: a reduction does not care, and a gradient written back with
// store_pair_any lands in place. For bf16 the order is even columns, odd columns: a bf16 is the
// top half of its fp32, so a 256-bit load gives both vectors with one shift and one mask
// (three fewer operations than the in-order conversion); elsewhere it is load_pair.
template <typename scalar_t>
inline void load_pair_any(const scalar_t* src, Vec& a, Vec& b) {
  load_pair(src, a, b);
}
template <typename scalar_t>
inline void store_pair_any(const Vec& a, const Vec& b, scalar_t* dst) {
  store_pair(a, b, dst);
}
#if defined(CPU_CAPABILITY_AVX2)
template <>
inline void load_pair_any(const at::BFloat16* src, Vec& even, Vec& odd) {
  const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(both, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(both, _mm256_set1_epi32(0xFFFF0000)));
}

// fp32 -> bf16 bits in the top half of each lane, rounded to nearest even; NaN becomes the quiet
// NaN 0x7FC0 (rounding its bits could carry into the sign), as c10::BFloat16 does.
inline __m256i round_to_bf16_high(const Vec& x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 is_number = _mm256_cmp_ps(x, x, _CMP_ORD_Q);
  return _mm256_blendv_epi8(_mm256_set1_epi32(0x7FC00000), rounded, _mm256_castps_si256(is_number));
}

template <>
inline void store_pair_any(const Vec& even, const Vec& odd, at::BFloat16* dst) {
  const __m256i both = _mm256_or_si256(
      _mm256_srli_epi32(round_to_bf16_high(even), 16),
      _mm256_and_si256(round_to_bf16_high(odd), _mm256_set1_epi32(0xFFFF0000)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), both);
}
#endif

// The first `count` (< kPair) columns of src, `fill` in the other lanes.
template <typename scalar_t>
inline void load_pair_partial(const scalar_t* src, int64_t count, float fill, Vec& a, Vec& b) {
  alignas(64) float lanes[kPair];
  for (int64_t k = 0; k < kPair; ++k) {
    lanes[k] = k < count ? upcast(src[k]) : fill;
  }
  a = Vec::loadu(lanes);
  b = Vec::loadu(lanes + Vec::size());
}

template <typename scalar_t>
inline void store_pair_partial(const Vec& a, const Vec& b, int64_t count, scalar_t* dst) {
  alignas(64) float lanes[kPair];
  store_pair(a, b, lanes);
  for (int64_t k = 0; k < count; ++k) {
    dst[k] = static_cast<scalar_t>(lanes[k]);  // c10's float -> bf16/fp16 rounds to nearest even
  }
}

// Lanes at or past `count` of a pair (count < kPair) set to -inf, so max and exp sums ignore them.
inline void mask_pair_tail(int64_t count, Vec& a, Vec& b) {
  const Vec minus_inf(-INFINITY);
  a = Vec::set(minus_inf, a, std::min<int64_t>(count, Vec::size()));
  b = Vec::set(minus_inf, b, std::max<int64_t>(count - Vec::size(), 0));
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

// exp for the kernels, on the vector unit, for x <= 88 (every caller passes a difference from a
// max: at most kHeadroom). It is the inner loop's whole cost, so it is built for throughput:
//
//   exp(x) = 2^(k div 8) * 2^((k mod 8) / 8) * exp(r),  k = round(8 x / ln 2),  r = x - k ln2 / 8
//
// with |r| <= ln2 / 16: exp(r) by a cubic (least-squares coefficients, relative error 3e-8, under
// 2e-7 with rounding), 2^(j/8) from an 8-entry table held in a register (vpermps), 2^(k div 8)
// built in the exponent bits. k comes out of one fmadd with a magic bias: 1.5 * 2^23 + 1016
// rounds 8 x / ln 2 to an integer and leaves k + 1016 in the low mantissa bits, so those bits
// give the table index (mod 8) and the biased exponent (div 8) directly. x is first clamped to
// -88 with max(lo, x), an operand order that keeps NaN; there k + 1016 >= 0 and every x below
// -87.3 (so -inf) gets a zero exponent field: exactly 0, as a column with p = 0 must stay 0. NaN
// reaches the result through r, so a NaN log-sum-exp poisons its row as torch.exp would.
#if defined(CPU_CAPABILITY_AVX2)
// 2^(j/8) for j = 0..7.
inline Vec exp_table() {
  return _mm256_setr_ps(1.0f, 1.09050773f, 1.18920712f, 1.29683955f, 1.41421356f, 1.54221083f,
                        1.68179283f, 1.83400809f);
}

// c * exp(x) for the price of exp(x), given c * exp_table(): a row's constant factor (the
// gradient's -go) rides in the table instead of costing a multiply per vector.
inline Vec fast_exp_scaled(const Vec& x, const Vec& scaled_table) {
  const __m256 bias = _mm256_set1_ps(12582912.0f + 1016.0f);
  const __m256 clamped = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  const __m256 t = _mm256_fmadd_ps(clamped, _mm256_set1_ps(11.5415603271117073f), bias);
  const __m256 k = _mm256_sub_ps(t, bias);
  const __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(-0.0866433975699931636f), clamped);
  __m256 poly = _mm256_fmadd_ps(r, _mm256_set1_ps(0.16667383f), _mm256_set1_ps(0.50006518f));
  poly = _mm256_fmadd_ps(r, poly, _mm256_set1_ps(1.0f));
  poly = _mm256_fmadd_ps(r, poly, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_castps_si256(t);
  const __m256 eighths = _mm256_permutevar8x32_ps(scaled_table, bits);
  const __m256i exponent =
      _mm256_and_si256(_mm256_slli_epi32(bits, 20), _mm256_set1_epi32(0x7F800000));
  return _mm256_mul_ps(_mm256_mul_ps(poly, eighths), _mm256_castsi256_ps(exponent));
}

inline Vec fast_exp(const Vec& x) { return fast_exp_scaled(x, exp_table()); }
#else
// Without AVX2 (a build for another vector extension): ATen's portable vector ops on the same
// idea with 2^n instead of 2^(k/8) and a degree-5 polynomial (the coefficients of ATen's
// exp_u20, about 1e-6 relative error).
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

inline Vec exp_table() { return Vec(1.0f); }  // lane 0 carries the factor, as in the table above

inline Vec fast_exp_scaled(const Vec& x, const Vec& scaled_table) {
  return fast_exp(x) * Vec(first_lane(scaled_table));
}
#endif

}  // namespace fastalign
