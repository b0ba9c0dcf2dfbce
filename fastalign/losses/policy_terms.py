"""The per-token terms of ``policy_loss``'s loss types, one table entry each, with TRL 1.16's
semantics (``trl/trainer/grpo_trainer.py::GRPOTrainer._compute_loss``; its ``loss_type`` names
the aggregation too, which here is ``policy_loss``'s own ``aggregation``):

- ``clip``: PPO's clipped surrogate (Schulman et al. 2017, https://arxiv.org/abs/1707.06347)
  ``-min(r A, clamp(r, 1 - clip_low, 1 + clip_high) A)``, ``r`` first capped at ``delta`` when
  given (two-sided clipping, INTELLECT-2, https://arxiv.org/abs/2505.07291), and at
  ``-dual_clip A`` where ``A < 0`` (dual-clip PPO, Ye et al. 2020).
- ``luspo``: the same term; the loss type sums each sequence's tokens (``seq_mean_token_sum``),
  so a sequence weighs by its length (LUSPO, https://arxiv.org/abs/2602.05261).
- ``cispo``: ``-sg(min(r, clip_high)) A log pi`` (MiniMax-M1, https://arxiv.org/abs/2506.13585):
  the importance weight clipped and detached, so every token keeps a gradient; ``clip_high`` is
  the absolute cap of the ratio (ScaleRL's epsilon_max, 5.0 there,
  https://arxiv.org/abs/2510.13786).
- ``sapo``: ``-sigmoid(tau (r - 1)) 4 / tau A``, ``tau`` = ``sapo_temperature_pos`` where
  ``A > 0`` else ``sapo_temperature_neg`` (SAPO's soft gate, https://arxiv.org/abs/2511.20347).
- ``vespo``: ``-sg(phi(w)) A log pi`` with ``phi(w) = exp(lambda + k log w - lambda w)`` of the
  sequence's importance ratio ``w = exp(sum log r)`` (its rollout correction ratios folded in),
  ``k, lambda`` by the sign of ``A`` (VESPO, https://arxiv.org/abs/2602.10693).

Each entry says whether a one-pass chunk must hold whole sequences (a sequence-level weight
computed from the current log-probs) and which aggregation it implies, if any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TermInputs:
    """What a term reads: ``ratio`` ``[B, T]`` (token level) or ``[B, 1]`` (sequence level),
    ``logprobs``, ``log_ratio`` (per token, ``logprobs - old``), ``advantages`` and ``mask``
    ``[B, T]`` float32, ``rollout_weights`` (None, ``[B, T]`` or ``[B, 1]``) and the options."""
    ratio: torch.Tensor
    logprobs: torch.Tensor
    log_ratio: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    rollout_weights: torch.Tensor | None
    options: dict


@dataclass
class TermOutput:
    """``per_token`` ``[B, T]`` (before the masks, the rollout weights and the KL penalty),
    the tokens clipped below and above (bool, broadcastable to ``[B, T]``, or None: the type
    does not clip there) and any metrics of its own: ``means``, ``[B, T]``-broadcastable values
    whose masked token mean is reported, and ``sequence_means``, per-sequence values (constant
    along T) whose mean over the sequences (those with a token) is reported, as TRL logs them."""
    per_token: torch.Tensor
    clipped_low: torch.Tensor | None = None
    clipped_high: torch.Tensor | None = None
    means: dict | None = None
    sequence_means: dict | None = None


@dataclass(frozen=True)
class PolicyTerm:
    term: Callable[[TermInputs], TermOutput]
    whole_sequences: bool = False  # a weight from the whole sequence's current log-probs
    aggregation: str | None = None  # the aggregation the loss type implies
    folds_rollout_weights: bool = False  # the term applies the rollout weights itself


def _clip(x: TermInputs) -> TermOutput:
    o, ratio, advantages = x.options, x.ratio, x.advantages
    low, high = 1 - o["clip_low"], 1 + o["clip_high"]
    unclipped = ratio if o["delta"] is None else torch.clamp(ratio, max=o["delta"])
    per_token = -torch.minimum(unclipped * advantages, torch.clamp(ratio, low, high) * advantages)
    if o["dual_clip"] is not None:
        per_token = torch.where(advantages < 0,
                                torch.minimum(per_token, -o["dual_clip"] * advantages), per_token)
    ratio = ratio.detach()
    return TermOutput(per_token, (ratio < low) & (advantages < 0), (ratio > high) & (advantages > 0))


def _cispo(x: TermInputs) -> TermOutput:
    cap = x.options["clip_high"]
    weight = torch.clamp(x.ratio, max=cap).detach()
    return TermOutput(-weight * x.advantages * x.logprobs, None,
                      (x.ratio.detach() > cap) & (x.advantages > 0))


def _sapo(x: TermInputs) -> TermOutput:
    o = x.options
    tau = torch.where(x.advantages > 0, o["sapo_temperature_pos"], o["sapo_temperature_neg"])
    gate = torch.sigmoid(tau * (x.ratio - 1)) * 4 / tau
    return TermOutput(-gate * x.advantages)


@torch.no_grad()
def vespo_weights(advantages, log_ratio, mask, rollout_weights, *, k_pos, lambda_pos, k_neg,
                  lambda_neg) -> torch.Tensor:
    """``[B, 1]`` VESPO's ``phi(w)`` of each sequence's importance ratio, without gradient:
    ``log w`` is the masked sum of the per-token log-ratios (each clamped to [-20, 20]) plus
    the logs of the token-level rollout weights (clamped to [log 1e-8, 20]; a masked-out ratio
    of 0 counts as 1e-8), the sum clamped to [log 1e-8, 20]; a non-finite phi is 0."""
    floor = math.log(1e-8)
    log_w = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
    if rollout_weights is not None:
        log_w = log_w + torch.clamp(torch.log(rollout_weights), floor, 20.0).sum(-1, keepdim=True)
    log_w = torch.clamp(log_w, floor, 20.0)
    sign = advantages >= 0
    k = torch.where(sign, k_pos, k_neg)
    lam = torch.where(sign, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _vespo(x: TermInputs) -> TermOutput:
    o = x.options
    phi = vespo_weights(x.advantages, x.log_ratio, x.mask, x.rollout_weights,
                        k_pos=o["vespo_k_pos"], lambda_pos=o["vespo_lambda_pos"],
                        k_neg=o["vespo_k_neg"], lambda_neg=o["vespo_lambda_neg"])
    # One weight per sequence: a token mean would weigh it by length (TRL's vespo/phi_seq_mean
    # is the mean over sequences).
    return TermOutput(-phi * x.advantages * x.logprobs, sequence_means={"vespo/phi_mean": phi})


LOSS_TYPES: dict[str, PolicyTerm] = {
    "clip": PolicyTerm(_clip),
    "cispo": PolicyTerm(_cispo),
    "sapo": PolicyTerm(_sapo),
    "luspo": PolicyTerm(_clip, aggregation="seq_mean_token_sum"),
    "vespo": PolicyTerm(_vespo, whole_sequences=True, folds_rollout_weights=True),
}
