"""Native C++ backend of the KL ops (``csrc/kl.cpp``): the statistics and gradient of
``fastalign.kernels.kl`` in one vectorized pass per row. Same launcher signatures."""

from __future__ import annotations

from .._native import extension


def kl_partials(logits, ref_logits, layout, ref_layout, mask, *, inv_temperature):
    """Same contract as ``fastalign.kernels.kl.kl_partials``."""
    stats = extension().kl_stats(logits, layout.native_arg(), ref_logits, ref_layout.native_arg(),
                                 layout.n_rows, mask, inv_temperature)
    return tuple(stats.unbind(0))


def kl_grad(logits, ref_logits, layout, ref_layout, mask, stats, grad_kl, grad_out,
            grad_layout, *, inv_temperature):
    """Same contract as ``fastalign.kernels.kl.kl_grad``."""
    extension().kl_grad(logits, layout.native_arg(), ref_logits, ref_layout.native_arg(),
                        layout.n_rows, mask, stats, grad_kl, grad_out, grad_layout.native_arg(),
                        inv_temperature)
    return grad_out
