// Python bindings of the native CPU kernels (built just in time by fastalign/_native.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastalign native CPU kernels: per-row softmax statistics, log-prob/entropy "
            "gradients and exact KL, vectorized and parallel over rows";
  using namespace pybind11::literals;
  m.def("softmax_stats", &fastalign::softmax_stats, "x"_a, "layout"_a, "n_rows"_a, "targets"_a,
        "target_offset"_a, "skip_index"_a, "inv_temperature"_a, "softcap"_a, "want_entropy"_a);
  m.def("logprobs_grad", &fastalign::logprobs_grad, "x"_a, "layout"_a, "n_rows"_a,
        "grad_out"_a, "grad_layout"_a, "targets"_a, "target_offset"_a, "skip_index"_a,
        "inv_temperature"_a, "softcap"_a, "row_max"_a, "lse"_a, "entropy"_a, "grad_logprobs"_a,
        "grad_entropy"_a);
  m.def("kl_stats", &fastalign::kl_stats, "logits"_a, "layout"_a, "ref_logits"_a,
        "ref_layout"_a, "n_rows"_a, "mask"_a, "inv_temperature"_a);
  m.def("kl_grad", &fastalign::kl_grad, "logits"_a, "layout"_a, "ref_logits"_a, "ref_layout"_a,
        "n_rows"_a, "mask"_a, "stats"_a, "grad_kl"_a, "grad_out"_a, "grad_layout"_a,
        "inv_temperature"_a);
  m.def("empty_gradient", &fastalign::empty_gradient, "sizes"_a, "dtype"_a, "reuse"_a);
  m.def("release_gradient_buffers", &fastalign::release_gradient_buffers);
  m.def("kept_gradient_bytes", &fastalign::kept_gradient_bytes);
}
