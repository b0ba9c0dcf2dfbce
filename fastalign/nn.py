"""Fused end-to-end losses: hidden states and an lm_head in, ``(loss, metrics)`` out, through
``linear_logprobs``, so no ``[N, V]`` logits exist in forward or backward. Each equals the
unfused composition (``linear_logprobs``, masked sums per sequence, the loss)."""

from __future__ import annotations

import torch

from . import _gradient_in_forward as one_pass
from ._backend import select_backend
from ._validation import (check_choice, check_flag, check_ignore_index, check_positive,
                          check_softcap, check_temperature)
from .losses import dpo_loss, policy_loss
from .losses._reduce import masked_mean
from .losses.dpo import LOSS_TYPES, check_dpo_options
from .losses.policy import AGGREGATIONS, KL_ESTIMATORS, LEVELS, check_policy_options
from .ops import linear_logprobs
from .ops.linear_loss import DEFAULT_CHUNK_MB


def _sequence_logps(hidden, weight, bias, targets, ignore_index, temperature, softcap):
    """``(sums [rows], counts [rows])``: each sequence's summed log-probs of its targets and its
    count of completion tokens (at least 1, so a mean of none is 0)."""
    logprobs = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                               softcap=softcap, ignore_index=ignore_index)
    counts = (targets != ignore_index).sum(dim=-1).clamp(min=1)
    return logprobs.sum(dim=-1), counts


