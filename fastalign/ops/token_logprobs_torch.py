"""Pure-torch chunked backend of ``token_logprobs``: runs on any device, memory bounded by a chunk.

The same math as the Triton kernels, a few rows at a time: each chunk is shifted (or transformed)
into one fp32 buffer and reduced in place, so the extra memory is a couple of
``[rows_per_chunk, V]`` fp32 buffers (about ``CHUNK_ELEMENTS`` elements each), never ``[N, V]``;
an fp32 gradient is computed where it is returned. The launchers take the
same arguments as those of ``fastalign.kernels`` so the autograd Function treats both alike.
"""

from __future__ import annotations

import torch

from .._layout import iter_row_chunks
from ._sampler import kept_columns, row_slice
from ._tiles import FINITE_MIN, logits_grad_, row_scale, softcapped, target_masks

# ~1 MiB of fp32 per temporary: large enough that per-chunk overhead is small, small enough to
# stay in a CPU's L2 across the several passes each chunk takes.
CHUNK_ELEMENTS = 1 << 18


def _rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _shifted(chunk: torch.Tensor, inv_temperature, softcap: float | None, row_max=None):
    """((key - max key) / T, max key) per row, with key = softcap(z) (z itself without a softcap,
    fastalign/kernels/_math.py): the max is subtracted before the temperature scales, so no
    ``z / T`` is formed (it would overflow for a tiny T, round at |z / T| for a large z).
    The first is a fresh fp32 tensor the caller may overwrite. ``inv_temperature``: a float or
    the chunk's ``[r]`` tensor; ``row_max`` ``[r, 1]``: the max key when known (the sampler's
    second pass)."""
    if softcap is None:
        # No copy of the logits: a bf16/fp16 chunk minus an fp32 max computes in fp32.
        if row_max is None:
            row_max = chunk.amax(dim=1, keepdim=True).float().clamp_(min=FINITE_MIN)
        shifted = torch.sub(chunk, row_max)
    else:
        keys = softcapped(chunk, softcap).mul_(softcap)
        if row_max is None:
            row_max = keys.amax(dim=1, keepdim=True).clamp_(min=FINITE_MIN)
        shifted = keys.sub_(row_max)
    scale = row_scale(inv_temperature)
    return (shifted if scale is None else shifted.mul_(scale)), row_max


def token_logprobs_forward(logits, targets, layout, *,
                           inv_temperature, softcap, ignore_index, return_entropy, support=None):
    """``support`` (``_sampler.Support``): sums over each row's sampler support only, relative
    to its known max; a target outside it gets -inf."""
    n_rows, vocab_size = targets.numel(), logits.shape[-1]
    ignored, safe_targets, nan_if_invalid = target_masks(targets, vocab_size, ignore_index)
    logprobs = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    stats = torch.empty(n_rows, 2, device=logits.device, dtype=torch.float32)
    entropy = torch.empty(n_rows, device=logits.device, dtype=torch.float32) if return_entropy else None

    for start, chunk in iter_row_chunks(logits, layout, _rows_per_chunk(vocab_size)):
        rows = slice(start, start + chunk.shape[0])
        shifted, row_max = _shifted(
            chunk, row_slice(inv_temperature, rows), softcap,
            None if support is None else support.row_max[rows, None])
        if support is not None:
            kept = kept_columns(chunk, shifted, row_slice(support.kth, rows), support.log_min_p)
            shifted.masked_fill_(~kept, float("-inf"))  # removed columns: p = 0
        target_shifted = shifted.gather(1, safe_targets[rows, None]).squeeze(1)
        if return_entropy:
            p = shifted.exp()
            sum_exp = p.sum(dim=1)
            # entropy = log sum exp(s) - sum(exp(s) * s) / sum exp(s) with s = z' - max; clamping
            # -inf logits to a finite value keeps 0 * -inf from turning into NaN.
            weighted = p.mul_(shifted.clamp_(min=FINITE_MIN)).sum(dim=1)
        else:
            sum_exp = shifted.exp_().sum(dim=1)
        log_sum_exp = sum_exp.log()
        skip, nan_rows = ignored[rows], nan_if_invalid[rows]
        logprobs[rows] = torch.where(skip, 0.0, target_shifted - log_sum_exp + nan_rows)
        # The max and the log-sum stay apart: their sum would round at |max|.
        stats[rows, 0] = torch.where(skip, 0.0, row_max.squeeze(1) + nan_rows)
        stats[rows, 1] = torch.where(skip, 0.0, log_sum_exp + nan_rows)
        if return_entropy:
            entropy[rows] = torch.where(skip, 0.0, log_sum_exp - weighted / sum_exp + nan_rows)
    return logprobs, entropy, stats


def token_logprobs_backward(logits, targets, layout, stats, entropy, grad_logprobs,
                            grad_entropy, grad_out, grad_layout, *,
                            inv_temperature, softcap, ignore_index, support=None):
    vocab_size = logits.shape[-1]
    ignored, safe_targets, _ = target_masks(targets, vocab_size, ignore_index)
    rows_per_chunk = _rows_per_chunk(vocab_size)

    chunks = zip(iter_row_chunks(logits, layout, rows_per_chunk),
                 iter_row_chunks(grad_out, grad_layout, rows_per_chunk))
    for (start, chunk), (_, grad_chunk) in chunks:
        rows = slice(start, start + chunk.shape[0])
        # NaN statistics (an id outside [0, V)) make their row NaN. Without a softcap, work in
        # the returned gradient itself when it is fp32 (no temporary at all).
        go_lp = None if grad_logprobs is None else grad_logprobs[rows]
        grad = logits_grad_(
            chunk, stats[rows], None if entropy is None else entropy[rows], go_lp,
            None if grad_entropy is None else grad_entropy[rows], safe_targets[rows], go_lp,
            inv_temperature=row_slice(inv_temperature, rows), softcap=softcap,
            out=grad_chunk if grad_chunk.dtype == torch.float32 else None,
            support=None if support is None else _rows_of(support, rows))
        grad.masked_fill_(ignored[rows, None], 0.0)
        if grad is not grad_chunk:
            grad_chunk.copy_(grad)
    return grad_out


def _rows_of(support, rows: slice):
    """The support of a chunk of rows (the backward reads the max from the statistics)."""
    return type(support)(None, row_slice(support.kth, rows), support.log_min_p)
