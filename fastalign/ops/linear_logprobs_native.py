"""Native C++ backend of ``linear_logprobs``: the torch backend's tiles (one matmul per
vocabulary slice, ``_tiles.raw_logits_tile``), reduced and differentiated by the native row
kernels of ``csrc/logprobs.cpp`` instead of a chain of elementwise torch ops. Same launcher
signatures as ``fastalign.kernels.linear_logprobs``.
"""

from __future__ import annotations

import torch

from .._native import extension
from ._sampler import native_grad_support, native_support
from ._tiles import (native_temperature, partials_buffers, raw_logits_tile, row_stat_partials,
                     row_stat_slice_, softcap_keys)


def _tile_layout(tile: torch.Tensor) -> tuple[int, int, int]:
    return max(tile.shape[0], 1), 0, tile.stride(0)


def linear_logprobs_partials(hidden, weight, bias, targets, *, inv_temperature, softcap,
                             return_entropy, return_row_stats=False, support=None):
    """Same contract as ``linear_logprobs_torch.linear_logprobs_partials``. The row statistics
    (on request) are reduced by torch from the same logits tile: no second matmul. With the
    sampler's ``support`` every slice's max is the row's (its keys off the support are -inf)."""
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    cols, (row_max, sum_exp, sum_exp_shifted, target_logit) = partials_buffers(
        hidden, vocab_size, return_entropy)
    targets = targets.long()
    row_stats = row_stat_partials(row_max.shape[0], hidden) if return_row_stats else None
    scalar, per_row = native_temperature(inv_temperature)
    for index, start in enumerate(range(0, vocab_size, cols)):
        tile = raw_logits_tile(hidden, weight, bias, start, min(start + cols, vocab_size))
        # Columns outside this slice give a target logit of 0: the sum over slices is exact.
        stats = extension().softmax_stats(tile, _tile_layout(tile), n_rows, targets, start, None,
                                          scalar, softcap, return_entropy,
                                          row_inv_temperature=per_row, **native_support(support))
        row_max[index], sum_exp[index] = stats[0], stats[1]
        if return_entropy:
            sum_exp_shifted[index] = stats[2]
        target_logit += stats[3]
        if row_stats is not None:
            row_stat_slice_(softcap_keys(tile, softcap), stats[0], targets - start, inv_temperature, row_stats, index)
    return row_max, sum_exp, sum_exp_shifted, target_logit, row_stats


def linear_logprobs_grad_tile(hidden, weight, bias, targets, stats, entropy, grad_logprobs,
                              grad_entropy, start: int, end: int, *, inv_temperature, softcap,
                              support=None):
    """Same contract as ``linear_logprobs_torch.linear_logprobs_grad_tile``: the gradient is
    written over the float32 logits tile itself."""
    tile = raw_logits_tile(hidden, weight, bias, start, end)
    layout = _tile_layout(tile)
    scalar, per_row = native_temperature(inv_temperature)
    extension().logprobs_grad(
        tile, layout, tile.shape[0], tile, layout, targets.long(), start, None, scalar,
        softcap, stats[:, 0].contiguous(), stats[:, 1].contiguous(),
        entropy if grad_entropy is not None else None, grad_logprobs, grad_entropy,
        row_inv_temperature=per_row, **native_grad_support(support))
    return tile if tile.dtype == hidden.dtype else tile.to(hidden.dtype)
