"""PPO / GRPO policy-gradient losses: the clipped surrogate and its variants (one fused pass
per token, ``fastalign.ops.policy_stats``) and the clipped value loss (Schulman et al. 2017,
https://arxiv.org/abs/1707.06347; GRPO, Shao et al. 2024, https://arxiv.org/abs/2402.03300).
The sampled-token KL estimators of the penalty: ``fastalign.ops.kl_estimators``."""

from __future__ import annotations

import torch

from .._validation import check_choice, check_int, check_number, check_same_shape
from ..kernels.policy_interface import (APPROX_KL, CLIP_HIGH, CLIP_LOW, COUNT, KL, KL_KINDS,
                                        LOSS, RATIO)
from ..ops.policy_stats import policy_stats
from ._reduce import masked_mean

KL_ESTIMATORS = tuple(KL_KINDS)  # k1, k2, k3 (kl_estimate lives in fastalign.ops.kl_estimators)
LEVELS = ("token", "sequence")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                "seq_mean_token_sum_norm")


def _aggregate(stats: torch.Tensor, aggregation: str, max_length: int | None,
               length: int) -> torch.Tensor:
    """The loss from per-sequence sums; a sequence with no token contributes 0, never NaN."""
    loss_sums, counts = stats[:, LOSS], stats[:, COUNT]
    if aggregation == "token_mean":  # DAPO, BNPO
        return loss_sums.sum() / counts.sum().clamp(min=1.0)
    if aggregation == "seq_mean_token_mean":  # GRPO
        return (loss_sums / counts.clamp(min=1.0)).mean()
    if aggregation == "seq_mean_token_sum":
        return loss_sums.mean()
    # seq_mean_token_sum_norm, Dr. GRPO: a constant normalizer, no length bias
    return loss_sums.sum() / (stats.shape[0] * (max_length or length))


def check_policy_options(clip_low, clip_high, dual_clip, kl_coef, max_length) -> None:
    """The numeric options of the clipped surrogate, checked where they are given (policy_loss
    and FusedPolicyLoss's constructor): a NaN would poison the loss, a negative clip_high
    would invert the clip range (clamp with min > max), a negative kl_coef or max_length
    would flip the sign of a term."""
    check_number("clip_low", clip_low, low=0.0, low_open=True,
                 why="the ratio is clipped below at 1 - clip_low")
    check_number("clip_high", clip_high, low=0.0, low_open=True, allow_none=True,
                 why="the ratio is clipped above at 1 + clip_high")
    check_number("dual_clip", dual_clip, low=1.0, low_open=True, allow_none=True,
                 why="it caps the loss at -dual_clip * A where A < 0")
    check_number("kl_coef", kl_coef, low=0.0, why="the weight of the KL penalty")
    check_int("max_length", max_length, low=1, allow_none=True,
              why="the constant normalizer of seq_mean_token_sum_norm")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2,
                clip_high: float | None = None, dual_clip: float | None = None,
                ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", level: str = "token", aggregation: str = "token_mean",
                max_length: int | None = None):
    """The PPO/GRPO clipped surrogate over completion tokens ``[B, T]``.

    ``ratio = exp(logprobs - old_logprobs)`` per token (``level="sequence"``: exp of each
    sequence's masked mean log-ratio, GSPO). Per token:
    ``-min(ratio A, clamp(ratio, 1 - clip_low, 1 + clip_high) A)``; with ``dual_clip = c``
    (c > 1) capped at ``-c A`` where ``A < 0`` (dual-clip PPO, Ye et al. 2020); plus
    ``kl_coef * k(logprobs, ref_logprobs)`` when ``ref_logprobs`` is given.

    Args:
        logprobs, old_logprobs: ``[B, T]``; ``old_logprobs=None`` means on-policy (the
            detached ``logprobs``: ratio 1, gradient of ``A * logprobs``).
        advantages: ``[B, T]``, or ``[B]`` (one per sequence, GRPO).
        mask: ``[B, T]``, 1 (or True) on completion tokens.
        aggregation: ``token_mean`` (sum / count), ``seq_mean_token_mean`` (GRPO),
            ``seq_mean_token_sum``, ``seq_mean_token_sum_norm`` (sum / (B * max_length),
            Dr. GRPO; ``max_length`` defaults to T).
        clip_low, clip_high: finite and > 0; dual_clip: None or finite and > 1; kl_coef:
            finite and >= 0; max_length: None or an int >= 1. Anything else raises
            ``ValueError`` naming the option and its range.

    Returns:
        ``(loss, metrics)`` with masked token means: ``clip_fraction/low`` (ratio < 1 -
        clip_low and A < 0), ``clip_fraction/high`` (ratio > 1 + clip_high and A > 0),
        ``approx_kl`` (``(logprobs - old)^2 / 2``), ``ratio/mean``, and ``kl`` when
        ``ref_logprobs`` is given.
    """
    check_choice("level", level, LEVELS)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    tensors = [("logprobs", logprobs), ("old_logprobs", old_logprobs)]
    if ref_logprobs is not None:
        tensors.append(("ref_logprobs", ref_logprobs))
    check_same_shape(tensors, "per-token log-probs [B, T]")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if tuple(mask.shape) != tuple(logprobs.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but logprobs has "
                         f"{tuple(logprobs.shape)}; they must match (1 = completion token)")
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(f"advantages must be [B, T] = {tuple(logprobs.shape)} or [B] = "
                         f"({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    check_policy_options(clip_low, clip_high, dual_clip, kl_coef, max_length)
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.to(torch.float32)
    advantages = (advantages if advantages.dim() == 2 else advantages[:, None]).expand(
        logprobs.shape)
    stats = policy_stats(logprobs, old_logprobs, advantages, mask, ref_logprobs,
                         clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                         kl_coef=kl_coef, kl_estimator=kl_estimator, level=level)
    loss = _aggregate(stats, aggregation, max_length, logprobs.shape[1])
    with torch.no_grad():
        sums = stats.detach().sum(0)
        tokens = sums[COUNT].clamp(min=1.0)
        metrics = {
            "clip_fraction/low": sums[CLIP_LOW] / tokens,
            "clip_fraction/high": sums[CLIP_HIGH] / tokens,
            "approx_kl": sums[APPROX_KL] / tokens,
            "ratio/mean": sums[RATIO] / tokens,
        }
        if ref_logprobs is not None:
            metrics["kl"] = sums[KL] / tokens
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, *, clip: float = 0.2):
    """PPO's clipped value loss:
    ``0.5 * masked_mean(max((V - R)^2, (old + clamp(V - old, -clip, clip) - R)^2))``.

    ``clip`` must be a finite number >= 0 (``ValueError`` otherwise). Returns
    ``(loss, metrics)`` with ``clip_fraction`` (share of masked tokens where the clipped term
    is the larger) and ``values/mean``.
    """
    check_same_shape([("values", values), ("old_values", old_values), ("returns", returns)],
                     "per-token values [B, T]")
    # clamp(x, -clip, clip) with clip < 0 would put every value at old - |clip|.
    check_number("clip", clip, low=0.0, why="value updates are clipped to [-clip, clip]")
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but values has "
                         f"{tuple(values.shape)}; they must match")
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        metrics = {"clip_fraction": masked_mean((clipped_error > unclipped_error).to(
            values.dtype), mask), "values/mean": masked_mean(values, mask)}
    return loss, metrics
