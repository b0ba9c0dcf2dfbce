"""Best-of-N: the kept completion is each prompt's highest-reward sample, with reward
functions or a reward model."""

import pytest
import torch
from helpers import RL_PROMPTS, lowercase_share, small_policy

from fastalign.trainer import byte_tokenizer, tiny_reward_model
from fastalign.trainer.algorithms.best_of_n import best_of_n, score_with_reward_model

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


def test_keeps_the_best_of_each_group():
    torch.manual_seed(0)
    result = best_of_n(small_policy(), byte_tokenizer(), RL_PROMPTS, n=6, max_new_tokens=10,
                       reward_funcs=[lowercase_share])
    assert len(result.completions) == len(RL_PROMPTS)
    rescored = lowercase_share(RL_PROMPTS, result.completions)
    assert rescored == pytest.approx(result.rewards)
    assert result.best_reward >= result.mean_reward and result.gain > 0


def test_one_sample_gains_nothing():
    torch.manual_seed(0)
    result = best_of_n(small_policy(), byte_tokenizer(), RL_PROMPTS, n=1, max_new_tokens=6,
                       reward_funcs=[lowercase_share])
    assert result.gain == pytest.approx(0.0)


def test_with_a_reward_model():
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    reward_model = tiny_reward_model(vocab_size=300, hidden_size=32, num_layers=1)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    result = best_of_n(small_policy(), tokenizer, RL_PROMPTS[:2], n=4, max_new_tokens=8,
                       reward_model=reward_model)
    rescored = score_with_reward_model(reward_model, tokenizer, RL_PROMPTS[:2], result.completions)
    torch.testing.assert_close(rescored, torch.tensor(result.rewards))


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of reward_funcs and reward_model"):
        best_of_n(small_policy(), byte_tokenizer(), RL_PROMPTS, n=2)
    with pytest.raises(ValueError, match="n and prompts_per_batch must be >= 1"):
        best_of_n(small_policy(), byte_tokenizer(), RL_PROMPTS, n=0, reward_funcs=[lowercase_share])
