"""Alignment losses: DPO family, PPO/GRPO clipped surrogate, value loss, GAE, group
advantages, Bradley-Terry reward loss, KL estimators. Each loss returns ``(loss, metrics)``: a
scalar tensor and a dict of detached scalar tensors (DESIGN.md)."""

from ..ops.policy_stats import kl_estimate
from .advantages import gae, group_advantages
from .dpo import dpo_loss
from .policy import policy_loss, value_loss
from .reward import reward_loss

__all__ = ["dpo_loss", "gae", "group_advantages", "kl_estimate", "policy_loss", "reward_loss",
           "value_loss"]
