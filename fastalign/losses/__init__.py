"""Alignment losses: DPO family, PPO/GRPO clipped surrogate, value loss, GAE, group
advantages, whitening, Bradley-Terry reward loss, KL estimators, top-k distillation. Each loss
returns ``(loss, metrics)``: a scalar tensor and a dict of detached scalar tensors (DESIGN.md);
the per-token terms (``kl_estimate``, ``topk_divergence``) return a tensor per token."""

# kl_estimate is loss math, but it lives in the op layer: the torch policy row adds it to every
# token's loss, and ops never import this package.
from ..ops.kl_estimators import kl_estimate
from .advantages import gae, group_advantages, whiten
from .distillation import topk_divergence
from .dpo import dpo_loss
from .policy import policy_loss, value_loss
from .reward import reward_loss

__all__ = ["dpo_loss", "gae", "group_advantages", "kl_estimate", "policy_loss", "reward_loss",
           "topk_divergence", "value_loss", "whiten"]
