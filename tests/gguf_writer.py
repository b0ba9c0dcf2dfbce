"""Writes a tiny Llama as a GGUF file, the way llama.cpp's converter lays one out (its q/k
projections permuted to interleaved rotary pairs, tied output head left out), with a
byte-level BPE tokenizer: what the GGUF loading tests read back."""

from __future__ import annotations

import torch

from fastalign.trainer.models.tokenizer import _byte_alphabet

SPECIALS = ("<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_vocabulary() -> tuple[list[str], list[str]]:
    """(tokens, merges): the 256 byte symbols, two merged pairs, then the specials."""
    merges = ["Ġ t", "h e"]
    tokens = [*_byte_alphabet(), "Ġt", "he", *SPECIALS]
    return tokens, merges


def interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's layout of a q/k projection: each head's rotary halves as adjacent pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def tiny_llama_and_gguf(path, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                        kv_heads: int = 2, seed: int = 0, declared_ffn: int = 64,
                        nan_in: str | None = None):
    """A random ``LlamaForCausalLM`` and its GGUF file at ``path`` (float32 tensors);
    ``declared_ffn``: the MLP width the file's metadata states (another than its tensors'
    64 makes a file whose shapes do not match its config); ``nan_in``: a GGUF tensor name
    whose first value is written as NaN (a damaged file)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = tiny_vocabulary()
    eos = tokens.index("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                         bos_token_id=tokens.index("<|im_start|>"), eos_token_id=eos,
                         pad_token_id=eos)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(declared_ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for name, tensor in model.model.state_dict().items():
        stem = name.removesuffix(".weight")
        if stem.startswith("layers."):
            _, index, rest = stem.split(".", 2)
            target = f"blk.{index}.{per_layer[rest]}"
            if rest == "self_attn.q_proj":
                tensor = interleaved(tensor, heads)
            elif rest == "self_attn.k_proj":
                tensor = interleaved(tensor, kv_heads)
        else:
            target = names[stem]
        values = tensor.float().contiguous().numpy().copy()
        if f"{target}.weight" == nan_in:
            values.flat[0] = float("nan")
        writer.add_tensor(f"{target}.weight", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
