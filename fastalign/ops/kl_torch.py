"""Pure-torch backend of the KL ops: the statistics and gradient of ``fastalign.kernels.kl``,
a few rows at a time, so the extra memory is a few ``[rows, V]`` float32 chunks of about
``token_logprobs_torch.CHUNK_ELEMENTS`` elements. Same launcher signatures as the Triton ones.
"""

from __future__ import annotations

import torch

from .._layout import RowLayout, iter_aligned_row_ranges, row_block
from . import token_logprobs_torch
from ._tiles import FINITE_MIN


def _rows_per_chunk(vocab_size: int) -> int:
    return max(1, token_logprobs_torch.CHUNK_ELEMENTS // vocab_size)


def _row_ranges(vocab_size: int, *layouts: RowLayout):
    return iter_aligned_row_ranges(list(layouts), _rows_per_chunk(vocab_size))


def _float(chunk: torch.Tensor) -> torch.Tensor:
    """A fresh float32 copy of ``chunk``."""
    return chunk.to(torch.float32, copy=True)


def kl_partials(logits, ref_logits, layout, ref_layout, mask, *, inv_temperature):
    """Same contract as ``fastalign.kernels.kl.kl_partials``: maxes of the raw logits, exps of
    ``(z - max) / T`` (the difference before the scaling)."""
    stats = torch.empty(5, layout.n_rows, device=logits.device, dtype=torch.float32)
    for start, stop in _row_ranges(logits.shape[-1], layout, ref_layout):
        rows = slice(start, stop)
        zp = _float(row_block(logits, layout, start, stop))
        zq = _float(row_block(ref_logits, ref_layout, start, stop))
        max_p = zp.amax(dim=1, keepdim=True).clamp_(min=FINITE_MIN)
        max_q = zq.amax(dim=1, keepdim=True).clamp_(min=FINITE_MIN)
        shifted_p = zp.sub_(max_p).mul_(inv_temperature)
        shifted_q = zq.sub_(max_q).mul_(inv_temperature)
        ep = shifted_p.exp()
        # p = 0 columns (-inf logits) add nothing, whatever the reference says there; a finite
        # logit where the reference's is -inf makes the KL +inf (even where exp underflows).
        inf = float("inf")
        cross = torch.where(shifted_p == -inf, 0.0, torch.where(
            shifted_q == -inf, inf, ep * (shifted_p - shifted_q))).sum(dim=1)
        stats[:, rows] = torch.stack([max_p.squeeze(1), ep.sum(dim=1), max_q.squeeze(1),
                                      shifted_q.exp_().sum(dim=1), cross])
    if mask is not None:
        # Statistics that merge to KL = 0 (see merge_kl_partials).
        skipped = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0], device=stats.device)[:, None]
        stats = torch.where(mask.reshape(1, -1), stats, skipped)
    return tuple(stats.unbind(0))


def kl_grad(logits, ref_logits, layout, ref_layout, mask, stats, grad_kl, grad_out,
            grad_layout, *, inv_temperature):
    """Same contract as ``fastalign.kernels.kl.kl_grad``."""
    coef = grad_kl * inv_temperature
    for start, stop in _row_ranges(logits.shape[-1], layout, ref_layout, grad_layout):
        rows = slice(start, stop)
        row_max, log_sum, ref_max, shift = (stats[rows, k:k + 1] for k in range(4))
        sp = _float(row_block(logits, layout, start, stop)).sub_(row_max).mul_(inv_temperature)
        sq = _float(row_block(ref_logits, ref_layout, start, stop)).sub_(ref_max)
        p = torch.sub(sp, log_sum).exp_()
        # dKL/dz'_j = p_j ((s_j - s_ref,j) - shift), each s relative to its own side's max;
        # p = 0 columns give 0, not 0 * -inf, unless the row's KL is NaN or inf (shift - shift
        # is then NaN: the row is poisoned, as log_softmax's backward poisons it); a NaN p stays.
        log_ratio = sp.sub_(sq.mul_(inv_temperature)).sub_(shift)
        grad = torch.where(p == 0, shift - shift, p * log_ratio).mul_(coef[rows, None])
        if mask is not None:  # skipped rows may hold anything, even NaN: overwrite, not scale
            grad.masked_fill_(~mask.reshape(-1)[rows, None], 0.0)
        row_block(grad_out, grad_layout, start, stop).copy_(grad)
    return grad_out
