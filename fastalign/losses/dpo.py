"""DPO and its family: losses on the implicit rewards ``beta * (log pi - log pi_ref)`` of a
chosen and a rejected completion (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_same_shape

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down", "discopop")
# DiscoPOP's temperature tau (TRL's DPOConfig.discopop_tau default).
DISCOPOP_TAU = 0.05
# EXO needs a smoothing eps > 0 (its target distribution is [1 - eps, eps]); TRL uses 1e-3.
EXO_DEFAULT_EPS = 1e-3


def _per_pair_losses(chosen_logratios, rejected_logratios, beta, loss_type, eps):
    """Per-pair losses, the formulas of TRL 1.16's DPOTrainer (and the papers cited there)."""
    delta = chosen_logratios - rejected_logratios
    logits = beta * delta
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    if loss_type == "sigmoid":  # DPO; eps > 0 is conservative DPO (cDPO, label smoothing)
        return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    if loss_type == "robust":  # rDPO, Chowdhury et al. 2024 (unbiased under label noise eps)
        return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    if loss_type == "ipo":  # IPO, Azar et al. 2023, Eq. 17 (callers pass length-averaged logps)
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":  # SLiC, Zhao et al. 2023
        return torch.relu(1 - logits)
    if loss_type == "exo_pair":  # EXO, Ji et al. 2024, Eq. 16 with targets [1 - eps, eps]
        eps = eps or EXO_DEFAULT_EPS
        log_chosen, log_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
        return (log_chosen.exp() * (log_chosen - math.log1p(-eps))
                + log_rejected.exp() * (log_rejected - math.log(eps)))
    if loss_type == "nca_pair":  # NCA, Chen et al. 2024
        return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards))
    if loss_type == "bco_pair":  # BCO, Jung et al. 2024 (pairwise, without the reward shift)
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    if loss_type == "sppo_hard":  # SPPO, Wu et al. 2024, hard win probabilities (1 and 0)
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":  # APO-zero, D'Oosterlinck et al. 2024, Eq. 7
        return 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
    if loss_type == "apo_down":  # APO-down, Eq. 8
        return torch.sigmoid(chosen_rewards) + 1 - torch.sigmoid(beta * delta)
    # discopop: DiscoPOP, Chan et al. 2024, Eq. 5
    mix = torch.sigmoid(logits / DISCOPOP_TAU)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """A DPO-family loss from sequence log-probs ``[B]`` of both completions under the policy
    and the reference.

    With ``d = (pc - rc) - (pr - rr)`` and ``eps = label_smoothing``:

    - ``sigmoid``: ``-(1-eps) logsig(beta d) - eps logsig(-beta d)`` (DPO; cDPO when eps > 0)
    - ``robust``: ``(-(1-eps) logsig(beta d) + eps logsig(-beta d)) / (1 - 2 eps)`` (rDPO)
    - ``ipo``: ``(d - 1/(2 beta))^2`` (pass length-averaged log-probs, as IPO defines it)
    - ``hinge``: ``relu(1 - beta d)`` (SLiC)
    - ``exo_pair``, ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``apo_zero``, ``apo_down``,
      ``discopop``: TRL 1.16's definitions (EXO uses eps = 1e-3 when label_smoothing is 0;
      DiscoPOP tau = 0.05).

    Returns:
        ``(loss, metrics)``: the batch mean, and detached batch means ``rewards/chosen``,
        ``rewards/rejected`` (``beta * (policy - ref)``), ``rewards/accuracies`` (share with
        chosen > rejected) and ``rewards/margins``.
    """
    check_same_shape([("policy_chosen_logps", policy_chosen_logps),
                      ("policy_rejected_logps", policy_rejected_logps),
                      ("ref_chosen_logps", ref_chosen_logps),
                      ("ref_rejected_logps", ref_rejected_logps)], "sequence log-probs [B]")
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r} "
                         "(it is the assumed probability that a preference label is flipped)")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = _per_pair_losses(chosen_logratios, rejected_logratios, beta, loss_type,
                              label_smoothing)
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }
    return losses.mean(), metrics
