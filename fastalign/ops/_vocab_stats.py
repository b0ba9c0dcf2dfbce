"""Merging softmax statistics of vocabulary slices: kernel splits, chunks and ranks alike.

A slice ``s`` of the vocabulary (a Triton split, a torch chunk, or a rank's shard of the lm_head)
summarizes each row by ``m_s = max key`` (``key = softcap(z)``, before the temperature:
fastalign/kernels/_math.py), ``S_s = sum exp(x)`` and, for the entropy, ``T_s = sum exp(x) x``
with ``x = (key - m_s) / T``. Both sums are kept relative to the slice's own max, so large
logits never cancel; merging shifts them to the global max ``M`` with ``d_s = (m_s - M) / T``:
``S = sum_s exp(d_s) S_s`` and ``T = sum_s exp(d_s) T_s + (exp(d_s) d_s) S_s``, giving
``entropy = log S - T / S``. ``M`` and ``log S`` are kept apart (never summed into one
log-sum-exp): with logits near 1e6 the sum would lose the bits that
``log p = (key - M) / T - log S`` needs, near 1e20 all of them. ``d_s`` is clamped to the most
negative float: slices at opposite ends of the float range would overflow it to -inf and make
``exp(d_s) d_s = 0 * -inf`` NaN.

With a ``process_group`` (the lm_head sharded by vocabulary) the same merge runs across ranks:
one all-reduce of the max, one of the stacked sums.

The row statistics TRL logs merge the same way: ``sum exp(2 x)`` shifted by ``exp(2 d_s)``
(``log sum p^2 = log sum exp(2x) - 2 log S``), the key sums added, the maxes before the target
taken (the target is the top-1 token when its key is the max and no earlier column reaches it).
"""

from __future__ import annotations

import torch

from ._tiles import FINITE_MIN  # noqa: F401  (slices start their max there, see _tiles)


def scaled_delta(slice_max: torch.Tensor, global_max: torch.Tensor,
                 inv_temperature: float) -> torch.Tensor:
    """``d_s = (m_s - M) / T``, clamped to the most negative float (NaN stays NaN)."""
    return ((slice_max - global_max) * inv_temperature).clamp_(min=FINITE_MIN)


def resolve_group(group_name: str):
    """The process group a custom op received by name ("" = not sharded)."""
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name)


def vocab_shard(process_group, local_vocab: int, device: torch.device) -> tuple[int, int]:
    """(offset of this rank's first vocabulary id, total vocabulary) of a head sharded by rows in
    rank order; ``(0, local_vocab)`` without a group. Shards may differ in size.

    The shard sizes are all-gathered on every call (one int per rank). They are not cached:
    a rank cannot know that the other ranks' sizes are unchanged (a second head sharded
    differently over the same group), and a rank that skipped the collective the others enter
    would hang them.
    """
    if process_group is None:
        return 0, local_vocab
    import torch.distributed as dist
    world_size, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    sizes = torch.zeros(world_size, dtype=torch.int64, device=device)
    mine = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(sizes, mine, group=process_group)
    sizes = sizes.tolist()
    return int(sum(sizes[:rank])), int(sum(sizes))


def merge_vocab_partials(row_max: torch.Tensor, sum_exp: torch.Tensor,
                         sum_exp_shifted: torch.Tensor | None, target_logit: torch.Tensor,
                         row_stats=None, process_group=None, inv_temperature: float = 1.0,
                         vocab_total: int = 0):
    """Merges ``[S, N]`` per-slice statistics (see the module docstring) into per-row results.

    ``target_logit [N]`` is the target's key summed over slices, 0 in slices without it;
    ``row_stats`` None or the ``[S, N]`` ``(key_sum, sum_sq_exp, max_before)`` of
    ``_tiles.row_stat_slice_`` (``vocab_total`` then the whole vocabulary's size).
    Returns ``(softmax_stats [N, 2], entropy [N] or None, log_prob_target [N],
    row_stats [N, 3] or None)``, float32: ``softmax_stats[:, 0] = M`` and ``[:, 1] = log S``,
    the target's ``log p`` from them; ``row_stats`` = (mean of z', 1.0 where the target is the
    top-1 token else 0.0, log sum p^2).
    """
    import torch.distributed as dist

    global_max = row_max.amax(0)
    if process_group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=process_group)
    delta = scaled_delta(row_max, global_max, inv_temperature)
    scale = torch.exp(delta)
    sums = [(sum_exp * scale).sum(0), target_logit]
    if sum_exp_shifted is not None:
        sums.append((scale * sum_exp_shifted + (scale * delta) * sum_exp).sum(0))
    if row_stats is not None:
        key_sum, sum_sq_exp, max_before = row_stats
        sums += [key_sum.sum(0), (sum_sq_exp * scale.square()).sum(0)]
        max_before = max_before.amax(0)
    if process_group is not None:
        stacked = torch.stack(sums)
        dist.all_reduce(stacked, group=process_group)
        sums = list(stacked.unbind(0))
        if row_stats is not None:
            dist.all_reduce(max_before, op=dist.ReduceOp.MAX, group=process_group)
    log_sum_exp = sums[0].log()
    entropy = None if sum_exp_shifted is None else log_sum_exp - sums[2] / sums[0]
    log_prob_target = (sums[1] - global_max) * inv_temperature - log_sum_exp
    merged_row_stats = None
    if row_stats is not None:
        key_total, sum_sq_total = sums[-2], sums[-1]
        target_key = sums[1]
        is_top1 = (target_key >= global_max) & (target_key > max_before)
        merged_row_stats = torch.stack([key_total * (inv_temperature / vocab_total),
                                        is_top1.float(),
                                        sum_sq_total.log() - 2.0 * log_sum_exp], dim=1)
    return (torch.stack([global_max, log_sum_exp], dim=1), entropy, log_prob_target,
            merged_row_stats)


def merge_kl_partials(row_max, sum_exp, ref_max, ref_sum_exp, cross, inv_temperature: float = 1.0):
    """``(kl [N], stats [N, 4])`` per row from ``[S, N]`` slice statistics of both softmaxes (maxes
    of the raw logits, sums of ``exp(s)`` with ``s = (z - m) / T``, and
    ``cross = sum exp(s) (s - s_ref)``, see ``fastalign.kernels.kl``):
    ``KL = cross / S - log S + log S_ref`` once all slices are shifted to the global maxes.

    ``stats = (M, log S, M_ref, shift)`` with ``shift = log S - log S_ref + KL`` is what the
    backward needs: ``dKL/dz'_j = p_j (((z_j - M) - (z_ref,j - M_ref)) / T - shift)``, every
    difference formed relative to its own side's max, never between two large log-sum-exps.
    """
    global_max = row_max.amax(0)
    ref_global_max = ref_max.amax(0)
    delta = scaled_delta(row_max, global_max, inv_temperature)
    ref_delta = scaled_delta(ref_max, ref_global_max, inv_temperature)
    scale = torch.exp(delta)
    total = (sum_exp * scale).sum(0)
    ref_total = (ref_sum_exp * torch.exp(ref_delta)).sum(0)
    # exp(d) (cross + (d - d_ref) S) as exp(d) cross + (exp(d) (d - d_ref)) S: a slice whose
    # exp(d) is 0 adds 0, not 0 * inf.
    cross_total = (scale * cross + (scale * (delta - ref_delta)) * sum_exp).sum(0)
    log_total, ref_log_total = total.log(), ref_total.log()
    kl = cross_total / total - log_total + ref_log_total
    shift = (log_total - ref_log_total) + kl
    return kl, torch.stack([global_max, log_total, ref_global_max, shift], dim=1)
