// Entry points of the native CPU kernels (bound to Python in bindings.cpp). Each checks its
// arguments with TORCH_CHECK, so a wrong call from Python raises instead of reading out of
// bounds. Layouts are (n_inner, stride_outer, stride_inner) as in fastalign/_layout.py.
#pragma once

#include "rows.h"

namespace fastalign {

// [4, n_rows] float32: row max of the keys softcap(z) (z without a softcap), sum exp(s) and
// sum exp(s) s with s = (key - max) / T (the latter only when want_entropy, else 0), and the key
// at column targets[row] - target_offset (0 when that column is outside the row). Rows whose target is skip_index are not read: (0, 1, 0, 0).
// row_inv_temperature: 1 / T per row (float32 [n_rows]) instead of inv_temperature. With
// support_max (each row's max key, from a first pass) the sums run over the sampler's support
// only (fastalign/ops/_sampler.py: raw logit >= kth[row], (key - max) / T >= log_min_p; each
// bound optional), relative to that max, and a target outside it reads as -inf.
at::Tensor softmax_stats(const at::Tensor& x, const LayoutArg& layout, int64_t n_rows,
                         const at::Tensor& targets, int64_t target_offset,
                         std::optional<int64_t> skip_index, double inv_temperature,
                         std::optional<double> softcap, bool want_entropy,
                         const std::optional<at::Tensor>& row_inv_temperature,
                         const std::optional<at::Tensor>& support_max,
                         const std::optional<at::Tensor>& kth, std::optional<double> log_min_p);

// Writes d(sum go_lp * logprob + go_ent * entropy)/dz into grad_out (may be x itself), from the
// forward's per-row statistics (and entropy): log p = (key - row_max) / T - lse with
// key = softcap(z) (rows.h's VecTransform), lse then the log-sum relative to row_max; without
// row_max, log p = z' - lse. Rows whose target is skip_index get 0. row_inv_temperature as in
// softmax_stats; with support (row_max given, lse the kept log-sum) p is 0 off the sampler's
// support (kth, log_min_p as in softmax_stats), and so is the gradient there.
void logprobs_grad(const at::Tensor& x, const LayoutArg& layout, int64_t n_rows,
                   const at::Tensor& grad_out, const LayoutArg& grad_layout,
                   const at::Tensor& targets, int64_t target_offset,
                   std::optional<int64_t> skip_index, double inv_temperature,
                   std::optional<double> softcap, const std::optional<at::Tensor>& row_max,
                   const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                   const std::optional<at::Tensor>& grad_logprobs,
                   const std::optional<at::Tensor>& grad_entropy,
                   const std::optional<at::Tensor>& row_inv_temperature, bool support,
                   const std::optional<at::Tensor>& kth, std::optional<double> log_min_p);

// The math of a divergence call, as Python passes a kernels/divergence_interface.py
// DivergenceSpec: (mode, beta, inv_temperature, softcap, teacher_softcap).
using SpecArg = std::tuple<int64_t, double, double, std::optional<double>, std::optional<double>>;

// [6, n_rows] float32 first-pass statistics of student and teacher rows, as kernels/divergence.py's
// divergence_partials (rows: kernels/divergence_interface.py); rows with mask false give
// statistics that merge to 0. With top1 (int64 [2, n_rows], float32 logits only), each side's
// argmax of its raw logits is written there in the same pass (torch.argmax's; masked rows -1).
at::Tensor divergence_stats(const at::Tensor& logits, const LayoutArg& layout,
                            const at::Tensor& teacher_logits, const LayoutArg& teacher_layout,
                            int64_t n_rows, const std::optional<at::Tensor>& mask,
                            const SpecArg& spec, bool want_entropy,
                            const std::optional<at::Tensor>& top1);

// [2, n_rows] float32: the JSD's second-pass sums (sum q log(q / m), sum p log(p / m)) from the
// merged [n_rows, 6] statistics; masked rows 0.
at::Tensor divergence_mixture(const at::Tensor& logits, const LayoutArg& layout,
                              const at::Tensor& teacher_logits, const LayoutArg& teacher_layout,
                              int64_t n_rows, const std::optional<at::Tensor>& mask,
                              const at::Tensor& stats, const SpecArg& spec);

// The JSD's second pass (as divergence_mixture, whose [2, n_rows] sums it returns) and the
// gradient of go_div * divergence w.r.t. the logits (jsd_grad.cpp): whole rows of float32
// logits, which the gradient overwrites; teacher_logits is overwritten with scratch values.
at::Tensor divergence_mixture_grad(const at::Tensor& logits, const LayoutArg& layout,
                                   const at::Tensor& teacher_logits,
                                   const LayoutArg& teacher_layout, int64_t n_rows,
                                   const std::optional<at::Tensor>& mask, const at::Tensor& stats,
                                   const at::Tensor& grad_divergence, const SpecArg& spec);

// Writes d(go_div * divergence + go_ent * entropy)/dlogits into grad_out (the logits' dtype; may
// be the logits themselves) from the merged [n_rows, 6] statistics; either upstream gradient
// may be absent; masked rows get 0.
void divergence_grad(const at::Tensor& logits, const LayoutArg& layout,
                     const at::Tensor& teacher_logits, const LayoutArg& teacher_layout,
                     int64_t n_rows, const std::optional<at::Tensor>& mask,
                     const at::Tensor& stats, const std::optional<at::Tensor>& grad_divergence,
                     const std::optional<at::Tensor>& grad_entropy, const at::Tensor& grad_out,
                     const LayoutArg& grad_layout, const SpecArg& spec);

// A contiguous CPU tensor for a gradient: from at::empty below 32 MiB, else from a huge-page
// block that (with reuse) is kept when the tensor is freed and handed to the next gradient of
// a fitting size (buffers.cpp says why).
at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype, bool reuse);

// Frees the kept gradient block; returns its bytes (0 when none was kept).
int64_t release_gradient_buffers();

// Bytes of the kept gradient block (0 when none).
int64_t kept_gradient_bytes();

}  // namespace fastalign
