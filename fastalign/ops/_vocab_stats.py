"""Merging softmax statistics of vocabulary slices: kernel splits, chunks and ranks alike.

A slice ``s`` of the vocabulary (a Triton split, a torch chunk, or a rank's shard of the lm_head)
summarizes each row by ``m_s = max z'``, ``S_s = sum exp(z' - m_s)`` and, for the entropy,
``T_s = sum exp(z' - m_s) * (z' - m_s)``. Both sums are kept relative to the slice's own max,
so large logits never cancel; merging shifts them to the global max ``M``:
``S = sum_s exp(m_s - M) S_s`` and ``T = sum_s exp(m_s - M) (T_s + (m_s - M) S_s)``, giving
``lse = M + log S`` and ``entropy = log S - T / S``. ``M`` and ``log S`` are kept apart (not
summed into ``lse``): with logits near 1000 the sum would lose the low bits that
``log p = (z' - M) - log S`` needs.

With a ``process_group`` (the lm_head sharded by vocabulary) the same merge runs across ranks:
one all-reduce of the max, one of the stacked sums.
"""

from __future__ import annotations

import torch

# Slices start their max here rather than at -inf, so that (m_s - M) * S_s is 0 * finite = 0
# for a slice whose logits are all -inf; exp(m_s - M) is still exactly 0 for it.
FINITE_MIN = -3.0e38


def resolve_group(group_name: str):
    """The process group a custom op received by name ("" = not sharded)."""
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name)


def vocab_shard(process_group, local_vocab: int, device: torch.device) -> tuple[int, int]:
    """(offset of this rank's first vocabulary id, total vocabulary) of a head sharded by rows in
    rank order; ``(0, local_vocab)`` without a group. Shards may differ in size."""
    if process_group is None:
        return 0, local_vocab
    import torch.distributed as dist
    sizes = torch.zeros(dist.get_world_size(process_group), dtype=torch.int64, device=device)
    mine = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(sizes, mine, group=process_group)
    sizes = sizes.tolist()
    rank = dist.get_rank(process_group)
    return int(sum(sizes[:rank])), int(sum(sizes))


def merge_vocab_partials(row_max: torch.Tensor, sum_exp: torch.Tensor,
                         sum_exp_shifted: torch.Tensor | None, target_logit: torch.Tensor,
                         process_group=None):
    """Merges ``[S, N]`` per-slice statistics (see the module docstring) into per-row results.

    ``target_logit [N]`` is the target's ``z'`` summed over slices, 0 in slices without it.
    Returns ``(softmax_stats [N, 2], entropy [N] or None, log_prob_target [N])``, float32:
    ``softmax_stats[:, 0] = M`` and ``[:, 1] = log S``, the target's ``log p`` from them.
    """
    import torch.distributed as dist

    global_max = row_max.amax(0)
    if process_group is not None:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=process_group)
    scale = torch.exp(row_max - global_max)
    sums = [(sum_exp * scale).sum(0), target_logit]
    if sum_exp_shifted is not None:
        sums.append((scale * (sum_exp_shifted + (row_max - global_max) * sum_exp)).sum(0))
    if process_group is not None:
        stacked = torch.stack(sums)
        dist.all_reduce(stacked, group=process_group)
        sums = list(stacked.unbind(0))
    log_sum_exp = sums[0].log()
    entropy = None if sum_exp_shifted is None else log_sum_exp - sums[2] / sums[0]
    log_prob_target = (sums[1] - global_max) - log_sum_exp
    return torch.stack([global_max, log_sum_exp], dim=1), entropy, log_prob_target


def merge_kl_partials(row_max, sum_exp, ref_max, ref_sum_exp, cross):
    """``(kl, lse, shift)`` per row from ``[S, N]`` slice statistics of both softmaxes, with
    ``cross = sum exp(z' - m) ((z' - m) - (z'_ref - m_ref))`` (see ``fastalign.kernels.kl``):
    ``KL = cross / S - log S + log S_ref`` once all slices are shifted to the global maxes.

    ``shift = lse - lse_ref + KL`` is what the backward subtracts from ``z' - z'_ref``
    (``dKL/dz'_j = p_j ((z'_j - z'_ref,j) - shift)``); it is formed from the maxes' difference
    and the log-sums, never as the difference of two large log-sum-exps.
    """
    global_max = row_max.amax(0)
    ref_global_max = ref_max.amax(0)
    scale = torch.exp(row_max - global_max)
    total = (sum_exp * scale).sum(0)
    ref_total = (ref_sum_exp * torch.exp(ref_max - ref_global_max)).sum(0)
    offset = (row_max - global_max) - (ref_max - ref_global_max)
    cross_total = (scale * (cross + offset * sum_exp)).sum(0)
    log_total, ref_log_total = total.log(), ref_total.log()
    kl = cross_total / total - log_total + ref_log_total
    shift = (global_max - ref_global_max) + (log_total - ref_log_total) + kl
    return kl, global_max + log_total, shift
