"""Padding-free (packed) forward passes: the real tokens of a padded batch ``[B, T]`` run as
ONE row ``[1, N]``, each sequence's ``position_ids`` starting again at 0, and no attention mask.

transformers (5.x, ``masking_utils.find_packed_sequence_indices``) reads a position that does
not follow its predecessor as the start of a new sequence and builds a block-diagonal causal
mask from it (sdpa, eager, flex; flash-attention takes the same positions as variable-length
sequences), so no token attends across a boundary and no compute goes to padding. The model's
hidden states are scattered back to the padded layout before the head, where padding is ignored
anyway (the fused ops compact ignored rows out), so every loss sees the rows it would have seen.

Needs a model whose attention builds its mask with ``masking_utils`` (Llama, Qwen2/3, Mistral,
Gemma, Phi-3, ... in transformers 5); the trainers' tests check that a packed batch's log-probs
equal the padded batch's. Packed: the policy and reference passes of every trainer and the
reward model's; PPO's separate ``value_model`` (when one is given) still runs padded.
"""

from __future__ import annotations

import torch


def check_packing_supported(model) -> None:
    """Raises ``ValueError`` when this transformers cannot keep packed sequences apart."""
    import transformers

    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise ValueError(f"padding_free=True needs transformers >= 5 (its attention masks keep "
                         f"packed sequences apart by their position_ids); this is "
                         f"{transformers.__version__}. Set padding_free=False.")
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in (None, "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                         "flex_attention"):
        raise ValueError(f"padding_free=True: attention implementation {attention!r} is not "
                         "known to keep packed sequences apart; use sdpa or eager")


class Packing:
    """How the rows of a padded batch map onto one packed row.

    Args:
        attention_mask: ``[B, T]``, 1 on real tokens (left, right or both sides padded).
        position_ids: ``[B, T]`` positions of the real tokens (default: counted from each row's
            first real token, as the trainers' own).
    """

    def __init__(self, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None):
        self.real = attention_mask.bool()
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.shape = tuple(attention_mask.shape)
        self.position_ids = position_ids[self.real][None]  # [1, N]

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[1, N, ...]``: the real tokens, row after row."""
        return values[self.real][None]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, N, ...]`` -> ``[B, T, ...]`` with zeros at padding (differentiable)."""
        full = packed.new_zeros(self.shape + tuple(packed.shape[2:]))
        return full.index_put((self.real,), packed[0])
