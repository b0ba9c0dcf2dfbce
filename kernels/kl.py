"""Triton kernels for the exact full-vocabulary KL(softmax(z / T) || softmax(z_ref / T)) per row.

Forward: one program per row streams both rows once, in ``BLOCK_V`` tiles, with two online
softmaxes: for each side its max ``m`` (of the raw logits) and ``sum exp(s)`` with
``s = (z - m) / T``, and for the policy side ``sum exp(s) * (s - s_ref)``: the row's statistics
over the columns given. ``fastalign.ops._vocab_stats.merge_kl_partials`` turns them (or several
slices of them, for the fused-linear form) into ``KL = sum p (s - s_ref) - log S + log S_ref``.

Backward: one program per (row, tile) writes
``dKL/dz_j = p_j ((s_j - log S) - (s_ref,j - log S_ref) - KL) / T`` from the merged
``(m, log S, m_ref, shift = log S - log S_ref + KL)``. Every difference is taken before the
1 / T scaling and relative to its own side's max (kernels/_math.py): ``z / T`` never overflows
for a tiny T, and neither a large common offset of the logits nor policy and reference logits
of very different sizes costs precision (``log p - log q`` is formed from exact ``z - m``).

Rows are addressed through the same two-level layout as ``token_logprobs`` (a ``[:, :-1]``
slice of ``[B, T, V]`` logits is read in place); offsets are int64.
"""

import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (records how these kernels were defined: fastalign/_backend.py)
from ._math import FINITE_MIN, scaled_delta
from ._rows import block_and_warps, row_offset

FORWARD_BLOCK_V = 4096
FORWARD_NUM_WARPS = 8
BACKWARD_BLOCK_V = 4096
BACKWARD_NUM_WARPS = 8


