"""Pure-torch backend of ``linear_logprobs``: runs anywhere, memory bounded by one logits tile.

The vocabulary is walked in slices of ``cols`` columns (``tile_cols`` picks them so a
``[N, cols]`` tile stays near ``TILE_ELEMENTS``). Each tile of logits is one
matmul (``hidden @ weight[slice].T``, the fastest primitive torch has on a CPU), reduced in place
to the slice's softmax statistics (``_vocab_stats``) in the forward, or turned in place into the
gradient w.r.t. the logits in the backward. The launchers take the same arguments as those of
``fastalign.kernels.linear_logprobs`` so the op treats both backends alike.
"""

from __future__ import annotations

import torch

from ._vocab_stats import FINITE_MIN

# A [N, cols] float32 tile of about 4 MiB: wide enough for efficient matmuls, small enough that
# the elementwise passes over it stay mostly in cache (in a quick sweep at N = 2048, D = 256 on
# 2 cores it beat 4x larger tiles in backward), and far below the logits' size.
TILE_ELEMENTS = 1 << 20


def raw_logits_tile(hidden, weight, bias, start: int, end: int) -> torch.Tensor:
    """``hidden @ weight[start:end].T + bias[start:end]`` as a fresh float32 ``[N, end-start]``
    tile, computed in ``hidden``'s dtype (the rounding torch's own bf16 path has); a weight or
    bias of another dtype is cast one slice at a time."""
    w = weight[start:end].to(hidden.dtype)
    if bias is None:
        tile = torch.mm(hidden, w.t())
    else:
        tile = torch.addmm(bias[start:end].to(hidden.dtype), hidden, w.t())
    return tile if tile.dtype == torch.float32 else tile.float()


