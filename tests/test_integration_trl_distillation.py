"""TRL 1.16's DistillationTrainer loss served by fastalign: with enable(), the trainer's
``_chunked_divergence_loss`` is fastalign's, equal to TRL's own on the same inputs (loss,
entropy sum, count, every student gradient) with TRL's ChunkedDivergenceFunction made to raise;
disable() restores TRL's. And the trainer itself: a few steps of ``train()`` patched log what
unpatched TRL logs and end at the same student."""

import importlib
import warnings

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


PROMPTS = ["the cat sat on", "a dog ran to", "my hat is", "one two three", "red and blue",
           "in the morning"]
# Wall-clock entries of the log: the only ones two runs may differ in.
TIMING_LOGS = {"step_time", "train_runtime", "train_samples_per_second",
               "train_steps_per_second"}


def _distillation_run(tmp_path, **options):
    """Three optimizer steps of TRL's DistillationTrainer.train(), seed 0, each sampling the
    student's completions (TRL 1.16's trainer is on-policy only) and distilling a wider
    teacher of the same 300-token vocabulary: (each step's loss unrounded, the log history,
    the student's parameters before and after)."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from fastalign.trainer import byte_tokenizer, tiny_llama

    student = tiny_llama(vocab_size=300, hidden_size=32, num_layers=2, seed=0)
    teacher = tiny_llama(vocab_size=300, hidden_size=48, num_layers=2, seed=1)
    with torch.no_grad():  # a peaked teacher, so the divergence and its gradient are not ~0
        teacher.get_output_embeddings().weight.mul_(8.0)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                  max_completion_length=8, max_steps=3, learning_rate=1e-3,
                                  logging_steps=1, save_strategy="no", report_to=[],
                                  use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                                  **options)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      processing_class=byte_tokenizer(),
                                      train_dataset=Dataset.from_list([{"prompt": p}
                                                                       for p in PROMPTS]))
        # The log rounds the loss to 4 decimals: keep each step's own.
        losses, compute_loss = [], trainer.compute_loss

        def recorded(*args, **kwargs):
            loss = compute_loss(*args, **kwargs)
            losses.append(float(loss.detach()))
            return loss

        trainer.compute_loss = recorded
        trainer.train()
    after = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return losses, trainer.state.log_history, before, after


# About 1 s per case on the idle 2-core VM (two short train() runs), so not marked slow.
@pytest.mark.parametrize("options", [dict(), dict(beta=0.5, temperature=0.8)],
                         ids=["default_reverse_kl", "jsd_temperature"])
def test_training_matches_unpatched_trl(tmp_path, monkeypatch, options):
    losses, logs, init, params = _distillation_run(tmp_path / "trl", **options)
    monkeypatch.setattr(distillation.ChunkedDivergenceFunction, "apply",
                        lambda *a: pytest.fail("TRL's ChunkedDivergenceFunction ran"))
    with fatrl.enabled():
        our_losses, our_logs, _, our_params = _distillation_run(tmp_path / "fastalign",
                                                                **options)
    assert len(losses) == 3 and min(losses) > 0.01  # a divergence that matters
    torch.testing.assert_close(our_losses, losses, rtol=1e-5, atol=0)
    # Every logged number but the clocks: the same completions were sampled (their lengths
    # are logged), the same entropy and gradient norm.
    assert len(our_logs) == len(logs) == 4
    for ours, expected in zip(our_logs, logs):
        assert ours.keys() == expected.keys()
        for key, value in expected.items():
            if key in TIMING_LOGS or not isinstance(value, (int, float)):
                continue
            torch.testing.assert_close(float(ours[key]), float(value), rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"step {expected.get('step')} {key}: {m}")
    for name, value in params.items():
        update, our_update = value - init[name], our_params[name] - init[name]
        assert update.norm() > 0, name
        # AdamW scales each element's step to ~lr (1e-3) whatever its gradient's size, so an
        # element whose gradient is at float32 rounding level may take a slightly different
        # step: each element within 1% of lr, each tensor's update within 1e-4 of its norm.
        torch.testing.assert_close(our_params[name], value, rtol=0, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
        error = float((our_update - update).norm() / update.norm())
        assert error <= 1e-4, f"{name}: update differs by {error:.2e} of its norm"
