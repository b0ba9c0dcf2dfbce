"""DistillTrainer: a step's loss and gradients against a float64 reference (every beta, a
temperature, hard labels, a teacher of another width), on-policy steps, evaluation, the
vocabulary check, exact resume, and the command."""

import copy
import math

import pytest
import torch
from helpers import preference_rows, run_cli

from fastalign.trainer import byte_tokenizer, tiny_llama
from fastalign.trainer.algorithms.distill import DistillConfig, DistillTrainer
from fastalign.trainer.models.adapter import IGNORE_INDEX, completion_targets

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


def completion_rows(n=4):
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(n)]


def models(teacher_width=48):
    """A student and a teacher over the same 1000 tokens, of different widths, scaled so their
    distributions differ clearly."""
    student = tiny_llama(vocab_size=1000, hidden_size=32, num_layers=1, seed=0)
    teacher = tiny_llama(vocab_size=1000, hidden_size=teacher_width, num_layers=1, seed=1)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.mul_(4.0)
    return student, teacher


def trainer(tmp_path, student, teacher, rows=None, eval_rows=None, **options):
    config = DistillConfig(**{"output_dir": str(tmp_path / "out"), "batch_size": 4,
                              "progress": False, **options})
    return DistillTrainer(student, byte_tokenizer(), config, rows or completion_rows(),
                          eval_rows, teacher=teacher)


def divergence64(student_logp, teacher_logp, beta):
    """Per-token divergence from float64 log-softmaxes: TRL's beta convention."""
    ps, pt = student_logp.exp(), teacher_logp.exp()
    if beta == 0:
        return (pt * (teacher_logp - student_logp)).sum(-1)
    if beta == 1:
        return (ps * (student_logp - teacher_logp)).sum(-1)
    mixture = torch.logsumexp(torch.stack([student_logp + math.log(1 - beta),
                                           teacher_logp + math.log(beta)]), 0)
    return (beta * (pt * (teacher_logp - mixture)).sum(-1)
            + (1 - beta) * (ps * (student_logp - mixture)).sum(-1))


def reference_loss(student, teacher, batch, *, beta, temperature, hard_label_weight=0.0,
                   divergence_weight=1.0):
    """The mean over completion tokens of divergence_weight x the divergence (+
    hard_label_weight x the
    cross-entropy of the tokens), from the models' float64 copies; differentiable w.r.t. the
    float64 student, which is returned with it."""
    exact_student, exact_teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    targets = completion_targets(batch["input_ids"], batch["completion_mask"],
                                 batch["attention_mask"])
    kept = targets != IGNORE_INDEX
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if batch.get("position_ids") is not None:
        inputs["position_ids"] = batch["position_ids"]
    student_logits = exact_student(**inputs).logits[:, :-1][kept] / temperature
    with torch.no_grad():
        teacher_logits = exact_teacher(**inputs).logits[:, :-1][kept] / temperature
    student_logp = torch.log_softmax(student_logits, -1)
    teacher_logp = torch.log_softmax(teacher_logits, -1)
    loss = divergence_weight * divergence64(student_logp, teacher_logp, beta).mean()
    if hard_label_weight:
        cross_entropy = -student_logp.gather(-1, targets[kept][:, None]).mean()
        loss = loss + hard_label_weight * cross_entropy
    return loss, exact_student


@pytest.mark.parametrize("beta, temperature, hard_label_weight",
                         [(0.0, 1.0, 0.0), (0.5, 2.0, 0.0), (1.0, 0.7, 0.0), (0.3, 1.0, 0.5)])
def test_a_step_matches_the_float64_loss_and_gradients(tmp_path, beta, temperature,
                                                       hard_label_weight):
    student, teacher = models()
    ours = trainer(tmp_path, student, teacher, beta=beta, temperature=temperature,
                   hard_label_weight=hard_label_weight)
    work = ours.prepare_step([ours.train_items])
    (batch, weight), = next(iter(ours.updates(work)))
    loss, metrics = ours.compute_loss(batch)
    loss.backward()
    exact, exact_student = reference_loss(student, teacher, batch, beta=beta,
                                          temperature=temperature,
                                          hard_label_weight=hard_label_weight)
    exact.backward()
    assert weight == pytest.approx(1.0)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5, abs=1e-7)
    for (name, ours_p), (_, exact_p) in zip(ours.model.named_parameters(),
                                            exact_student.named_parameters()):
        torch.testing.assert_close(ours_p.grad.double(), exact_p.grad, rtol=1e-4, atol=1e-7,
                                   msg=name)
    assert 0 <= metrics["agreement"] <= 1 and metrics["entropy"] > 0


