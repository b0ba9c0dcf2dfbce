"""Plain torch references: the definitions every kernel is tested against.

Each materializes the full ``[..., V]`` log-softmax in ``compute_dtype``. Tests call them in
float64 as ground truth; benchmarks call them in float32 as "torch eager", the code a user writes
before reaching for fastalign.
"""

from __future__ import annotations

import torch


def _zero_where_p_is_zero(log_p: torch.Tensor, values: torch.Tensor | None = None):
    """``values`` (default ``log_p``) with 0 where ``p = exp(log_p) = 0``: p * log p and
    p * log(p / q) are 0 there by definition (-inf logits, a masked vocabulary). Selecting
    before the product keeps 0 * -inf out of the values and of their gradient."""
    values = log_p if values is None else values
    return torch.where(log_p > float("-inf"), values, 0.0)


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor | None = None, *,
                             topk_targets: torch.Tensor | None = None,
                             temperature: float = 1.0, softcap: float | None = None,
                             ignore_index: int = -100, return_entropy: bool = False,
                             compute_dtype: torch.dtype = torch.float64):
    """``log_softmax(softcap(z) / temperature).gather(target)`` (and entropy), differentiable.
    ``topk_targets [..., K]`` instead of ``targets [...]``: K log-probs per row; the entropy
    then is 0 where all K are ignored."""
    z = logits.to(compute_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    ids = targets.unsqueeze(-1) if topk_targets is None else topk_targets
    ignored = ids == ignore_index
    logprobs = log_p.gather(-1, ids.masked_fill(ignored, 0).long()).masked_fill(ignored, 0.0)
    if topk_targets is None:
        logprobs = logprobs.squeeze(-1)
    if not return_entropy:
        return logprobs
    entropy = -(log_p.exp() * _zero_where_p_is_zero(log_p)).sum(-1)
    return logprobs, entropy.masked_fill(ignored.all(-1), 0.0)


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
    matmul_dtype = torch.float64 if compute_dtype == torch.float64 else hidden.dtype
    logits = torch.nn.functional.linear(
        hidden.to(matmul_dtype), weight.to(matmul_dtype),
        None if bias is None else bias.to(matmul_dtype))
    return token_logprobs_reference(logits, targets, topk_targets=topk_targets,
                                    temperature=temperature, softcap=softcap,
                                    ignore_index=ignore_index, return_entropy=return_entropy,
                                    compute_dtype=compute_dtype)


def token_kl_reference(logits: torch.Tensor, ref_logits: torch.Tensor, *,
                       temperature: float = 1.0, mask: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``sum p (log p - log q)`` over the vocabulary with full log-softmaxes; masked rows 0."""
    log_p = torch.log_softmax(logits.to(compute_dtype) / temperature, dim=-1)
    log_q = torch.log_softmax(ref_logits.to(compute_dtype) / temperature, dim=-1)
    # p = 0 columns (log p = -inf) add 0. A column the reference gives probability 0 and the
    # policy does not (a finite log p, however small its exp) makes the KL +inf, where
    # exp(log p) * inf could be 0 * inf = NaN. Each product sees only values it is defined for
    # (selected before multiplying, so no NaN reaches the gradient either); a NaN log p (a NaN
    # or +inf logit) stays NaN.
    dead = log_p == float("-inf")
    impossible = (log_q == float("-inf")) & ~dead
    safe_p, safe_q = torch.where(dead, 0.0, log_p), torch.where(dead | impossible, 0.0, log_q)
    terms = torch.where(impossible, float("inf"), safe_p.exp() * (safe_p - safe_q))
    kl = torch.where(dead, 0.0, terms).sum(-1)
    return kl if mask is None else kl.masked_fill(~mask, 0.0)


def linear_kl_reference(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None,
                        temperature: float = 1.0, mask=None,
                        compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """:func:`token_kl_reference` of both models' logits, matmuls as in
    :func:`linear_logprobs_reference`."""
    def logits(h, w, b):
        dtype = torch.float64 if compute_dtype == torch.float64 else h.dtype
        return torch.nn.functional.linear(h.to(dtype), w.to(dtype),
                                          None if b is None else b.to(dtype))
    return token_kl_reference(logits(hidden, weight, bias), logits(ref_hidden, ref_weight, ref_bias),
                              temperature=temperature, mask=mask, compute_dtype=compute_dtype)
