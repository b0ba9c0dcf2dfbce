"""Distillation from a teacher that returns only its top-k log-probs (a vLLM server's
``logprobs=20``): the divergence over the teacher's K tokens, plus one tail bin for the rest.

The student's log-probs of the same K tokens come from the fused ops in one vocabulary pass
(``linear_logprobs(hidden, weight, topk_targets=teacher_ids)``), so neither side's full
distribution is ever needed.

Zero probabilities (``-inf`` log-probs) are everyday input here: padding where a teacher returned
fewer than K tokens, tokens its sampler masked, a tail the K tokens already fill. Every product
``p * (log p - log q)`` is therefore formed only where ``p > 0`` (0 elsewhere, by the limit
``p log p -> 0``), selected before it is formed, so that neither the value nor the gradient
sees ``0 * inf``; the same holds for the log-sum-exp of a row of ``-inf`` and for the mixture of
two empty bins.
"""

from __future__ import annotations

import math

import torch

from .. import _validation as checks

_NEG_INF = float("-inf")


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``log sum exp`` over the last dim; ``-inf`` with a zero gradient for a row of only
    ``-inf`` (where ``torch.logsumexp``'s gradient is ``exp(-inf + inf)`` = NaN)."""
    alive = (x > _NEG_INF).any(-1)
    safe = torch.where(alive[..., None], x, 0.0)
    return torch.where(alive, torch.logsumexp(safe, -1), _NEG_INF)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends: ``expm1`` near 0, ``log1p``
    below ``-log 2`` (each branch is finite, with a finite gradient, wherever it is taken)."""
    near_zero = x > -math.log(2.0)
    return torch.where(near_zero, torch.log(-torch.expm1(torch.where(near_zero, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x))))


def _bins(logps: torch.Tensor, tail: bool) -> torch.Tensor:
    """The distribution the divergence compares: the K log-probs and the tail bin
    ``log(1 - sum exp)`` (``[..., K + 1]``), or the K renormalized to sum to 1."""
    total = _logsumexp(logps)
    if not tail:
        # A row of only -inf stays so (no probability anywhere): every term of it is 0.
        return logps - torch.where(total > _NEG_INF, total, 0.0)[..., None]
    # The sum of K float log-probs is known to an ulp of 1: a tail below that (or a sum that
    # rounds past 1) is held at eps, where an empty bin would make the divergence or its
    # gradient infinite over a rounding.
    eps = torch.finfo(logps.dtype).eps
    tail_log_p = _log1mexp(total.clamp(max=math.log1p(-eps)))
    return torch.cat([logps, tail_log_p[..., None]], dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum p (log p - log q)`` over the last dim. Bins with ``p = 0`` (to float precision)
    add 0 and get no gradient; bins with ``q = 0 < p`` make it ``+inf``, as it is; NaN stays."""
    alive = log_p.exp() != 0
    safe_p = torch.where(alive, log_p, 0.0)
    safe_q = torch.where(alive, log_q, 0.0)
    return torch.where(alive, safe_p.exp() * (safe_p - safe_q), 0.0).sum(-1)


def _generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta KL(q || m) + (1 - beta) KL(p || m)`` with ``m = (1 - beta) p + beta q``, for
    ``0 < beta < 1``: finite even where one side is 0. A bin empty on both sides has no
    mixture; its inputs are replaced (it adds 0 either way) so ``logaddexp``'s gradient is not
    ``exp(-inf + inf)``."""
    both_empty = (log_p == _NEG_INF) & (log_q == _NEG_INF)
    log_m = torch.logaddexp(torch.where(both_empty, 0.0, log_p) + math.log1p(-beta),
                            torch.where(both_empty, 0.0, log_q) + math.log(beta))
    return beta * _kl(log_q, log_m) + (1.0 - beta) * _kl(log_p, log_m)


def _infinite_rows(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Rows where a pure KL is ``+inf``: a bin the numerator's side fills and the other's is
    empty (the forward KL's teacher over the student's, the reverse KL's the other way)."""
    if 0.0 < beta < 1.0:
        return torch.zeros(student.shape[:-1], dtype=torch.bool, device=student.device)
    p, q = (teacher, student) if beta == 0.0 else (student, teacher)
    return ((p.exp() != 0) & (q == _NEG_INF)).any(-1)


def _stand_in(rows: torch.Tensor, *tensors: torch.Tensor):
    """``tensors`` with the given rows replaced by log-probs 0 (divergence 0 between them):
    whatever those rows held (inf, NaN) then reaches neither the value nor, as ``0 * inf``,
    the gradient."""
    return tuple(torch.where(rows[..., None], 0.0, x) for x in tensors)


def topk_divergence(student_topk_logps: torch.Tensor, teacher_topk_logps: torch.Tensor, *,
                    beta: float = 1.0, tail: bool = True,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row divergence between student and teacher over the teacher's K tokens.

    ``beta`` follows TRL's distillation convention (``DistillationTrainer``, GKD):
    ``beta = 0`` is the forward KL(teacher || student), ``beta = 1`` the reverse
    KL(student || teacher), and ``0 < beta < 1`` the generalized Jensen-Shannon divergence
    ``beta KL(teacher || m) + (1 - beta) KL(student || m)`` with the mixture
    ``m = (1 - beta) p_student + beta p_teacher``.

    Args:
        student_topk_logps: ``[..., K]`` the student's log-probs of the teacher's K tokens under
            its full softmax, e.g. ``linear_logprobs(hidden, weight, topk_targets=ids)``;
            differentiable.
        teacher_topk_logps: ``[..., K]`` the teacher's log-probs of the same tokens; constants
            (detached: no gradient reaches the teacher).
        beta: in ``[0, 1]``, see above.
        tail: add one bin for the probability outside the K tokens on each side,
            ``log(1 - sum exp(logps))`` (held at ``finfo.eps`` where the K fill the
            distribution to float precision: the sum of K log-probs cannot resolve less). With
            ``tail=False`` each side's K probabilities are renormalized to sum to 1 over the K
            tokens, and the divergence is between those.
        mask: ``[...]`` bool or None; rows where it is False give 0 and no gradient.

    Returns:
        ``[...]`` the divergence per row, float32 (float64 for float64 inputs).

    Zero probabilities are ``-inf`` log-probs and never give NaN, in the value or the gradient.
    Entries a teacher did not fill (fewer than K tokens) must be ``-inf`` on both sides (the
    ops give ignored targets a log-prob of 0, so mask the student's too:
    ``student.masked_fill(ids == ignore_index, float("-inf"))``). A token the teacher gives 0
    and the student does not makes the reverse KL ``+inf`` (the forward KL, the reverse way
    round), as it mathematically is, and that row passes no gradient; the JSD stays finite.
    """
    checks.check_same_shape([("student_topk_logps", student_topk_logps),
                             ("teacher_topk_logps", teacher_topk_logps)],
                            "log-probs of the teacher's K tokens, [..., K]")
    if student_topk_logps.dim() == 0 or student_topk_logps.shape[-1] == 0:
        raise ValueError("student_topk_logps must have shape [..., K] with K >= 1, got shape "
                         f"{tuple(student_topk_logps.shape)}")
    checks.check_same_device("teacher_topk_logps", teacher_topk_logps,
                             "student_topk_logps", student_topk_logps)
    checks.check_number("beta", beta, low=0.0, high=1.0,
                        why="0: forward KL, 1: reverse KL, between: generalized JSD")
    checks.check_flag("tail", tail)
    checks.check_mask(mask, student_topk_logps.shape[:-1], student_topk_logps.device,
                      "student_topk_logps")

    dtype = torch.float64 if student_topk_logps.dtype == torch.float64 else torch.float32
    student = student_topk_logps.to(dtype)
    teacher = teacher_topk_logps.detach().to(dtype)
    if mask is not None:
        student, teacher = _stand_in(~mask, student, teacher)
    student, teacher = _bins(student, tail), _bins(teacher, tail)
    # An infinite divergence has no gradient: such rows are computed on the stand-in too.
    infinite = _infinite_rows(student.detach(), teacher, beta)
    student, teacher = _stand_in(infinite, student, teacher)
    if beta == 0.0:
        divergence = _kl(teacher, student)
    elif beta == 1.0:
        divergence = _kl(student, teacher)
    else:
        divergence = _generalized_jsd(student, teacher, float(beta))
    divergence = divergence.masked_fill(infinite, float("inf"))
    return divergence if mask is None else divergence.masked_fill(~mask, 0.0)
