"""TRL's ``DistillationTrainer`` on fastalign (enabled with the rest by
``fastalign.integrations.trl.enable()``).

The trainer's loss is one module-level function, ``_chunked_divergence_loss`` of
``trl.trainer.distillation_trainer`` (TRL's ``ChunkedDivergenceFunction`` on the student's and
the teacher's last hidden states and heads), called by name from its ``_compute_loss``. Its
replacement here returns the same three numbers (the loss, the student's entropy summed over
the completion tokens, their count) computed by ``FusedDistillationLoss``: the student's
gradient formed in the forward (3 matmuls of its head, 1 of the teacher's, instead of TRL's
recomputation in backward), chunks of at most ``chunk_mb`` MiB of float32 logits per model.
"""

from __future__ import annotations

import torch

from ..nn import FusedDistillationLoss

MODULE = "trl.trainer.distillation_trainer"
FUNCTION = "_chunked_divergence_loss"
# The trainer whose steps the guard of fastalign.integrations.trl watches.
TRAINER = (MODULE, "DistillationTrainer")


def fused_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                          teacher_lm_head_weight, completion_mask, beta,
                          num_items_in_batch=None, student_lm_head_bias=None,
                          teacher_lm_head_bias=None, student_logit_scale=1.0,
                          teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                          teacher_final_logit_softcapping=None, temperature=1.0):
    """TRL 1.16's ``_chunked_divergence_loss`` contract (same arguments, same
    ``(loss, entropy_sum, n_valid)``), computed by ``FusedDistillationLoss``. A logit scale
    other than 1 is folded into that model's head (softcap(scale z) is softcap of the scaled
    head's logits)."""
    student = _head(student_lm_head_weight, student_lm_head_bias, student_logit_scale,
                    student_hidden_states.dtype)
    teacher = _head(teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale,
                    teacher_hidden_states.dtype)
    valid = completion_mask != 0
    # Only which rows count is read: the loss has no hard-label term here.
    targets = torch.where(valid, 0, -100).to(torch.long)
    loss_module = FusedDistillationLoss(
        beta=beta, temperature=temperature, softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping, ignore_index=-100)
    mean, metrics = loss_module(student_hidden_states, student[0], teacher_hidden_states,
                                teacher[0], targets, bias=student[1], teacher_bias=teacher[1])
    n_valid = valid.sum()
    count = n_valid.clamp(min=1)
    total = mean * count
    if num_items_in_batch is None:
        loss = total / count
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    return loss, metrics["entropy"] * count, n_valid


def _head(weight, bias, scale, dtype):
    """``(weight, bias)`` as the loss takes them: an FSDP2 ``DTensor`` gathered once (as TRL
    does, cast to the hidden states' dtype), the logit scale folded in."""
    if isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor().to(dtype)
        bias = None if bias is None else bias.full_tensor()
    if scale != 1.0:
        weight = weight * scale
        bias = None if bias is None else bias * scale
    return weight, bias
