"""Triton kernels for the per-token PPO/GRPO math of ``fastalign.losses.policy_loss``, and
their launchers: one pass over ``[B, T]`` instead of a dozen elementwise kernels and their
temporaries.

Forward: one program per sequence walks its tokens in ``BLOCK_T`` tiles and writes the
sequence's masked sums (``STATS`` columns): the per-token loss (clipped surrogate, dual clip,
KL penalty), the token count, the two clip counts, the ratio, ``(log ratio)^2 / 2`` and the
KL estimate. Every aggregation and metric of ``policy_loss`` is a function of these ``[B]``
sums. With sequence-level ratios (GSPO) a first pass forms the sequence's mean log-ratio.

Backward: the gradient w.r.t. ``logprobs`` of ``sum_b w_b * loss_sum_b`` for per-sequence
weights ``w_b`` (the aggregation's), recomputed per token from the same inputs.
"""

import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (records how these kernels were defined: fastalign/_backend.py)
from . import policy_interface as interface

# The columns of the forward's [B, STATS] output and the KL_KIND codes, declared in
# policy_interface.py (plain Python, which the ops read); globals a jit function reads must be
# constexpr.
_LOSS = tl.constexpr(interface.LOSS)
_COUNT = tl.constexpr(interface.COUNT)
_CLIP_LOW = tl.constexpr(interface.CLIP_LOW)
_CLIP_HIGH = tl.constexpr(interface.CLIP_HIGH)
_RATIO = tl.constexpr(interface.RATIO)
_APPROX_KL = tl.constexpr(interface.APPROX_KL)
_KL = tl.constexpr(interface.KL)
_STATS = tl.constexpr(interface.STATS)
_KL_NONE = tl.constexpr(interface.KL_NONE)
_K1 = tl.constexpr(interface.KL_KINDS["k1"])
_K2 = tl.constexpr(interface.KL_KINDS["k2"])  # any other code is k3
BLOCK_T = 1024


@triton.jit
def _tile(logprobs_ptr, old_ptr, advantages_ptr, mask_ptr, ref_ptr, row_offset, start, length,
          KL_KIND: tl.constexpr, BLOCK_T: tl.constexpr):
    """Columns ``[start, start + BLOCK_T)`` of one sequence: ``(cols, inside, mask, lp, old,
    adv, ref)``, 0 past its end; ``ref`` only with a KL term (``lp`` stands in for it without
    one). A pass that does not use a tile loses its loads to the compiler's dead-code
    elimination."""
    cols = start + tl.arange(0, BLOCK_T)
    inside = cols < length
    mask = tl.load(mask_ptr + row_offset + cols, mask=inside, other=0.0)
    lp = tl.load(logprobs_ptr + row_offset + cols, mask=inside, other=0.0)
    old = tl.load(old_ptr + row_offset + cols, mask=inside, other=0.0)
    adv = tl.load(advantages_ptr + row_offset + cols, mask=inside, other=0.0)
    if KL_KIND != _KL_NONE:
        ref = tl.load(ref_ptr + row_offset + cols, mask=inside, other=0.0)
    else:
        ref = lp
    return cols, inside, mask, lp, old, adv, ref


@triton.jit
def _sequence_log_ratio(logprobs_ptr, old_ptr, advantages_ptr, mask_ptr, row_offset, length,
                        BLOCK_T: tl.constexpr):
    """The sequence's masked mean of logprobs - old (0 for a sequence without tokens)."""
    total = 0.0
    count = 0.0
    for start in range(0, length, BLOCK_T):
        _, _, mask, lp, old, _, _ = _tile(logprobs_ptr, old_ptr, advantages_ptr, mask_ptr,
                                          logprobs_ptr, row_offset, start, length, _KL_NONE,
                                          BLOCK_T)
        total += tl.sum((lp - old) * mask, axis=0)
        count += tl.sum(mask, axis=0)
    return total / tl.maximum(count, 1.0)


@triton.jit
def _surrogate(ratio, adv, clip_low, clip_high, dual_clip, HAS_DUAL_CLIP: tl.constexpr):
    """The per-token clipped surrogate ``-min(ratio A, clamp(ratio, 1 - clip_low,
    1 + clip_high) A)`` (capped at ``-dual_clip A`` where ``A < 0``) and its derivative w.r.t.
    the ratio: -A where the unclipped term is the one kept (or both are equal), 0 where the
    clamp or the dual clip holds it constant. The forward uses the first, the backward the
    second; the compiler drops the other."""
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    loss = -tl.minimum(ratio * adv, clipped * adv)
    unclipped_kept = ratio * adv <= clipped * adv
    inside_clip = (ratio > 1.0 - clip_low) & (ratio < 1.0 + clip_high)
    grad = tl.where(unclipped_kept | inside_clip, -adv, 0.0)
    if HAS_DUAL_CLIP:
        grad = tl.where((adv < 0) & (-dual_clip * adv < loss), 0.0, grad)
        loss = tl.where(adv < 0, tl.minimum(loss, -dual_clip * adv), loss)
    return loss, grad