def test_on_policy_steps_train_on_the_students_samples(tmp_path):
    """lmbda = 1: every step samples; the batch is the student's completions (not the
    data's), the loss the float64 divergence on them, without the hard-label term."""
    student, teacher = models()
    ours = trainer(tmp_path, student, teacher, lmbda=1.0, beta=0.5, hard_label_weight=1.0,
                   max_new_tokens=6)
    work = ours.prepare_step([ours.train_items])
    assert work.on_policy
    (batch, _), = next(iter(ours.updates(work)))
    assert batch["completion_mask"].sum(-1).max() <= 6
    loss, _ = ours.compute_loss(batch)
    exact, _ = reference_loss(student, teacher, batch, beta=0.5, temperature=1.0)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)
    assert ours.step_metrics(work) == {"on_policy": 1.0}


def test_seq_kd_steps_train_on_the_teachers_samples(tmp_path, monkeypatch):
    """seq_kd: the off-policy step's completions are the teacher's samples (the teacher model
    is what generates), and the loss is the float64 divergence + hard labels on them."""
    from fastalign.trainer.algorithms import distill
    student, teacher = models()
    samplers = []

    def recording(model, *args, **kwargs):
        samplers.append(model)
        return generate_rollouts(model, *args, **kwargs)

    generate_rollouts = distill.generate_rollouts
    monkeypatch.setattr(distill, "generate_rollouts", recording)
    ours = trainer(tmp_path, student, teacher, seq_kd=True, beta=0.3, hard_label_weight=0.5,
                   max_new_tokens=6)
    work = ours.prepare_step([ours.train_items])
    assert samplers == [teacher] and not work.on_policy
    (batch, _), = next(iter(ours.updates(work)))
    assert batch["completion_mask"].sum(-1).max() <= 6
    loss, _ = ours.compute_loss(batch)
    exact, _ = reference_loss(student, teacher, batch, beta=0.3, temperature=1.0,
                              hard_label_weight=0.5)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)


