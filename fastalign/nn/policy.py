"""``FusedPolicyLoss``: the PPO/GRPO-family policy losses (``fastalign.losses.policy_loss``:
every loss type, the entropy bonus, rollout correction) from the policy's hidden states and
lm_head, through ``linear_logprobs`` or the gradient-in-forward chunks, so no ``[N, V]`` logits
exist in forward or backward. It equals the unfused composition (``linear_logprobs(...,
return_entropy=True)``, then ``policy_loss``)."""

from __future__ import annotations

from .._validation import check_sampler
from ..losses import policy_loss
from ..losses.policy import needs_whole_sequences, resolve_policy_options
from ..ops.linear_loss import DEFAULT_CHUNK_MB
from . import _gradient_in_forward as one_pass
from ._fused_loss import FusedLoss


class FusedPolicyLoss(FusedLoss):
    """The policy loss of ``fastalign.losses.policy_loss`` from the policy's hidden states;
    ``options`` are ``policy_loss``'s (``loss_type``, ``clip_low``, ``clip_high``, ...,
    ``entropy_coef``, ``top_entropy_quantile``, ``rollout_correction``, ...), checked here.

    ``forward(hidden, weight, targets, advantages, *, bias, old_logprobs, ref_logprobs,
    rollout_logprobs)``: ``hidden [B, T, D]``, ``targets [B, T]`` (``ignore_index`` = not a
    completion token), ``advantages [B, T]`` or ``[B]``; ``old_logprobs=None`` means
    on-policy (ratio 1, detached). Returns ``policy_loss``'s ``(loss, metrics)``; ``entropy``
    is the token mean of the policy's entropy, from the same pass over the vocabulary as the
    log-probs, and it is differentiated where the loss uses it (``entropy_coef > 0``).
    ``softcap`` (Gemma-2's ``final_logit_softcapping``) caps the logits as ``linear_logprobs``.
    ``top_k`` / ``min_p``: the log-probs (and entropies) of the distribution the sampler drew
    from, renormalized over its support, as ``linear_logprobs``' options: score rollouts with
    the settings they were sampled with, and the ratio of an unchanged policy is exactly 1.

    ``gradient_in_forward`` and ``chunk_mb``: as ``FusedDPOLoss`` (chunks of tokens, or of
    whole sequences where a token's loss depends on its sequence's log-probs: ``level=
    "sequence"``, ``vespo``, ``off_policy_mask_threshold``). Exact there, entropy gradient
    included; ``top_entropy_quantile < 1`` runs the two-pass path instead, since its mask is a
    quantile over every token's entropy, which no chunk knows before all have run.
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100,
                 softcap: float | None = None, gradient_in_forward: bool = True,
                 chunk_mb: float = DEFAULT_CHUNK_MB, top_k: int | None = None,
                 min_p: float | None = None, **options):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                         gradient_in_forward=gradient_in_forward, chunk_mb=chunk_mb)
        check_sampler(top_k, min_p, None)
        self.top_k, self.min_p = top_k, min_p
        # Every option checked (and defaults resolved) now, not at each call.
        self.options = resolve_policy_options(**options)

    def forward(self, hidden, weight, targets, advantages, *, bias=None, old_logprobs=None,
                ref_logprobs=None, rollout_logprobs=None):
        mask = targets != self.ignore_index
        options = self.options
        entropy_grad = options["entropy_coef"] > 0
        inputs = dict(ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
                      **self.options)
        # This call's one decision; the chunks group rows by [B, T] sequences, hence the 2-D
        # targets. A quantile over all entropies has no one-pass form (class docstring).
        backend = one_pass.backend_for(
            self.gradient_in_forward and targets.dim() == 2
            and options["top_entropy_quantile"] == 1, hidden, weight, bias, advantages,
            old_logprobs, ref_logprobs, rollout_logprobs)
        result = None
        if backend is not None:
            result = self._one_pass(
                hidden, weight, bias, targets, backend,
                groups=one_pass.token_groups(mask, needs_whole_sequences(options)),
                loss_of=lambda per_token, entropy=None: policy_loss(
                    per_token, old_logprobs, advantages, mask, entropy=entropy, **inputs)[0],
                need_entropy=True, entropy_grad=entropy_grad, top_k=self.top_k, min_p=self.min_p)
        anchor = None
        if result is None:
            logprobs, entropy = self._two_pass_logprobs(
                hidden, weight, bias, targets, backend, return_entropy=True, top_k=self.top_k,
                min_p=self.min_p)
        else:
            anchor, logprobs, entropy = result
        loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, entropy=entropy,
                                    **inputs)
        if anchor is not None:  # the value from the log-probs, the gradient from the pass
            loss = loss.detach() + anchor
        return loss, metrics
