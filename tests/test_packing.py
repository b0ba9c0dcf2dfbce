"""Padding-free batches: the real tokens of a padded batch run as one packed row, sequences kept
apart by their position ids. Everything a packed pass returns must equal the padded pass."""

import pytest
import torch
from helpers import preference_rows, small_llama

from fastalign.trainer import (CausalLMAdapter, DPOConfig, DPOTrainer, RewardConfig,
                               RewardTrainer, byte_tokenizer, tiny_reward_model)
from fastalign.trainer.models.packing import Packing


def _mixed_batch(left_padded: bool):
    """Rows of 3, 11, 7 and 1 real tokens over 1000 ids (left- or right-padded to 11), every
    token after the first a completion token."""
    torch.manual_seed(0)
    lengths, width = [3, 11, 7, 1], 11
    input_ids = torch.randint(0, 1000, (len(lengths), width))
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if left_padded else slice(0, length)
        attention_mask[row, span] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    completion_mask = attention_mask.clone()
    first = attention_mask.argmax(-1)
    completion_mask[torch.arange(len(lengths)), first] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, completion_mask, attention_mask, position_ids


@pytest.mark.parametrize("left_padded", [False, True])
def test_packed_logprobs_and_gradients_equal_the_padded_batch(left_padded):
    input_ids, completion_mask, attention_mask, position_ids = _mixed_batch(left_padded)
    results = []
    for padding_free in (False, True):
        model = small_llama(seed=1, scale=3.0)
        adapter = CausalLMAdapter(model, padding_free=padding_free)
        per_token, counts = adapter.completion_logprobs(input_ids, completion_mask,
                                                        attention_mask, position_ids=position_ids)
        (per_token * torch.linspace(0.5, 2, per_token.shape[1])).sum().backward()
        results.append((per_token, counts, {n: p.grad for n, p in model.named_parameters()}))
    (padded, padded_counts, padded_grads), (packed, packed_counts, packed_grads) = results
    assert torch.equal(packed_counts, padded_counts) and padded_counts.sum() > 10
    assert padded.abs().sum() > 0
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():  # fp32 sums in another order: relative to the norm
        error = (packed_grads[name] - grad).norm() / grad.norm()
        assert grad.norm() > 0 and error < 1e-5, (name, float(error))


def test_no_token_attends_across_a_boundary():
    """Changing one sequence changes no other sequence's log-probs in the packed row."""
    input_ids, completion_mask, attention_mask, _ = _mixed_batch(left_padded=False)
    adapter = CausalLMAdapter(small_llama(seed=1, scale=3.0), padding_free=True)
    with torch.no_grad():
        before, _ = adapter.completion_logprobs(input_ids, completion_mask, attention_mask)
        changed = input_ids.clone()
        # The 7-token row, packed first in the row it shares with the 3- and 1-token rows.
        changed[2, :7] = torch.tensor([5, 6, 7, 8, 9, 10, 11])
        after, _ = adapter.completion_logprobs(changed, completion_mask, attention_mask)
    assert not torch.allclose(after[2], before[2])
    others = [0, 1, 3]
    assert torch.equal(after[others], before[others])


def test_packing_round_trip_and_positions():
    _, _, attention_mask, _ = _mixed_batch(left_padded=True)
    packing = Packing(attention_mask)
    # Longest first, each into the first row with room: [11] and [7, 3, 1], rows of 11.
    assert packing.position_ids.tolist() == [list(range(11)), [*range(7), *range(3), 0]]
    values = torch.randn(*attention_mask.shape, 2)
    back = packing.unpack(packing.pack(values))
    assert torch.equal(back, values * attention_mask[..., None])


def test_rows_left_over_are_filled_with_a_sequence_of_their_own():
    """[5, 1, 4, 3] in rows of 5: [5], [4], [3], then 1 fills the second row's end; the third
    row's last two tokens are filler (token 0, positions 0, 1) and nothing of it is unpacked."""
    attention_mask = torch.zeros(4, 5, dtype=torch.long)
    for row, length in enumerate([5, 1, 4, 3]):
        attention_mask[row, :length] = 1
    packing = Packing(attention_mask)
    assert packing.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    values = torch.arange(1, 21).reshape(4, 5) * attention_mask
    packed = packing.pack(values)
    assert packed.tolist() == [[1, 2, 3, 4, 5], [11, 12, 13, 14, 6], [16, 17, 18, 0, 0]]
    assert torch.equal(packing.unpack(packed), values)


