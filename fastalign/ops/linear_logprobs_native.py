"""Native C++ backend of ``linear_logprobs``: the torch backend's tiles (one matmul per
vocabulary slice, ``_tiles.raw_logits_tile``), reduced and differentiated by the native row
kernels of ``csrc/logprobs.cpp`` instead of a chain of elementwise torch ops. Same launcher
signatures as ``fastalign.kernels.linear_logprobs``.
"""

from __future__ import annotations

import torch

from .._native import extension
from ._sampler import native_grad_support, native_support
from ._tiles import native_temperature, raw_logits_tile, reduced_tile_partials


def _tile_layout(tile: torch.Tensor) -> tuple[int, int, int]:
    return max(tile.shape[0], 1), 0, tile.stride(0)


def linear_logprobs_partials(hidden, weight, bias, targets, *, inv_temperature, softcap,
                             return_entropy, return_row_stats=False, support=None):
    """Same contract as ``linear_logprobs_torch.linear_logprobs_partials``. With the sampler's
    ``support`` every slice's max is the row's (its keys off the support are -inf)."""
    targets = targets.long()
    scalar, per_row = native_temperature(inv_temperature)

    def reduce_tile(tile, start):
        # Columns outside this slice give a target logit of 0: the sum over slices is exact.
        stats = extension().softmax_stats(tile, _tile_layout(tile), tile.shape[0], targets,
                                          start, None, scalar, softcap, return_entropy,
                                          row_inv_temperature=per_row, **native_support(support))
        return stats[0], stats[1], stats[2], stats[3]

    return reduced_tile_partials(
        hidden, weight, bias, targets, reduce_tile, cols=None, inv_temperature=inv_temperature,
        softcap=softcap, return_entropy=return_entropy, return_row_stats=return_row_stats)


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
