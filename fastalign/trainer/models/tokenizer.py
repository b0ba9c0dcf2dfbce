"""The built-in tokenizer: byte-level, made locally (nothing to download or train).

Token ``i < 256`` is byte ``i``; a few special tokens follow (padding, begin/end of text, chat
roles). Every string round-trips, tokenization is a pure function of the text (so a tokenized
prompt is always a prefix of the tokenized prompt + completion), and the model's embedding can
be any size above ``len(tokenizer)``: the tiny demo model keeps Llama-3's 128256 rows, so the
fused ops run at the vocabulary size that costs real trainings their memory.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
# A message is "<|role|>content<|eos|>"; the generation prompt is "<|assistant|>".
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|eos|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """The printable stand-in of each byte 0..255, as byte-level BPE (GPT-2) spells them: bytes
    that are printable map to themselves, the others to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = 0
    alphabet = []
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A ``transformers`` fast tokenizer: one token per UTF-8 byte (ids 0..255), then
    ``<|pad|>``, ``<|bos|>``, ``<|eos|>`` and the chat roles, with a chat template. No BOS is
    added implicitly."""
    vocab = {char: byte for byte, char in enumerate(_byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([PAD, BOS, EOS, *(f"<|{role}|>" for role in ROLES)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast
