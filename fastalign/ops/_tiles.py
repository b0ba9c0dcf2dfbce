"""The torch home of the softmax math the torch and native backends share: the finite-minimum
constant, the log-p floor, target masks, the fused-linear logits tiles, and the gradient of
``go_lp * log p[target] + go_ent * entropy`` w.r.t. a block of raw logits (used by
``token_logprobs_torch`` and ``linear_logprobs_torch`` alike). The merge of per-slice statistics
lives in ``_vocab_stats``; the Triton twin of this module is ``kernels/_math.py``, the C++ one
``csrc/rows.h``.
"""

from __future__ import annotations

import torch

# Maxes start at the most negative float rather than -inf, so that key - max is never
# -inf - -inf for a block whose logits are all -inf; exp of it is still exactly 0, and no finite
# logit lies below it. (kernels/_math.py FINITE_MIN, csrc/rows.h kFiniteMin.)
FINITE_MIN = torch.finfo(torch.float32).min
# log p is clamped here (exp underflows below ~-104) in the entropy gradient: a -inf logit then
# gives 0 * finite rather than 0 * inf = NaN. (kernels/_math.py LOG_P_FLOOR, csrc/rows.h kLogPFloor.)
LOG_P_FLOOR = -1000.0
# The ignore_index given to the row kernels where every row reaching them is kept (compacted
# rows, a fused loss's chunks): an id no row has.
NO_TARGET = -(2**62)

# A [N, cols] float32 tile of about 4 MiB: wide enough for efficient matmuls, small enough that
# the elementwise passes over it stay mostly in cache (in a quick sweep at N = 2048, D = 256 on
# 2 cores it beat 4x larger tiles in backward), and far below the logits' size.
TILE_ELEMENTS = 1 << 20


def target_masks(targets: torch.Tensor, vocab_size: int, ignore_index: int):
    """(ignored rows, ids safe to gather, 0 or NaN per row for ids outside [0, V))."""
    ignored = targets == ignore_index
    valid = (targets >= 0) & (targets < vocab_size)
    safe_targets = torch.where(valid, targets, 0).long()
    nan_if_invalid = torch.where(valid | ignored, 0.0, float("nan"))
    return ignored, safe_targets, nan_if_invalid


def softcapped(z: torch.Tensor, softcap: float) -> torch.Tensor:
    """tanh(z / s) of ``z`` as a fresh fp32 tensor (upcast first: an op on bf16/fp16 inputs
    computes in their precision even with an fp32 out)."""
    return torch.empty(z.shape, dtype=torch.float32, device=z.device).copy_(z).div_(softcap).tanh_()


