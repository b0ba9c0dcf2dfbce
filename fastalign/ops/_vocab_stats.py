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

from ..kernels.divergence_interface import (AUX, CROSS, FORWARD_KL, MAX, REVERSE_KL, STUDENT_TERM,
                                           SUM_EXP, SUM_EXP_SHIFTED, TEACHER_MAX,
                                           TEACHER_SUM_EXP, TEACHER_TERM)
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


def merge_divergence_partials(partials: torch.Tensor, *, spec, process_group=None):
    """``(divergence [N] or None, entropy [N], stats [N, ROW_STATS])`` from the ``[S, PARTIALS,
    N]`` first-pass statistics of ``S`` vocabulary slices of both models (rows and columns:
    ``kernels/divergence_interface.py``), merged across the ranks of ``process_group`` too.

    Each side's sums move to its global max as in :func:`merge_vocab_partials`; the KL cross
    term ``sum exp(s_w) (s_w - s_o)`` of the weighted side ``w`` (the student for the reverse
    KL, the teacher for the forward one) moves as ``exp(d_w) (cross + (d_w - d_o) S_w)``,
    written ``exp(d_w) cross + (exp(d_w) (d_w - d_o)) S_w`` so that a slice whose ``exp(d_w)``
    is 0 adds 0, not 0 * inf. Then ``KL = cross / S_w - log S_w + log S_o``, every difference
    formed relative to its own side's max, never between two large log-sum-exps. The JSD's
    divergence needs the second pass (:func:`merge_mixture_partials`): None here.
    """
    import torch.distributed as dist

    maxes = torch.stack([partials[:, MAX].amax(0), partials[:, TEACHER_MAX].amax(0)])
    if process_group is not None:
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=process_group)
    delta = scaled_delta(partials[:, MAX], maxes[0], spec.inv_temperature)
    teacher_delta = scaled_delta(partials[:, TEACHER_MAX], maxes[1], spec.inv_temperature)
    scale, teacher_scale = torch.exp(delta), torch.exp(teacher_delta)
    sum_exp, teacher_sum_exp = partials[:, SUM_EXP], partials[:, TEACHER_SUM_EXP]
    if spec.mode == FORWARD_KL:
        weighted = (teacher_scale, teacher_delta - delta, teacher_sum_exp)
    else:
        weighted = (scale, delta - teacher_delta, sum_exp)
    cross_scale, cross_shift, cross_sum = weighted
    sums = torch.stack([
        sum_exp * scale, teacher_sum_exp * teacher_scale,
        cross_scale * partials[:, CROSS] + (cross_scale * cross_shift) * cross_sum,
        scale * partials[:, SUM_EXP_SHIFTED] + (scale * delta) * sum_exp]).sum(1)
    if process_group is not None:
        dist.all_reduce(sums, group=process_group)
    total, teacher_total, cross, shifted = sums.unbind(0)
    log_total, teacher_log_total = total.log(), teacher_total.log()
    entropy = log_total - shifted / total
    divergence, aux = None, torch.zeros_like(total)
    if spec.mode == REVERSE_KL:
        divergence = cross / total - log_total + teacher_log_total
        # The backward's shift: dKL/dz'_j = p_j ((s_j - s_t,j) - shift), s relative to each max.
        aux = (log_total - teacher_log_total) + divergence
    elif spec.mode == FORWARD_KL:
        divergence = cross / teacher_total - teacher_log_total + log_total
        aux = divergence
    stats = torch.stack([maxes[0], log_total, maxes[1], teacher_log_total, aux, entropy], dim=1)
    return divergence, entropy, stats


def merge_mixture_partials(stats: torch.Tensor, terms: torch.Tensor, *, spec,
                           process_group=None) -> torch.Tensor:
    """The JSD ``[N]`` from the ``[S, 2, N]`` second-pass sums of every slice (and rank); writes
    ``KL(p_s || m)``, what its backward needs, into ``stats``' AUX column."""
    sums = terms.sum(0)
    if process_group is not None:
        import torch.distributed as dist
        dist.all_reduce(sums, group=process_group)
    teacher_term, student_term = sums[TEACHER_TERM], sums[STUDENT_TERM]
    divergence = spec.beta * teacher_term + (1.0 - spec.beta) * student_term
    # The backward reads the student's term only: a NaN divergence (a NaN teacher logit) must
    # still poison its gradient.
    stats[:, AUX] = student_term + (divergence - divergence)
    return divergence


def divergence_over_slices(slices, first_pass, second_pass, *, spec, process_group=None):
    """``(divergence [N], entropy [N], stats [N, ROW_STATS])`` of a divergence whose vocabulary
    comes in ``slices``: ``first_pass(slice)`` gives a slice's ``[PARTIALS, N]`` statistics,
    merged (and across ranks); for the JSD, which needs both normalizers before its mixture,
    ``second_pass(slice, stats)`` then gives a slice's ``[2, N]`` sums. Two passes at most."""
    partials = torch.stack([first_pass(part) for part in slices])
    divergence, entropy, stats = merge_divergence_partials(partials, spec=spec,
                                                           process_group=process_group)
    if divergence is None:
        terms = torch.stack([second_pass(part, stats) for part in slices])
        divergence = merge_mixture_partials(stats, terms, spec=spec, process_group=process_group)
    return divergence, entropy, stats


def mixture_then_grad(mixture, backward):
    """A backend's ``mixture_grad`` launcher (``_backends.DivergenceLaunchers``) made of its
    ``mixture`` and ``backward``: the second pass, the row's ``KL(p_s || m)`` merged into
    ``stats``, then the gradient written over the logits. The Triton and torch backends use it
    as it is: on a GPU both passes are bound by memory traffic, which keeping per-column
    intermediates for a later sweep (as ``csrc/jsd_grad.cpp`` does in a CPU core's cache)
    would raise."""
    def mixture_grad(logits, teacher_logits, layout, teacher_layout, mask, stats,
                     grad_divergence, *, spec):
        terms = mixture(logits, teacher_logits, layout, teacher_layout, mask, stats, spec=spec)
        merge_mixture_partials(stats, terms[None], spec=spec)
        backward(logits, teacher_logits, layout, teacher_layout, mask, stats, grad_divergence,
                 None, logits, layout, spec=spec)
        return terms
    return mixture_grad
