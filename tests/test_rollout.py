"""Rollouts: sampled completions and their recomputed ("old") log-probs."""

import pytest
import torch
from helpers import warped_log_softmax
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from fastalign.trainer import byte_tokenizer, tiny_llama
from fastalign.trainer.algorithms.rollout import _Sampling, generate_rollouts

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


def model(kind="llama"):
    """A tiny Llama (rotary, relative positions) or GPT-2 (learned absolute positions)."""
    if kind == "gpt2":
        import transformers
        tokenizer = byte_tokenizer()
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=128,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    else:
        m = tiny_llama(vocab_size=300, hidden_size=32, num_layers=2)
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)  # a peaked distribution: sampling hits EOS sometimes
    return m


@pytest.mark.parametrize("kind,temperature,sampler", [
    ("llama", 1.0, {}), ("llama", 0.7, {}), ("gpt2", 0.7, {}),
    ("llama", 0.7, dict(top_k=5)),  # sampled from the top 5, scored over the vocabulary
    ("llama", 0.8, dict(top_k=20, min_p=0.05, processed_logprobs=True))])
def test_old_logprobs_are_the_sampling_distribution(kind, temperature, sampler):
    """The recomputed log-prob of every sampled token equals log_softmax(logits / T) of the
    logits generate() sampled it from, on left-padded prompts of different lengths; with
    processed_logprobs, of the top_k / min_p support renormalized, as Hugging Face's warpers
    keep it; the sampler's own log-probs agree, and no sampled token leaves the support."""
    torch.manual_seed(0)
    policy, tokenizer = model(kind), byte_tokenizer()
    prompts = ["Tell me about owls.", "Hi", [{"role": "user", "content": "Name a fruit."}]]
    captured = []
    original = policy.generate

    def generate(**kwargs):  # the same call, asking generate for the logits it sampled from
        out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
        captured.append(torch.stack(out.logits, 1))
        return out.sequences
    policy.generate = generate
    rollouts = generate_rollouts(policy, tokenizer, prompts[:2], num_generations=3,
                                 max_new_tokens=12, temperature=temperature,
                                 sampler_logprobs=True, **sampler)
    logits = captured[0]  # [R, new tokens, V]
    prompt_length = rollouts.input_ids.shape[1] - logits.shape[1]
    tokens = rollouts.input_ids[:, prompt_length:]
    support = dict(top_k=sampler.get("top_k"), min_p=sampler.get("min_p"))
    kept = warped_log_softmax(logits, temperature=temperature, **support).gather(
        -1, tokens[..., None]).squeeze(-1)
    if not sampler.get("processed_logprobs"):
        support = {}
    expected = warped_log_softmax(logits, temperature=temperature, **support).gather(
        -1, tokens[..., None]).squeeze(-1)
    mask = rollouts.completion_mask[:, prompt_length:].bool()
    got = rollouts.old_logprobs[:, prompt_length - 1:]
    assert mask.any() and torch.isfinite(kept[mask]).all()  # every token from the support
    torch.testing.assert_close(got[mask].double(), expected[mask], rtol=0, atol=1e-4)
    assert (got[~mask] == 0).all()
    sampled = rollouts.sampler_logprobs[:, prompt_length - 1:]
    torch.testing.assert_close(sampled[mask], got[mask], rtol=0, atol=1e-4)
    assert rollouts.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(rollouts.completions) == 6


@pytest.mark.parametrize("temperature,top_p,block", [(1.0, 1.0, 4), (0.5, 1.0, 6), (1.3, 0.8, 4),
                                                     (1.0, 1.0, 16)])
def test_sampling_draws_from_the_tempered_nucleus(temperature, top_p, block):
    """The argmax of the processed scores, over 40000 draws, has the frequencies of
    softmax(logits / T) renormalized over the top_p nucleus (and never leaves it)."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits.double() / temperature, -1)
    inside = (probs.cumsum(-1) - probs) < top_p  # logits are sorted: the nucleus is a prefix
    expected = torch.where(inside, probs, 0) / probs[inside].sum()
    sampler = _Sampling(temperature, top_p)
    sampler.BLOCK = block  # 4: a full block and a partial one; 6: one full; 16: one partial
    draws = sampler(None, logits.expand(40000, -1)).argmax(-1)
    frequencies = torch.bincount(draws, minlength=6).double() / 40000
    assert inside.sum() < 6 if top_p < 1 else inside.all()
    assert (frequencies[~inside] == 0).all()
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.01)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 3, 1.0, None), (0.7, None, 1.0, 0.3), (1.3, 5, 1.0, 0.1), (1.0, 5, 0.8, 0.2),
    (1.0, 40, 1.0, None)])  # k >= V keeps every token
def test_sampling_draws_from_hugging_faces_warpers(temperature, top_k, top_p, min_p):
    """Over 40000 draws the frequencies are those of the distribution Hugging Face's warpers
    leave (temperature, top-k, top-p, min-p in generate's order), never outside it."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.7]])  # a tie at 1.0
    scores = TemperatureLogitsWarper(temperature)(None, logits.double())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p is not None:
        scores = MinPLogitsWarper(min_p)(None, scores)
    expected = scores.softmax(-1)[0]
    sampler = _Sampling(temperature, top_p, top_k=top_k, min_p=min_p)
    draws = sampler(None, logits.expand(40000, -1)).argmax(-1)
    frequencies = torch.bincount(draws, minlength=8).double() / 40000
    assert (frequencies[expected == 0] == 0).all()
    assert (expected > 0).sum() < 8 or top_k == 40
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.01)


def test_completions_stop_at_the_first_stop_token():
    torch.manual_seed(1)
    tokenizer = byte_tokenizer()
    rollouts = generate_rollouts(model(), tokenizer, ["a", "bb"], num_generations=4,
                                 max_new_tokens=16, stop_tokens=["."])
    stops = {tokenizer.eos_token_id, tokenizer(".", add_special_tokens=False)["input_ids"][0]}
    for row, mask in zip(rollouts.input_ids, rollouts.completion_mask):
        kept = row[mask.bool()].tolist()
        assert all(token not in stops for token in kept[:-1])  # only the last may be a stop
        after = mask.nonzero().max() + 1 if mask.any() else len(mask)
        assert (mask[after:] == 0).all()


@pytest.mark.parametrize("options,message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(num_generations=0), "num_generations and max_new_tokens must be >= 1"),
    (dict(stop_tokens=["ab"]), "stop token 'ab' is 2 tokens"),
    (dict(top_k=0), "top_k must be"),
    (dict(min_p=1.5), "min_p must be"),
    (dict(top_p=0.9, processed_logprobs=True), "processed_logprobs cannot score a top_p=0.9"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        generate_rollouts(model(), byte_tokenizer(), ["x"], **options)
