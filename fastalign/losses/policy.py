"""PPO / GRPO policy-gradient losses: the clipped surrogate (one fused pass per token,
``fastalign.ops.policy_stats``), today's loss types beside it (``policy_terms.py``: CISPO,
SAPO, LUSPO, VESPO), the entropy bonus, rollout correction and the clipped value loss (Schulman et al. 2017,
https://arxiv.org/abs/1707.06347; GRPO, Shao et al. 2024, https://arxiv.org/abs/2402.03300).
The sampled-token KL estimators of the penalty: ``fastalign.ops.kl_estimators``."""

from __future__ import annotations

import torch

from .._validation import check_choice, check_flag, check_int, check_number, check_same_shape
from ..kernels.policy_interface import (APPROX_KL, CLIP_HIGH, CLIP_LOW, COUNT, KL, KL_KINDS,
                                        LOSS, RATIO)
from ..ops.kl_estimators import kl_estimate
from ..ops.policy_stats import policy_stats
from ._reduce import masked_mean
from .policy_terms import LOSS_TYPES, TermInputs
from .rollout_correction import (ROLLOUT_CORRECTIONS, is_sequence_mode, mismatch_kl,
                                 off_policy_mask, rollout_weights)

KL_ESTIMATORS = tuple(KL_KINDS)  # k1, k2, k3 (kl_estimate lives in fastalign.ops.kl_estimators)
LEVELS = ("token", "sequence")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                "seq_mean_token_sum_norm")
LOSS_TYPE_NAMES = tuple(LOSS_TYPES)

# Every option of policy_loss (and FusedPolicyLoss) but its tensors, with its default.
DEFAULTS = dict(
    loss_type="clip", clip_low=0.2, clip_high=None, dual_clip=None, delta=None,
    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
    vespo_k_neg=3.0, vespo_lambda_neg=2.0, level="token", entropy_coef=0.0,
    top_entropy_quantile=1.0, rollout_correction=None, rollout_clip_min=None,
    rollout_clip_max=3.0, off_policy_mask_threshold=None, use_bias_correction_kl=False,
    kl_coef=0.0, kl_estimator="k3", aggregation=None, max_length=None)


def _aggregate(loss_sums: torch.Tensor, counts: torch.Tensor, aggregation: str,
               max_length: int | None, length: int) -> torch.Tensor:
    """The loss from per-sequence sums; a sequence with no token contributes 0, never NaN."""
    if aggregation == "token_mean":  # DAPO, BNPO
        return loss_sums.sum() / counts.sum().clamp(min=1.0)
    if aggregation == "seq_mean_token_mean":  # GRPO
        return (loss_sums / counts.clamp(min=1.0)).mean()
    if aggregation == "seq_mean_token_sum":  # LUSPO
        return loss_sums.mean()
    # seq_mean_token_sum_norm, Dr. GRPO: a constant normalizer, no length bias
    return loss_sums.sum() / (loss_sums.shape[0] * (max_length or length))


