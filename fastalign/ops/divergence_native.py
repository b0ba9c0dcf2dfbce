"""Native C++ backend of the divergence ops (``csrc/divergence.cpp``): the statistics and
gradient of ``fastalign.kernels.divergence`` in one vectorized pass per row (two for the JSD's
forward), parallel over rows; for the fused loss the JSD's second pass and its gradient in one
(``csrc/jsd_grad.cpp``). Same launcher signatures."""

from __future__ import annotations

import torch

from .._layout import RowLayout
from .._native import extension


def divergence_partials(logits, teacher_logits, layout, teacher_layout, mask, *, spec,
                        return_entropy):
    """Same contract as ``fastalign.kernels.divergence.divergence_partials``."""
    return extension().divergence_stats(logits, layout.native_arg(), teacher_logits,
                                        teacher_layout.native_arg(), layout.n_rows, mask,
                                        tuple(spec), return_entropy)


def partials_and_top1(logits, teacher_logits, *, spec):
    """``(divergence_partials of two whole-row float32 [N, V] tensors, [2, N] int64 argmax of
    each side's raw logits)`` from one pass over both (``csrc/divergence.cpp``)."""
    layout = RowLayout(1, logits.shape[0], 0, logits.shape[1])
    top1 = torch.empty(2, logits.shape[0], dtype=torch.long)
    partials = extension().divergence_stats(logits, layout.native_arg(), teacher_logits,
                                            layout.native_arg(), layout.n_rows, None,
                                            tuple(spec), True, top1)
    return partials, top1


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