def test_divergence_weight_scales_the_divergence_beside_the_hard_labels(tmp_path):
    student, teacher = models()
    ours = trainer(tmp_path, student, teacher, beta=0.5, divergence_weight=0.25,
                   hard_label_weight=0.5)
    (batch, _), = next(iter(ours.updates(ours.prepare_step([ours.train_items]))))
    loss, metrics = ours.compute_loss(batch)
    loss.backward()
    divergence, _ = reference_loss(student, teacher, batch, beta=0.5, temperature=1.0)
    exact, exact_student = reference_loss(student, teacher, batch, beta=0.5, temperature=1.0,
                                          hard_label_weight=0.5, divergence_weight=0.25)
    exact.backward()
    assert metrics["divergence"].item() == pytest.approx(divergence.item(), rel=1e-5)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)
    for (name, ours_p), (_, exact_p) in zip(ours.model.named_parameters(),
                                            exact_student.named_parameters()):
        torch.testing.assert_close(ours_p.grad.double(), exact_p.grad, rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_divergence_weight_0_is_supervised_fine_tuning_without_the_teacher(tmp_path):
    """The loss and gradients are hard_label_weight x the float64 cross-entropy, and the
    teacher never runs while training (it still does for the held-out divergence)."""
    student, teacher = models()
    ours = trainer(tmp_path, student, teacher, divergence_weight=0.0, hard_label_weight=2.0)
    (batch, _), = next(iter(ours.updates(ours.prepare_step([ours.train_items]))))

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher ran during a supervised step")

    handle = teacher.register_forward_pre_hook(refuse)
    loss, metrics = ours.compute_loss(batch)
    loss.backward()
    handle.remove()
    exact, exact_student = reference_loss(student, teacher, batch, beta=1.0, temperature=1.0,
                                          hard_label_weight=2.0, divergence_weight=0.0)
    exact.backward()
    assert metrics["hard_label_loss"].item() == pytest.approx(exact.item() / 2, rel=1e-5)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)
    for (name, ours_p), (_, exact_p) in zip(ours.model.named_parameters(),
                                            exact_student.named_parameters()):
        torch.testing.assert_close(ours_p.grad.double(), exact_p.grad, rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_held_out_rewards_receive_the_rows_fields(tmp_path):
    """--eval-rewards: each held-out row's other fields (a verifier's answer) reach the reward
    function by name, aligned with its prompt."""
    student, teacher = models()
    held_out = [dict(row, answer=index) for index, row in enumerate(completion_rows(6)[4:])]
    seen = {}

    def check(prompts, completions, answer):
        seen.update(zip([p for p in prompts], answer))
        return [0.0] * len(completions)

    ours = trainer(tmp_path, student, teacher, eval_rows=held_out, max_new_tokens=2)
    ours.eval_reward_funcs = [check]
    assert "eval_rewards/check" in ours.evaluate()
    assert seen == {row["prompt"]: row["answer"] for row in held_out}


def test_evaluation_is_the_mean_divergence_over_held_out_tokens(tmp_path):
    student, teacher = models()
    held_out = completion_rows(6)[4:]
    ours = trainer(tmp_path, student, teacher, eval_rows=held_out, beta=1.0)
    result = ours.evaluate()
    batch = ours.prepare_step([ours.eval_items]).batches[0]
    exact, _ = reference_loss(student, teacher, batch, beta=1.0, temperature=1.0)
    assert result["eval_divergence"] == pytest.approx(exact.item(), rel=1e-5)
    assert set(result) == {"eval_divergence", "eval_agreement", "eval_entropy"}


def test_a_teacher_of_another_vocabulary_is_refused_naming_both(tmp_path):
    student = tiny_llama(vocab_size=1000, hidden_size=32, num_layers=1)
    teacher = tiny_llama(vocab_size=1200, hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match="vocabulary of 1200 tokens, the student .* 1000"):
        trainer(tmp_path, student, teacher)


@pytest.mark.parametrize("option, value, message", [
    ("beta", 1.5, "beta must be in \\[0, 1\\]"), ("lmbda", -0.1, "lmbda must be in \\[0, 1\\]"),
    ("temperature", 0.0, "temperature must be > 0"),
    ("hard_label_weight", -1.0, "hard_label_weight must be >= 0"),
    ("divergence_weight", -1.0, "divergence_weight must be >= 0"),
    ("divergence_weight", 0.0, "needs hard_label_weight > 0 \\(got 0.0\\)")])
def test_bad_options_are_refused_naming_them(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(output_dir=str(tmp_path), **{option: value})


def test_supervised_steps_cannot_be_on_policy(tmp_path):
    with pytest.raises(ValueError, match="lmbda=0 \\(got 0.5; on-policy steps have no labels"):
        DistillConfig(output_dir=str(tmp_path), divergence_weight=0.0, hard_label_weight=1.0,
                      lmbda=0.5)


def test_resume_continues_exactly(tmp_path):
    """Two steps with a checkpoint after the first, then a resume from it: the same weights as
    the uninterrupted run (on-policy draws included: lmbda = 0.5 is seeded by the step)."""
    options = dict(max_steps=2, save_steps=1, lmbda=0.5, max_new_tokens=4, batch_size=2,
                   learning_rate=1e-2)
    student, teacher = models()
    whole = trainer(tmp_path / "whole", copy.deepcopy(student), teacher, **options)
    whole.train()
    first = trainer(tmp_path / "part", copy.deepcopy(student), teacher,
                    **dict(options, max_steps=1))
    first.train()
    resumed = trainer(tmp_path / "part", copy.deepcopy(student), teacher, **options)
    resumed.train(resume_from="latest")
    for (name, a), (_, b) in zip(whole.model.named_parameters(),
                                 resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_the_command_distils_the_built_in_teacher(tmp_path):
    done = run_cli("train", "distill", "--model", "tiny", "--max-steps", "4",
                   "--batch-size", "4", "--output", str(tmp_path / "run"), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 4 steps; mean divergence over the first" in done.stdout
    assert "held-out (" in done.stdout and "after training: divergence" in done.stdout