@triton.jit
def _kl_and_grad(lp, ref, KL_KIND: tl.constexpr):
    """(k(lp, ref), dk/dlp) with r = ref - lp: k1 = -r, k2 = r^2/2, k3 = exp(r) - r - 1."""
    r = ref - lp
    if KL_KIND == _K1:
        kl = -r
        grad = tl.full(r.shape, 1.0, tl.float32)
    elif KL_KIND == _K2:
        kl = r * r / 2
        grad = -r
    else:
        # Below |r| = 0.1 a series (exp(r) - r - 1 and 1 - exp(r) cancel: fastalign/ops/
        # kl_estimators.K3_SERIES_BELOW); r = +inf (a -inf log-prob under the policy) would make
        # exp(r) - r inf - inf, and k3's limit there is inf.
        small = tl.abs(r) < 0.1
        s = tl.where(small, r, 0.0)
        series = s * s * (0.5 + s * (1.0 / 6 + s * (1.0 / 24 + s * (1.0 / 120 + s / 720))))
        series_grad = -s * (1.0 + s * (0.5 + s * (1.0 / 6 + s * (1.0 / 24 + s / 120))))
        kl = tl.where(small, series, tl.where(r == float("inf"), r, tl.exp(r) - r - 1.0))
        grad = tl.where(small, series_grad, 1.0 - tl.exp(r))
    return kl, grad


