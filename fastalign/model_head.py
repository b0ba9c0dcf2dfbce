"""The LM head of a Hugging Face causal LM as ``fastalign.linear_logprobs`` needs it, read by ONE
reader, ``read_head``, that fastalign's trainers (``CausalLMAdapter``) and the TRL and
transformers integrations share: its weight and bias (``head_parameters``: a LoRA adapter on the
head folded in, an FSDP2 head gathered, a ZeRO-3 head left to ``linear_logprobs`` to gather), and
what the model's forward does around it (``Head``): a factor on the last hidden state before the
head (MiniCPM3, Inkling), a scale and a tanh soft cap on the logits (Cohere's ``logit_scale``,
Granite's ``logits_scaling``, Falcon-H1's ``lm_head_multiplier``, Gemma-2's soft cap, ...). Those
are read from the source of the model class's ``forward`` (``_forward_reader``) and evaluated on the
model, not guessed from config names, so a family that divides where another multiplies is read
as its forward applies it. Anything else is refused with the class named, never read as a plain
linear map: a head whose ``forward`` is not ``nn.Linear.forward`` (Dory's per-vocabulary scale, a
quantized or custom head), a tensor-valued scale, a vocabulary cut, an unknown function of the
logits, a head input that is not the backbone's last hidden state.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import _forward_reader
from .ops import _sharded_head, linear_logprobs


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


@dataclass(frozen=True)
class Head:
    """A model's output embedding as fastalign reads it (``read_head``): ``module``, the factor
    ``input_scale`` its forward multiplies the backbone's last hidden state by before the head,
    and ``logits``, what it does to the head's output."""
    module: torch.nn.Module
    input_scale: float
    logits: LogitTransform

    def from_hidden_state(self) -> LogitTransform:
        """The transform from the backbone's last hidden state (the integrations' input): the
        input factor is one more logit scale (``read_head`` refuses it on a head with a bias)."""
        return LogitTransform(self.logits.softcap, self.logits.scale * self.input_scale)

    def scaled_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` times ``logits.scale``, for losses that take a soft cap but no
        scale (fastalign's trainers run theirs inside the head, on what the head receives):
        ``softcap(s (W h + b)) = softcap((s W) h + s b)``. One ``[V, D]`` temporary when the
        scale is not 1; gradients reach the weight through it."""
        weight, bias = head_parameters(self.module)
        scale = self.logits.scale
        if scale == 1.0:
            return weight, bias
        if hasattr(weight, "ds_id"):
            raise NotImplementedError("a DeepSpeed ZeRO-3 head with a logit scale cannot be "
                                      "scaled outside fastalign's op; use FSDP2 or ZeRO-2")
        return weight * scale, None if bias is None else bias * scale


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _linear_layers(head: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose ``forward`` computes the head's logits: through PEFT's
    ``modules_to_save`` (whole copies of the head) and LoRA wrappers (their base layer)."""
    modules = [head]
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        modules = [head.original_module, *head.modules_to_save.values()]
    return [m.get_base_layer() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer") else m
            for m in modules]


def read_head(model) -> Head:
    """The output embedding of ``model`` (a ``*ForCausalLM``, not a PEFT wrapper) and the
    transform its forward applies around it.

    Raises:
        TypeError: a head whose ``forward`` is not ``nn.Linear.forward`` (PEFT's LoRA and
            modules_to_save wrappers are looked through), a head inside another module, or a
            model without a backbone apart from itself.
        ValueError: a forward step from the last hidden state to the logits fastalign does not
            know (``_forward_reader``).
    """
    owner = type(model).__name__
    head = model.get_output_embeddings()
    for layer in _linear_layers(head):
        if type(layer).forward is not torch.nn.Linear.forward:
            name = type(layer).__name__
            raise TypeError(
                f"{owner}'s output embedding is a {name}, whose forward is not nn.Linear's: "
                f"fastalign computes log-probs from the head's weight and bias alone and would "
                f"silently drop what {name}.forward does to the logits. Compute this model's "
                f"log-probs from its own logits (TRL without fastalign.integrations.trl, a "
                f"plain loss), or give it a plain nn.Linear head if that step is not needed")
    names = {id(module): name for name, module in model.named_children()}
    head_name, backbone_name = names.get(id(head)), names.get(id(model.base_model))
    if head_name is None or backbone_name is None:
        what = ("has no backbone apart from itself (base_model)" if backbone_name is None else
                "keeps its output embedding inside another module (a prediction head)")
        raise TypeError(f"{owner} {what}, so fastalign cannot tell what its forward does "
                        f"between the last hidden state and the logits; compute its log-probs "
                        f"from its own logits")
    try:
        steps, constants = _forward_reader.program(type(model).forward, head_name, backbone_name)
        input_scale, softcap, scale = _forward_reader.evaluate(model, steps, dict(constants))
    except _forward_reader.UnknownStep as step:
        raise ValueError(
            f"{owner}.forward turns the last hidden state into logits with a step fastalign "
            f"does not know: {step}. fastalign's fused head would silently compute other "
            f"log-probs, so it refuses this model: compute its log-probs from its own logits "
            f"(TRL without fastalign.integrations.trl, a plain loss). fastalign reads a plain "
            f"nn.Linear head, factors that are numbers on the model or its config, and a tanh "
            f"soft cap") from None
    if input_scale != 1.0 and any(getattr(m, "bias", None) is not None
                                  for m in _linear_layers(head)):
        raise ValueError(f"{owner}.forward scales the hidden states by {input_scale} before a "
                         f"head with a bias, which is no logit scale fastalign can apply; "
                         f"compute its log-probs from its own logits")
    return Head(head, input_scale, LogitTransform(softcap=softcap, scale=scale))


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
    """Per-token ``log p(label)`` (and entropy) of ``hidden [B, T, D]``, the backbone's last
    hidden state, under the model's head and logit transform (``read_head``):
    ``(log_probs [B, T], entropy [B, T] or None, row statistics dict or None)``, 0 where the
    label is -100 (those rows are compacted out before any work); the statistics are
    ``linear_logprobs``' ``return_row_stats``, from the same pass. ``cast_to_fp32`` runs the
    head in float32 outside autocast."""
    head = read_head(model)
    weight, bias = head_parameters(head.module)
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    fused_temperature, softcap = head.from_hidden_state().folded(temperature)
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
