"""Public ops: torch.library custom ops with autograd, and their functional entry points."""

from .linear_logprobs import linear_logprobs
from .token_logprobs import token_logprobs

__all__ = ["token_logprobs", "linear_logprobs"]