@triton.jit
def _kl_forward_kernel(
    logits_ptr, ref_ptr, mask_ptr, max_ptr, sum_exp_ptr, ref_max_ptr, ref_sum_exp_ptr, cross_ptr,
    n_inner, stride_outer, stride_inner, ref_n_inner, ref_stride_outer, ref_stride_inner,
    vocab_size, inv_temperature, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            # Skipped entirely; these statistics make the merged KL exactly 0.
            tl.store(max_ptr + row, 0.0)
            tl.store(sum_exp_ptr + row, 1.0)
            tl.store(ref_max_ptr + row, 0.0)
            tl.store(ref_sum_exp_ptr + row, 1.0)
            tl.store(cross_ptr + row, 0.0)
            return
    p_row = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    q_row = ref_ptr + row_offset(row, ref_n_inner, ref_stride_outer, ref_stride_inner)
    # Maxes start at the most negative float (FINITE_MIN), not -inf: z - max is then
    # never -inf - -inf.
    max_p = FINITE_MIN
    sum_p = 0.0
    max_q = FINITE_MIN
    sum_q = 0.0
    # sum exp(s) * (s - s_ref): relative to both maxes, so a large common offset of the logits
    # does not cancel away the (often tiny) KL.
    cross = 0.0
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < vocab_size
        zp = tl.load(p_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
        zq = tl.load(q_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
        zp = tl.where(in_vocab, zp, -float("inf"))
        zq = tl.where(in_vocab, zq, -float("inf"))
        new_max_p = tl.maximum(max_p, tl.max(zp, axis=0))
        new_max_q = tl.maximum(max_q, tl.max(zq, axis=0))
        delta_p = scaled_delta(max_p, new_max_p, inv_temperature)
        delta_q = scaled_delta(max_q, new_max_q, inv_temperature)
        rescale_p = tl.exp(delta_p)
        sp = (zp - new_max_p) * inv_temperature
        sq = (zq - new_max_q) * inv_temperature
        ep = tl.exp(sp)
        # Columns with p = 0 (masked, -inf logits) add nothing, whatever z_ref is; a finite
        # logit where the reference's is -inf makes the KL +inf, even where exp(s) underflows
        # to 0 (0 * inf would be NaN, and dropping it would give a finite KL).
        term = tl.where(sp == -float("inf"), 0.0,
                        tl.where(sq == -float("inf"), float("inf"), ep * (sp - sq)))
        # The running cross term moved to the new maxes: exp(d_p) (cross + (d_p - d_q) sum_p),
        # as exp(d_p) * (d_p - d_q) so that a vanishing exp(d_p) gives 0, not 0 * inf.
        cross = rescale_p * cross + (rescale_p * (delta_p - delta_q)) * sum_p \
            + tl.sum(term, axis=0)
        sum_p = sum_p * rescale_p + tl.sum(ep, axis=0)
        sum_q = sum_q * tl.exp(delta_q) + tl.sum(tl.exp(sq), axis=0)
        max_p = new_max_p
        max_q = new_max_q
    tl.store(max_ptr + row, max_p)
    tl.store(sum_exp_ptr + row, sum_p)
    tl.store(ref_max_ptr + row, max_q)
    tl.store(ref_sum_exp_ptr + row, sum_q)
    tl.store(cross_ptr + row, cross)


@triton.jit
def _kl_backward_kernel(
    logits_ptr, ref_ptr, mask_ptr, stats_ptr, grad_kl_ptr, grad_ptr,
    n_inner, stride_outer, stride_inner, ref_n_inner, ref_stride_outer, ref_stride_inner,
    grad_stride_outer, grad_stride_inner, vocab_size, inv_temperature,
    HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab_size
    grad_row = grad_ptr + row_offset(row, n_inner, grad_stride_outer, grad_stride_inner)
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            tl.store(grad_row + cols, tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty),
                     mask=in_vocab)
            return
    p_row = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    q_row = ref_ptr + row_offset(row, ref_n_inner, ref_stride_outer, ref_stride_inner)
    zp = tl.load(p_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
    zq = tl.load(q_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
    # stats: (max, log S, ref max, shift) per row, see merge_kl_partials.
    sp = (zp - tl.load(stats_ptr + 4 * row)) * inv_temperature
    p = tl.exp(sp - tl.load(stats_ptr + 4 * row + 1))
    log_ratio = (sp - (zq - tl.load(stats_ptr + 4 * row + 2)) * inv_temperature) \
        - tl.load(stats_ptr + 4 * row + 3)
    # p = 0 columns get 0, not 0 * (-inf - finite) = NaN, unless the row's KL is NaN or inf
    # (shift - shift is then NaN: the row is poisoned, as log_softmax's backward poisons it). A
    # NaN p (a NaN or +inf logit, a row of only -inf) fails p == 0 and stays NaN.
    shift = tl.load(stats_ptr + 4 * row + 3)
    grad = tl.where(p == 0.0, shift - shift, p * log_ratio) \
        * (tl.load(grad_kl_ptr + row) * inv_temperature)
    tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)


def kl_partials(logits, ref_logits, layout, ref_layout, mask, *, inv_temperature):
    """Per-row ``(max, sum_exp, ref_max, ref_sum_exp, cross)``, float32 ``[N]`` each, over the
    columns of ``logits``/``ref_logits`` (rows addressed by their ``RowLayout``s); rows with
    ``mask == False`` get statistics that merge to KL = 0."""
    n_rows, vocab_size = layout.n_rows, logits.shape[-1]
    stats = torch.empty(5, n_rows, device=logits.device, dtype=torch.float32)
    block, warps = block_and_warps(vocab_size, FORWARD_BLOCK_V, FORWARD_NUM_WARPS)
    if n_rows > 0:
        _kl_forward_kernel[(n_rows,)](
            logits, ref_logits, stats if mask is None else mask, *stats,
            layout.n_inner, layout.stride_outer, layout.stride_inner,
            ref_layout.n_inner, ref_layout.stride_outer, ref_layout.stride_inner,
            vocab_size, inv_temperature, HAS_MASK=mask is not None, BLOCK_V=block,
            num_warps=warps)
    return tuple(stats.unbind(0))


def kl_grad(logits, ref_logits, layout, ref_layout, mask, stats, grad_kl, grad_out,
            grad_layout, *, inv_temperature):
    """Writes ``grad_kl * dKL/dlogits`` into ``grad_out`` and returns it; ``stats`` is the
    contiguous ``[N, 4]`` float32 of ``merge_kl_partials``; ``grad_layout`` has the same
    ``n_inner`` as ``layout`` (``grad_out`` is the logits' shape, contiguous or not)."""
    n_rows, vocab_size = layout.n_rows, logits.shape[-1]
    block, warps = block_and_warps(vocab_size, BACKWARD_BLOCK_V, BACKWARD_NUM_WARPS)
    if n_rows > 0:
        _kl_backward_kernel[(n_rows, triton.cdiv(vocab_size, block))](
            logits, ref_logits, stats if mask is None else mask, stats, grad_kl,
            grad_out, layout.n_inner, layout.stride_outer, layout.stride_inner,
            ref_layout.n_inner, ref_layout.stride_outer, ref_layout.stride_inner,
            grad_layout.stride_outer, grad_layout.stride_inner, vocab_size, inv_temperature,
            HAS_MASK=mask is not None, BLOCK_V=block, num_warps=warps)
    return grad_out