class FusedDPOLoss(torch.nn.Module):
    """DPO-family loss (``fastalign.losses.dpo_loss``) from the policy's hidden states.

    ``forward(hidden, weight, targets, *, bias, ref_chosen_logps, ref_rejected_logps,
    ref_hidden, ref_weight, ref_bias)``: ``hidden [2B, T, D]`` holds the chosen rows then the
    rejected ones; ``targets [2B, T]`` are already shifted (target t follows position t), with
    ``ignore_index`` outside completions. The reference is either precomputed sequence
    log-probs ``[B]`` each, or reference hidden states and head (run under ``no_grad``).
    ``average_logprobs`` divides each sequence's sum by its completion-token count (always for
    ``loss_type="ipo"``, as IPO defines it).

    ``softcap`` (Gemma-2's ``final_logit_softcapping``) caps both models' logits as
    ``linear_logprobs`` does.

    ``gradient_in_forward`` (default on): when a backward will follow, form the gradient while
    each chunk of pairs' logits exists (3 matmul passes over the head instead of 4; see
    ``fastalign/ops/linear_loss.py``), chunks of at most ``chunk_mb`` MiB of float32 logits;
    where it would not be exact or possible (gradients through the reference log-probs, a
    sharded head, ``torch.compile``, a pair larger than a chunk) the two-pass path runs.

    Returns ``(loss, metrics)``: ``dpo_loss``'s metrics plus ``logps/chosen`` and
    ``logps/rejected`` (batch means of the policy's sequence log-probs, as the loss sees them)
    and ``preference_accuracy`` (the share of pairs whose chosen completion has the higher mean
    per-token log-prob under the policy itself).
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, ignore_index: int = -100,
                 average_logprobs: bool = False, temperature: float = 1.0,
                 softcap: float | None = None, gradient_in_forward: bool = True,
                 chunk_mb: float = DEFAULT_CHUNK_MB):
        super().__init__()
        # Every option is checked here, not at the first forward (ValueError / TypeError).
        check_choice("loss_type", loss_type, LOSS_TYPES)
        check_flag("gradient_in_forward", gradient_in_forward)
        check_positive("chunk_mb", chunk_mb)
        self.gradient_in_forward, self.chunk_mb = gradient_in_forward, chunk_mb
        check_dpo_options(beta, label_smoothing)
        check_ignore_index(ignore_index)
        check_flag("average_logprobs", average_logprobs)
        check_temperature(temperature)
        check_softcap(softcap)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap
        self.average_logprobs = average_logprobs or loss_type == "ipo"

    def forward(self, hidden, weight, targets, *, bias=None, ref_chosen_logps=None,
                ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None):
        if hidden.dim() != 3 or hidden.shape[0] % 2:
            raise ValueError(f"hidden must be [2B, T, D] (chosen rows, then rejected), got "
                             f"{tuple(hidden.shape)}")
        options = (self.ignore_index, self.temperature, self.softcap)
        precomputed = ref_chosen_logps is not None or ref_rejected_logps is not None
        if precomputed == (ref_hidden is not None or ref_weight is not None):
            raise ValueError("give the reference either as ref_chosen_logps and "
                             "ref_rejected_logps, or as ref_hidden and ref_weight, not both")
        if precomputed:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("ref_chosen_logps and ref_rejected_logps go together")
            ref_chosen, ref_rejected = ref_chosen_logps, ref_rejected_logps
        else:
            if ref_hidden is None or ref_weight is None:
                raise ValueError("ref_hidden and ref_weight go together")
            if self.gradient_in_forward and one_pass.applies(hidden, weight, bias):
                reference = one_pass.reference_logprobs(
                    ref_hidden, ref_weight, ref_bias, targets, ignore_index=self.ignore_index,
                    chunk_mb=self.chunk_mb, temperature=self.temperature,
                    softcap=self.softcap, backend=select_backend(hidden.device)).sum(-1)
            else:
                with torch.no_grad():
                    reference, _ = _sequence_logps(ref_hidden, ref_weight, ref_bias, targets,
                                                   *options)
            if self.average_logprobs:
                reference = reference / (targets != self.ignore_index).sum(-1).clamp(min=1)
            ref_chosen, ref_rejected = reference.chunk(2)
        counts = (targets != self.ignore_index).sum(dim=-1).clamp(min=1)

        def loss_of(per_token):
            sums = per_token.sum(-1)
            chosen, rejected = (sums / counts if self.average_logprobs else sums).chunk(2)
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
                            loss_type=self.loss_type, label_smoothing=self.label_smoothing)[0]

        anchor = None
        if self.gradient_in_forward and one_pass.applies(hidden, weight, bias, ref_chosen,
                                                         ref_rejected):
            result = one_pass.one_pass(
                hidden, weight, bias, targets,
                groups=one_pass.pair_groups(targets != self.ignore_index), loss_of=loss_of,
                chunk_mb=self.chunk_mb, temperature=self.temperature, softcap=self.softcap,
                need_entropy=False, backend=select_backend(hidden.device), what="FusedDPOLoss",
                ignore_index=self.ignore_index)
            if result is not None:
                anchor, per_token, _ = result
                sums = per_token.sum(-1)
        if anchor is None:
            sums, _ = _sequence_logps(hidden, weight, bias, targets, *options)
        policy = sums / counts if self.average_logprobs else sums
        chosen, rejected = policy.chunk(2)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
                                 loss_type=self.loss_type,
                                 label_smoothing=self.label_smoothing)
        if anchor is not None:  # the value from the log-probs, the gradient from the pass
            loss = loss.detach() + anchor
        metrics["logps/chosen"] = chosen.detach().mean()
        metrics["logps/rejected"] = rejected.detach().mean()
        per_token_chosen, per_token_rejected = (sums.detach() / counts).chunk(2)
        metrics["preference_accuracy"] = (per_token_chosen > per_token_rejected).float().mean()
        return loss, metrics


class FusedPolicyLoss(torch.nn.Module):
    """PPO/GRPO clipped surrogate (``fastalign.losses.policy_loss``) from the policy's hidden
    states.

    ``forward(hidden, weight, targets, advantages, *, bias, old_logprobs, ref_logprobs)``:
    ``hidden [B, T, D]``, ``targets [B, T]`` (``ignore_index`` = not a completion token),
    ``advantages [B, T]`` or ``[B]``; ``old_logprobs=None`` means on-policy (ratio 1,
    detached). Returns ``policy_loss``'s ``(loss, metrics)`` plus ``entropy``: the token mean
    of the policy's entropy, from the same pass over the vocabulary (not differentiated).
    ``softcap`` (Gemma-2's ``final_logit_softcapping``) caps the logits as ``linear_logprobs``.
    ``gradient_in_forward`` and ``chunk_mb``: as ``FusedDPOLoss`` (chunks of tokens, or of
    whole sequences for ``level="sequence"``).
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float | None = None,
                 dual_clip: float | None = None, kl_coef: float = 0.0,
                 kl_estimator: str = "k3", level: str = "token",
                 aggregation: str = "token_mean", max_length: int | None = None,
                 temperature: float = 1.0, ignore_index: int = -100,
                 softcap: float | None = None, gradient_in_forward: bool = True,
                 chunk_mb: float = DEFAULT_CHUNK_MB):
        super().__init__()
        # Every option is checked here, not at the first forward (ValueError / TypeError).
        check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        check_flag("gradient_in_forward", gradient_in_forward)
        check_positive("chunk_mb", chunk_mb)
        self.gradient_in_forward, self.chunk_mb = gradient_in_forward, chunk_mb
        check_choice("level", level, LEVELS)
        check_choice("aggregation", aggregation, AGGREGATIONS)
        check_policy_options(clip_low, clip_high, dual_clip, kl_coef, max_length)
        check_temperature(temperature)
        check_softcap(softcap)
        check_ignore_index(ignore_index)
        self.options = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                            kl_coef=kl_coef, kl_estimator=kl_estimator, level=level,
                            aggregation=aggregation, max_length=max_length)
        self.temperature, self.ignore_index = temperature, ignore_index
        self.softcap = softcap

    def forward(self, hidden, weight, targets, advantages, *, bias=None, old_logprobs=None,
                ref_logprobs=None):
        mask = targets != self.ignore_index
        anchor = None
        if (self.gradient_in_forward and targets.dim() == 2
                and one_pass.applies(hidden, weight, bias, advantages, old_logprobs,
                                     ref_logprobs)):
            result = one_pass.one_pass(
                hidden, weight, bias, targets,
                groups=one_pass.token_groups(mask, self.options["level"] == "sequence"),
                loss_of=lambda per_token: policy_loss(
                    per_token, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                    **self.options)[0],
                chunk_mb=self.chunk_mb, temperature=self.temperature, softcap=self.softcap,
                need_entropy=True, backend=select_backend(hidden.device),
                what="FusedPolicyLoss", ignore_index=self.ignore_index)
            if result is not None:
                anchor, logprobs, entropy = result
        if anchor is None:
            logprobs, entropy = linear_logprobs(
                hidden, weight, targets, bias=bias, temperature=self.temperature,
                softcap=self.softcap, ignore_index=self.ignore_index, return_entropy=True)
        loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask,
                                    ref_logprobs=ref_logprobs, **self.options)
        if anchor is not None:  # the value from the log-probs, the gradient from the pass
            loss = loss.detach() + anchor
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
        return loss, metrics
