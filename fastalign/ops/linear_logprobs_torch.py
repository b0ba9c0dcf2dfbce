"""Pure-torch backend of ``linear_logprobs``: runs anywhere, memory bounded by one logits tile.

The vocabulary is walked in slices of ``cols`` columns (``_tiles.tile_cols`` picks them so a
``[N, cols]`` tile stays near ``_tiles.TILE_ELEMENTS``). Each tile of logits is one
matmul (``hidden @ weight[slice].T``, the fastest primitive torch has on a CPU), reduced in place
to the slice's softmax statistics (``_vocab_stats``) in the forward, or turned in place into the
gradient w.r.t. the logits in the backward. The launchers take the same arguments as those of
``fastalign.kernels.linear_logprobs`` so the op treats both backends alike.
"""

from __future__ import annotations

import torch

from ._sampler import kept_columns
from ._tiles import (FINITE_MIN, logits_grad_, partials_buffers, raw_logits_tile, row_scale,
                     row_stat_partials, row_stat_slice_)


def key_(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The keys ``softcap(z)`` (``z`` itself without a softcap), in place: maxes are taken of
    keys and ``z' = key / T`` is never formed (``_vocab_stats``)."""
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


def linear_logprobs_partials(hidden, weight, bias, targets, *, inv_temperature, softcap,
                             return_entropy, return_row_stats=False, support=None):
    """Per-slice softmax statistics of ``z' = softcap(hidden @ weight.T + bias) / T`` (maxes of
    the keys ``softcap(z)``, sums of ``exp((key - max) / T)``: ``_vocab_stats``).

    Args:
        hidden: ``[N, D]`` contiguous; weight ``[V, D]``; bias ``[V]`` or None.
        targets: ``[N]`` ids relative to this weight's first row (a shard's ids may be outside
            ``[0, V)``: they add nothing to ``target_logit``).
        inv_temperature: a float, or float32 ``[N]`` (one per row).
        support: None, or the sampler's (``_sampler.Support``): sums over each row's kept
            columns relative to its known max (every slice's max is then that max), and a
            target outside the support gives ``target_logit = -inf``.
    Returns:
        ``(row_max, sum_exp, sum_exp_shifted or None)``, each ``[S, N]`` float32 for
        ``S = ceil(V / tile_cols)`` slices, ``target_logit [N]`` (see ``_vocab_stats``), and
        with ``return_row_stats`` the ``[S, N]`` row statistics ``(key_sum, sum_sq_exp,
        max_before)`` of ``_tiles.row_stat_slice_`` (else None).
    """
    vocab_size = weight.shape[0]
    cols, (row_max, sum_exp, sum_exp_shifted, target_logit) = partials_buffers(
        hidden, vocab_size, return_entropy)
    row_stats = row_stat_partials(row_max.shape[0], hidden) if return_row_stats else None
    scale = row_scale(inv_temperature)
    for index, start in enumerate(range(0, vocab_size, cols)):
        end = min(start + cols, vocab_size)
        raw = raw_logits_tile(hidden, weight, bias, start, end)
        # The top-k test reads the raw logits, before key_ overwrites them.
        kept = None if support is None else kept_columns(raw, None, support.kth, None)
        z = key_(raw, softcap)
        if support is not None:
            tile_max = support.row_max
            shifted = torch.sub(z, tile_max[:, None])
            if scale is not None:
                shifted.mul_(scale)
            if support.log_min_p is not None:
                above = shifted >= support.log_min_p
                kept = above if kept is None else kept.logical_and_(above)
            if kept is not None:  # removed columns: keys of -inf, p = 0
                shifted.masked_fill_(~kept, float("-inf"))
                z.masked_fill_(~kept, float("-inf"))
        in_slice = (targets >= start) & (targets < end)
        local = torch.where(in_slice, targets - start, 0).long()
        target_logit += torch.where(in_slice, z.gather(1, local[:, None]).squeeze(1), 0.0)
        if support is None:
            tile_max = z.amax(dim=1).clamp_(min=FINITE_MIN)
            if row_stats is not None:
                row_stat_slice_(z, tile_max, targets - start, inv_temperature, row_stats, index)
            shifted = z.sub_(tile_max[:, None])  # (key - max) / T: the difference first
            if scale is not None:
                shifted.mul_(scale)
        if return_entropy:
            p = shifted.exp()
            sum_exp[index] = p.sum(dim=1)
            # -inf logits: clamp so that their term is 0 * finite, not 0 * -inf = NaN.
            sum_exp_shifted[index] = p.mul_(shifted.clamp_(min=FINITE_MIN)).sum(dim=1)
        else:
            sum_exp[index] = shifted.exp_().sum(dim=1)
        row_max[index] = tile_max
    return row_max, sum_exp, sum_exp_shifted, target_logit, row_stats


def linear_logprobs_grad_tile(hidden, weight, bias, targets, stats, entropy, grad_logprobs,
                              grad_entropy, start: int, end: int, *, inv_temperature, softcap,
                              support=None):
    """Gradient of ``sum(go_lp * logprob + go_ent * entropy)`` w.r.t. the raw logits of
    vocabulary columns ``[start, end)``: a fresh ``[N, end-start]`` tensor in ``hidden.dtype``.

    ``stats`` (``[N, 2]``: max and log-sum of each row) and ``entropy`` (``[N]``) are the merged
    per-row results of the forward, float32;
    ``grad_*`` are float32 ``[N]`` or None. ``support``: the sampler's (p = 0 off it).
    """
    raw = raw_logits_tile(hidden, weight, bias, start, end)
    target_grad = None
    if grad_logprobs is not None:
        in_slice = (targets >= start) & (targets < end)
        local = torch.where(in_slice, targets - start, 0).long()
        target_grad = torch.where(in_slice, grad_logprobs, 0.0)
    grad = logits_grad_(raw, stats, entropy, grad_logprobs, grad_entropy,
                        None if target_grad is None else local, target_grad,
                        inv_temperature=inv_temperature, softcap=softcap, out=raw,
                        support=support)
    return grad if grad.dtype == hidden.dtype else grad.to(hidden.dtype)
