"""Reward-model training: the Bradley-Terry pairwise loss (Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155), with an optional margin (Llama 2) and a centering term
(Eisenstein et al. 2023) that keeps rewards near 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import check_number, check_same_shape


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                margin: torch.Tensor | float | None = None, center_coef: float = 0.0):
    """``-logsig(rc - rr - margin).mean() + center_coef * mean((rc + rr)^2)`` over ``[B]``
    pairs. Returns ``(loss, metrics)`` with ``accuracy`` (share with rc > rr) and ``margin``
    (mean rc - rr). A number ``margin`` must be finite, ``center_coef`` finite and >= 0 (a
    negative one would push rewards away from 0); ``ValueError`` otherwise. A tensor margin
    is data: its values are not checked."""
    check_same_shape([("chosen_rewards", chosen_rewards),
                      ("rejected_rewards", rejected_rewards)], "rewards [B]")
    check_number("center_coef", center_coef, low=0.0, why="the weight of the centering term")
    if margin is not None and not isinstance(margin, torch.Tensor):
        check_number("margin", margin, why="subtracted from rc - rr")
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.shape not in ((), difference.shape):
            raise ValueError(f"margin must be a number or shaped like the rewards "
                             f"{tuple(difference.shape)}, got {tuple(margin.shape)}")
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards).square().mean()
    with torch.no_grad():
        gap = chosen_rewards - rejected_rewards
        metrics = {"accuracy": (gap > 0).float().mean(), "margin": gap.mean()}
    return loss, metrics
