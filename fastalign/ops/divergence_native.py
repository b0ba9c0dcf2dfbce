"""Native C++ backend of the divergence ops (``csrc/divergence.cpp``): the statistics and
gradient of ``fastalign.kernels.divergence`` in one vectorized pass per row (two for the JSD's
forward), parallel over rows; for the fused loss the JSD's second pass and its gradient in one
(``csrc/jsd_grad.cpp``). Same launcher signatures."""

from __future__ import annotations

from .._native import extension


def divergence_partials(logits, teacher_logits, layout, teacher_layout, mask, *, spec,
                        return_entropy):
    """Same contract as ``fastalign.kernels.divergence.divergence_partials``."""
    return extension().divergence_stats(logits, layout.native_arg(), teacher_logits,
                                        teacher_layout.native_arg(), layout.n_rows, mask,
                                        tuple(spec), return_entropy)


def mixture_partials(logits, teacher_logits, layout, teacher_layout, mask, stats, *, spec):
    """Same contract as ``fastalign.kernels.divergence.mixture_partials``."""
    return extension().divergence_mixture(logits, layout.native_arg(), teacher_logits,
                                          teacher_layout.native_arg(), layout.n_rows, mask,
                                          stats, tuple(spec))


def divergence_grad(logits, teacher_logits, layout, teacher_layout, mask, stats,
                    grad_divergence, grad_entropy, grad_out, grad_layout, *, spec):
    """Same contract as ``fastalign.kernels.divergence.divergence_grad``."""
    extension().divergence_grad(logits, layout.native_arg(), teacher_logits,
                                teacher_layout.native_arg(), layout.n_rows, mask, stats,
                                grad_divergence, grad_entropy, grad_out,
                                grad_layout.native_arg(), tuple(spec))
    return grad_out


def mixture_grad(logits, teacher_logits, layout, teacher_layout, mask, stats, grad_divergence,
                 *, spec):
    """Same contract as ``_backends.DivergenceLaunchers.mixture_grad``: one C++ call
    (``csrc/jsd_grad.cpp``) that forms each column's mixture once for both."""
    return extension().divergence_mixture_grad(logits, layout.native_arg(), teacher_logits,
                                               teacher_layout.native_arg(), layout.n_rows, mask,
                                               stats, grad_divergence, tuple(spec))
