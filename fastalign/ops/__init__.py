"""Public ops: torch.library custom ops with autograd, and their functional entry points."""

from .kl import linear_kl, token_kl
from .linear_divergence import linear_divergence
from .linear_logprobs import linear_logprobs
from .token_divergence import token_divergence
from .token_logprobs import token_logprobs

__all__ = ["linear_divergence", "linear_kl", "linear_logprobs", "token_divergence", "token_kl",
           "token_logprobs"]
