"""``FusedPolicyLoss``: the PPO/GRPO clipped surrogate from the policy's hidden states and
lm_head, through ``linear_logprobs`` or the gradient-in-forward chunks, so no ``[N, V]`` logits
exist in forward or backward. It equals the unfused composition (``linear_logprobs``, then
``policy_loss``)."""

from __future__ import annotations

from .._validation import check_choice
from ..losses import policy_loss
from ..losses._reduce import masked_mean
from ..losses.policy import AGGREGATIONS, KL_ESTIMATORS, LEVELS, check_policy_options
from ..ops.linear_loss import DEFAULT_CHUNK_MB
from . import _gradient_in_forward as one_pass
from ._fused_loss import FusedLoss


class FusedPolicyLoss(FusedLoss):
    """PPO/GRPO clipped surrogate (``fastalign.losses.policy_loss``) from the policy's hidden
    states.

    ``forward(hidden, weight, targets, advantages, *, bias, old_logprobs, ref_logprobs)``:
    ``hidden [B, T, D]``, ``targets [B, T]`` (``ignore_index`` = not a completion token),
    ``advantages [B, T]`` or ``[B]``; ``old_logprobs=None`` means on-policy (ratio 1,
    detached). Returns ``policy_loss``'s ``(loss, metrics)`` plus ``entropy``: the token mean
    of the policy's entropy, from the same pass over the vocabulary (not differentiated).
    ``softcap`` (Gemma-2's ``final_logit_softcapping``) caps the logits as ``linear_logprobs``.
    ``gradient_in_forward`` and ``chunk_mb``: as ``FusedDPOLoss`` (chunks of tokens, or of
    whole sequences for ``level="sequence"``).
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float | None = None,
                 dual_clip: float | None = None, kl_coef: float = 0.0,
                 kl_estimator: str = "k3", level: str = "token",
                 aggregation: str = "token_mean", max_length: int | None = None,
                 temperature: float = 1.0, ignore_index: int = -100,
                 softcap: float | None = None, gradient_in_forward: bool = True,
                 chunk_mb: float = DEFAULT_CHUNK_MB):
        check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                         gradient_in_forward=gradient_in_forward, chunk_mb=chunk_mb)
        check_choice("level", level, LEVELS)
        check_choice("aggregation", aggregation, AGGREGATIONS)
        check_policy_options(clip_low, clip_high, dual_clip, kl_coef, max_length)
        self.options = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                            kl_coef=kl_coef, kl_estimator=kl_estimator, level=level,
                            aggregation=aggregation, max_length=max_length)

    def forward(self, hidden, weight, targets, advantages, *, bias=None, old_logprobs=None,
                ref_logprobs=None):
        mask = targets != self.ignore_index
        # This call's one decision; the chunks group rows by [B, T] sequences, hence the 2-D
        # targets.
        backend = one_pass.backend_for(self.gradient_in_forward and targets.dim() == 2,
                                       hidden, weight, bias, advantages, old_logprobs,
                                       ref_logprobs)
        result = None
        if backend is not None:
            result = self._one_pass(
                hidden, weight, bias, targets, backend,
                groups=one_pass.token_groups(mask, self.options["level"] == "sequence"),
                loss_of=lambda per_token: policy_loss(
                    per_token, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                    **self.options)[0],
                need_entropy=True)
        anchor = None
        if result is None:
            logprobs, entropy = self._two_pass_logprobs(hidden, weight, bias, targets, backend,
                                                        return_entropy=True)
        else:
            anchor, logprobs, entropy = result
        loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask,
                                    ref_logprobs=ref_logprobs, **self.options)
        if anchor is not None:  # the value from the log-probs, the gradient from the pass
            loss = loss.detach() + anchor
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
        return loss, metrics
