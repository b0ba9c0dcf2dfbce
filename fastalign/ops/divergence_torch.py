"""Pure-torch backend of the divergence ops: the statistics and gradient of
``fastalign.kernels.divergence``, a few rows at a time, so the extra memory is a few
``[rows, V]`` float32 chunks of about ``token_logprobs_torch.CHUNK_ELEMENTS`` elements. Same
launcher signatures as the Triton ones.
"""

from __future__ import annotations

import torch

from .._layout import RowLayout, iter_aligned_row_ranges, row_block
from ..kernels.divergence_interface import (AUX, ENTROPY, FORWARD_KL, LOG_SUM, MASKED_PARTIALS,
                                            PARTIALS, REVERSE_KL, ROW_MAX, TEACHER_ROW_MAX,
                                            DivergenceSpec)
from . import token_logprobs_torch
from ._tiles import FINITE_MIN, LOG_P_FLOOR

_INF = float("inf")


def _row_ranges(vocab_size: int, *layouts: RowLayout):
    rows_per_chunk = max(1, token_logprobs_torch.CHUNK_ELEMENTS // vocab_size)
    return iter_aligned_row_ranges(list(layouts), rows_per_chunk)


def _keys(chunk: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """A fresh float32 copy of ``chunk`` through the softcap: the keys maxes are taken of."""
    keys = chunk.to(torch.float32, copy=True)
    return keys if softcap is None else keys.div_(softcap).tanh_().mul_(softcap)


def _chunk_keys(logits, teacher_logits, layout, teacher_layout, start, stop, spec):
    return (_keys(row_block(logits, layout, start, stop), spec.softcap),
            _keys(row_block(teacher_logits, teacher_layout, start, stop), spec.teacher_softcap))


def _cross_terms(exp_w: torch.Tensor, s_w: torch.Tensor, s_o: torch.Tensor) -> torch.Tensor:
    """``exp(s_w) (s_w - s_o)`` of the KL's weighted side ``w``: 0 where ``w`` has probability 0
    (whatever the other side says), +inf where only the other side has (even where exp(s_w)
    underflows: 0 * inf would be NaN, and dropping the term would give a finite KL)."""
    return torch.where(s_w == -_INF, 0.0, torch.where(s_o == -_INF, _INF, exp_w * (s_w - s_o)))


def mixture_log_ratios(log_p, log_q, p, q, spec: DivergenceSpec):
    """``(log(p / m), log(q / m))`` for the mixture ``m = (1 - beta) p + beta q`` of two
    probabilities (and their logs). ``m`` is clamped to the smallest normal float: below it,
    where log has no precision left, either term is at most ~1e-22 (``m >= (1 - beta) p`` with
    ``1 - beta >= 1.1e-16``, a float64 below 1)."""
    mixture = spec.student_weight * p + spec.beta * q
    log_m = mixture.clamp_(min=torch.finfo(torch.float32).tiny).log_()
    return log_p - log_m, log_q - log_m


def divergence_partials(logits, teacher_logits, layout, teacher_layout, mask, *,
                        spec: DivergenceSpec, return_entropy: bool):
    """Same contract as ``fastalign.kernels.divergence.divergence_partials``."""
    partials = torch.empty(PARTIALS, layout.n_rows, device=logits.device, dtype=torch.float32)
    for start, stop in _row_ranges(logits.shape[-1], layout, teacher_layout):
        keys, teacher_keys = _chunk_keys(logits, teacher_logits, layout, teacher_layout, start,
                                         stop, spec)
        row_max = keys.amax(dim=1, keepdim=True).clamp_(min=FINITE_MIN)
        teacher_max = teacher_keys.amax(dim=1, keepdim=True).clamp_(min=FINITE_MIN)
        s = keys.sub_(row_max).mul_(spec.inv_temperature)
        s_t = teacher_keys.sub_(teacher_max).mul_(spec.inv_temperature)
        exp_s, exp_t = s.exp(), s_t.exp()
        cross = (_cross_terms(exp_s, s, s_t) if spec.mode == REVERSE_KL else
                 _cross_terms(exp_t, s_t, s) if spec.mode == FORWARD_KL else
                 torch.zeros_like(s)).sum(dim=1)
        # -inf logits: s clamped so that their term is 0 * finite, not 0 * -inf = NaN.
        shifted = (exp_s * s.clamp(min=FINITE_MIN)).sum(dim=1) if return_entropy \
            else torch.zeros_like(cross)
        partials[:, start:stop] = torch.stack([
            row_max.squeeze(1), exp_s.sum(dim=1), teacher_max.squeeze(1), exp_t.sum(dim=1),
            cross, shifted])
    if mask is not None:
        masked = torch.tensor(MASKED_PARTIALS, device=partials.device)[:, None]
        partials = torch.where(mask.reshape(1, -1), partials, masked)
    return partials


def _shifted(keys: torch.Tensor, stats: torch.Tensor, side: int,
             spec: DivergenceSpec) -> torch.Tensor:
    """``s = (key - max) / T`` in place of ``keys``, with the max of ``side`` (``ROW_MAX``: the
    student's, ``TEACHER_ROW_MAX``: the teacher's): the difference taken before the scaling."""
    return keys.sub_(stats[:, side:side + 1]).mul_(spec.inv_temperature)


def _log_probs(keys: torch.Tensor, stats: torch.Tensor, side: int,
               spec: DivergenceSpec) -> torch.Tensor:
    """``log p = (key - max) / T - log S`` in place of ``keys`` (see :func:`_shifted`; each
    side's log-sum is the column after its max)."""
    return _shifted(keys, stats, side, spec).sub_(stats[:, side + 1:side + 2])


def mixture_partials(logits, teacher_logits, layout, teacher_layout, mask, stats, *,
                     spec: DivergenceSpec):
    """Same contract as ``fastalign.kernels.divergence.mixture_partials``."""
    terms = torch.empty(2, layout.n_rows, device=logits.device, dtype=torch.float32)
    for start, stop in _row_ranges(logits.shape[-1], layout, teacher_layout):
        keys, teacher_keys = _chunk_keys(logits, teacher_logits, layout, teacher_layout, start,
                                         stop, spec)
        log_p = _log_probs(keys, stats[start:stop], ROW_MAX, spec)
        log_q = _log_probs(teacher_keys, stats[start:stop], TEACHER_ROW_MAX, spec)
        p, q = log_p.exp(), log_q.exp()
        to_mixture_p, to_mixture_q = mixture_log_ratios(log_p, log_q, p, q, spec)
        terms[0, start:stop] = torch.where(q == 0, 0.0, q * to_mixture_q).sum(dim=1)
        terms[1, start:stop] = torch.where(p == 0, 0.0, p * to_mixture_p).sum(dim=1)
    if mask is not None:
        terms = terms.masked_fill(~mask.reshape(1, -1), 0.0)
    return terms


def _divergence_grad(s, log_p, p, teacher_keys, stats, spec):
    """d divergence / dz' of one chunk (z' = softcap(z) / T), before the upstream factor."""
    aux = stats[:, AUX:AUX + 1]
    poison = aux - aux  # 0, or NaN where the divergence is NaN or infinite
    if spec.mode == FORWARD_KL:
        return p - _log_probs(teacher_keys, stats, TEACHER_ROW_MAX, spec).exp_() + poison
    if spec.mode == REVERSE_KL:
        # log p - log q - KL = (s - s_t) - shift, each s relative to its own side's max.
        log_ratio = s - _shifted(teacher_keys, stats, TEACHER_ROW_MAX, spec) - aux
        return torch.where(p == 0, poison, p * log_ratio)
    log_q = _log_probs(teacher_keys, stats, TEACHER_ROW_MAX, spec)
    to_mixture, _ = mixture_log_ratios(log_p, log_q, p, log_q.exp(), spec)
    return torch.where(p == 0, poison, spec.student_weight * p * (to_mixture - aux))


def divergence_grad(logits, teacher_logits, layout, teacher_layout, mask, stats, grad_divergence,
                    grad_entropy, grad_out, grad_layout, *, spec: DivergenceSpec):
    """Same contract as ``fastalign.kernels.divergence.divergence_grad``."""
    for start, stop in _row_ranges(logits.shape[-1], layout, teacher_layout, grad_layout):
        rows = slice(start, stop)
        row_stats = stats[rows]
        keys, teacher_keys = _chunk_keys(logits, teacher_logits, layout, teacher_layout, start,
                                         stop, spec)
        softcap_grad = None if spec.softcap is None else \
            (keys / spec.softcap).square_().neg_().add_(1.0)
        s = _shifted(keys, row_stats, ROW_MAX, spec)
        log_p = s - row_stats[:, LOG_SUM:LOG_SUM + 1]
        p = log_p.exp()
        grad = torch.zeros_like(p)
        if grad_divergence is not None:
            grad += _divergence_grad(s, log_p, p, teacher_keys, row_stats, spec) \
                * grad_divergence[rows, None]
        if grad_entropy is not None:
            # d entropy / dz'_j = -p_j (log p_j + entropy), log p floored (_tiles.LOG_P_FLOOR).
            entropy = row_stats[:, ENTROPY:ENTROPY + 1]
            grad -= p * (log_p.clamp(min=LOG_P_FLOOR) + entropy) * grad_entropy[rows, None]
        grad.mul_(spec.inv_temperature)
        if softcap_grad is not None:
            grad.mul_(softcap_grad)
        if mask is not None:  # skipped rows may hold anything, even NaN: overwrite, not scale
            grad.masked_fill_(~mask.reshape(-1)[rows, None], 0.0)
        row_block(grad_out, grad_layout, start, stop).copy_(grad)
    return grad_out
