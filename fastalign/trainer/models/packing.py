"""Padding-free (packed) forward passes: the real tokens of a padded batch ``[B, T]`` run
packed into fewer rows (``Packing``: first-fit, rows no longer than the longest sequence), each
sequence's ``position_ids`` starting again at 0, and no attention mask.

transformers (5.x, ``masking_utils.find_packed_sequence_indices``) reads a position that does
not follow its predecessor as the start of a new sequence and builds a block-diagonal causal
mask from it (sdpa, eager, flex; flash-attention takes the same positions as variable-length
sequences), so no token attends across a boundary and only the rows' filler costs compute.
The model's hidden states are scattered back to the padded layout before the head, where
padding is ignored anyway (the fused ops compact ignored rows out), so every loss sees the rows
it would have seen.

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
    """How the sequences of a padded batch ``[B, T]`` map onto packed rows ``[R, L]``.

    ``L`` is the longest sequence's length, and sequences go, longest first, into the first row
    with room for them (first-fit decreasing), so ``R <= B`` and no row is longer than the
    padded batch's: the attention's cost (``R * L**2``, sdpa computes the whole masked square)
    never exceeds the padded batch's, and the projections and MLPs run on ``R * L <= B * T``
    tokens. What a row has left over at its end is filler: token 0 with positions ``0, 1, ...``,
    a sequence of its own whose outputs nothing reads.

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
        lengths = self.real.sum(-1).tolist()
        row_length = max(max(lengths, default=0), 1)
        row_of, start_of, used = _first_fit_decreasing(lengths, row_length)
        device = attention_mask.device
        sequence = self.real.nonzero()[:, 0]  # the padded row of each real token, in order
        offset = (self.real.long().cumsum(-1) - 1)[self.real]  # its index in its sequence
        self.rows = torch.tensor(row_of, device=device, dtype=torch.long)[sequence]
        self.columns = torch.tensor(start_of, device=device, dtype=torch.long)[sequence] + offset
        columns = torch.arange(row_length, device=device)
        filler = columns - torch.tensor(used, device=device, dtype=torch.long)[:, None]
        self.position_ids = filler.clamp(min=0)  # [R, L]: the filler's, then the real tokens'
        self.position_ids[self.rows, self.columns] = position_ids[self.real].long()

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[R, L, ...]``: the real tokens, zeros in the filler."""
        packed = values.new_zeros(tuple(self.position_ids.shape) + tuple(values.shape[2:]))
        return packed.index_put((self.rows, self.columns), values[self.real])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[R, L, ...]`` -> ``[B, T, ...]`` with zeros at padding (differentiable)."""
        full = packed.new_zeros(self.shape + tuple(packed.shape[2:]))
        return full.index_put((self.real,), packed[self.rows, self.columns])


def _first_fit_decreasing(lengths: list[int], capacity: int
                          ) -> tuple[list[int], list[int], list[int]]:
    """``(row of each sequence, its first column, tokens used per row)`` for sequences of
    ``lengths`` packed, longest first, each into the first row with room in rows of
    ``capacity``. Equal lengths keep the batch's order, so packing is deterministic."""
    row_of, start_of, used = [0] * len(lengths), [0] * len(lengths), []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, filled in enumerate(used) if filled + lengths[index] <= capacity),
                   len(used))
        if row == len(used):
            used.append(0)
        row_of[index], start_of[index] = row, used[row]
        used[row] += lengths[index]
    return row_of, start_of, used or [0]
