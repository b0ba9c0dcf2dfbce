"""PPOTrainer: every piece of a step (reference log-probs, scores, per-token rewards, values,
GAE, whitening, the policy + value loss and its gradients) against an unfused float64
reference on recorded rollouts; the score rising; resume; bad input."""

import copy
import json

import pytest
import torch
from helpers import (RL_PROMPTS, policy_reference, small_policy, warped_entropy,
                     warped_log_softmax)

from fastalign.trainer import PPOConfig, PPOTrainer, byte_tokenizer, tiny_reward_model

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


def small_reward_model(seed=2):
    return tiny_reward_model(vocab_size=300, hidden_size=32, seed=seed)


class LowercaseReward(torch.nn.Module):
    """A stand-in reward model with a learnable rule: a sequence's count of lowercase ASCII
    letters (the byte tokenizer maps them to their byte values), over 10."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_labels": 1})()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, attention_mask):
        lower = ((input_ids >= ord("a")) & (input_ids <= ord("z"))).float() * attention_mask
        return type("Output", (), {"logits": lower.sum(-1, keepdim=True) / 10})()


def _naive_logprobs(model, rollouts, temperature):
    hidden = model.model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                         position_ids=rollouts.position_ids).last_hidden_state
    logprobs = torch.log_softmax(model.lm_head(hidden)[:, :-1] / temperature, -1)
    return hidden[:, :-1], logprobs.gather(-1, rollouts.input_ids[:, 1:, None]).squeeze(-1)


def _naive_values(trainer, value_module, rollouts, policy_hidden):
    if trainer.shared_value_head:
        return value_module(policy_hidden).squeeze(-1)
    hidden = value_module.model(input_ids=rollouts.input_ids,
                                attention_mask=rollouts.attention_mask,
                                position_ids=rollouts.position_ids).last_hidden_state
    return value_module.score(hidden[:, :-1]).squeeze(-1)


def _naive_advantages(rewards, values, mask, gamma, lam):
    """GAE by its definition, one row and token at a time, then whitening over the mask."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        running = 0.0
        for i in reversed(range(len(positions))):
            t = positions[i]
            next_value = values[b, positions[i + 1]] if i + 1 < len(positions) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
    returns = advantages + values * mask
    chosen = advantages[mask.bool()]
    whitened = (advantages - chosen.mean()) / chosen.var(unbiased=False).add(1e-8).sqrt()
    return whitened * mask, returns


def _perturb(*modules, scale):
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.add_(torch.randn_like(parameter) * scale)


