"""DPO and its family: losses on the implicit rewards ``beta * (log pi - log pi_ref)`` of a
chosen and a rejected completion (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_number, check_same_shape, check_scale

# DiscoPOP's temperature tau (TRL's DPOConfig.discopop_tau default).
DISCOPOP_TAU = 0.05
# EXO needs a smoothing eps > 0 (its target distribution is [1 - eps, eps]); TRL uses 1e-3.
EXO_DEFAULT_EPS = 1e-3


@dataclass(frozen=True)
class DPOLossType:
    """One DPO-family loss: all that ``dpo_loss`` and ``FusedDPOLoss`` know about it.

    ``per_pair(chosen_logratios, rejected_logratios, beta, eps) -> [B]``: each pair's loss (the
    batch loss is their mean), ``eps`` being ``label_smoothing``. ``formula``: what it computes,
    with ``d = (pc - rc) - (pr - rr)``. ``length_averaged``: defined on length-averaged sequence
    log-probs (IPO), so ``FusedDPOLoss`` averages them whatever ``average_logprobs`` says.
    ``pair_separable``: the loss of a pair depends on that pair's log-probs alone, which is what
    lets ``FusedDPOLoss``'s ``gradient_in_forward`` mode take each chunk of pairs' gradient on its
    own (a loss coupling the pairs of a batch runs the two-pass path)."""
    per_pair: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
    formula: str
    length_averaged: bool = False
    pair_separable: bool = True


# The formulas of TRL 1.16's DPOTrainer (and the papers cited there). The eps terms are there only
# when eps > 0: at logits = +-inf (a -inf log-prob, or beta * d past float32's range)
# 0 * logsig(-inf) would be NaN.

def _sigmoid(chosen, rejected, beta, eps):
    logits = beta * (chosen - rejected)
    loss = -(1 - eps) * F.logsigmoid(logits)
    return loss - eps * F.logsigmoid(-logits) if eps else loss


def _robust(chosen, rejected, beta, eps):
    logits = beta * (chosen - rejected)
    loss = -(1 - eps) * F.logsigmoid(logits)
    return (loss + eps * F.logsigmoid(-logits) if eps else loss) / (1 - 2 * eps)


def _ipo(chosen, rejected, beta, eps):
    return ((chosen - rejected) - 1 / (2 * beta)) ** 2


def _hinge(chosen, rejected, beta, eps):
    return torch.relu(1 - beta * (chosen - rejected))


def _exo_pair(chosen, rejected, beta, eps):
    logits = beta * (chosen - rejected)
    eps = eps or EXO_DEFAULT_EPS
    return (_p_log_ratio(F.logsigmoid(logits), math.log1p(-eps))
            + _p_log_ratio(F.logsigmoid(-logits), math.log(eps)))


def _nca_pair(chosen, rejected, beta, eps):
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
            - 0.5 * F.logsigmoid(-rejected_rewards))


def _bco_pair(chosen, rejected, beta, eps):
    return -F.logsigmoid(beta * chosen) - F.logsigmoid(-(beta * rejected))


def _sppo_hard(chosen, rejected, beta, eps):
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def _apo_zero(chosen, rejected, beta, eps):
    return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)


def _apo_down(chosen, rejected, beta, eps):
    return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))


def _discopop_pair(chosen, rejected, beta, eps):
    return _discopop(beta * (chosen - rejected))


# loss_type -> its loss. dpo_loss, FusedDPOLoss and the DPO trainer's config read this table, so
# a new DPO-family loss is one entry here, plus its float64 formula in tests/test_losses.py
# (which, like tests/test_gradient_in_forward.py, runs every entry).
LOSSES = {
    "sigmoid": DPOLossType(_sigmoid, "-(1-eps) logsig(beta d) - eps logsig(-beta d): DPO, "
                           "conservative DPO (cDPO) when eps > 0"),
    "robust": DPOLossType(_robust, "(-(1-eps) logsig(beta d) + eps logsig(-beta d)) / (1 - 2 eps): "
                          "rDPO, Chowdhury et al. 2024 (unbiased under label noise eps)"),
    "ipo": DPOLossType(_ipo, "(d - 1/(2 beta))^2 of length-averaged log-probs: IPO, Azar et al. "
                       "2023, Eq. 17", length_averaged=True),
    "hinge": DPOLossType(_hinge, "relu(1 - beta d): SLiC, Zhao et al. 2023"),
    "exo_pair": DPOLossType(_exo_pair, "EXO, Ji et al. 2024, Eq. 16 with targets [1 - eps, eps] "
                            "(eps = 1e-3 when label_smoothing is 0)"),
    "nca_pair": DPOLossType(_nca_pair, "NCA, Chen et al. 2024"),
    "bco_pair": DPOLossType(_bco_pair, "BCO, Jung et al. 2024 (pairwise, without the reward "
                            "shift)"),
    "sppo_hard": DPOLossType(_sppo_hard, "SPPO, Wu et al. 2024, hard win probabilities (1 and 0)"),
    "apo_zero": DPOLossType(_apo_zero, "APO-zero, D'Oosterlinck et al. 2024, Eq. 7"),
    "apo_down": DPOLossType(_apo_down, "APO-down, D'Oosterlinck et al. 2024, Eq. 8"),
    "discopop": DPOLossType(_discopop_pair, "DiscoPOP, Chan et al. 2024, Eq. 5 (tau = 0.05)"),
}
LOSS_TYPES = tuple(LOSSES)


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

    ``loss_type`` is a key of ``LOSSES``, each entry's ``formula`` saying what it computes with
    ``d = (pc - rc) - (pr - rr)`` and ``eps = label_smoothing`` (TRL 1.16's definitions). For a
    ``length_averaged`` type (``ipo``) pass length-averaged log-probs, as the type defines it.

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
    losses = LOSSES[loss_type].per_pair(chosen_logratios, rejected_logratios, beta,
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
