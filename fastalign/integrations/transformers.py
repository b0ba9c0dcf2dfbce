"""A plain transformers causal LM whose loss comes from fastalign's fused head.

    from fastalign.integrations.transformers import patch_model
    patch_model(model)
    loss = model(input_ids, attention_mask=mask, labels=labels).loss   # no [B, T, V] logits

After ``patch_model(model)``, a forward with ``labels`` runs the backbone and computes the
causal-LM loss with ``fastalign.linear_logprobs`` from the hidden states: the logits are never
formed (``output.logits`` is None), positions labelled -100 cost nothing, and the loss equals
the model's own (the mean over the predicted tokens, or their sum over ``num_items_in_batch``
when the transformers ``Trainer`` passes it for gradient accumulation). ``return_logprobs=True``
also returns the per-token log-probs (``output.logprobs [B, T - 1]``, 0 at -100) and entropy
(``output.entropy``). A forward without labels, and ``generate()``, are the model's own.
Soft caps (Gemma-2), logit scales and a LoRA adapter on ``lm_head`` are honoured, read from the
model's forward by ``fastalign.model_head.read_head``, which refuses (when patching)
a head or a logit step it does not know. This is the role Liger-Kernel's model patch plays, for
SFT with the transformers ``Trainer`` or a loop of one's own.
"""

from __future__ import annotations

import functools
import types

from .. import model_head


def patch_model(model, *, temperature: float = 1.0):
    """Installs the fused loss on ``model`` (a ``*ForCausalLM``; a PEFT model's base is
    patched) and returns it. ``temperature`` divides the logits of the loss (1 = the model's
    own loss). Calling it twice is harmless.

    Raises:
        TypeError, ValueError: a head that is not a linear map, or a logit transform fastalign
            does not know (``fastalign.model_head.read_head``), named with the model's class.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(target.forward, "__func__", None), "fastalign_patched", False):
        return model
    if target.get_output_embeddings() is None:
        raise ValueError(f"{type(target).__name__} has no output embeddings (lm_head): "
                         f"patch_model needs a causal LM")
    model_head.read_head(target)  # refuses a head or a logit transform fastalign cannot read
    original_forward = target.forward

    @functools.wraps(type(target).forward)
    def forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None,
                return_logprobs=False, **kwargs):
        if labels is None and shift_labels is None:
            return original_forward(*args, **kwargs)
        kwargs.pop("logits_to_keep", None)
        outputs = self.base_model(*args, **kwargs)
        hidden = outputs.last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        log_probs, entropy, _ = model_head.head_logprobs(
            self, hidden, shift_labels, temperature=temperature, return_entropy=return_logprobs)
        mask = shift_labels.to(log_probs.device) != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        result = CausalLMOutputWithPast(
            loss=-log_probs.sum() / count, logits=None,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None))
        if return_logprobs:
            result["logprobs"], result["entropy"] = log_probs, entropy
        return result

    forward.fastalign_patched = True
    target.forward = types.MethodType(forward, target)
    return model
