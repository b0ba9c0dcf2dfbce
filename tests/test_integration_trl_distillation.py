"""TRL 1.16's DistillationTrainer loss served by fastalign: with enable(), the trainer's
``_chunked_divergence_loss`` is fastalign's, equal to TRL's own on the same inputs (loss,
entropy sum, count, every student gradient) with TRL's ChunkedDivergenceFunction made to raise;
disable() restores TRL's."""

import importlib

import pytest
import torch

pytest.importorskip("trl")

import fastalign.integrations.trl as fatrl  # noqa: E402

distillation = importlib.import_module("trl.trainer.distillation_trainer")
TRL_LOSS = distillation._chunked_divergence_loss


def inputs(seed=0, teacher_width=24):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: torch.randn(*shape, generator=generator) * scale  # noqa
    student = [randn(2, 9, 16).requires_grad_(), randn(1007, 16, scale=0.5).requires_grad_(),
               randn(1007, scale=0.1).requires_grad_()]
    teacher = [randn(2, 9, teacher_width), randn(1007, teacher_width, scale=0.5),
               randn(1007, scale=0.1)]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, 7:] = 0
    return student, teacher, mask


def call(function, student, teacher, mask, **options):
    return function(student[0], teacher[0], student[1], teacher[1], mask,
                    student_lm_head_bias=student[2], teacher_lm_head_bias=teacher[2], **options)


@pytest.mark.parametrize("options", [
    dict(beta=0.0), dict(beta=0.5, temperature=1.7), dict(beta=1.0),
    dict(beta=0.3, student_logit_scale=0.8, teacher_logit_scale=1.3,
         student_final_logit_softcapping=9.0, teacher_final_logit_softcapping=7.0),
    dict(beta=1.0, num_items_in_batch=torch.tensor(25))])
def test_the_patched_loss_equals_trls(options, monkeypatch):
    student, teacher, mask = inputs()
    loss, entropy, count = call(TRL_LOSS, student, teacher, mask, **options)
    expected = torch.autograd.grad(loss, student)
    with fatrl.enabled():
        patched = distillation._chunked_divergence_loss
        assert patched is not TRL_LOSS
        monkeypatch.setattr(distillation.ChunkedDivergenceFunction, "apply",
                            lambda *a: pytest.fail("TRL's ChunkedDivergenceFunction ran"))
        ours, our_entropy, our_count = call(patched, student, teacher, mask, **options)
        grads = torch.autograd.grad(ours, student)
    assert distillation._chunked_divergence_loss is TRL_LOSS  # disable() restored it
    torch.testing.assert_close(ours, loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(our_entropy, entropy, rtol=1e-5, atol=1e-5)
    assert int(our_count) == int(count) == int(mask.sum())
    for ours_grad, trl_grad in zip(grads, expected):
        torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-5, atol=1e-7)


def test_a_teacher_of_another_vocabulary_is_refused():
    student, teacher, mask = inputs()
    teacher[1], teacher[2] = teacher[1][:1000], teacher[2][:1000]
    with fatrl.enabled(), pytest.raises(ValueError, match="teacher_weight has 1000 vocabulary "
                                                          "rows but weight has 1007"):
        call(distillation._chunked_divergence_loss, student, teacher, mask, beta=0.5)
