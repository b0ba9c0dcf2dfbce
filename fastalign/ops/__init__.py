"""Public ops: torch.library custom ops with autograd, and their functional entry points."""

from .kl import linear_kl, token_kl
from .linear_logprobs import linear_logprobs
from .token_logprobs import token_logprobs

__all__ = ["linear_kl", "linear_logprobs", "token_kl", "token_logprobs"]
