"""CausalLMAdapter: completion log-probs of tiny Hugging Face models (Llama, GPT-2 with tied
embeddings, Gemma-2 with logit soft-capping) through linear_logprobs equal the naive
``model(...).logits`` -> log_softmax -> gather, values and parameter gradients."""

import pytest
import torch
from conftest import assert_close

from fastalign.trainer import CausalLMAdapter, completion_targets

transformers = pytest.importorskip("transformers")

VOCAB = 997  # a multiple of no tile


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    elif kind in ("qwen2", "mistral"):
        config_class, model_class = {
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
        config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=kind == "qwen2")  # Qwen2 (small) ties its head
        model = model_class(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                         n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=3.0,
                                           tie_word_embeddings=False)
        model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():
        # Logits of a few units (an untrained head gives ~0.1): the softmax and Gemma-2's cap
        # of 3 then matter, so a missed softcap or temperature fails the comparison.
        model.get_output_embeddings().weight.mul_(50.0)
    return model.float().eval()


def batch():
    """Two right-padded rows: prompt, completion, padding."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 9:] = 0
    completion_mask = torch.zeros(2, 12, dtype=torch.long)
    completion_mask[0, 5:] = 1
    completion_mask[1, 3:9] = 1
    return input_ids, completion_mask, attention_mask


def naive(model, input_ids, completion_mask, attention_mask, temperature):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    log_p = torch.log_softmax(logits / temperature, -1)
    targets = completion_targets(input_ids, completion_mask, attention_mask)
    picked = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets >= 0, picked, 0.0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2", "gemma2"])
def test_completion_logprobs_match_the_naive_logits(kind):
    model = tiny_model(kind)
    adapter = CausalLMAdapter(model)
    if kind == "gemma2":
        assert adapter.softcap == 3.0  # the model's logits apply it; so must we
    if kind == "gpt2":
        assert adapter.lm_head.weight is model.transformer.wte.weight  # tied
    inputs = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for compute in (lambda: adapter.completion_logprobs(*inputs, temperature=0.9)[0],
                    lambda: naive(model, *inputs, 0.9)):
        per_token = compute()
        weights = torch.linspace(0.5, 1.5, per_token.numel()).view_as(per_token)
        grads = torch.autograd.grad((per_token * weights.to(per_token.dtype)).sum(), params,
                                    allow_unused=True)
        results.append((per_token, grads))
    (fused, fused_grads), (expected, expected_grads) = results
    assert fused.dtype == torch.float32 and fused.shape == (2, 11)
    assert_close(fused, expected, 1e-5, "log-probs")
    ignored = completion_targets(*inputs) < 0
    assert (fused[ignored] == 0).all()
    for got, want in zip(fused_grads, expected_grads):
        if want is None:
            assert got is None or not got.any()
            continue
        assert_close(got, want, 1e-4, "parameter gradient")


def test_counts_and_targets():
    input_ids, completion_mask, attention_mask = batch()
    targets = completion_targets(input_ids, completion_mask, attention_mask)
    assert targets.shape == (2, 11)
    assert torch.equal(targets[0, 4:], input_ids[0, 5:]) and (targets[0, :4] == -100).all()
    assert (targets[1, 8:] == -100).all()  # padding is never a target
    _, counts = CausalLMAdapter(tiny_model("llama")).completion_logprobs(
        input_ids, completion_mask, attention_mask)
    assert counts.tolist() == [7, 6]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"completion_mask must have input_ids' shape \(2, 12\)"):
        completion_targets(torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 11))
    with pytest.raises(TypeError, match="is not a causal LM"):
        CausalLMAdapter(torch.nn.Linear(3, 3))


def test_preference_logprobs_is_one_pass_equal_to_two():
    adapter = CausalLMAdapter(tiny_model("llama"))
    input_ids, completion_mask, attention_mask = batch()
    chosen = dict(input_ids=input_ids, completion_mask=completion_mask,
                  attention_mask=attention_mask)
    rejected = dict(input_ids=input_ids[:, :8].flip(0), completion_mask=completion_mask[:, :8])
    calls = []
    handle = adapter.backbone.register_forward_hook(lambda *args: calls.append(1))
    with adapter.reference_context():
        got_chosen, got_rejected = adapter.preference_logprobs(chosen, rejected)
    handle.remove()
    assert len(calls) == 1  # chosen and rejected in one concatenated forward
    with torch.no_grad():
        want_chosen = adapter.sequence_logprobs(**chosen)
        want_rejected = adapter.sequence_logprobs(**rejected)
    assert_close(got_chosen, want_chosen, 1e-5, "chosen")
    assert_close(got_rejected, want_rejected, 1e-5, "rejected")
    assert not got_chosen.requires_grad  # the reference context is no_grad


def test_empty_completion_sums_to_zero_and_errors_are_named():
    adapter = CausalLMAdapter(tiny_model("llama"))
    input_ids, completion_mask, attention_mask = batch()
    completion_mask[1] = 0
    with torch.no_grad():
        values = adapter.sequence_logprobs(input_ids, completion_mask, attention_mask)
    assert torch.isfinite(values).all() and values[1] == 0
    with pytest.raises(ValueError, match="chosen has 2 rows but rejected has 1"):
        side = dict(input_ids=input_ids, completion_mask=completion_mask)
        adapter.preference_logprobs(side, {k: v[:1] for k, v in side.items()})
    with pytest.raises(ValueError, match="disable_adapters=True needs a PEFT model"):
        with adapter.reference_context(disable_adapters=True):
            pass
    assert torch.is_grad_enabled()