def resolve_policy_options(**given) -> dict:
    """Every option of ``policy_loss`` checked (each message names the option and its range)
    and resolved: ``clip_high`` None is ``clip_low`` (``cispo``: required, the ratio's absolute
    cap), ``aggregation`` None is the loss type's (``luspo``: ``seq_mean_token_sum``, the others
    ``token_mean``). Called where the options are given: ``policy_loss`` and
    ``FusedPolicyLoss``'s constructor."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown policy loss option(s) {unknown}; the options are "
                        f"{sorted(DEFAULTS)}")
    o = {**DEFAULTS, **given}
    check_choice("loss_type", o["loss_type"], LOSS_TYPE_NAMES)
    check_choice("level", o["level"], LEVELS)
    check_choice("kl_estimator", o["kl_estimator"], KL_ESTIMATORS)
    check_choice("rollout_correction", o["rollout_correction"], (None, *ROLLOUT_CORRECTIONS))
    check_number("clip_low", o["clip_low"], low=0.0, low_open=True,
                 why="the ratio is clipped below at 1 - clip_low")
    if o["loss_type"] == "cispo":
        if o["clip_high"] is None:
            raise ValueError("loss_type='cispo' needs clip_high: the absolute cap of its "
                             "detached importance ratio (TRL's epsilon_high; 5.0 in ScaleRL)")
        check_number("clip_high", o["clip_high"], low=0.0, low_open=True,
                     why="cispo caps the importance ratio at clip_high")
    else:
        check_number("clip_high", o["clip_high"], low=0.0, low_open=True, allow_none=True,
                     why="the ratio is clipped above at 1 + clip_high")
    check_number("dual_clip", o["dual_clip"], low=1.0, low_open=True, allow_none=True,
                 why="it caps the loss at -dual_clip * A where A < 0")
    check_number("delta", o["delta"], low=1.0, low_open=True, allow_none=True,
                 why="the unclipped ratio is capped at delta (two-sided clipping)")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos",
                 "vespo_lambda_neg"):
        check_number(name, o[name], low=0.0, low_open=True, why="a positive scale")
    for name in ("vespo_k_pos", "vespo_k_neg"):
        check_number(name, o[name], low=0.0, why="the Gamma weighting's shape, >= 0")
    check_number("entropy_coef", o["entropy_coef"], low=0.0,
                 why="the weight of the entropy bonus (the loss minus entropy_coef x entropy)")
    check_number("top_entropy_quantile", o["top_entropy_quantile"], low=0.0, high=1.0,
                 low_open=True, why="the share of the highest-entropy tokens the loss acts on")
    check_number("rollout_clip_min", o["rollout_clip_min"], low=0.0, allow_none=True,
                 why="the lower bound of the rollout importance ratio")
    check_number("rollout_clip_max", o["rollout_clip_max"], low=0.0, low_open=True,
                 allow_none=True, why="the upper bound of the rollout importance ratio")
    if None not in (o["rollout_clip_min"], o["rollout_clip_max"]) \
            and o["rollout_clip_min"] > o["rollout_clip_max"]:
        raise ValueError(f"rollout_clip_min ({o['rollout_clip_min']}) must be <= "
                         f"rollout_clip_max ({o['rollout_clip_max']})")
    if o["rollout_correction"] in ("icepop", "sequence_geometric_mask") \
            and o["rollout_clip_max"] is None:
        raise ValueError(f"rollout_correction={o['rollout_correction']!r} is two-sided: it "
                         "needs rollout_clip_max (and takes rollout_clip_min, by default "
                         "1 / rollout_clip_max)")
    if o["loss_type"] == "vespo" and is_sequence_mode(o["rollout_correction"]):
        raise ValueError("loss_type='vespo' folds token-level rollout ratios into its sequence "
                         "weight: use rollout_correction='token_truncate', 'token_mask' or "
                         f"'icepop', not {o['rollout_correction']!r}")
    check_number("off_policy_mask_threshold", o["off_policy_mask_threshold"], low=0.0,
                 allow_none=True, why="the sequence KL above which negative-advantage "
                                      "sequences are dropped")
    check_flag("use_bias_correction_kl", o["use_bias_correction_kl"])
    check_number("kl_coef", o["kl_coef"], low=0.0, why="the weight of the KL penalty")
    check_int("max_length", o["max_length"], low=1, allow_none=True,
              why="the constant normalizer of seq_mean_token_sum_norm")
    implied = LOSS_TYPES[o["loss_type"]].aggregation
    if o["aggregation"] is None:
        o["aggregation"] = implied or "token_mean"
    check_choice("aggregation", o["aggregation"], AGGREGATIONS)
    if implied and o["aggregation"] != implied:
        raise ValueError(f"loss_type={o['loss_type']!r} is aggregated as {implied!r} (that is "
                         f"the loss type); got aggregation={o['aggregation']!r}: leave it None, "
                         "or use loss_type='clip' with the aggregation you want")
    if o["clip_high"] is None:
        o["clip_high"] = o["clip_low"]
    return o


def needs_whole_sequences(options: dict) -> bool:
    """Whether a token's loss depends on the current log-probs of its whole sequence (a
    sequence-level ratio or weight): then one-pass chunks must hold whole sequences."""
    return (options["level"] == "sequence" or LOSS_TYPES[options["loss_type"]].whole_sequences
            or options["off_policy_mask_threshold"] is not None)


def _is_classic(o: dict) -> bool:
    """Whether the options are the clipped surrogate the fused per-token kernel covers
    (``ops.policy_stats``): no newer loss type, entropy term, rollout or off-policy weight."""
    return (o["loss_type"] == "clip" and o["delta"] is None and o["entropy_coef"] == 0
            and o["top_entropy_quantile"] == 1 and o["rollout_correction"] is None
            and o["off_policy_mask_threshold"] is None and not o["use_bias_correction_kl"])


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, *, entropy=None,
                rollout_logprobs=None, ref_logprobs=None, **options):
    """PPO/GRPO-family policy losses over completion tokens ``[B, T]``, with TRL 1.16's names
    and semantics (``GRPOTrainer._compute_loss``; the per-token terms and their papers:
    ``fastalign/losses/policy_terms.py``; rollout correction: ``rollout_correction.py``).

    ``ratio = exp(logprobs - old_logprobs)`` per token (``level="sequence"``: exp of each
    sequence's masked mean log-ratio, GSPO). Per token, the ``loss_type``'s term: ``clip``
    ``-min(ratio A, clamp(ratio, 1 - clip_low, 1 + clip_high) A)`` (``ratio`` capped at
    ``delta`` in the first; with ``dual_clip = c`` capped at ``-c A`` where ``A < 0``),
    ``cispo``, ``sapo``, ``luspo`` or ``vespo``; times the off-policy sequence mask
    (``off_policy_mask_threshold``), the entropy mask (``top_entropy_quantile < 1``: only the
    tokens at or above that quantile of this call's entropies) and the rollout correction
    weights (``rollout_correction`` of ``rollout_logprobs``); plus ``kl_coef`` x the KL
    estimate to ``ref_logprobs`` (times the ratio with ``use_bias_correction_kl``). The
    per-token loss is aggregated (``aggregation``), then ``entropy_coef`` x the mean entropy
    over the tokens the loss acts on is subtracted (the entropy bonus, differentiable through
    ``entropy``).

    Args:
        logprobs, old_logprobs: ``[B, T]``; ``old_logprobs=None`` means on-policy (the
            detached ``logprobs``: ratio 1, gradient of ``A * logprobs``).
        advantages: ``[B, T]``, or ``[B]`` (one per sequence, GRPO).
        mask: ``[B, T]``, 1 (or True) on completion tokens.
        entropy: ``[B, T]`` per-token entropy of the policy (e.g. ``linear_logprobs(...,
            return_entropy=True)``), needed by ``entropy_coef > 0`` and
            ``top_entropy_quantile < 1``; reported as ``entropy`` when given.
        rollout_logprobs: ``[B, T]`` the sampler's log-probs of the tokens (NaN: not scored),
            needed by ``rollout_correction`` and ``off_policy_mask_threshold`` (which otherwise
            uses ``old_logprobs``); reported as ``rollout/mismatch_kl`` when given.
        ref_logprobs: ``[B, T]`` the reference's log-probs, for ``kl_coef``.
        options: see ``DEFAULTS``; checked by ``resolve_policy_options`` (``ValueError``
            naming the option and its range). ``aggregation``: ``token_mean`` (sum / count;
            TRL's dapo, bnpo, cispo, vespo), ``seq_mean_token_mean`` (grpo, sapo),
            ``seq_mean_token_sum`` (luspo, implied by it), ``seq_mean_token_sum_norm`` (sum /
            (B * max_length), Dr. GRPO; ``max_length`` defaults to T).

    Returns:
        ``(loss, metrics)`` with masked token means: ``clip_fraction/low`` and
        ``clip_fraction/high`` (where the loss type clips), ``approx_kl``
        (``(logprobs - old)^2 / 2``), ``ratio/mean``; ``kl`` with ``ref_logprobs``;
        ``entropy`` with ``entropy``; ``entropy_mask/kept_fraction``,
        ``off_policy_mask/dropped_fraction`` where they apply; ``vespo/phi_mean`` (the mean
        over the sequences, as TRL's ``vespo/phi_seq_mean``); with
        ``rollout_logprobs``: ``rollout/mismatch_kl`` and, with a correction,
        ``rollout/is_ratio_mean``, ``rollout/is_ratio_max``, ``rollout/corrected_fraction``.
    """
    o = resolve_policy_options(**options)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    tensors = [("logprobs", logprobs), ("old_logprobs", old_logprobs)]
    for name, tensor in (("ref_logprobs", ref_logprobs), ("entropy", entropy),
                         ("rollout_logprobs", rollout_logprobs)):
        if tensor is not None:
            tensors.append((name, tensor))
    check_same_shape(tensors, "per-token values [B, T]")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if tuple(mask.shape) != tuple(logprobs.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but logprobs has "
                         f"{tuple(logprobs.shape)}; they must match (1 = completion token)")
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(f"advantages must be [B, T] = {tuple(logprobs.shape)} or [B] = "
                         f"({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    for name, needed in (("entropy", o["entropy_coef"] > 0 or o["top_entropy_quantile"] < 1),
                         ("rollout_logprobs", o["rollout_correction"] is not None)):
        if needed and (entropy if name == "entropy" else rollout_logprobs) is None:
            why = ("entropy_coef > 0 / top_entropy_quantile < 1" if name == "entropy"
                   else f"rollout_correction={o['rollout_correction']!r}")
            raise ValueError(f"{why} needs {name} ([B, T])")
    mask = mask.to(torch.float32)
    advantages = (advantages if advantages.dim() == 2 else advantages[:, None]).expand(
        logprobs.shape)
    if _is_classic(o):
        loss, metrics = _classic(logprobs, old_logprobs, advantages, mask, ref_logprobs, o)
    else:
        loss, metrics = _general(logprobs, old_logprobs, advantages, mask, ref_logprobs,
                                 entropy, rollout_logprobs, o)
    with torch.no_grad():
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach().float(), mask)
        if rollout_logprobs is not None:
            metrics["rollout/mismatch_kl"] = mismatch_kl(old_logprobs.float(),
                                                         rollout_logprobs.float(), mask)
    return loss, metrics


def _classic(logprobs, old_logprobs, advantages, mask, ref_logprobs, o):
    """The clipped surrogate through the fused per-token kernel (``ops.policy_stats``)."""
    stats = policy_stats(logprobs, old_logprobs, advantages, mask, ref_logprobs,
                         clip_low=o["clip_low"], clip_high=o["clip_high"],
                         dual_clip=o["dual_clip"], kl_coef=o["kl_coef"],
                         kl_estimator=o["kl_estimator"], level=o["level"])
    loss = _aggregate(stats[:, LOSS], stats[:, COUNT], o["aggregation"], o["max_length"],
                      logprobs.shape[1])
    with torch.no_grad():
        sums = stats.detach().sum(0)
        tokens = sums[COUNT].clamp(min=1.0)
        metrics = {"clip_fraction/low": sums[CLIP_LOW] / tokens,
                   "clip_fraction/high": sums[CLIP_HIGH] / tokens,
                   "approx_kl": sums[APPROX_KL] / tokens, "ratio/mean": sums[RATIO] / tokens}
        if ref_logprobs is not None:
            metrics["kl"] = sums[KL] / tokens
    return loss, metrics


def _general(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy,
             rollout_logprobs, o):
    """Every loss type and option, as torch ops on ``[B, T]`` (the vocabulary-sized work, the
    log-probs and entropies, is done before; this is a few elementwise passes over tokens)."""
    # float32 at least (bf16 log-probs would round the ratios); float64 stays float64.
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    logprobs, old = logprobs.to(dtype), old_logprobs.to(dtype)
    log_ratio = logprobs - old
    if o["level"] == "sequence":  # GSPO: one ratio per sequence
        log_weight = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(
            min=1.0)
    else:
        log_weight = log_ratio
    ratio = torch.exp(log_weight)
    metrics, means = {}, {}
    weights = None
    if o["rollout_correction"] is not None:
        weights, metrics = rollout_weights(old, rollout_logprobs.to(dtype), mask,
                                           o["rollout_correction"], o["rollout_clip_min"],
                                           o["rollout_clip_max"])
    term = LOSS_TYPES[o["loss_type"]]
    out = term.term(TermInputs(ratio, logprobs, log_ratio, advantages, mask, weights, o))
    per_token = out.per_token
    acting = mask  # the tokens the loss acts on (the entropy bonus's too)
    if o["off_policy_mask_threshold"] is not None:
        sampling = old if rollout_logprobs is None else rollout_logprobs.to(dtype)
        keep = off_policy_mask(advantages, logprobs, sampling, mask,
                               o["off_policy_mask_threshold"])
        per_token = per_token * keep
        means["off_policy_mask/dropped_fraction"] = 1.0 - keep
    if o["top_entropy_quantile"] < 1:
        high = high_entropy_mask(entropy.detach().to(dtype), mask, o["top_entropy_quantile"])
        per_token = per_token * high
        acting = acting * high
        means["entropy_mask/kept_fraction"] = high
    if weights is not None and not term.folds_rollout_weights:
        per_token = per_token * weights
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs.to(dtype), o["kl_estimator"])
        if o["use_bias_correction_kl"]:
            kl = kl * ratio
        per_token = per_token + o["kl_coef"] * kl
        means["kl"] = kl
    loss = _aggregate((per_token * mask).sum(-1), mask.sum(-1), o["aggregation"],
                      o["max_length"], logprobs.shape[1])
    if o["entropy_coef"] > 0:
        loss = loss - o["entropy_coef"] * masked_mean(entropy.to(dtype), acting)
    with torch.no_grad():
        means.update(out.means or {})
        if out.clipped_low is not None:
            means["clip_fraction/low"] = out.clipped_low
        if out.clipped_high is not None:
            means["clip_fraction/high"] = out.clipped_high
        means["approx_kl"] = log_ratio.square() / 2
        means["ratio/mean"] = ratio
        for name, value in means.items():
            metrics[name] = masked_mean(value.detach().to(dtype).expand_as(mask), mask)
        counts = mask.sum(-1)
        for name, value in (out.sequence_means or {}).items():
            rows = (value.detach().to(dtype).expand_as(mask) * mask).sum(-1) / counts.clamp(min=1.0)
            metrics[name] = masked_mean(rows, counts > 0)
    return loss, metrics


@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """``[B, T]`` 1 on the masked tokens whose entropy is at or above the ``1 - quantile``
    quantile of the masked tokens' entropies (the top ``quantile`` share, "Beyond the 80/20
    Rule", https://arxiv.org/abs/2506.01939, TRL's ``top_entropy_quantile``), else 0."""
    kept = mask.bool()
    values = entropy[kept]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - quantile)
    return ((entropy * mask >= threshold) & kept).to(mask.dtype)


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
