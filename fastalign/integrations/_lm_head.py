"""The LM head of a Hugging Face causal LM, read the way ``fastalign.linear_logprobs`` needs it:
its weight and bias (a LoRA adapter on the head folded in, a sharded FSDP2 head gathered, a
DeepSpeed ZeRO-3 head left to ``linear_logprobs`` to gather), and
the transform the model applies to its logits (Gemma-2's soft cap, the logit scales of Cohere,
Granite, Falcon-H1 and others), so that per-token log-probs come from the hidden states without
the ``[N, V]`` logits. Shared by the TRL and transformers integrations.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .. import linear_logprobs
from ..ops import _sharded_head


@dataclass(frozen=True)
class LogitTransform:
    """``z' = softcap(scale * z) / temperature`` as a model applies it to its logits."""
    softcap: float | None
    scale: float

    def folded(self, temperature: float) -> tuple[float, float | None]:
        """``(temperature, softcap)`` for ``linear_logprobs`` with the scale folded in, exactly:
        ``softcap_c(s z) / T = softcap_{c/s}(z) / (T / s)`` for ``s > 0``, so no scaled copy of
        the hidden states or the weight is made (and nothing extra is rounded)."""
        if not self.scale > 0:
            raise ValueError(f"the model's logit scale is {self.scale}; fastalign's fused head "
                             f"needs a positive one (its logits would be constant or reversed)")
        softcap = None if self.softcap is None else self.softcap / self.scale
        return temperature / self.scale, softcap


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(model) -> LogitTransform:
    """Where the model families keep the multiplier of their logits: ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), or ``logits_scaling`` that
    Granite and MiniCPM3 divide by and HyperCLOVA X multiplies by. None of them: 1."""
    config = text_config(model)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            break
    divisor = getattr(config, "logits_scaling", None)
    if scale is None and divisor is not None:
        scale = divisor if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / divisor
    return LogitTransform(softcap=getattr(config, "final_logit_softcapping", None),
                          scale=1.0 if scale is None else float(scale))


def _full(name: str, tensor):
    """A DTensor (an FSDP2-sharded head) gathered to the whole tensor, differentiably, its
    gradient the average over ranks of each rank's (each rank brings its own rows): see
    ``fastalign/ops/_sharded_head.py``."""
    return _sharded_head.gather_data_parallel(name, tensor)


def _refuse_zero3_lora(name: str, base) -> None:
    """Folding a LoRA adapter reads the base weight (and A, B) outside any gather; under ZeRO-3
    they are empty there."""
    partitioned = [p for p in (base.weight, base.bias) if p is not None and hasattr(p, "ds_id")]
    if partitioned:
        raise NotImplementedError(
            f"the LoRA adapter {name!r} on lm_head cannot be folded into a DeepSpeed ZeRO-3 "
            f"partitioned head (its weight is gathered only inside fastalign's op, not where "
            f"the adapter is added); leave lm_head out of target_modules, merge the adapter "
            f"first, or use FSDP2 or ZeRO-2")


def head_parameters(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, D], bias [V] or None)`` of the output embeddings as the model applies them.

    A PEFT LoRA adapter on the head itself is folded in (``W + scaling * B @ A`` for each active,
    unmerged adapter; one ``[V, D]`` temporary, gradients reach A and B through it): reading
    ``head.weight`` alone would silently drop it. Where folding would not equal the model's own
    forward, it raises: adapter dropout in training, DoRA, an adapter on a ZeRO-3 head.

    An FSDP2 head is gathered here (its gradient averaged over the ranks); a DeepSpeed ZeRO-3
    head is returned as its partitioned parameters, which ``linear_logprobs`` gathers in forward
    and again in backward.
    """
    if hasattr(head, "lora_A") and hasattr(head, "get_base_layer"):
        base = head.get_base_layer()
        weight, bias = _full("lm_head.weight", base.weight), _full("lm_head.bias", base.bias)
        if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
            return weight, bias
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            _refuse_zero3_lora(name, base)
            if getattr(head, "use_dora", {}).get(name, False):
                raise ValueError(f"the LoRA adapter {name!r} on lm_head uses DoRA, which "
                                 f"fastalign's fused head cannot fold into the weight; leave "
                                 f"lm_head out of target_modules or merge the adapter first")
            dropout = head.lora_dropout[name]
            if head.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                raise ValueError(f"the LoRA adapter {name!r} on lm_head has dropout {dropout.p}: "
                                 f"its output is not a fixed weight, so fastalign's fused head "
                                 f"cannot fold it in; set lora_dropout=0 or leave lm_head out "
                                 f"of target_modules")
            delta = head.lora_B[name].weight @ head.lora_A[name].weight
            weight = weight + delta.to(weight.dtype) * head.scaling[name]
        return weight, bias
    return _full("lm_head.weight", head.weight), _full("lm_head.bias", getattr(head, "bias", None))


def head_logprobs(model, hidden: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                  return_entropy: bool, return_row_stats: bool = False,
                  cast_to_fp32: bool = False):
    """Per-token ``log p(label)`` (and entropy) of ``hidden [B, T, D]`` under the model's head:
    ``(log_probs [B, T], entropy [B, T] or None, row statistics dict or None)``, 0 where the
    label is -100 (those rows are compacted out before any work); the statistics are
    ``linear_logprobs``' ``return_row_stats``, from the same pass. ``cast_to_fp32`` runs the
    head in float32 outside autocast."""
    weight, bias = head_parameters(model.get_output_embeddings())
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    fused_temperature, softcap = logit_transform(model).folded(temperature)
    if cast_to_fp32:
        hidden = hidden.float()
    with torch.autocast(hidden.device.type, enabled=False) if cast_to_fp32 else nullcontext():
        result = linear_logprobs(hidden, weight, labels, bias=bias, temperature=fused_temperature,
                                 softcap=softcap, ignore_index=-100,
                                 return_entropy=return_entropy,
                                 return_row_stats=return_row_stats)
    result = list(result) if isinstance(result, tuple) else [result]
    log_probs = result.pop(0)
    entropy = result.pop(0) if return_entropy else None
    return log_probs, entropy, result.pop(0) if return_row_stats else None