def test_padding_free_dpo_and_reward_losses_equal_the_padded(tmp_path):
    losses = {}
    for padding_free in (False, True):
        config = DPOConfig(output_dir=str(tmp_path / f"dpo{padding_free}"), batch_size=3,
                           progress=False, padding_free=padding_free)
        trainer = DPOTrainer(small_llama(seed=2, scale=2.0), byte_tokenizer(), config,
                             preference_rows(3), ref_model=small_llama(seed=3, scale=2.0))
        loss, _ = trainer.compute_loss(trainer.collate(trainer.train_items[:3]))
        config = RewardConfig(output_dir=str(tmp_path / f"rm{padding_free}"), batch_size=3,
                              progress=False, padding_free=padding_free)
        model = tiny_reward_model(vocab_size=300, hidden_size=32, num_layers=1, seed=4)
        scorer = RewardTrainer(model, byte_tokenizer(), config, preference_rows(3))
        input_ids, attention_mask, _ = scorer.collate(scorer.train_items[:3])
        assert (attention_mask == 0).any()  # the rows differ in length: there is padding
        losses[padding_free] = (loss, scorer._packed_rewards(input_ids, attention_mask)
                                if padding_free else model(
                                    input_ids=input_ids, attention_mask=attention_mask
                                ).logits.squeeze(-1))
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[True][1], losses[False][1], rtol=1e-5, atol=1e-6)


def test_padding_free_refuses_an_attention_it_cannot_trust():
    model = small_llama()
    model.config._attn_implementation = "paged_attention"
    with pytest.raises(ValueError, match="'paged_attention' is not known to keep packed"):
        CausalLMAdapter(model, padding_free=True)


def test_padding_free_rl_rollouts_and_ppo_experience_equal_the_padded(tmp_path):
    """Left-padded prompts of different lengths and completions that stop at different points:
    GRPO's recomputed log-probs, and PPO's old log-probs, values, reference log-probs and loss,
    are the same packed as padded."""
    from helpers import RL_PROMPTS, small_policy

    from fastalign.trainer import PPOConfig, PPOTrainer
    from fastalign.trainer.algorithms.rollout import generate_rollouts

    tokenizer = byte_tokenizer()
    recomputed = [generate_rollouts(small_policy(0), tokenizer, RL_PROMPTS, num_generations=2,
                                    max_new_tokens=8, seeds=[1, 2, 3, 4],
                                    padding_free=padding_free).old_logprobs
                  for padding_free in (False, True)]
    torch.testing.assert_close(recomputed[1], recomputed[0], rtol=1e-5, atol=1e-5)
    experiences, losses = [], []
    for padding_free in (False, True):
        config = PPOConfig(output_dir=str(tmp_path / f"ppo{padding_free}"), batch_size=4,
                           mini_batch_size=2, max_new_tokens=8, progress=False,
                           padding_free=padding_free)
        trainer = PPOTrainer(small_policy(0), tokenizer, config, RL_PROMPTS,
                             tiny_reward_model(vocab_size=300, hidden_size=32, seed=2),
                             ref_model=small_policy(1))
        torch.manual_seed(5)  # values that depend on the hidden states (the head starts at 0)
        torch.nn.init.normal_(trainer.value_module.weight)
        experience = trainer.rollout(RL_PROMPTS, seeds=[1, 2, 3, 4])
        experiences.append(experience)
        losses.append(trainer.compute_loss((experience, torch.arange(4)))[0])
    padded, packed = experiences
    assert torch.equal(packed.rollouts.input_ids, padded.rollouts.input_ids)
    assert (padded.rollouts.attention_mask == 0).any()  # there is padding to skip
    torch.testing.assert_close(packed.rollouts.old_logprobs, padded.rollouts.old_logprobs,
                               rtol=1e-5, atol=1e-5)
    assert padded.values.abs().sum() > 0
    for name in ("ref_logprobs", "values", "advantages"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
