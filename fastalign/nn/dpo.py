"""``FusedDPOLoss``: a DPO-family loss from the policy's hidden states and lm_head, through
``linear_logprobs`` or the gradient-in-forward chunks, so no ``[N, V]`` logits exist in forward or
backward. It equals the unfused composition (``linear_logprobs``, masked sums per sequence,
``dpo_loss``)."""

from __future__ import annotations

import torch

from .._validation import check_choice, check_flag
from ..losses import dpo_loss
from ..losses.dpo import LOSS_TYPES, LOSSES, check_dpo_options
from ..ops.linear_loss import DEFAULT_CHUNK_MB
from . import _gradient_in_forward as one_pass
from ._fused_loss import FusedLoss


class FusedDPOLoss(FusedLoss):
    """DPO-family loss (``fastalign.losses.dpo_loss``) from the policy's hidden states.

    ``forward(hidden, weight, targets, *, bias, ref_chosen_logps, ref_rejected_logps,
    ref_hidden, ref_weight, ref_bias)``: ``hidden [2B, T, D]`` holds the chosen rows then the
    rejected ones; ``targets [2B, T]`` are already shifted (target t follows position t), with
    ``ignore_index`` outside completions. The reference is either precomputed sequence
    log-probs ``[B]`` each, or reference hidden states and head (run under ``no_grad``).
    ``average_logprobs`` divides each sequence's sum by its completion-token count (always for
    a ``length_averaged`` loss type of ``fastalign.losses.dpo.LOSSES``: ``"ipo"``, as IPO
    defines it).

    ``softcap`` (Gemma-2's ``final_logit_softcapping``) caps both models' logits as
    ``linear_logprobs`` does.

    ``gradient_in_forward`` (default on): when a backward will follow, form the gradient while
    each chunk of pairs' logits exists (3 matmul passes over the head instead of 4; see
    ``fastalign/ops/linear_loss.py``), chunks of at most ``chunk_mb`` MiB of float32 logits;
    where it would not be exact or possible (gradients through the reference log-probs, a
    sharded head, ``torch.compile``, a pair larger than a chunk) the two-pass path runs.

    Returns ``(loss, metrics)``: ``dpo_loss``'s metrics plus ``logps/chosen`` and
    ``logps/rejected`` (batch means of the policy's sequence log-probs, as the loss sees them)
    and ``preference_accuracy`` (the share of pairs whose chosen completion has the higher mean
    per-token log-prob under the policy itself).
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, ignore_index: int = -100,
                 average_logprobs: bool = False, temperature: float = 1.0,
                 softcap: float | None = None, gradient_in_forward: bool = True,
                 chunk_mb: float = DEFAULT_CHUNK_MB):
        check_choice("loss_type", loss_type, LOSS_TYPES)
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                         gradient_in_forward=gradient_in_forward, chunk_mb=chunk_mb)
        check_dpo_options(beta, label_smoothing)
        check_flag("average_logprobs", average_logprobs)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.average_logprobs = average_logprobs or LOSSES[loss_type].length_averaged

    def forward(self, hidden, weight, targets, *, bias=None, ref_chosen_logps=None,
                ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None):
        if hidden.dim() != 3 or hidden.shape[0] % 2:
            raise ValueError(f"hidden must be [2B, T, D] (chosen rows, then rejected), got "
                             f"{tuple(hidden.shape)}")
        precomputed = ref_chosen_logps is not None or ref_rejected_logps is not None
        if precomputed == (ref_hidden is not None or ref_weight is not None):
            raise ValueError("give the reference either as ref_chosen_logps and "
                             "ref_rejected_logps, or as ref_hidden and ref_weight, not both")
        if precomputed and (ref_chosen_logps is None or ref_rejected_logps is None):
            raise ValueError("ref_chosen_logps and ref_rejected_logps go together")
        if not precomputed and (ref_hidden is None or ref_weight is None):
            raise ValueError("ref_hidden and ref_weight go together")
        # This call's one decision, for the reference and the policy alike. A reference given as
        # hidden states is computed without gradient, so only precomputed log-probs can carry one.
        backend = one_pass.backend_for(
            self.gradient_in_forward and LOSSES[self.loss_type].pair_separable,
            hidden, weight, bias, ref_chosen_logps, ref_rejected_logps)
        if not precomputed:
            reference = self._reference_sums(ref_hidden, ref_weight, ref_bias, targets, backend)
        counts = (targets != self.ignore_index).sum(dim=-1).clamp(min=1)
        if precomputed:
            ref_chosen, ref_rejected = ref_chosen_logps, ref_rejected_logps
        else:
            ref_chosen, ref_rejected = self._as_the_loss_sees(reference, counts).chunk(2)

        def loss_of(per_token):
            chosen, rejected = self._as_the_loss_sees(per_token.sum(-1), counts).chunk(2)
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
                            loss_type=self.loss_type, label_smoothing=self.label_smoothing)[0]

        result = None
        if backend is not None:
            result = self._one_pass(hidden, weight, bias, targets, backend, loss_of=loss_of,
                                    groups=one_pass.pair_groups(targets != self.ignore_index),
                                    need_entropy=False)
        anchor = None
        if result is None:
            sums = self._two_pass_logprobs(hidden, weight, bias, targets, backend).sum(-1)
        else:
            anchor, per_token, _ = result
            sums = per_token.sum(-1)
        chosen, rejected = self._as_the_loss_sees(sums, counts).chunk(2)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
                                 loss_type=self.loss_type,
                                 label_smoothing=self.label_smoothing)
        if anchor is not None:  # the value from the log-probs, the gradient from the pass
            loss = loss.detach() + anchor
        metrics["logps/chosen"] = chosen.detach().mean()
        metrics["logps/rejected"] = rejected.detach().mean()
        per_token_chosen, per_token_rejected = (sums.detach() / counts).chunk(2)
        metrics["preference_accuracy"] = (per_token_chosen > per_token_rejected).float().mean()
        return loss, metrics

    def _as_the_loss_sees(self, sums, counts):
        """Summed sequence log-probs as the loss takes them: divided by each sequence's
        completion-token count ``counts`` (at least 1) with ``average_logprobs``."""
        return sums / counts if self.average_logprobs else sums

    def _reference_sums(self, hidden, weight, bias, targets, backend):
        """The reference model's summed log-probs of each sequence ``[2B]``, without gradient:
        in the gradient-in-forward chunks (one wide matmul each) where this call runs them,
        else through ``linear_logprobs``."""
        if backend is not None:
            return self._reference_logprobs(hidden, weight, bias, targets, backend).sum(-1)
        with torch.no_grad():
            return self._two_pass_logprobs(hidden, weight, bias, targets, backend).sum(-1)
