// Python bindings of the native CPU kernels (built just in time by fastalign/_native.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastalign native CPU kernels: per-row softmax statistics, log-prob/entropy "
            "gradients and exact divergences (KL, JSD), vectorized and parallel over rows";
  using namespace pybind11::literals;
  m.def("softmax_stats", &fastalign::softmax_stats, "x"_a, "layout"_a, "n_rows"_a, "targets"_a,
        "target_offset"_a, "skip_index"_a, "inv_temperature"_a, "softcap"_a, "want_entropy"_a,
        "row_inv_temperature"_a = py::none(), "support_max"_a = py::none(), "kth"_a = py::none(),
        "log_min_p"_a = py::none());
  m.def("logprobs_grad", &fastalign::logprobs_grad, "x"_a, "layout"_a, "n_rows"_a,
        "grad_out"_a, "grad_layout"_a, "targets"_a, "target_offset"_a, "skip_index"_a,
        "inv_temperature"_a, "softcap"_a, "row_max"_a, "lse"_a, "entropy"_a, "grad_logprobs"_a,
        "grad_entropy"_a, "row_inv_temperature"_a = py::none(), "support"_a = false,
        "kth"_a = py::none(), "log_min_p"_a = py::none());
  m.def("divergence_stats", &fastalign::divergence_stats, "logits"_a, "layout"_a,
        "teacher_logits"_a, "teacher_layout"_a, "n_rows"_a, "mask"_a, "spec"_a,
        "want_entropy"_a, "top1"_a = py::none());
  m.def("divergence_mixture", &fastalign::divergence_mixture, "logits"_a, "layout"_a,
        "teacher_logits"_a, "teacher_layout"_a, "n_rows"_a, "mask"_a, "stats"_a, "spec"_a);
  m.def("divergence_mixture_grad", &fastalign::divergence_mixture_grad, "logits"_a, "layout"_a,
        "teacher_logits"_a, "teacher_layout"_a, "n_rows"_a, "mask"_a, "stats"_a,
        "grad_divergence"_a, "spec"_a);
  m.def("divergence_grad", &fastalign::divergence_grad, "logits"_a, "layout"_a,
        "teacher_logits"_a, "teacher_layout"_a, "n_rows"_a, "mask"_a, "stats"_a,
        "grad_divergence"_a, "grad_entropy"_a, "grad_out"_a, "grad_layout"_a, "spec"_a);
  m.def("empty_gradient", &fastalign::empty_gradient, "sizes"_a, "dtype"_a, "reuse"_a);
  m.def("release_gradient_buffers", &fastalign::release_gradient_buffers);
  m.def("kept_gradient_bytes", &fastalign::kept_gradient_bytes);
}