@pytest.mark.parametrize("value_kind", ["head", "model"])
def test_step_matches_an_unfused_float64_reference(tmp_path, value_kind):
    torch.manual_seed(0)
    policy, reference, reward_model = small_policy(0), small_policy(1), small_reward_model()
    value_model = None if value_kind == "head" else small_reward_model(seed=3)
    config = PPOConfig(output_dir=str(tmp_path), batch_size=4, mini_batch_size=2,
                       max_new_tokens=8, temperature=0.8, kl_coef=0.1, clip_high=0.28,
                       vf_coef=0.5, value_clip=0.05, gamma=0.9, lam=0.8, progress=False)
    trainer = PPOTrainer(policy, byte_tokenizer(), config, RL_PROMPTS, reward_model,
                         ref_model=reference, value_model=value_model)
    _perturb(trainer.value_module, scale=0.3)  # old values != 0
    experience = trainer.rollout(RL_PROMPTS)
    rollouts, mask = experience.rollouts, experience.mask.double()

    exact_policy = copy.deepcopy(policy).double()
    exact_values = copy.deepcopy(trainer.value_module).double()
    with torch.no_grad():
        policy_hidden, old = _naive_logprobs(exact_policy, rollouts, 0.8)
        _, ref = _naive_logprobs(copy.deepcopy(reference).double(), rollouts, 0.8)
        values = _naive_values(trainer, exact_values, rollouts, policy_hidden) * mask
        scores = []
        for prompt, completion in zip(RL_PROMPTS, rollouts.completions):  # one row, no padding
            ids = torch.tensor([list(prompt.encode()) + list(completion.encode())])
            scores.append(copy.deepcopy(reward_model).double()(input_ids=ids).logits[0, 0])
    scores = torch.stack(scores)
    torch.testing.assert_close(experience.ref_logprobs.double(), ref * mask, rtol=0, atol=1e-5)
    torch.testing.assert_close(experience.scores.double(), scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experience.values.double(), values, rtol=1e-4, atol=1e-5)
    rewards = -0.1 * (experience.rollouts.old_logprobs.double() - ref) * mask
    for b in range(4):
        rewards[b, int(mask[b].nonzero().max())] += scores[b]
    torch.testing.assert_close(experience.rewards.double(), rewards, rtol=1e-5, atol=1e-5)
    advantages, returns = _naive_advantages(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(experience.advantages.double(), advantages, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(experience.returns.double(), returns, rtol=1e-5, atol=1e-5)

    # The models moved since the rollouts: ratios != 1 and some values clipped.
    _perturb(policy, trainer.value_module, scale=0.05)
    exact_policy = copy.deepcopy(policy).double()
    exact_values = copy.deepcopy(trainer.value_module).double()
    rows = torch.tensor([3, 0])
    loss, metrics = trainer.compute_loss((experience, rows))
    loss.backward()
    policy_hidden, logprobs = _naive_logprobs(exact_policy, rollouts, 0.8)
    new_values = _naive_values(trainer, exact_values, rollouts, policy_hidden)
    expected_policy = policy_reference(
        logprobs[rows] * mask[rows], rollouts.old_logprobs.double()[rows], advantages[rows],
        mask[rows], 0.2, 0.28, None, None, 0.0, "k1", "token", "token_mean", None)
    old_values = values[rows]
    clipped = old_values + (new_values[rows] - old_values).clamp(-0.05, 0.05)
    errors = torch.maximum((new_values[rows] - returns[rows]).square(),
                           (clipped - returns[rows]).square())
    expected_value = 0.5 * (errors * mask[rows]).sum() / mask[rows].sum()
    expected = expected_policy + 0.5 * expected_value
    expected.backward()
    assert 0 < metrics["value_clip_fraction"] < 1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(policy.lm_head.weight.grad.double(),
                               exact_policy.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    for trained, exact in zip(trainer.value_module.parameters(), exact_values.parameters()):
        if exact.grad is not None:
            torch.testing.assert_close(trained.grad.double(), exact.grad, rtol=1e-4, atol=1e-6)


def test_score_rises_and_resume_restores_the_value_head(tmp_path):
    torch.manual_seed(0)
    config = PPOConfig(output_dir=str(tmp_path), batch_size=16, mini_batch_size=8, ppo_epochs=2,
                       max_new_tokens=12, learning_rate=3e-2, kl_coef=0.01, max_steps=30,
                       save_steps=30, progress=False)
    trainer = PPOTrainer(small_policy(), byte_tokenizer(), config, RL_PROMPTS * 4, LowercaseReward())
    trainer.train()
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first = sum(row["score"] for row in logged[:5]) / 5
    last = sum(row["score"] for row in logged[-5:]) / 5
    assert last > first + 0.3, (first, last)  # 3 more lowercase letters of 12 tokens
    assert all(set(row) >= {"kl", "entropy", "value_loss", "explained_variance",
                            "clip_fraction/low", "clip_fraction/high"} for row in logged)
    assert (tmp_path / "value_head.safetensors").is_file()
    print(f"score first 5 steps {first:.3f}, last 5 {last:.3f}")

    resumed = PPOTrainer(small_policy(), byte_tokenizer(), config, RL_PROMPTS * 4, LowercaseReward())
    resumed.resume("latest")
    assert resumed.step == 30
    torch.testing.assert_close(resumed.value_module.weight, trainer.value_module.weight)


def test_bad_input(tmp_path):
    config = PPOConfig(output_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="reward_model must be a sequence-classification"):
        PPOTrainer(small_policy(), byte_tokenizer(), config, RL_PROMPTS, small_policy())
    with pytest.raises(TypeError, match="has no `score` head"):
        PPOTrainer(small_policy(), byte_tokenizer(), config, RL_PROMPTS, small_reward_model(),
                   value_model=small_policy())
    with pytest.raises(ValueError, match="prompts is empty"):
        PPOTrainer(small_policy(), byte_tokenizer(), config, [], small_reward_model())
    with pytest.raises(ValueError, match=r"mini_batch_size \(8\) must be <= batch_size"):
        PPOConfig(batch_size=4, mini_batch_size=8)
    with pytest.raises(ValueError, match="kl_estimator must be one of k1, k2, k3"):
        PPOConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        PPOConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        PPOConfig(temperature=0)
    with pytest.raises(ValueError, match="ppo_epochs must be an integer >= 1, got 0"):
        PPOConfig(ppo_epochs=0)


def test_a_lora_policy_uses_its_base_as_the_reference(tmp_path):
    """No copy of the weights: the reference pass disables the adapters (PPO and GRPO)."""
    peft = pytest.importorskip("peft")
    from fastalign.trainer import CausalLMAdapter, GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    policy = peft.get_peft_model(small_policy(), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # adapters that move the policy away from its base
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    config = PPOConfig(output_dir=str(tmp_path), batch_size=4, mini_batch_size=2,
                       max_new_tokens=6, progress=False)
    trainer = PPOTrainer(policy, byte_tokenizer(), config, RL_PROMPTS, small_reward_model())
    assert trainer.reference.uses_base
    experience = trainer.rollout(RL_PROMPTS)
    inputs = experience.rollouts.model_inputs()
    with torch.no_grad():
        base = CausalLMAdapter(small_policy()).completion_logprobs(**inputs)[0]  # same weights
    torch.testing.assert_close(experience.ref_logprobs, base, rtol=0, atol=1e-5)
    assert (experience.rollouts.old_logprobs - base).abs().max() > 1e-2  # the policy differs
    grpo = GRPOTrainer(policy, byte_tokenizer(), GRPOConfig(output_dir=str(tmp_path), beta=0.1,
                                                            progress=False),
                       RL_PROMPTS, [lambda prompts, completions: [0.0] * len(completions)])
    assert grpo.reference.uses_base
    torch.testing.assert_close(grpo.reference_logprobs(experience.rollouts), base, rtol=0,
                               atol=1e-5)


def test_evaluate_scores_greedy_held_out_completions(tmp_path):
    """``evaluate``: the reward model's mean score and each check's mean over the greedy
    completions of the held-out prompts (in chunks of eval_batch_size), equal to scoring the
    whole set at once; logged every eval_steps and at the end."""
    from fastalign.trainer.algorithms.best_of_n import score_with_reward_model
    from fastalign.trainer.algorithms.rollout import generate_rollouts

    def vowels(prompts, completions):
        return [float(sum(c in "aeiou" for c in completion)) for completion in completions]

    held_out = ["Say a word.", "Count to three.", "Hello there!"]
    config = PPOConfig(output_dir=str(tmp_path), batch_size=2, mini_batch_size=1, ppo_epochs=1,
                       max_new_tokens=6, max_steps=2, eval_steps=1, eval_batch_size=2,
                       progress=False, learning_rate=1e-3)
    tokenizer = byte_tokenizer()
    trainer = PPOTrainer(small_policy(0), tokenizer, config, RL_PROMPTS[:2], LowercaseReward(),
                         eval_prompts=held_out, eval_reward_funcs=[vowels])
    measured = trainer.evaluate()
    rollouts = generate_rollouts(trainer.model, tokenizer, held_out, max_new_tokens=6,
                                 logprobs=False, greedy=True)
    expected = score_with_reward_model(LowercaseReward(), tokenizer, held_out,
                                       rollouts.completions).mean()
    assert measured["eval_score"] == pytest.approx(float(expected), rel=1e-6)
    assert measured["eval_rewards/vowels"] == pytest.approx(
        sum(vowels(held_out, rollouts.completions)) / 3)
    assert measured["eval_score"] > 0
    torch.manual_seed(0)
    trainer.train()
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [("eval_score" in row and "eval_rewards/vowels" in row) for row in logged] == [True,
                                                                                           True]
    with pytest.raises(ValueError, match="eval_reward_funcs must be callables"):
        PPOTrainer(small_policy(0), tokenizer, config, RL_PROMPTS[:2], LowercaseReward(),
                   eval_reward_funcs=["correct_answer"])



def _logprobs64(policy, rollouts, scoring):
    """A float64 copy of ``policy``, its per-token log-probs and entropies on ``rollouts``
    under ``scoring`` (temperature, and the top_k / min_p support where given)."""
    exact = copy.deepcopy(policy).double()
    hidden = exact.model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                         position_ids=rollouts.position_ids).last_hidden_state
    logp = warped_log_softmax(exact.lm_head(hidden)[:, :-1], **scoring)
    return exact, logp.gather(-1, rollouts.input_ids[:, 1:, None]).squeeze(-1), \
        warped_entropy(logp)


@pytest.mark.parametrize("sampler", [{}, dict(top_k=12, min_p=0.05, processed_logprobs=True)],
                         ids=["full_vocabulary", "processed_logprobs"])
def test_the_policy_loss_options_with_bf16_rollouts(tmp_path, sampler):
    """PPO with an entropy bonus and rollout correction against a bf16 sampler: the policy
    part of the step loss equals policy_loss on float64 log-probs and entropies with the
    sampler's own log-probs, and the precision mismatch is measured; with processed_logprobs
    every log-prob (old, new, entropy) is over the sampler's top_k / min_p support."""
    from fastalign.losses import policy_loss
    torch.manual_seed(0)
    policy = small_policy(0)
    config = PPOConfig(output_dir=str(tmp_path), batch_size=4, mini_batch_size=2,
                       max_new_tokens=8, temperature=0.8, entropy_coef=0.05,
                       rollout_correction="token_truncate", rollout_clip_max=1.01,
                       rollout_dtype="bf16", progress=False, **sampler)
    trainer = PPOTrainer(policy, byte_tokenizer(), config, RL_PROMPTS, small_reward_model())
    experience = trainer.rollout(RL_PROMPTS)
    rollouts, mask = experience.rollouts, experience.mask
    assert rollouts.sampler_logprobs is not None
    _, old64, _ = _logprobs64(policy, rollouts, config.scoring)
    torch.testing.assert_close(rollouts.old_logprobs.double()[mask.bool()],
                               old64[mask.bool()], rtol=0, atol=1e-4)
    _perturb(policy, scale=0.05)
    rows = torch.tensor([1, 2])
    _, metrics = trainer.compute_loss((experience, rows))
    _, logprobs, entropy = _logprobs64(policy, rollouts, config.scoring)
    expected, expected_metrics = policy_loss(
        logprobs[rows], rollouts.old_logprobs.double()[rows],
        experience.advantages.double()[rows], mask[rows], entropy=entropy[rows],
        rollout_logprobs=rollouts.sampler_logprobs.double()[rows],
        **config.policy_loss_options(aggregation="token_mean"))
    assert metrics["policy_loss"].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    assert metrics["rollout/mismatch_kl"] > 0
    assert metrics["rollout/corrected_fraction"] == pytest.approx(
        expected_metrics["rollout/corrected_fraction"].item())
