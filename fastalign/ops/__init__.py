"""Public ops: autograd Functions and their functional entry points."""

from .token_logprobs import token_logprobs

__all__ = ["token_logprobs"]
