"""Gradient accumulation in the RL trainers: a step of A micro-batches of B prompts uses every
prompt of its schedule and equals, in loss and gradients, a step of one batch of A x B prompts.
"""

import pytest
import torch
from helpers import lowercase_share, small_policy

from fastalign.trainer import (GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, byte_tokenizer,
                               tiny_reward_model)

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


PROMPTS = ["Tell me about owls.", "Hi", "Name a fruit.", "Why is the sky blue?",
           "Count to three.", "Say yes.", "Pick a color.", "Tell a joke."]


def recorded(trainer):
    """Runs one optimizer step of ``trainer`` and returns (prompts rolled out, the logged
    metrics, the gradients the optimizer update saw)."""
    prompts, gradients = [], []
    # GRPO samples through _sample (prepare_step), PPO through rollout.
    name = "_sample" if isinstance(trainer, GRPOTrainer) else "rollout"
    sample, optimizer_step = getattr(trainer, name), trainer.optimizer_step

    def recording_sample(batch, *rest):
        prompts.extend(batch)
        return sample(batch, *rest)

    def recording_optimizer_step(loss, grad_norm):
        gradients.append([p.grad.clone() for p in trainer.parameters])
        return optimizer_step(loss, grad_norm)
    setattr(trainer, name, recording_sample)
    trainer.optimizer_step = recording_optimizer_step
    torch.manual_seed(1234)  # the same sampling for both PPO runs (GRPO seeds each prompt)
    metrics = trainer.training_step()
    return prompts, metrics, gradients


def assert_same_step(accumulated, one_batch):
    prompts_a, metrics_a, gradients_a = accumulated
    prompts_b, metrics_b, gradients_b = one_batch
    assert prompts_a == prompts_b
    assert metrics_a["loss"] == pytest.approx(metrics_b["loss"], rel=1e-5, abs=1e-7)
    assert len(gradients_a) == len(gradients_b)
    for update_a, update_b in zip(gradients_a, gradients_b):
        for a, b in zip(update_a, update_b):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("bnpo", 0.04), ("dr_grpo", 0.0)])
def test_grpo_accumulation_equals_one_batch_of_all_its_prompts(tmp_path, loss_type, beta):
    def trainer(batch_size, accumulation):
        config = GRPOConfig(output_dir=str(tmp_path / f"{batch_size}"), batch_size=batch_size,
                            gradient_accumulation_steps=accumulation, num_generations=2,
                            max_new_tokens=6, loss_type=loss_type, beta=beta, num_iterations=2,
                            clip_low=0.1, progress=False)
        return GRPOTrainer(small_policy(), byte_tokenizer(), config, PROMPTS, [lowercase_share],
                           ref_model=small_policy(1))
    accumulated = trainer(2, 2)
    assert accumulated.total_steps == 2  # 8 prompts, 4 per step: one epoch
    assert_same_step(recorded(accumulated), recorded(trainer(4, 1)))


def test_grpo_accumulation_uses_every_prompt_of_its_schedule(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), batch_size=2, gradient_accumulation_steps=2,
                        num_generations=2, max_new_tokens=4, progress=False)
    trainer = GRPOTrainer(small_policy(), byte_tokenizer(), config, PROMPTS, [lowercase_share])
    seen = []
    sample = trainer._sample
    trainer._sample = lambda batch, seeds: (seen.extend(batch), sample(batch, seeds))[1]
    trainer.train()
    assert trainer.step == 2 and sorted(seen) == sorted(PROMPTS)


def test_ppo_accumulation_equals_one_batch_of_all_its_rows(tmp_path):
    def trainer(batch_size, mini_batch_size, accumulation):
        config = PPOConfig(output_dir=str(tmp_path / f"{batch_size}"), batch_size=batch_size,
                           mini_batch_size=mini_batch_size, ppo_epochs=2,
                           gradient_accumulation_steps=accumulation, max_new_tokens=6,
                           progress=False)
        reward_model = tiny_reward_model(vocab_size=300, hidden_size=32, seed=2)
        return PPOTrainer(small_policy(), byte_tokenizer(), config, PROMPTS, reward_model,
                          ref_model=small_policy(1))
    assert_same_step(recorded(trainer(2, 1, 2)), recorded(trainer(4, 2, 1)))


def test_options_that_do_not_apply_to_rl_are_refused():
    from fastalign.trainer.core.config import ConfigError

    with pytest.raises(ConfigError, match="unknown GRPOConfig option\\(s\\): max_length"):
        GRPOConfig.from_dict({"max_length": 4})
    GRPOConfig(eval_steps=4, eval_batch_size=4)  # both evaluate held-out prompts
    PPOConfig(eval_steps=4, eval_batch_size=4)
    with pytest.raises(TypeError):
        PPOConfig(max_length=4)
    with pytest.raises(ConfigError, match="eval_steps must be an integer >= 1, got 0"):
        PPOConfig(eval_steps=0)
