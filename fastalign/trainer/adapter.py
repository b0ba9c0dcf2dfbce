"""Completion-token log-probs of a Hugging Face causal LM through ``linear_logprobs``.

The model's backbone runs to its last hidden states; the output embedding (``lm_head``, tied
or not) is applied only inside ``fastalign.linear_logprobs``, one vocabulary slice at a time, so
the ``[B, T, V]`` logits never exist, and positions that are not followed by a completion token
(the prompt, the padding) are compacted out before any projection. Gemma-2's
``final_logit_softcapping`` is read from the config and applied as ``softcap``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import linear_logprobs

IGNORE_INDEX = -100


def completion_targets(input_ids: torch.Tensor, completion_mask: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T-1]`` next-token targets: ``input_ids[:, t+1]`` where token ``t+1`` is a
    completion token (and not padding), else ``IGNORE_INDEX``.

    Raises:
        ValueError: shapes that do not match ``input_ids [B, T]``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    for name, mask in (("completion_mask", completion_mask), ("attention_mask", attention_mask)):
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(mask.shape)}")
    keep = completion_mask[:, 1:].bool()
    if attention_mask is not None:
        keep = keep & attention_mask[:, 1:].bool()
    return torch.where(keep, input_ids[:, 1:], IGNORE_INDEX)


@dataclass(frozen=True)
class _Head:
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None


class CausalLMAdapter:
    """Wraps a ``transformers`` causal LM (Llama, Qwen2, Mistral, Gemma-2, GPT-2, ... or a PEFT
    model around one) for fused completion log-probs.

    Args:
        model: a ``PreTrainedModel`` with an output embedding (``get_output_embeddings()``) and
            a backbone (``base_model``) returning ``last_hidden_state``.
    """

    def __init__(self, model: torch.nn.Module):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        backbone = getattr(inner, "base_model", None)
        if head is None or backbone is None or backbone is inner:
            raise TypeError(
                f"{type(model).__name__} is not a causal LM with a separate backbone and output "
                "embedding (expected a transformers *ForCausalLM model)")
        self.model = model
        self.backbone = backbone
        self.lm_head = head
        config = getattr(inner, "config", None)
        self.softcap = getattr(config, "final_logit_softcapping", None) or None

    def head(self) -> _Head:
        return _Head(self.lm_head.weight, getattr(self.lm_head, "bias", None), self.softcap)

    def hidden_states(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, D]`` last hidden states (after the final norm), no logits."""
        output = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False, return_dict=True)
        return output.last_hidden_state

    def completion_logprobs(self, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                            attention_mask: torch.Tensor | None = None, *,
                            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per_token [B, T-1], counts [B])``: float32 log-probs of each completion token
        given what precedes it (0 elsewhere) and the number of completion tokens per row.
        Differentiable w.r.t. the model's parameters (hidden states and lm_head)."""
        targets = completion_targets(input_ids, completion_mask, attention_mask)
        hidden = self.hidden_states(input_ids, attention_mask)[:, :-1]
        head = self.head()
        per_token = linear_logprobs(hidden, head.weight, targets, bias=head.bias,
                                    temperature=temperature, softcap=head.softcap,
                                    ignore_index=IGNORE_INDEX)
        return per_token, (targets != IGNORE_INDEX).sum(-1)
