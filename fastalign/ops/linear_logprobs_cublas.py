"""The cuBLAS path of ``linear_logprobs`` on CUDA: the torch backend's tiles (one GEMM per
vocabulary slice, ``_tiles.raw_logits_tile``: cuBLAS at its own speed) reduced and
differentiated by the Triton row kernels of ``kernels/token_logprobs.py`` (each tile read once
in the forward, rewritten in place into its gradient in the backward), where the fused Triton
tiles (``kernels/linear_logprobs.py``) compute the matmul themselves. Same launcher signatures;
``ops/_backends.py`` says which of the two a call gets.

A slice holds ``TILE_MB`` MiB of float32 logits (at least 256 columns): with 8k rows, 8192
columns, a GEMM as wide as cuBLAS needs, and one tile in flight at a time.
"""

from __future__ import annotations

import torch

from .._layout import RowLayout
from ..kernels.token_logprobs import slice_partials, token_logprobs_backward
from ._tiles import NO_TARGET, raw_logits_tile, reduced_tile_partials

TILE_MB = 256


def tile_cols(n_rows: int, vocab_size: int) -> int:
    """Vocabulary columns per tile: ``TILE_MB`` MiB of float32 logits, a multiple of 128 (the
    GEMM's tile), at least 256."""
    cols = TILE_MB * 2**20 // (4 * max(n_rows, 1)) // 128 * 128
    return min(vocab_size, max(256, cols))


def _layout(tile: torch.Tensor) -> RowLayout:
    return RowLayout(1, tile.shape[0], 0, tile.stride(0))


def linear_logprobs_partials(hidden, weight, bias, targets, *, inv_temperature, softcap,
                             return_entropy, return_row_stats=False, support=None):
    """Same contract as ``linear_logprobs_torch.linear_logprobs_partials``."""
    targets = targets.long().contiguous()

    def reduce_tile(tile, start):
        target_key, stats, shifted = slice_partials(
            tile, targets, _layout(tile), start, inv_temperature=inv_temperature,
            softcap=softcap, return_entropy=return_entropy, support=support)
        return stats[:, 0], stats[:, 1], shifted, target_key

    return reduced_tile_partials(
        hidden, weight, bias, targets, reduce_tile,
        cols=tile_cols(hidden.shape[0], weight.shape[0]), inv_temperature=inv_temperature,
        softcap=softcap, return_entropy=return_entropy, return_row_stats=return_row_stats)


def linear_logprobs_grad_tile(hidden, weight, bias, targets, stats, entropy, grad_logprobs,
                              grad_entropy, start: int, end: int, *, inv_temperature, softcap,
                              support=None):
    """Same contract as ``linear_logprobs_torch.linear_logprobs_grad_tile``: the gradient is
    written over the float32 logits tile itself."""
    tile = raw_logits_tile(hidden, weight, bias, start, end)
    if tile.shape[0]:  # the kept rows (the launchers get no ignored row: NO_TARGET)
        layout = _layout(tile)
        token_logprobs_backward(
            tile, targets.long() - start, layout, stats.contiguous(),
            entropy if grad_entropy is not None else None, grad_logprobs, grad_entropy, tile,
            layout, inv_temperature=inv_temperature, softcap=softcap, ignore_index=NO_TARGET,
            support=support)
    return tile if tile.dtype == hidden.dtype else tile.to(hidden.dtype)
