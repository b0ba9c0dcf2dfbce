"""What ``FusedDPOLoss`` and ``FusedPolicyLoss`` share: the options of the head and of the
gradient-in-forward mode, checked once in the constructor, and the two ways a call turns hidden
states into per-token log-probs (the one-pass chunks, or ``linear_logprobs``)."""

from __future__ import annotations

import torch

from .._validation import (check_flag, check_ignore_index, check_positive, check_softcap,
                           check_temperature)
from ..ops.linear_logprobs import linear_logprobs_on
from . import _gradient_in_forward as one_pass


class FusedLoss(torch.nn.Module):
    """A loss from hidden states and an lm_head (``hidden @ weight.T + bias``, ``softcap``,
    ``temperature``; ``ignore_index`` targets left out), never materializing the ``[N, V]``
    logits, in ``gradient_in_forward`` chunks of at most ``chunk_mb`` MiB of float32 logits."""

    def __init__(self, *, ignore_index: int, temperature: float, softcap: float | None,
                 gradient_in_forward: bool, chunk_mb: float):
        super().__init__()
        # Every option is checked here, not at the first forward (ValueError / TypeError).
        check_flag("gradient_in_forward", gradient_in_forward)
        check_positive("chunk_mb", chunk_mb)
        check_temperature(temperature)
        check_softcap(softcap)
        check_ignore_index(ignore_index)
        self.gradient_in_forward, self.chunk_mb = gradient_in_forward, chunk_mb
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap

    def _one_pass(self, hidden, weight, bias, targets, backend: str, *, groups, loss_of,
                  need_entropy: bool, entropy_grad: bool = False, top_k=None, min_p=None):
        """``(anchor, per-token logprobs, entropy or None)`` of the gradient-in-forward pass
        over ``groups``, or None when a group does not fit a chunk (``one_pass.one_pass``)."""
        return one_pass.one_pass(
            hidden, weight, bias, targets, groups=groups, loss_of=loss_of,
            chunk_mb=self.chunk_mb, temperature=self.temperature, softcap=self.softcap,
            need_entropy=need_entropy, backend=backend, what=type(self).__name__,
            ignore_index=self.ignore_index, entropy_grad=entropy_grad, top_k=top_k, min_p=min_p)

    def _reference_logprobs(self, hidden, weight, bias, targets, backend: str) -> torch.Tensor:
        """A frozen model's per-token log-probs, without gradient, in the mode's chunks."""
        return one_pass.reference_logprobs(
            hidden, weight, bias, targets, ignore_index=self.ignore_index,
            chunk_mb=self.chunk_mb, temperature=self.temperature, softcap=self.softcap,
            backend=backend)

    def _two_pass_logprobs(self, hidden, weight, bias, targets, backend: str | None, *,
                           return_entropy: bool = False, top_k=None, min_p=None):
        """``linear_logprobs`` of the head (its backward recomputes the logits): on ``backend``
        where this call chose one, else on the one ``linear_logprobs`` selects."""
        return linear_logprobs_on(backend, hidden, weight, targets, bias=bias,
                                  temperature=self.temperature, softcap=self.softcap,
                                  ignore_index=self.ignore_index, return_entropy=return_entropy,
                                  top_k=top_k, min_p=min_p)
