"""The built-in default model: a small Llama built from a config (no weights to download) with
Llama-3's 128256-token vocabulary, and the byte-level tokenizer."""

from __future__ import annotations

import torch

from .tokenizer import byte_tokenizer

TINY = "tiny"
LLAMA3_VOCAB = 128256


def tiny_llama(*, vocab_size: int = LLAMA3_VOCAB, hidden_size: int = 128, num_layers: int = 2,
               num_heads: int = 4, max_positions: int = 1024, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM``: tied embeddings (as Llama-3.2-1B), grouped
    KV heads, ``vocab_size`` rows (the byte tokenizer uses the first 262; the rest are real
    vocabulary the fused ops walk, as in a pretrained model's unused tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=max_positions,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def warm_started_tiny(*, steps: int = 20, seed: int = 0, progress: bool = True,
                      device: torch.device | str = "cpu"):
    """``(model, tokenizer)``: the tiny model after ``supervised_warm_start`` on the bundled
    answers (polite and curt alike), the policy and reference of the built-in RL runs. An
    untrained tiny model samples almost only token ids the byte tokenizer never uses."""
    from ..core.bundled import demo_preferences
    from .sft import supervised_warm_start

    model, tokenizer = tiny_llama(seed=seed).to(device), byte_tokenizer()
    losses = supervised_warm_start(model, tokenizer, demo_preferences("train"), steps=steps,
                                   seed=seed, progress=progress)
    print(f"tiny: {steps}-step supervised warm start on the bundled answers, loss "
          f"{losses[0]:.2f} -> {losses[-1]:.2f}")
    return model, tokenizer


def tiny_reward_model(*, vocab_size: int | None = None, hidden_size: int = 128,
                      num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    """The built-in reward model: the tiny Llama's architecture with a 1-output score head."""
    from transformers import LlamaForSequenceClassification

    causal = tiny_llama(vocab_size=vocab_size or LLAMA3_VOCAB, hidden_size=hidden_size,
                        num_layers=num_layers, num_heads=num_heads, seed=seed)
    config = causal.config
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config)