@triton.jit
def _policy_forward_kernel(
    logprobs_ptr, old_ptr, advantages_ptr, mask_ptr, ref_ptr, stats_ptr, length,
    clip_low, clip_high, dual_clip, kl_coef,
    HAS_DUAL_CLIP: tl.constexpr, KL_KIND: tl.constexpr, SEQUENCE_LEVEL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_offset = row * length
    if SEQUENCE_LEVEL:
        sequence_log_ratio = _sequence_log_ratio(logprobs_ptr, old_ptr, advantages_ptr,
                                                 mask_ptr, row_offset, length, BLOCK_T)
    loss_sum = 0.0
    count = 0.0
    clip_low_count = 0.0
    clip_high_count = 0.0
    ratio_sum = 0.0
    approx_kl_sum = 0.0
    kl_sum = 0.0
    for start in range(0, length, BLOCK_T):
        _, _, mask, lp, old, adv, ref = _tile(logprobs_ptr, old_ptr, advantages_ptr, mask_ptr,
                                              ref_ptr, row_offset, start, length, KL_KIND,
                                              BLOCK_T)
        if SEQUENCE_LEVEL:
            log_ratio = tl.zeros([BLOCK_T], tl.float32) + sequence_log_ratio
        else:
            log_ratio = lp - old
        ratio = tl.exp(log_ratio)
        loss, _ = _surrogate(ratio, adv, clip_low, clip_high, dual_clip, HAS_DUAL_CLIP)
        if KL_KIND != _KL_NONE:
            kl, _ = _kl_and_grad(lp, ref, KL_KIND)
            loss += kl_coef * kl
            kl_sum += tl.sum(kl * mask, axis=0)
        loss_sum += tl.sum(loss * mask, axis=0)
        count += tl.sum(mask, axis=0)
        clip_low_count += tl.sum(tl.where((ratio < 1.0 - clip_low) & (adv < 0), mask, 0.0), axis=0)
        clip_high_count += tl.sum(tl.where((ratio > 1.0 + clip_high) & (adv > 0), mask, 0.0), axis=0)
        ratio_sum += tl.sum(ratio * mask, axis=0)
        approx_kl_sum += tl.sum((lp - old) * (lp - old) * 0.5 * mask, axis=0)
    out = stats_ptr + row * _STATS
    tl.store(out + _LOSS, loss_sum)
    tl.store(out + _COUNT, count)
    tl.store(out + _CLIP_LOW, clip_low_count)
    tl.store(out + _CLIP_HIGH, clip_high_count)
    tl.store(out + _RATIO, ratio_sum)
    tl.store(out + _APPROX_KL, approx_kl_sum)
    tl.store(out + _KL, kl_sum)


@triton.jit
def _policy_backward_kernel(
    logprobs_ptr, old_ptr, advantages_ptr, mask_ptr, ref_ptr, weights_ptr, grad_ptr, length,
    clip_low, clip_high, dual_clip, kl_coef,
    HAS_DUAL_CLIP: tl.constexpr, KL_KIND: tl.constexpr, SEQUENCE_LEVEL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_offset = row * length
    weight = tl.load(weights_ptr + row)  # d(loss)/d(loss_sum of this sequence)
    if SEQUENCE_LEVEL:
        # ratio_b = exp(mean log-ratio): d/d lp_t = (mask_t / count) * ratio_b * sum_t' dl/dratio
        sequence_log_ratio = _sequence_log_ratio(logprobs_ptr, old_ptr, advantages_ptr,
                                                 mask_ptr, row_offset, length, BLOCK_T)
        ratio = tl.exp(sequence_log_ratio)
        total = 0.0
        count = 0.0
        for start in range(0, length, BLOCK_T):
            _, _, mask, _, _, adv, _ = _tile(logprobs_ptr, old_ptr, advantages_ptr, mask_ptr,
                                             ref_ptr, row_offset, start, length, _KL_NONE,
                                             BLOCK_T)
            ratios = tl.zeros([BLOCK_T], tl.float32) + ratio
            _, surrogate_grad = _surrogate(ratios, adv, clip_low, clip_high, dual_clip,
                                           HAS_DUAL_CLIP)
            total += tl.sum(surrogate_grad * mask, axis=0)
            count += tl.sum(mask, axis=0)
        through_ratio = total * ratio / tl.maximum(count, 1.0)
    for start in range(0, length, BLOCK_T):
        cols, inside, mask, lp, old, adv, ref = _tile(logprobs_ptr, old_ptr, advantages_ptr,
                                                      mask_ptr, ref_ptr, row_offset, start,
                                                      length, KL_KIND, BLOCK_T)
        if SEQUENCE_LEVEL:
            grad = tl.zeros([BLOCK_T], tl.float32) + through_ratio
        else:
            ratio = tl.exp(lp - old)
            _, surrogate_grad = _surrogate(ratio, adv, clip_low, clip_high, dual_clip,
                                           HAS_DUAL_CLIP)
            grad = surrogate_grad * ratio
        if KL_KIND != _KL_NONE:
            _, kl_grad = _kl_and_grad(lp, ref, KL_KIND)
            grad += kl_coef * kl_grad
        tl.store(grad_ptr + row_offset + cols, grad * mask * weight, mask=inside)


def policy_stats(logprobs, old, advantages, mask, ref, *, clip_low, clip_high, dual_clip,
                 kl_coef, kl_kind, sequence_level):
    """``[B, STATS]`` float32 masked sums per sequence (columns: ``policy_interface.py``); all
    inputs ``[B, T]`` contiguous float32 (``ref`` None when ``kl_kind`` is ``KL_NONE``)."""
    batch, length = logprobs.shape
    stats = torch.empty(batch, interface.STATS, device=logprobs.device, dtype=torch.float32)
    block = min(BLOCK_T, triton.next_power_of_2(max(length, 1)))
    if batch > 0:
        _policy_forward_kernel[(batch,)](
            logprobs, old, advantages, mask, logprobs if ref is None else ref, stats, length,
            clip_low, clip_high, 1.0 if dual_clip is None else dual_clip, kl_coef,
            HAS_DUAL_CLIP=dual_clip is not None, KL_KIND=kl_kind, SEQUENCE_LEVEL=sequence_level,
            BLOCK_T=block)
    return stats


def policy_grad(logprobs, old, advantages, mask, ref, weights, *, clip_low, clip_high,
                dual_clip, kl_coef, kl_kind, sequence_level):
    """``d(sum_b weights_b * loss_sum_b) / d logprobs``, ``[B, T]`` float32."""
    batch, length = logprobs.shape
    grad = torch.empty_like(logprobs)
    block = min(BLOCK_T, triton.next_power_of_2(max(length, 1)))
    if batch > 0:
        _policy_backward_kernel[(batch,)](
            logprobs, old, advantages, mask, logprobs if ref is None else ref, weights, grad,
            length, clip_low, clip_high, 1.0 if dual_clip is None else dual_clip, kl_coef,
            HAS_DUAL_CLIP=dual_clip is not None, KL_KIND=kl_kind, SEQUENCE_LEVEL=sequence_level,
            BLOCK_T=block)
    return grad
