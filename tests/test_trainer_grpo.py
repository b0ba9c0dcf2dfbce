"""GRPOTrainer: the step loss on recorded rollouts against an unfused float64 reference, the
reward rising on a rule a tiny model can learn, and bad reward functions."""

import copy
import json

import pytest
import torch
from helpers import (RL_PROMPTS, lowercase_share, policy_reference, small_policy, warped_entropy,
                     warped_log_softmax)

from fastalign.trainer import GRPOConfig, GRPOTrainer, byte_tokenizer

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_step_loss_matches_an_unfused_float64_reference(tmp_path, loss_type):
    torch.manual_seed(0)
    policy, reference = small_policy(0), small_policy(1)
    config = GRPOConfig(output_dir=str(tmp_path), batch_size=2, num_generations=4,
                        max_new_tokens=10, temperature=0.8, beta=0.1, clip_high=0.28,
                        loss_type=loss_type, progress=False)
    trainer = GRPOTrainer(policy, byte_tokenizer(), config, RL_PROMPTS[:2], [lowercase_share],
                          ref_model=reference)
    rollouts, rewards, advantages = trainer.rollout(RL_PROMPTS[:2])
    ref_logprobs = trainer.reference_logprobs(rollouts)
    with torch.no_grad():  # the policy moved since the rollouts: ratios != 1, some clipped
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    loss, _ = trainer.compute_loss((rollouts, advantages, ref_logprobs))
    loss.backward()

    def logprobs64(model):
        exact = copy.deepcopy(model).double()
        hidden = exact.model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                             position_ids=rollouts.position_ids).last_hidden_state
        logprobs = torch.log_softmax(exact.lm_head(hidden)[:, :-1] / 0.8, -1)
        return exact, logprobs.gather(-1, rollouts.input_ids[:, 1:, None]).squeeze(-1)

    exact_policy, lp = logprobs64(policy)
    with torch.no_grad():
        _, ref = logprobs64(reference)
    mask = rollouts.completion_mask[:, 1:].double()
    aggregation = {"grpo": "seq_mean_token_mean", "dapo": "token_mean",
                   "dr_grpo": "seq_mean_token_sum_norm"}[loss_type]
    expected = policy_reference(lp * mask, rollouts.old_logprobs.double(), advantages.double(),
                                mask, 0.2, 0.28, None, ref * mask, 0.1, "k3", "token",
                                aggregation, 10)
    expected.backward()
    assert rewards.std() > 0 and mask.sum() > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(policy.lm_head.weight.grad.double(),
                               exact_policy.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


def test_reward_rises(tmp_path):
    """Lowercase letters are 26 of 300 tokens: GRPO makes the policy prefer them."""
    torch.manual_seed(0)
    config = GRPOConfig(output_dir=str(tmp_path), batch_size=4, num_generations=8,
                        max_new_tokens=12, learning_rate=1e-2, max_steps=30, progress=False)
    trainer = GRPOTrainer(small_policy(), byte_tokenizer(), config, RL_PROMPTS, [lowercase_share])
    trainer.train()
    rewards = [json.loads(line)["reward"] for line in open(tmp_path / "metrics.jsonl")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, (first, last)
    print(f"reward first 5 steps {first:.3f}, last 5 {last:.3f}")


def test_a_reward_model_among_the_reward_functions(tmp_path):
    from fastalign.trainer import tiny_reward_model
    from fastalign.trainer.algorithms.best_of_n import score_with_reward_model

    torch.manual_seed(0)
    reward_model = tiny_reward_model(vocab_size=300, hidden_size=32, seed=4)
    config = GRPOConfig(output_dir=str(tmp_path), batch_size=2, num_generations=4,
                        max_new_tokens=6, progress=False)
    trainer = GRPOTrainer(small_policy(), byte_tokenizer(), config, RL_PROMPTS,
                          [lowercase_share, reward_model], reward_weights=[1.0, 2.0])
    rollouts, rewards, _ = trainer.rollout(RL_PROMPTS[:2])
    repeated = [RL_PROMPTS[i] for i in rollouts.prompt_index.tolist()]
    scores = score_with_reward_model(reward_model, byte_tokenizer(), repeated,
                                     rollouts.completions)
    expected = torch.tensor(lowercase_share(None, rollouts.completions)) + 2 * scores
    torch.testing.assert_close(rewards, expected)
    assert trainer.reward_means["rewards/reward_model"] == pytest.approx(float(scores.mean()))
    assert not any(p.requires_grad for p in reward_model.parameters())  # frozen


def test_bad_reward_functions(tmp_path):
    config = GRPOConfig(output_dir=str(tmp_path), batch_size=2, num_generations=2,
                        max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="reward_funcs must be a non-empty list"):
        GRPOTrainer(small_policy(), byte_tokenizer(), config, RL_PROMPTS, [])
    trainer = GRPOTrainer(small_policy(), byte_tokenizer(), config, RL_PROMPTS,
                          [lambda prompts, completions: [float("nan")] * len(completions)])
    with pytest.raises(ValueError, match="must return one finite number per completion"):
        trainer.training_step()


def entropy_and_logprobs64(model, rollouts, temperature, top_k=None, min_p=None):
    """A float64 copy of ``model`` and its per-token log-probs and entropies on ``rollouts``
    (differentiable w.r.t. the copy), over the ``top_k`` / ``min_p`` support if given."""
    exact = copy.deepcopy(model).double()
    hidden = exact.model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                         position_ids=rollouts.position_ids).last_hidden_state
    logp = warped_log_softmax(exact.lm_head(hidden)[:, :-1], temperature=temperature,
                              top_k=top_k, min_p=min_p)
    entropy = warped_entropy(logp)
    return exact, logp.gather(-1, rollouts.input_ids[:, 1:, None]).squeeze(-1), entropy


@pytest.mark.parametrize("loss_type, options", [
    ("cispo", dict(entropy_coef=0.05, rollout_correction="token_truncate")),
    ("sapo", dict(rollout_correction="sequence_mask", rollout_clip_min=0.5)),
    ("luspo", dict(importance_sampling_level="sequence", delta=1.5)),
    ("vespo", dict(rollout_dtype="bf16", rollout_correction="icepop", entropy_coef=0.01,
                   top_entropy_quantile=0.5)),
    ("dapo", dict(top_k=12, min_p=0.05, processed_logprobs=True, entropy_coef=0.02,
                  rollout_correction="token_truncate"))])
def test_newer_loss_types_match_policy_loss_in_float64(tmp_path, loss_type, options):
    """The step loss of each newer loss type with the options it is used with equals
    policy_loss of float64 log-probs and entropies under TRL's mapping of the loss type, with
    the sampler's own log-probs as the rollout log-probs; gradients too."""
    from fastalign.losses import policy_loss
    torch.manual_seed(0)
    policy = small_policy(0)
    config = GRPOConfig(output_dir=str(tmp_path), batch_size=2, num_generations=4,
                        max_new_tokens=10, temperature=0.8, loss_type=loss_type,
                        progress=False, **options)
    trainer = GRPOTrainer(policy, byte_tokenizer(), config, RL_PROMPTS[:2], [lowercase_share])
    rollouts, rewards, advantages = trainer.rollout(RL_PROMPTS[:2])
    mask = rollouts.completion_mask[:, 1:]
    sampled = rollouts.sampler_logprobs
    assert (sampled is None) == ("rollout_correction" not in options)
    if sampled is not None:
        # The sampler's log-probs are the same tokens' under the sampling model: equal to the
        # trainer's to its precision (bf16: a visible mismatch, fp32: rounding only).
        assert (sampled[mask == 0] == 0).all()
        gap = (sampled - rollouts.old_logprobs)[mask.bool()].abs().max()
        assert 0 < gap < (0.2 if "rollout_dtype" in options else 1e-4)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    loss, metrics = trainer.compute_loss((rollouts, advantages, None))
    loss.backward()
    exact, lp, entropy = entropy_and_logprobs64(policy, rollouts, **trainer.config.scoring)
    expected, _ = policy_loss(
        lp, rollouts.old_logprobs.double(), advantages.double(), mask, entropy=entropy,
        rollout_logprobs=None if sampled is None else sampled.double(),
        **trainer.config.policy_loss_options())
    expected.backward()
    assert rewards.std() > 0
    assert ("rollout/mismatch_kl" in metrics) == (sampled is not None)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    torch.testing.assert_close(policy.lm_head.weight.grad.double(),
                               exact.lm_head.weight.grad, rtol=1e-3, atol=1e-6)


def test_policy_loss_options_are_checked_with_the_config(tmp_path):
    with pytest.raises(ValueError, match="loss_type='vespo' folds token-level rollout"):
        GRPOConfig(output_dir=str(tmp_path), loss_type="vespo",
                   rollout_correction="sequence_truncate")
    with pytest.raises(ValueError, match="rollout_dtype must be one of bf16, fp16"):
        GRPOConfig(output_dir=str(tmp_path), rollout_dtype="fp8")
    with pytest.raises(ValueError, match="processed_logprobs cannot score a top_p < 1 sampler"):
        GRPOConfig(output_dir=str(tmp_path), top_p=0.9, processed_logprobs=True)
    with pytest.raises(ValueError, match=r"min_p must be in \(0, 1\], got 0.0"):
        GRPOConfig(output_dir=str(tmp_path), min_p=0.0)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        GRPOConfig(output_dir=str(tmp_path), top_k=0)
    scoring = GRPOConfig(output_dir=str(tmp_path), top_k=5, temperature=0.9).scoring
    assert scoring == dict(temperature=0.9, top_k=None, min_p=None)  # sampled, not scored
    assert GRPOConfig(output_dir=str(tmp_path), loss_type="cispo").policy_loss_options()[
        "clip_high"] == 5.0
