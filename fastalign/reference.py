"""Plain torch references: the definitions every kernel is tested against.

Each materializes the full ``[..., V]`` log-softmax in ``compute_dtype``. Tests call them in
float64 as ground truth; benchmarks call them in float32 as "torch eager", the code a user writes
before reaching for fastalign.
"""

from __future__ import annotations

import math

import torch


def _zero_where_p_is_zero(log_p: torch.Tensor, values: torch.Tensor | None = None):
    """``values`` (default ``log_p``) with 0 where ``p = exp(log_p) = 0``: p * log p and
    p * log(p / q) are 0 there by definition (-inf logits, a masked vocabulary). Selecting
    before the product keeps 0 * -inf out of the values and of their gradient."""
    values = log_p if values is None else values
    return torch.where(log_p > float("-inf"), values, 0.0)


def _transformed_log_softmax(logits, temperature, softcap, compute_dtype):
    z = logits.to(compute_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z / temperature, dim=-1)


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor | None = None, *,
                             topk_targets: torch.Tensor | None = None,
                             temperature: float = 1.0, softcap: float | None = None,
                             ignore_index: int = -100, return_entropy: bool = False,
                             compute_dtype: torch.dtype = torch.float64):
    """``log_softmax(softcap(z) / temperature).gather(target)`` (and entropy), differentiable.
    ``topk_targets [..., K]`` instead of ``targets [...]``: K log-probs per row; the entropy
    then is 0 where all K are ignored."""
    log_p = _transformed_log_softmax(logits, temperature, softcap, compute_dtype)
    ids = targets.unsqueeze(-1) if topk_targets is None else topk_targets
    ignored = ids == ignore_index
    logprobs = log_p.gather(-1, ids.masked_fill(ignored, 0).long()).masked_fill(ignored, 0.0)
    if topk_targets is None:
        logprobs = logprobs.squeeze(-1)
    if not return_entropy:
        return logprobs
    entropy = -(log_p.exp() * _zero_where_p_is_zero(log_p)).sum(-1)
    return logprobs, entropy.masked_fill(ignored.all(-1), 0.0)


def _linear_logits(hidden, weight, bias, compute_dtype):
    """The matmul as :func:`linear_logprobs_reference` runs it."""
    dtype = torch.float64 if compute_dtype == torch.float64 else hidden.dtype
    return torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype),
                                      None if bias is None else bias.to(dtype))


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor,
                              targets: torch.Tensor | None = None, *,
                              topk_targets: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              softcap: float | None = None, ignore_index: int = -100,
                              return_entropy: bool = False,
                              compute_dtype: torch.dtype = torch.float64):
    """:func:`token_logprobs_reference` of the logits ``hidden @ weight.T + bias``.

    The matmul runs in ``compute_dtype`` when that is float64 (ground truth), and otherwise in
    the inputs' own dtype, as the eager code of a bf16 model does (``F.linear`` in bf16, then
    an upcast), so the benchmarks' "torch eager" and the tests' "torch's own error" are that.
    """
    return token_logprobs_reference(_linear_logits(hidden, weight, bias, compute_dtype), targets,
                                    topk_targets=topk_targets,
                                    temperature=temperature, softcap=softcap,
                                    ignore_index=ignore_index, return_entropy=return_entropy,
                                    compute_dtype=compute_dtype)


def _kl_columns(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``a (log a - log b)`` per column, by the conventions: 0 where ``a = 0`` (log a = -inf),
    whatever b is; +inf where ``b = 0`` and ``a`` is not (a finite log a, however small its exp,
    where exp(log a) * inf could be 0 * inf = NaN). Each product sees only values it is defined
    for (selected before multiplying, so no NaN reaches the gradient either); a NaN log a (a NaN
    or +inf logit) stays NaN."""
    dead = log_a == float("-inf")
    impossible = (log_b == float("-inf")) & ~dead
    safe_a, safe_b = torch.where(dead, 0.0, log_a), torch.where(dead | impossible, 0.0, log_b)
    terms = torch.where(impossible, float("inf"), safe_a.exp() * (safe_a - safe_b))
    return torch.where(dead, 0.0, terms)


def token_divergence_reference(logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                               beta: float = 1.0, temperature: float = 1.0,
                               softcap: float | None = None,
                               teacher_softcap: float | None = None,
                               mask: torch.Tensor | None = None, return_entropy: bool = False,
                               compute_dtype: torch.dtype = torch.float64):
    """TRL's divergence per row with full log-softmaxes of ``softcap(z) / T``: beta = 0
    ``KL(p_t || p_s)``, beta = 1 ``KL(p_s || p_t)``, else ``beta KL(p_t || m) + (1 - beta)
    KL(p_s || m)`` with ``m = (1 - beta) p_s + beta p_t``; masked rows 0. With
    ``return_entropy`` also the student's entropy."""
    log_p = _transformed_log_softmax(logits, temperature, softcap, compute_dtype)
    log_q = _transformed_log_softmax(teacher_logits, temperature, teacher_softcap, compute_dtype)
    if beta == 1.0:
        divergence = _kl_columns(log_p, log_q).sum(-1)
    elif beta == 0.0:
        divergence = _kl_columns(log_q, log_p).sum(-1)
    else:
        # Columns where both are 0 get a stand-in mixture (their terms are 0 anyway), so that
        # logaddexp's backward never sees -inf - -inf.
        both_dead = (log_p == float("-inf")) & (log_q == float("-inf"))
        log_m = torch.logaddexp(torch.where(both_dead, 0.0, log_p + math.log1p(-beta)),
                                torch.where(both_dead, 0.0, log_q + math.log(beta)))
        divergence = (beta * _kl_columns(log_q, log_m).sum(-1)
                      + (1.0 - beta) * _kl_columns(log_p, log_m).sum(-1))
    if mask is not None:
        divergence = divergence.masked_fill(~mask, 0.0)
    if not return_entropy:
        return divergence
    entropy = -(log_p.exp() * _zero_where_p_is_zero(log_p)).sum(-1)
    return divergence, entropy if mask is None else entropy.masked_fill(~mask, 0.0)


def linear_divergence_reference(hidden, weight, teacher_hidden, teacher_weight, *, bias=None,
                                teacher_bias=None, compute_dtype: torch.dtype = torch.float64,
                                **options):
    """:func:`token_divergence_reference` of both models' logits (``options``: its
    keywords)."""
    return token_divergence_reference(
        _linear_logits(hidden, weight, bias, compute_dtype),
        _linear_logits(teacher_hidden, teacher_weight, teacher_bias, compute_dtype),
        compute_dtype=compute_dtype, **options)


def token_kl_reference(logits: torch.Tensor, ref_logits: torch.Tensor, *,
                       temperature: float = 1.0, mask: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``sum p (log p - log q)`` over the vocabulary with full log-softmaxes; masked rows 0
    (:func:`token_divergence_reference` at beta = 1)."""
    return token_divergence_reference(logits, ref_logits, beta=1.0, temperature=temperature,
                                      mask=mask, compute_dtype=compute_dtype)


def linear_kl_reference(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None,
                        temperature: float = 1.0, mask=None,
                        compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """:func:`token_kl_reference` of both models' logits, matmuls as in
    :func:`linear_logprobs_reference`."""
    return linear_divergence_reference(hidden, weight, ref_hidden, ref_weight, bias=bias,
                                       teacher_bias=ref_bias, beta=1.0, temperature=temperature,
                                       mask=mask, compute_dtype=compute_dtype)
