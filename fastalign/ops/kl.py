"""``fastalign.token_kl`` and ``fastalign.linear_kl``: exact full-vocabulary
KL(softmax(z / T) || softmax(z_ref / T)) per token, differentiable w.r.t. the policy side.

Each is the ``beta = 1`` (reverse KL) case of the divergence family, the policy as the student
and the reference as the teacher: ``token_kl`` runs ``token_divergence``'s implementation
(``ops/token_divergence.py``), ``linear_kl`` ``linear_divergence``'s
(``ops/linear_divergence.py``), with their own argument names in every message.
"""

from __future__ import annotations

import torch

from . import _sharded_head
from .linear_divergence import run_linear_divergence
from .token_divergence import run_token_divergence

_REFERENCE_NAMES = ("ref_hidden", "ref_weight", "ref_bias")
_REVERSE_KL = dict(beta=1.0, softcap=None, teacher_softcap=None, return_entropy=False)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``KL(softmax(z / T) || softmax(z_ref / T))`` per row, over the full vocabulary
    (:func:`token_divergence` with ``beta=1``).

    Args:
        logits: ``[..., V]`` policy logits, float16/bfloat16/float32, any strides.
        ref_logits: ``[..., V]`` reference logits, same shape and device (any float dtype);
            treated as constant (no gradient flows to them).
        temperature: divides both sides' logits; a finite number in ``[1.18e-38, 8.51e37]``
            (as in :func:`token_logprobs`; ``z / T`` is never formed, so no finite logit
            overflows).
        mask: ``[...]`` bool or None. False rows give 0, get zero gradient and are skipped by
            the Triton and native kernels (the torch path computes and discards them).

    Returns:
        ``kl [...]`` float32, differentiable w.r.t. ``logits``. Extra memory: a few float32 per
        row in forward; the returned gradient only, in backward. Logits of any finite size keep
        float32 precision (each side's differences are taken from its own max, before 1 / T).
        A NaN or +inf logit (either side) or a row of only -inf gives a NaN KL and a NaN
        gradient row; a finite policy logit where the reference's is -inf gives +inf (its
        gradient row is then not finite either). A KL within a factor V of float32's max may
        overflow to inf: the row's sum of p * log-ratio is accumulated before dividing by the
        sum of p.
    """
    return run_token_divergence(logits, ref_logits, teacher_name="ref_logits",
                                temperature=temperature, mask=mask, **_REVERSE_KL)


def linear_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
              ref_weight: torch.Tensor, *, bias: torch.Tensor | None = None,
              ref_bias: torch.Tensor | None = None, temperature: float = 1.0,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact per-token ``KL(pi || pi_ref)`` with ``pi = softmax((hidden @ weight.T + bias) / T)``
    and ``pi_ref`` likewise from the reference model, never materializing either model's
    ``[N, V]`` logits (:func:`linear_divergence` with ``beta=1``).

    Args:
        hidden: ``[..., D]`` policy hidden states; weight ``[V, D]``; bias ``[V]`` or None.
        ref_hidden: ``[..., D_ref]`` reference hidden states (same leading shape); ref_weight
            ``[V, D_ref]``; ref_bias ``[V]`` or None. Treated as constant. The two models may
            differ in width and dtype, not in vocabulary.
        temperature: divides both sides' logits, in ``[1.18e-38, 8.51e37]``.
        mask: ``[...]`` bool or None; False rows give 0, get zero gradient and are compacted
            out before any work.

    Returns:
        ``kl [...]`` float32, differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (no
        weight gradient when ``weight`` does not require grad). Memory: two ``[N, cols]``
        float32 logits tiles at a time, plus what ``linear_logprobs`` needs in backward.

    Sharded heads, as in :func:`linear_logprobs` (``fastalign/ops/_sharded_head.py``): an FSDP2
    ``DTensor`` ``weight``/``bias`` with a plain ``hidden`` is gathered once per call, its
    gradient the average over ranks of each rank's; a ``DTensor`` ``hidden`` replicated on a
    1-D mesh with ``weight`` ``Shard(0)`` on it gathers the weight, each rank's gradient being
    its shard of the (identical) full one; a DTensor reference head is gathered without
    gradient; DeepSpeed ZeRO-3 ``ds_id`` parameters (either model's) are gathered in forward
    and again in backward, which recomputes the forward. The result is a plain tensor.
    """
    arguments = (hidden, weight, ref_hidden, ref_weight, bias, ref_bias, mask)
    options = dict(temperature=temperature, teacher_names=_REFERENCE_NAMES, **_REVERSE_KL)
    if not _sharded_head.is_plain(*arguments):
        return _sharded_head.linear_pair(run_linear_divergence, *arguments, **options)
    return run_linear_divergence(*arguments, process_group=None, **options)
