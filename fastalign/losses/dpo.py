"""DPO and its family: losses on the implicit rewards ``beta * (log pi - log pi_ref)`` of a
chosen and a rejected completion (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_number, check_same_shape, check_scale

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
    # The eps terms only when eps > 0: at logits = +-inf (a -inf log-prob, or beta * d past
    # float32's range) 0 * logsig(-inf) would be NaN.
    if loss_type == "sigmoid":  # DPO; eps > 0 is conservative DPO (cDPO, label smoothing)
        loss = -(1 - eps) * F.logsigmoid(logits)
        return loss - eps * F.logsigmoid(-logits) if eps else loss
    if loss_type == "robust":  # rDPO, Chowdhury et al. 2024 (unbiased under label noise eps)
        loss = -(1 - eps) * F.logsigmoid(logits)
        return (loss + eps * F.logsigmoid(-logits) if eps else loss) / (1 - 2 * eps)
    if loss_type == "ipo":  # IPO, Azar et al. 2023, Eq. 17 (callers pass length-averaged logps)
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":  # SLiC, Zhao et al. 2023
        return torch.relu(1 - logits)
    if loss_type == "exo_pair":  # EXO, Ji et al. 2024, Eq. 16 with targets [1 - eps, eps]
        eps = eps or EXO_DEFAULT_EPS
        return (_p_log_ratio(F.logsigmoid(logits), math.log1p(-eps))
                + _p_log_ratio(F.logsigmoid(-logits), math.log(eps)))
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
    return _discopop(logits)


def _discopop(x: torch.Tensor) -> torch.Tensor:
    """DiscoPOP (Chan et al. 2024, Eq. 5): ``-logsig(x) (1 - mix) + exp(-x) mix`` with
    ``mix = sigmoid(x / tau)``. ``exp(-x) mix`` is taken as ``exp(logsig(x / tau) - x)``: exp(-x)
    alone overflows float32 from x < -88 (beta * d = -100 is an ordinary batch) and
    inf * 0 = NaN. At x = +-inf (a -inf log-prob, or beta * d past float32's range) the loss
    is its limit (inf at -inf, 0 at +inf) with gradient 0: evaluated there the product rule
    would meet logsig(-inf) * 0 = NaN."""
    finite = torch.isfinite(x)
    safe = torch.where(finite, x, 0.0)
    mix = torch.sigmoid(safe / DISCOPOP_TAU)
    loss = -F.logsigmoid(safe) * (1 - mix) + torch.exp(F.logsigmoid(safe / DISCOPOP_TAU) - safe)
    limit = torch.where(x > 0, 0.0, float("inf"))
    return torch.where(finite, loss, torch.where(x.isnan(), x, limit))  # NaN stays NaN


def _p_log_ratio(log_p: torch.Tensor, log_target: float) -> torch.Tensor:
    """``p * (log p - log_target)`` with ``p = exp(log_p)``, 0 where ``p = 0`` (0 * -inf would be
    NaN, in the value and in its gradient)."""
    alive = log_p > float("-inf")
    safe = torch.where(alive, log_p, 0.0)
    return torch.where(alive, safe.exp() * (safe - log_target), 0.0)


def check_dpo_options(beta, label_smoothing) -> None:
    """The float options of the DPO family, checked where they are given (dpo_loss and
    FusedDPOLoss's constructor)."""
    check_scale("beta", beta)
    check_number("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True,
                 why="the assumed probability that a preference label is flipped")


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

    ``beta`` must be a finite number in ``[1.18e-38, 8.51e37]`` (it and ``1 / beta`` scale
    float32 values) and ``label_smoothing`` in ``[0, 0.5)``, else ``ValueError``. Log-ratios
    of any size give a finite loss or its +-inf limit (``beta * d`` past float32's range),
    never NaN: terms weighted by ``eps = 0`` or by a probability of 0 are left out rather than
    multiplied by an infinite log.

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
    check_dpo_options(beta, label_smoothing)
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