def softcap_keys(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The keys ``softcap(z) = s tanh(z / s)`` of raw logits (``z`` itself without a softcap),
    fresh float32 where there is one: what maxes and the row statistics are taken of."""
    return z if softcap is None else softcapped(z, softcap).mul_(softcap)


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


def tile_cols(n_rows: int, vocab_size: int) -> int:
    """Vocabulary columns per tile of the torch and native fused-linear backends:
    ``TILE_ELEMENTS`` in all, at least 256 columns so that huge batches still get matmuls of a
    useful width."""
    return min(vocab_size, max(256, TILE_ELEMENTS // max(n_rows, 1)))


def partials_buffers(hidden, vocab_size: int, return_entropy: bool, cols: int | None = None):
    """``(cols, (row_max, sum_exp, sum_exp_shifted or None, target_logit))``: the slice width
    (``tile_cols``' unless given) and the float32 outputs of a fused-linear ``partials``
    launcher (``[S, N]`` each; ``target_logit [N]`` zeroed, since every slice adds to it)."""
    n_rows = hidden.shape[0]
    cols = tile_cols(n_rows, vocab_size) if cols is None else cols
    n_slices = -(-vocab_size // cols)
    new = dict(device=hidden.device, dtype=torch.float32)
    sum_exp_shifted = torch.empty(n_slices, n_rows, **new) if return_entropy else None
    return cols, (torch.empty(n_slices, n_rows, **new), torch.empty(n_slices, n_rows, **new),
                  sum_exp_shifted, torch.zeros(n_rows, **new))


def row_stat_partials(n_slices: int, like: torch.Tensor):
    """``(key_sum, sum_sq_exp, max_before)``, each an empty float32 ``[S, N]``: the per-slice
    row statistics a fused-linear forward fills on request (``row_stat_slice_``)."""
    return tuple(like.new_empty(n_slices, like.shape[0], dtype=torch.float32) for _ in range(3))


def row_stat_slice_(keys: torch.Tensor, tile_max: torch.Tensor, local_targets: torch.Tensor,
                    inv_temperature: float, partials, index: int) -> None:
    """Slice ``index`` of the row statistics from a float32 ``[N, cols]`` tile of keys
    (``softcap(z)``) and its rows' max key: the sum of the keys (the mean logit), ``sum
    exp(2 (key - max) / T)`` (``log sum p^2``) and the max key of the columns before each row's
    target (``local_targets``, ids relative to the tile: past its end the whole tile counts,
    before it none; for the first-max rule of "is the target the top-1 token")."""
    key_sum, sum_sq_exp, max_before = partials
    key_sum[index] = keys.sum(dim=1)
    shifted = torch.sub(keys, tile_max[:, None])
    if inv_temperature != 1.0:
        shifted.mul_(inv_temperature)
    sum_sq_exp[index] = shifted.mul_(2.0).exp_().sum(dim=1)
    columns = torch.arange(keys.shape[1], device=keys.device)
    before = columns[None, :] < local_targets[:, None]
    max_before[index] = keys.masked_fill(~before, float("-inf")).amax(dim=1)


def reduced_tile_partials(hidden, weight, bias, targets, reduce_tile, *, cols: int | None,
                          inv_temperature, softcap, return_entropy: bool,
                          return_row_stats: bool):
    """A fused-linear ``partials`` launcher's outputs (``linear_logprobs_torch``'s contract)
    where one row kernel reduces each whole float32 logits slice ``raw_logits_tile`` makes (the
    native and the cuBLAS paths): ``reduce_tile(tile, start) -> (max [N], sum_exp [N],
    sum_exp_shifted [N] or None, target_key [N])``, ``start`` the slice's first column. The row
    statistics, on request, come from the same tile: no second matmul."""
    vocab_size = weight.shape[0]
    cols, (row_max, sum_exp, sum_exp_shifted, target_logit) = partials_buffers(
        hidden, vocab_size, return_entropy, cols)
    row_stats = row_stat_partials(row_max.shape[0], hidden) if return_row_stats else None
    if hidden.shape[0] == 0:  # no row kept: nothing to compute
        return row_max, sum_exp, sum_exp_shifted, target_logit, row_stats
    for index, start in enumerate(range(0, vocab_size, cols)):
        tile = raw_logits_tile(hidden, weight, bias, start, min(start + cols, vocab_size))
        row_max[index], sum_exp[index], shifted, target_key = reduce_tile(tile, start)
        if return_entropy:
            sum_exp_shifted[index] = shifted
        target_logit += target_key
        if row_stats is not None:
            row_stat_slice_(softcap_keys(tile, softcap), row_max[index], targets - start,
                            inv_temperature, row_stats, index)
    return row_max, sum_exp, sum_exp_shifted, target_logit, row_stats


def row_scale(inv_temperature):
    """``1 / T`` as a multiplier of ``[r, c]`` blocks: None for a float 1.0 (nothing to scale),
    the float itself, or a per-row ``[r]`` tensor as ``[r, 1]``."""
    if isinstance(inv_temperature, torch.Tensor):
        return inv_temperature[:, None]
    return None if inv_temperature == 1.0 else inv_temperature


def native_temperature(inv_temperature) -> tuple[float, torch.Tensor | None]:
    """``(inv_temperature, row_inv_temperature)`` as the C++ entry points take them
    (csrc/kernels.h): one float, or a per-row float32 tensor (the float then unused)."""
    if isinstance(inv_temperature, torch.Tensor):
        return 1.0, inv_temperature
    return inv_temperature, None


def logits_grad_(z: torch.Tensor, stats: torch.Tensor, entropy, grad_logprobs, grad_entropy,
                 target_cols, target_grad, *, inv_temperature, softcap,
                 out: torch.Tensor | None = None, cap_log_p: bool = False,
                 support=None) -> torch.Tensor:
    """Gradient of ``sum(go_lp * log p[target] + go_ent * entropy)`` w.r.t. the raw logits ``z``
    (``[r, c]`` rows, any float dtype), as float32.

    ``stats [r, 2]`` holds each row's max key and log-sum (NaN poisons the row); ``entropy``,
    ``grad_logprobs``, ``grad_entropy`` are float32 ``[r]`` or None; ``target_grad [r]`` is added
    at column ``target_cols [r]`` (0 where the target lies outside ``z``'s columns; ``[r, k]``
    both: k additions per row).
    Without a softcap the result is written into ``out`` when given (``z`` itself, or an fp32
    buffer); with one, ``z`` is overwritten only when ``out is z``. ``cap_log_p`` clamps
    ``log p`` at 0, for logits formed apart from the pass that found the row max (one rounding
    above it would give p > 1). ``inv_temperature``: a float or the rows' ``[r]`` float32
    tensor. ``support`` (``_sampler.Support``, its ``kth`` of these rows): p is renormalized
    over the sampler's support, 0 on removed columns (``stats`` then hold the kept log-sum; a
    removed target's upstream gradient must be 0, as the ops make it).
    """
    row_max, log_sum = stats[:, 0:1], stats[:, 1:2]
    scale = row_scale(inv_temperature)
    kept = None
    if support is not None and support.kth is not None:
        kept = z >= support.kth[:, None]  # on the raw logits, before they may be overwritten
    dz = None
    if softcap is None:
        log_p = torch.sub(z, row_max, out=out)
    else:
        tanh = z.div_(softcap).tanh_() if out is z else softcapped(z, softcap)
        # dz'/dz = (1 - tanh(z / s)^2) / T
        dz = tanh.square().neg_().add_(1.0)
        if scale is not None:
            dz.mul_(scale)
        log_p = tanh.mul_(softcap).sub_(row_max)
    # log p = (key - max) / T - log sum, the difference taken before the scaling.
    if scale is not None:
        log_p.mul_(scale)
    if support is not None and support.log_min_p is not None:
        above = log_p >= support.log_min_p  # (key - M) / T, as the forward's sums test it
        kept = above if kept is None else kept.logical_and_(above)
    log_p.sub_(log_sum)
    if cap_log_p:
        log_p.clamp_(max=0.0)
    if kept is not None:
        log_p.masked_fill_(~kept, float("-inf"))  # p = 0; the entropy term clamps log p
    # grad wrt z' = go_lp * (onehot - p) + go_ent * p * (-log p - entropy)
    #             = -p * (go_lp + go_ent * (log p + entropy)) + go_lp * onehot
    if grad_entropy is None:
        grad = log_p.exp_().mul_(-grad_logprobs[:, None])
    else:
        p = log_p.exp()
        coef = log_p.clamp_(min=LOG_P_FLOOR).add_(entropy[:, None]).mul_(grad_entropy[:, None])
        if grad_logprobs is not None:
            coef.add_(grad_logprobs[:, None])
        grad = coef.mul_(p).neg_()
    if grad_logprobs is not None:
        if target_cols.dim() == 1:
            target_cols, target_grad = target_cols[:, None], target_grad[:, None]
        grad.scatter_add_(1, target_cols, target_grad)
    if dz is not None:
        grad.mul_(dz)
    elif scale is not None:
        grad.mul_(scale)
    return grad