def key_(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The keys ``softcap(z)`` (``z`` itself without a softcap), in place: maxes are taken of
    keys and ``z' = key / T`` is never formed (``_vocab_stats``)."""
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


def tile_cols(n_rows: int, vocab_size: int) -> int:
    """Vocabulary columns per tile: ``TILE_ELEMENTS`` in all, at least 256 columns so that huge
    batches still get matmuls of a useful width."""
    return min(vocab_size, max(256, TILE_ELEMENTS // max(n_rows, 1)))


def partials_buffers(hidden, vocab_size: int, return_entropy: bool):
    """``(cols, (row_max, sum_exp, sum_exp_shifted or None, target_logit))``: the slice width and
    the float32 outputs of ``linear_logprobs_partials`` (``[S, N]`` each; ``target_logit [N]``
    zeroed, since every slice adds to it)."""
    n_rows = hidden.shape[0]
    cols = tile_cols(n_rows, vocab_size)
    n_slices = -(-vocab_size // cols)
    new = dict(device=hidden.device, dtype=torch.float32)
    sum_exp_shifted = torch.empty(n_slices, n_rows, **new) if return_entropy else None
    return cols, (torch.empty(n_slices, n_rows, **new), torch.empty(n_slices, n_rows, **new),
                  sum_exp_shifted, torch.zeros(n_rows, **new))


def linear_logprobs_partials(hidden, weight, bias, targets, *, inv_temperature, softcap,
                             return_entropy):
    """Per-slice softmax statistics of ``z' = softcap(hidden @ weight.T + bias) / T`` (maxes of
    the keys ``softcap(z)``, sums of ``exp((key - max) / T)``: ``_vocab_stats``).

    Args:
        hidden: ``[N, D]`` contiguous; weight ``[V, D]``; bias ``[V]`` or None.
        targets: ``[N]`` ids relative to this weight's first row (a shard's ids may be outside
            ``[0, V)``: they add nothing to ``target_logit``).
    Returns:
        ``(row_max, sum_exp, sum_exp_shifted or None)``, each ``[S, N]`` float32 for
        ``S = ceil(V / tile_cols)`` slices, and ``target_logit [N]`` (see ``_vocab_stats``).
    """
    vocab_size = weight.shape[0]
    cols, (row_max, sum_exp, sum_exp_shifted, target_logit) = partials_buffers(
        hidden, vocab_size, return_entropy)
    for index, start in enumerate(range(0, vocab_size, cols)):
        end = min(start + cols, vocab_size)
        z = key_(raw_logits_tile(hidden, weight, bias, start, end), softcap)
        in_slice = (targets >= start) & (targets < end)
        local = torch.where(in_slice, targets - start, 0).long()
        target_logit += torch.where(in_slice, z.gather(1, local[:, None]).squeeze(1), 0.0)
        tile_max = z.amax(dim=1).clamp_(min=FINITE_MIN)
        shifted = z.sub_(tile_max[:, None])  # (key - max) / T: the difference first
        if inv_temperature != 1.0:
            shifted.mul_(inv_temperature)
        if return_entropy:
            p = shifted.exp()
            sum_exp[index] = p.sum(dim=1)
            # -inf logits: clamp so that their term is 0 * finite, not 0 * -inf = NaN.
            sum_exp_shifted[index] = p.mul_(shifted.clamp_(min=FINITE_MIN)).sum(dim=1)
        else:
            sum_exp[index] = shifted.exp_().sum(dim=1)
        row_max[index] = tile_max
    return row_max, sum_exp, sum_exp_shifted, target_logit


def linear_logprobs_grad_tile(hidden, weight, bias, targets, stats, entropy, grad_logprobs,
                              grad_entropy, start: int, end: int, *, inv_temperature, softcap):
    """Gradient of ``sum(go_lp * logprob + go_ent * entropy)`` w.r.t. the raw logits of
    vocabulary columns ``[start, end)``: a fresh ``[N, end-start]`` tensor in ``hidden.dtype``.

    ``stats`` (``[N, 2]``: max and log-sum of each row) and ``entropy`` (``[N]``) are the merged
    per-row results of the forward, float32;
    ``grad_*`` are float32 ``[N]`` or None.
    """
    raw = raw_logits_tile(hidden, weight, bias, start, end)
    row_max, log_sum = stats[:, 0:1], stats[:, 1:2]
    if softcap is None:
        log_p = raw.sub_(row_max)
    else:
        tanh = raw.div_(softcap).tanh_()
        # dz'/dz = (1 - tanh(z / s)^2) / T
        dz = tanh.square().neg_().add_(1.0).mul_(inv_temperature)
        log_p = tanh.mul_(softcap).sub_(row_max)
    # log p = (key - max) / T - log sum, the difference taken before the scaling.
    if inv_temperature != 1.0:
        log_p.mul_(inv_temperature)
    log_p.sub_(log_sum)
    # grad wrt z' = go_lp * (onehot - p) + go_ent * p * (-log p - entropy)
    #             = -p * (go_lp + go_ent * (log p + entropy)) + go_lp * onehot
    if grad_entropy is None:
        grad = log_p.exp_().mul_(-grad_logprobs[:, None])
    else:
        p = log_p.exp()
        # log p clamped at -1000 (exp underflows below ~-104): a -inf logit gives 0 * finite.
        coef = log_p.clamp_(min=-1000.0).add_(entropy[:, None]).mul_(grad_entropy[:, None])
        if grad_logprobs is not None:
            coef.add_(grad_logprobs[:, None])
        grad = coef.mul_(p).neg_()
    if grad_logprobs is not None:
        in_slice = (targets >= start) & (targets < end)
        local = torch.where(in_slice, targets - start, 0).long()
        grad.scatter_add_(1, local[:, None], torch.where(in_slice, grad_logprobs, 0.0)[:, None])
    if softcap is not None:
        grad.mul_(dz)
    elif inv_temperature != 1.0:
        grad.mul_(inv_temperature)
    return grad if grad.dtype == hidden.dtype else grad.to(hidden.dtype)
