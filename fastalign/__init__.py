"""fastalign: fused kernels for LLM preference tuning (DPO) and RL fine-tuning (PPO, GRPO).

Per-token log-probs and entropy of chosen tokens, and exact divergences between two models'
next-token distributions (KL, generalized JSD), without materializing a full-vocabulary
softmax. See DESIGN.md for the public contract.
"""

from . import losses
from ._backend import available_backends, select_backend
from ._native import empty_cache
from .losses import kl_estimate
from .nn import FusedDistillationLoss, FusedDPOLoss, FusedPolicyLoss
from .ops import (linear_divergence, linear_kl, linear_logprobs, token_divergence, token_kl,
                  token_logprobs)

__version__ = "0.1.0"

__all__ = ["FusedDPOLoss", "FusedPolicyLoss", "FusedDistillationLoss", "token_logprobs",
           "linear_logprobs", "token_kl", "linear_kl", "token_divergence", "linear_divergence", "kl_estimate", "losses",
           "available_backends", "select_backend", "empty_cache", "__version__"]
