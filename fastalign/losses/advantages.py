"""Advantage estimators: GAE for PPO (Schulman et al. 2015, https://arxiv.org/abs/1506.02438),
group-relative advantages for GRPO (Shao et al. 2024), and the whitening PPO applies to its
rewards and advantages."""

from __future__ import annotations

import torch

from .._validation import check_choice, check_number, check_same_shape
from ._reduce import masked_mean, masked_var

SCALES = ("group", "batch", "none")


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95):
    """Generalized advantage estimation over ``[B, T]`` completions.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, where
    ``mask = 0`` marks right padding: it counts as terminal (value and reward 0 there) and gets
    advantage and return 0. Returns ``(advantages, returns)`` with ``returns = advantages +
    values``; no gradient (they are targets). ``gamma`` and ``lam`` must lie in ``[0, 1]``
    (``ValueError`` otherwise: a NaN or inf would reach every position through the recursion,
    ``inf * 0 = NaN`` at the padding, and a negative one would flip the sign of later terms).
    """
    check_number("gamma", gamma, low=0.0, high=1.0, why="the discount")
    check_number("lam", lam, low=0.0, high=1.0, why="GAE's lambda")
    check_same_shape([("rewards", rewards), ("values", values)], "per-token [B, T]")
    if tuple(mask.shape) != tuple(rewards.shape) or rewards.dim() != 2:
        raise ValueError(f"rewards, values and mask must all be [B, T]; got rewards "
                         f"{tuple(rewards.shape)}, mask {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):  # T steps of [B] work; T is a sequence length
        running = (deltas[:, t] + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


@torch.no_grad()
def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages ``[B]`` of rewards ``[B]`` in consecutive groups of ``group_size``
    completions of one prompt: ``(r - group mean) / (std + eps)`` with the unbiased std of
    the group (``scale="group"``) or of the whole batch (``"batch"``); ``"none"``: r - mean
    (Dr. GRPO). A group of one has std 0 here, not NaN. ``eps`` must be a finite number at
    least the rewards' dtype's smallest normal number (1.18e-38 for float32; ``ValueError``
    otherwise): a group of equal rewards has std 0, and eps = 0 (or one that rounds to 0)
    would make its advantages 0 / 0 = NaN, a negative eps could flip their sign."""
    check_choice("scale", scale, SCALES)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B] (one per completion), got {tuple(rewards.shape)}")
    # Below the dtype's smallest normal number eps may round to 0 in std + eps.
    check_number("eps", eps, low=torch.finfo(rewards.dtype).tiny if rewards.is_floating_point()
                 else 0.0, why="it keeps groups of equal rewards at 0, not 0 / 0")
    if not isinstance(group_size, int) or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"group_size must be a positive int dividing B = {rewards.shape[0]} "
                         f"(completions per prompt, consecutive), got {group_size!r}")
    groups = rewards.view(-1, group_size)
    centered = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centered
    if scale == "group":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups)
        std = std.expand_as(groups).reshape(-1)
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
    return centered / (std + eps)


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
           processes=None) -> torch.Tensor:
    """``values`` normalized to mean 0 (kept when ``shift_mean`` is False) and variance 1 over
    ``mask`` (of every rank's rows with ``processes``); 0 outside it."""
    mean = masked_mean(values, mask, processes)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask, processes) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
