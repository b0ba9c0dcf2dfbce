"""Rollout correction: the sampler's log-probs (``rollout_logprobs``, as vLLM or a bf16 copy of
the policy reported them) differ from the trainer's for the same tokens (precision, kernels,
a stale policy), so the samples are slightly off-policy. The correction weighs (or drops) each
token or sequence by the importance ratio ``exp(old_logprobs - rollout_logprobs)``, detached,
as TRL 1.16 does (``vllm_importance_sampling_mode``; ``GRPOTrainer._generate_and_score_completions``)
and verl's rollout correction (Liu, Li et al. 2025, "When Speed Kills Stability",
https://richardli.xyz/rl-collapse):

- ``token_truncate`` / ``sequence_truncate``: the token's (the sequence's summed) ratio clamped
  to ``[rollout_clip_min, rollout_clip_max]`` (truncated IS, TIS);
- ``token_mask`` / ``sequence_mask``: the ratio, 0 where it falls outside those bounds (masked
  IS);
- ``icepop``: the two-sided token mask of IcePop (inclusionAI's Ring-1T report, 2025):
  ``token_mask`` whose lower bound defaults to ``1 / rollout_clip_max``;
- ``sequence_geometric_mask``: verl's geometric rejection: a sequence is kept (weight 1) when
  the geometric mean of its ratios, ``exp(mean log ratio)``, lies within the bounds (lower bound
  by default ``1 / rollout_clip_max``), else dropped (weight 0); no IS weight.

A token whose rollout log-prob is NaN (the sampler could not score it) counts as ratio 1, as
in TRL. Also here: the off-policy sequence mask of DeepSeek-V3.2 (https://arxiv.org/abs/2512.02556).
"""

from __future__ import annotations

import torch

ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask",
                       "icepop", "sequence_geometric_mask")
_SEQUENCE_MODES = ("sequence_truncate", "sequence_mask", "sequence_geometric_mask")
_TWO_SIDED = ("icepop", "sequence_geometric_mask")  # a lower bound by default


def is_sequence_mode(mode: str | None) -> bool:
    return mode in _SEQUENCE_MODES


def bounds(mode: str, clip_min: float | None, clip_max: float | None) -> tuple[float, float]:
    """``(low, high)`` of a mode: the given bounds, None as unbounded, except the two-sided
    modes' lower bound, ``1 / clip_max`` when not given."""
    high = float("inf") if clip_max is None else clip_max
    if clip_min is None:
        low = 1.0 / clip_max if mode in _TWO_SIDED and clip_max is not None else 0.0
    else:
        low = clip_min
    return low, high


@torch.no_grad()
def rollout_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                    mask: torch.Tensor, mode: str, clip_min: float | None,
                    clip_max: float | None) -> tuple[torch.Tensor, dict]:
    """``(weights, metrics)``: the detached weights of the per-token loss, ``[B, T]`` for the
    token modes and ``[B, 1]`` for the sequence modes, and ``rollout/is_ratio_mean``,
    ``rollout/is_ratio_max`` (of the ratios before truncation or masking, over the masked
    tokens, or the sequences in the sequence modes) and ``rollout/corrected_fraction`` (the
    share of those truncated, masked or rejected)."""
    log_ratio = ((old_logprobs - rollout_logprobs) * mask).nan_to_num(nan=0.0)
    if mode == "sequence_geometric_mask":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    elif is_sequence_mode(mode):
        log_ratio = log_ratio.sum(-1, keepdim=True)
    ratio = torch.exp(log_ratio)
    low, high = bounds(mode, clip_min, clip_max)
    outside = (ratio < low) | (ratio > high)
    if mode.endswith("truncate"):
        weights = torch.clamp(ratio, min=low, max=high)
    elif mode == "sequence_geometric_mask":
        weights = (~outside).to(ratio.dtype)
    else:
        weights = ratio.masked_fill(outside, 0.0)
    # Over the masked tokens, or over the sequences that have one; masked reductions rather
    # than boolean indexing, which would sync a GPU once per call (per chunk, in one pass).
    counted = (mask.sum(-1, keepdim=True) > 0) if ratio.shape[1] == 1 else mask.bool()
    counted = counted.expand_as(ratio)
    count = counted.sum().clamp(min=1)
    largest = ratio.masked_fill(~counted, -torch.inf).amax()
    metrics = {
        "rollout/is_ratio_mean": (ratio * counted).sum() / count,
        "rollout/is_ratio_max": torch.where(counted.any(), largest, ratio.new_zeros(())),
        "rollout/corrected_fraction": (outside & counted).sum().to(ratio.dtype) / count,
    }
    return weights, metrics


@torch.no_grad()
def mismatch_kl(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """The token mean of k3, the sampled-token estimate of KL(sampler || trainer) from the
    sampler's tokens: ``exp(d) - d - 1`` with ``d = old_logprobs - rollout_logprobs`` (tokens
    the sampler could not score left out)."""
    d = old_logprobs - rollout_logprobs
    kept = mask.bool() & ~torch.isnan(d)
    d = d.masked_fill(~kept, 0.0)  # k3(0) = 0; masked, not indexed: no GPU sync
    return (torch.expm1(d) - d).sum() / kept.sum().clamp(min=1)


@torch.no_grad()
def off_policy_mask(advantages: torch.Tensor, logprobs: torch.Tensor,
                    sampling_logprobs: torch.Tensor, mask: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's ``off_policy_mask_threshold``): a
    sequence is dropped (0) when its advantage is negative and the masked mean of
    ``sampling_logprobs - logprobs`` (its KL from the sampling policy, NaN tokens as 0)
    exceeds ``threshold``; else kept (1). Broadcastable to ``[B, T]``."""
    kl = (sampling_logprobs - logprobs.detach()).nan_to_num(nan=0.0)
    mean = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean <= threshold)).to(mask.dtype)
