"""A distillation loss whose gradient is formed in the forward: ``linear_loss``'s chunked pass
for two models (``fastalign.nn.FusedDistillationLoss``).

The loss is a sum of per-token terms (the divergence to the teacher, and optionally the
cross-entropy of the data's token, each weighted by the caller), so a chunk of tokens knows its
own gradient as soon as both models' logits of it exist. Per chunk of kept rows:

    Zs = hidden[chunk] @ weight.T + bias                 [rows, V] float32, into a reused buffer
    Zt = teacher_hidden[chunk] @ teacher_weight.T + b    [rows, V] float32, a second buffer
    the divergence's first pass over (Zs, Zt) (native C++ on the CPU, Triton on CUDA), and
        the top-1 agreement of the two (on the CPU from that pass's block maxes)
    log p(target): the token_logprobs launchers on Zs (when the cross-entropy is weighted, its
        gradient built in a third buffer)
    divergence, entropy and G = dLoss/dZs written over Zs: a second pass over the pair, the
        JSD's (which forms the gradient too: ``mixture_grad``) or the KLs' backward; the
        cross-entropy's part added to G
    dHidden[chunk] = G @ weight ;  dWeight += G.T @ hidden[chunk] ;  dBias += G.sum(0)

so the student's head costs 3 matmuls and the teacher's 1, and the extra memory is two (three
with the cross-entropy) float32 chunks beside the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._layout import RowLayout
from ._backends import (divergence_launchers, divergence_partials_and_top1,
                        token_logprobs_launchers, work_buffer)
from ._vocab_stats import merge_divergence_partials, merge_mixture_partials
from ._tiles import NO_TARGET
from .linear_loss import _logits, accumulate_head_grads, save_grads, scaled_grads


@dataclass
class DistillPlan:
    """One pass: ``targets [N]`` (the data's tokens, read when ``label_weight`` is not 0),
    ``chunks`` (index tensors of kept rows), the divergence ``spec``
    (``kernels/divergence_interface.py``), the student's ``softcap`` (of the cross-entropy,
    at temperature 1), the per-token weights of the divergence and of the cross-entropy in the
    loss (0 / None: no gradient is formed), and the ``backend``."""
    targets: torch.Tensor
    chunks: list[torch.Tensor]
    spec: object
    softcap: float | None
    divergence_weight: float | None
    label_weight: float
    backend: str


@dataclass
class DistillOutputs:
    """Per kept row (0 elsewhere): the divergence, the student's entropy (at the temperature),
    whether both models' most likely token is the same, and ``log p(target)`` of the student
    at temperature 1 (None without the cross-entropy); the student's gradients (None where not
    asked)."""
    divergence: torch.Tensor
    entropy: torch.Tensor
    agreement: torch.Tensor
    target_logprobs: torch.Tensor | None
    grads: tuple


def _divergence(plan: DistillPlan, tile: torch.Tensor, teacher_tile: torch.Tensor,
                partials: torch.Tensor, coefficient: torch.Tensor | None):
    """``(divergence [r], entropy [r])`` of a chunk's pair of full-vocabulary tiles from their
    first pass's ``partials``; with a ``coefficient [r]``, the gradient of ``coefficient x
    divergence`` is written over ``tile`` (and ``teacher_tile`` may be overwritten: the JSD's
    ``mixture_grad`` keeps its per-column intermediates there). One more pass over the pair,
    the JSD's second or the KLs' backward; the JSD's gradient in its second."""
    launchers = divergence_launchers(plan.backend)
    layout = RowLayout(1, tile.shape[0], 0, tile.shape[1])
    pair = (tile, teacher_tile, layout, layout, None)
    divergence, entropy, stats = merge_divergence_partials(partials[None], spec=plan.spec)
    if divergence is None:  # the JSD: its mixture needs both normalizers first
        terms = launchers.mixture(*pair, stats, spec=plan.spec) if coefficient is None else \
            launchers.mixture_grad(*pair, stats, coefficient, spec=plan.spec)
        divergence = merge_mixture_partials(stats, terms[None], spec=plan.spec)
    elif coefficient is not None:
        launchers.backward(*pair, stats, coefficient, None, tile, layout, spec=plan.spec)
    return divergence, entropy


