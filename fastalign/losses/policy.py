"""PPO / GRPO policy-gradient losses: the clipped surrogate and its variants, the clipped
value loss, and the sampled-token KL estimators (Schulman et al. 2017,
https://arxiv.org/abs/1707.06347; GRPO, Shao et al. 2024, https://arxiv.org/abs/2402.03300)."""

from __future__ import annotations

import torch

from ._checks import check_choice, check_same_shape, masked_mean

KL_ESTIMATORS = ("k1", "k2", "k3")
LEVELS = ("token", "sequence")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                "seq_mean_token_sum_norm")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3"):
    """Sampled-token estimators of KL(pi || pi_ref) (Schulman, "Approximating KL divergence",
    2020), with ``r = ref_logprobs - logprobs``: ``k1 = -r``, ``k2 = r^2 / 2``,
    ``k3 = exp(r) - r - 1`` (unbiased and always >= 0). Elementwise, differentiable."""
    check_choice("kind", kind, KL_ESTIMATORS)
    r = ref_logprobs - logprobs
    if kind == "k1":
        return -r
    if kind == "k2":
        return r.square() / 2
    return torch.expm1(r) - r


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str,
               max_length: int | None) -> torch.Tensor:
    """Loss over masked tokens; a sequence with no token contributes 0, never NaN."""
    if aggregation == "token_mean":  # DAPO, BNPO
        return masked_mean(per_token, mask)
    per_sequence_sum = (per_token * mask).sum(dim=1)
    if aggregation == "seq_mean_token_mean":  # GRPO
        return (per_sequence_sum / mask.sum(dim=1).clamp(min=1.0)).mean()
    if aggregation == "seq_mean_token_sum":
        return per_sequence_sum.mean()
    # seq_mean_token_sum_norm, Dr. GRPO: a constant normalizer, no length bias
    return per_sequence_sum.sum() / (mask.shape[0] * (max_length or mask.shape[1]))


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
    if not clip_low > 0:
        raise ValueError(f"clip_low must be positive, got {clip_low!r}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at -dual_clip * A), "
                         f"got {dual_clip!r}")
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.to(logprobs.dtype)
    advantages = advantages if advantages.dim() == 2 else advantages[:, None]

    log_ratio = logprobs - old_logprobs
    if level == "sequence":
        sequence_mean = (log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        log_ratio = sequence_mean[:, None].expand_as(logprobs)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages),
                                per_token)
    kl = None
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)
        if kl_coef:
            per_token = per_token + kl_coef * kl
    loss = _aggregate(per_token, mask, aggregation, max_length)

    with torch.no_grad():
        metrics = {
            "clip_fraction/low": masked_mean(((ratio < 1 - clip_low) & (advantages < 0)).to(
                ratio.dtype), mask),
            "clip_fraction/high": masked_mean(((ratio > 1 + clip_high) & (advantages > 0)).to(
                ratio.dtype), mask),
            "approx_kl": masked_mean((logprobs - old_logprobs).square() / 2, mask),
            "ratio/mean": masked_mean(ratio, mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, *, clip: float = 0.2):
    """PPO's clipped value loss:
    ``0.5 * masked_mean(max((V - R)^2, (old + clamp(V - old, -clip, clip) - R)^2))``.

    Returns ``(loss, metrics)`` with ``clip_fraction`` (share of masked tokens where the
    clipped term is the larger) and ``values/mean``.
    """
    check_same_shape([("values", values), ("old_values", old_values), ("returns", returns)],
                     "per-token values [B, T]")
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
