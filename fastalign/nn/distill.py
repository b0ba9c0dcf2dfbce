"""``FusedDistillationLoss``: a student's divergence to a teacher over the whole vocabulary, from
both models' hidden states and heads, with the student's gradient formed in the forward, so
neither model's ``[N, V]`` logits exist (``ops/linear_divergence_loss.py``)."""

from __future__ import annotations

import torch

from .._backend import select_backend
from .._validation import check_number, check_targets
from ..ops.linear_divergence import check_inputs, linear_divergence
from ..ops.linear_divergence_loss import DistillPlan, distill_in_forward
from ..ops.linear_logprobs import linear_logprobs
from ..ops.linear_loss import rows_per_chunk, split_rows
from ..ops.token_divergence import check_options
from ..kernels.divergence_interface import divergence_spec
from . import _gradient_in_forward as one_pass
from ._fused_loss import FusedLoss

# MiB of float32 logits per model and chunk, at most: 458 rows of a 128k vocabulary. Each chunk's
# four matmuls re-read both heads and the weight gradient, so the count of chunks sets their
# speed: on the 2-core VM the four matmuls of N=2048 rows (D=256, D_t=512, V=128256) in chunks
# of 128 / 192 / 256 MiB (8 / 6 / 4 chunks) took 1.21x / 1.14x / 1.07x their time as whole-batch
# products (bench/bench_divergence.py --providers matmul_floor matmul_chunked --chunk-mb ...),
# and the JSD took 1.33x the floor in 6 chunks, 1.26x in 5 (--chunk-mb 192 201, one run).
# The two models' chunks are most of the loss's extra memory: two full chunks of 224 MiB beside
# that shape's 125 MiB weight gradient stay under a fifth of TRL's chunked loss there (588 MiB
# at beta 1), and the chunks are of equal size (split_rows): N=2048 goes in 5 of 410 rows.
DISTILL_CHUNK_MB = 224.0


class FusedDistillationLoss(FusedLoss):
    """Distillation loss: the mean over the data's kept tokens of the divergence from the
    student's next-token distribution to the teacher's (``fastalign.linear_divergence``:
    ``beta`` 0 forward KL(teacher || student), 1 reverse KL(student || teacher), in between
    the generalized JSD, both at ``temperature``), plus ``hard_label_weight`` x the
    cross-entropy of the data's tokens (the student at temperature 1).

    ``forward(hidden, weight, teacher_hidden, teacher_weight, targets, *, bias=None,
    teacher_bias=None) -> (loss, metrics)``: ``hidden [..., D]`` and ``weight [V, D]`` the
    student's, ``teacher_hidden [..., D_t]`` and ``teacher_weight [V, D_t]`` the teacher's (its
    width may differ, not its vocabulary; no gradient reaches it), ``targets [...]`` the data's
    next tokens, ``ignore_index`` rows left out of every term. ``metrics``: ``divergence``,
    ``entropy`` (the student's, at the temperature), ``agreement`` (share of tokens where both
    models' most likely token is the same) and, with hard labels, ``hard_label_loss``; token
    means, not differentiated.

    ``gradient_in_forward`` (the default): the student's head costs 3 matmuls and the
    teacher's 1, in chunks of at most ``chunk_mb`` MiB of float32 logits per model (see
    ``DISTILL_CHUNK_MB``). Under
    ``torch.compile`` tracing, or with a sharded head (FSDP2 ``DTensor``, ZeRO-3), or with
    ``gradient_in_forward=False``, the two-pass ops run instead (``linear_divergence``,
    ``linear_logprobs``: their backward recomputes the logits) and ``agreement`` is not
    reported.
    """

    def __init__(self, beta: float = 1.0, temperature: float = 1.0,
                 hard_label_weight: float = 0.0, *, softcap: float | None = None,
                 teacher_softcap: float | None = None, ignore_index: int = -100,
                 gradient_in_forward: bool = True, chunk_mb: float = DISTILL_CHUNK_MB):
        super().__init__(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                         gradient_in_forward=gradient_in_forward, chunk_mb=chunk_mb)
        check_options(beta, temperature, softcap, teacher_softcap, False)
        check_number("hard_label_weight", hard_label_weight, low=0.0,
                     why="the weight of the cross-entropy of the data's tokens")
        self.beta, self.hard_label_weight = float(beta), float(hard_label_weight)
        self.teacher_softcap = teacher_softcap

    def forward(self, hidden, weight, teacher_hidden, teacher_weight, targets, *, bias=None,
                teacher_bias=None):
        # The chunked pass needs the mode on, plain tensors and no torch.compile tracing.
        chunked = (self.gradient_in_forward and not torch.compiler.is_compiling()
                   and one_pass.plain_tensors(hidden, weight, bias, teacher_weight, teacher_bias))
        if chunked:
            # The two-pass ops check their own inputs (sharded heads resolved first).
            check_inputs(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, None)
            check_targets(targets, hidden.shape[:-1], weight.shape[0], hidden.device,
                          self.ignore_index, source="hidden")
        kept = targets != self.ignore_index
        count = kept.sum().clamp(min=1)
        if chunked:
            return self._one_pass(hidden, weight, bias, teacher_hidden, teacher_weight,
                                  teacher_bias, targets, kept, count)
        divergence, entropy = linear_divergence(
            hidden, weight, teacher_hidden, teacher_weight, bias=bias, teacher_bias=teacher_bias,
            beta=self.beta, temperature=self.temperature, softcap=self.softcap,
            teacher_softcap=self.teacher_softcap, mask=kept, return_entropy=True)
        loss = divergence.sum() / count
        metrics = {"divergence": loss.detach(), "entropy": entropy.detach().sum() / count}
        if self.hard_label_weight:
            logprobs = linear_logprobs(hidden, weight, targets, bias=bias, softcap=self.softcap,
                                       ignore_index=self.ignore_index)
            hard = -logprobs.sum() / count
            loss = loss + self.hard_label_weight * hard
            metrics["hard_label_loss"] = hard.detach()
        return loss, metrics

    def _one_pass(self, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                  targets, kept, count):
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        rows = kept.reshape(-1).nonzero().squeeze(1)
        limit = rows_per_chunk(self.chunk_mb, weight.shape[0])
        wants_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))
        # A per-token term's share of the mean: the gradient of each row's divergence (the
        # count of kept rows is on the host already, after nonzero's sync).
        scale = 1.0 / max(len(rows), 1)
        plan = DistillPlan(
            targets=targets.reshape(-1), chunks=split_rows(rows, limit),
            spec=divergence_spec(self.beta, 1.0 / self.temperature, self.softcap,
                                 self.teacher_softcap),
            softcap=self.softcap, divergence_weight=scale if wants_grad else None,
            label_weight=self.hard_label_weight * scale, backend=select_backend(hidden.device))
        anchor, divergence, entropy, agreement, logprobs = distill_in_forward(
            (flat(hidden), weight, bias),
            (flat(teacher_hidden).detach(), teacher_weight.detach(),
             None if teacher_bias is None else teacher_bias.detach()), plan)
        value = divergence.sum() / count
        metrics = {"divergence": value, "entropy": entropy.sum() / count,
                   "agreement": agreement.sum() / count}
        if logprobs is not None:
            hard = -logprobs.sum() / count
            value = value + self.hard_label_weight * hard
            metrics["hard_label_loss"] = hard
        return (value + anchor if wants_grad else value), metrics