def run(student: tuple, teacher: tuple, plan: DistillPlan, *, need: tuple[bool, bool, bool]
        ) -> DistillOutputs:
    """The chunked pass of the module docstring. ``student``, ``teacher``: ``(hidden [N, D],
    weight [V, D], bias [V] or None)`` each; ``need``: which of the student's hidden, weight
    and bias gradients to form (with ``plan.divergence_weight``)."""
    hidden, weight, bias = student
    n_rows, vocab_size = plan.targets.shape[0], weight.shape[0]
    new = dict(dtype=torch.float32, device=hidden.device)
    divergence, entropy, agreement = (torch.zeros(n_rows, **new) for _ in range(3))
    labelled = plan.label_weight != 0
    target_logprobs = torch.zeros(n_rows, **new) if labelled else None
    grad_wanted = plan.divergence_weight is not None
    need_hidden, need_weight, need_bias = (grad_wanted and n for n in need)
    buffer = lambda *shape, zero=False: work_buffer(  # noqa: E731
        shape, hidden.device, plan.backend, zero=zero)
    grad_hidden = buffer(*hidden.shape, zero=True) if need_hidden else None
    grad_weight = buffer(*weight.shape, zero=True) if need_weight else None
    grad_bias = torch.zeros(vocab_size, **new) if need_bias else None
    widest = max((len(c) for c in plan.chunks), default=0)
    # Reused float32 chunks (``_logits`` writes a float32 matmul into them; other dtypes get a
    # fresh tile of their own rounding, so no buffer is held for them).
    float32 = lambda *ts: all(t is None or t.dtype == torch.float32 for t in ts)  # noqa: E731
    buffers = [buffer(widest if float32(*student) else 0, vocab_size),
               buffer(widest if float32(*teacher) else 0, vocab_size)]
    if labelled and grad_wanted:
        buffers.append(buffer(widest, vocab_size))
    for index in plan.chunks:
        rows = hidden.index_select(0, index)
        tile = _logits(rows, weight, bias, buffers[0][:len(index)])
        teacher_tile = _logits(teacher[0].index_select(0, index), teacher[1], teacher[2],
                               buffers[1][:len(index)])
        # What reads the logits comes first: the divergence's gradient is written over them.
        partials, top1 = divergence_partials_and_top1(tile, teacher_tile, plan.backend,
                                                      spec=plan.spec)
        agreement.index_copy_(0, index, (top1[0] == top1[1]).float())
        label_grad = None
        if labelled:
            targets = plan.targets.index_select(0, index).long()
            logprobs, label_grad = _cross_entropy(plan, tile, targets, buffers[2:],
                                                  grad_wanted)
            target_logprobs.index_copy_(0, index, logprobs)
        coefficient = torch.full((len(index),), plan.divergence_weight, **new) \
            if grad_wanted else None
        chunk_divergence, chunk_entropy = _divergence(plan, tile, teacher_tile, partials,
                                                       coefficient)
        divergence.index_copy_(0, index, chunk_divergence)
        entropy.index_copy_(0, index, chunk_entropy)
        if not grad_wanted:
            continue
        grad = tile
        if label_grad is not None:
            grad += label_grad
        accumulate_head_grads(grad, index, rows, weight, grad_hidden, grad_weight, grad_bias)
    grads = tuple(None if g is None else g.to(like.dtype) for g, like in
                  ((grad_hidden, hidden), (grad_weight, weight),
                   (grad_bias, bias if bias is not None else weight)))
    return DistillOutputs(divergence, entropy, agreement, target_logprobs, grads)


def _cross_entropy(plan: DistillPlan, tile: torch.Tensor, targets: torch.Tensor, spare: list,
                   grad_wanted: bool):
    """``(log p(target) [r], its loss's gradient w.r.t. the tile or None)``: the student at
    temperature 1 with its soft cap, through the token_logprobs launchers; the gradient of
    ``-label_weight x log p`` is written into the spare buffer (the tile itself is about to hold
    the divergence's)."""
    launchers = token_logprobs_launchers(plan.backend)
    layout = RowLayout(1, tile.shape[0], 0, tile.shape[1])
    options = dict(inv_temperature=1.0, softcap=plan.softcap, ignore_index=NO_TARGET)
    logprobs, _, stats = launchers.forward(tile, targets, layout, return_entropy=False,
                                           **options)
    if not grad_wanted:
        return logprobs, None
    # Read from the tile, written into the spare buffer: no copy of the tile first.
    out = spare[0][:tile.shape[0]]
    coefficient = torch.full_like(logprobs, -plan.label_weight)
    launchers.backward(tile, targets, layout, stats, None, coefficient, None, out, layout,
                       **options)
    return logprobs, out


class _DistillInForward(torch.autograd.Function):
    """Outputs ``(anchor, divergence, entropy, agreement, target log-probs)``: ``anchor`` is a 0
    whose gradient is the loss's (the caller adds it to the loss value it computes from the
    other outputs), which carry no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, plan):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        out = run((hidden, weight, bias), (teacher_hidden, teacher_weight, teacher_bias), plan,
                  need=need)
        save_grads(ctx, out.grads, plan.backend)
        logprobs = out.divergence.new_empty(0) if out.target_logprobs is None \
            else out.target_logprobs
        ctx.mark_non_differentiable(out.divergence, out.entropy, out.agreement, logprobs)
        return out.divergence.new_zeros(()), out.divergence, out.entropy, out.agreement, logprobs

    @staticmethod
    def backward(ctx, grad_anchor, *_):
        return (*scaled_grads(ctx, grad_anchor), None, None, None, None)


def distill_in_forward(student: tuple, teacher: tuple, plan: DistillPlan):
    """``(anchor, divergence [N], entropy [N], agreement [N], target log-probs [N] or None)``
    (see ``_DistillInForward``); the loss is ``value.detach() + anchor``."""
    anchor, *outputs = _DistillInForward.apply(*student, *teacher, plan)
    if plan.label_weight == 0:
        outputs[-1] = None
    return (anchor, *outputs)
