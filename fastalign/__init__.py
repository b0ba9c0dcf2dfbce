"""fastalign: fused kernels for LLM preference tuning (DPO) and RL fine-tuning (PPO, GRPO).

Per-token log-probs and entropy of chosen tokens, and exact divergences between two models'
next-token distributions (KL, generalized JSD), without materializing a full-vocabulary
softmax. See DESIGN.md for the public contract.
"""

import sys as _sys

from . import _source_folders

_source_folders.mount(_sys.modules[__name__])  # before anything imports fastalign.kernels

from . import losses  # noqa: E402
from ._backend import available_backends, select_backend  # noqa: E402
from ._native import empty_cache  # noqa: E402
from .losses import kl_estimate  # noqa: E402
from .nn import FusedDistillationLoss, FusedDPOLoss, FusedPolicyLoss  # noqa: E402
from .ops import (linear_divergence, linear_kl, linear_logprobs, token_divergence,  # noqa: E402
                  token_kl, token_logprobs)

__version__ = "0.1.0"

__all__ = ["FusedDPOLoss", "FusedPolicyLoss", "FusedDistillationLoss", "token_logprobs",
           "linear_logprobs", "token_kl", "linear_kl", "token_divergence", "linear_divergence", "kl_estimate", "losses",
           "available_backends", "select_backend", "empty_cache", "__version__"]
