"""Completion-token log-probs of a Hugging Face causal LM through ``linear_logprobs``.

The whole model runs, through its root module, with its output embedding (``lm_head``, tied or
not) swapped for the duration of the call: instead of the logits it computes what the trainer
asks from the last hidden states and its own weight, inside ``fastalign.linear_logprobs``, one
vocabulary slice at a time, so the ``[B, T, V]`` logits never exist, and positions that are not
followed by a completion token (the prompt, the padding) are compacted out before any
projection. Going through the root (not the backbone submodule) is what lets distributed
engines do their work: DDP prepares its gradient all-reduce in its forward, and FSDP2 unshards
the root's parameters (embeddings, final norm, the head) in the root's forward hook and keeps
them so through backward, so the head's weight is a whole tensor exactly while the swapped head
runs (see ``docs/architecture.md``). What the model's forward does to the head's output (Gemma-2's
soft cap, the logit scales of Cohere, Granite, Falcon-H1, ...) is read by the reader the TRL and
transformers integrations use, ``fastalign.model_head.read_head``, which refuses a head
or a logit step it does not know rather than read it as a plain linear map. The soft cap is
``softcap`` (the trainers hand it to their losses); the scale is multiplied into the weight the
head functions receive, since those losses take no scale.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from ...model_head import read_head
from ...ops import linear_logprobs
from .packing import Packing, check_packing_supported

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


class CausalLMAdapter:
    """Wraps a ``transformers`` causal LM (Llama, Qwen2, Mistral, Gemma-2, GPT-2, ... or a PEFT
    model around one) for fused completion log-probs.

    Args:
        model: a ``PreTrainedModel`` with an output embedding (``get_output_embeddings()``) and
            a backbone (``base_model``) returning ``last_hidden_state``.

    Raises:
        TypeError: not such a model, or its head is not a linear map (``read_head``).
        ValueError: its forward transforms the logits in a way fastalign does not know.
    """

    def __init__(self, model: torch.nn.Module, *, padding_free: bool = False):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        backbone = getattr(inner, "base_model", None)
        if head is None or backbone is None or backbone is inner:
            raise TypeError(
                f"{type(model).__name__} is not a causal LM with a separate backbone and output "
                "embedding (expected a transformers *ForCausalLM model)")
        self.model = model
        # What forward passes run through: the model, or its DDP wrapper (trainers set it).
        self.root = model
        self.backbone = backbone
        self.lm_head = head
        # The head's input here is what the model passes it (any factor on the hidden states
        # already applied), so only the transform of its output counts.
        self.head = read_head(inner)
        self.softcap = self.head.logits.softcap
        # Pack the sequences of a padded batch into fewer rows (``packing.py``).
        if padding_free:
            check_packing_supported(inner)
        self.padding_free = padding_free

    def forward_with_head(self, head_fn, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None):
        """Runs the model through ``root`` with its head computing
        ``head_fn(hidden [B, T-1, D], weight [V, D], bias [V] | None)`` in place of the logits,
        and returns what ``head_fn`` returned (e.g. a fused loss, differentiable w.r.t. all
        parameters). ``hidden`` is cut to the positions that have a next token; the weight
        has any LoRA adapter on the head folded in and the model's logit scale multiplied in
        (``Head.scaled_parameters``), so ``head_fn`` applies only ``softcap``. With
        ``padding_free``, the sequences run packed into fewer rows and ``hidden`` is
        scattered back to ``[B, T-1, D]`` (zeros at padding) before ``head_fn``."""
        results = []
        packing = (Packing(attention_mask, position_ids)
                   if self.padding_free and attention_mask is not None else None)

        def fused_head(hidden):
            weight, bias = self.head.scaled_parameters()
            if packing is not None:
                hidden = packing.unpack(hidden)
            results.append(head_fn(hidden[:, :-1], weight, bias))
            # What the model's forward goes on with (a soft cap, a cast): no vocabulary.
            return hidden.new_empty(*hidden.shape[:-1], 0)

        if packing is not None:  # no attention mask: the positions keep the sequences apart
            input_ids, attention_mask = packing.pack(input_ids), None
            position_ids = packing.position_ids
        extra = {} if position_ids is None else {"position_ids": position_ids}
        self.lm_head.forward = fused_head  # the instance attribute shadows the class's forward
        try:
            self.root(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      return_dict=True, **extra)
        finally:
            del self.lm_head.forward
        if len(results) != 1:
            raise RuntimeError(f"{type(self.model).__name__}'s forward called its output "
                               f"embedding {len(results)} times; fastalign expects once")
        return results[0]

    def completion_logprobs(self, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                            attention_mask: torch.Tensor | None = None, *,
                            position_ids: torch.Tensor | None = None,
                            temperature: float = 1.0, top_k: int | None = None,
                            min_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per_token [B, T-1], counts [B])``: float32 log-probs of each completion token
        given what precedes it (0 elsewhere) and the number of completion tokens per row.
        Differentiable w.r.t. the model's parameters (hidden states and lm_head). ``top_k`` /
        ``min_p``: over the sampler's support, renormalized (``linear_logprobs``)."""
        targets = completion_targets(input_ids, completion_mask, attention_mask)
        per_token = self.forward_with_head(
            lambda hidden, weight, bias: self.head_logprobs(
                hidden, weight, bias, targets, temperature=temperature, top_k=top_k,
                min_p=min_p),
            input_ids, attention_mask, position_ids)
        return per_token, (targets != IGNORE_INDEX).sum(-1)

    def head_logprobs(self, hidden, weight, bias, targets, *, temperature: float = 1.0,
                      top_k: int | None = None, min_p: float | None = None):
        """``[B, T-1]`` float32 log-probs of ``targets`` under the head ``(weight, bias)`` (as
        ``forward_with_head`` passes it, the logit scale in) with the model's soft cap."""
        return linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                               softcap=self.softcap, ignore_index=IGNORE_INDEX, top_k=top_k,
                               min_p=min_p)

    def sequence_logprobs(self, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, *,
                          temperature: float = 1.0) -> torch.Tensor:
        """``[B]`` float32: each row's summed completion log-prob (0 for a row without any)."""
        per_token, _ = self.completion_logprobs(input_ids, completion_mask, attention_mask,
                                                temperature=temperature)
        return per_token.sum(-1)

    def preference_inputs(self, chosen: dict, rejected: dict
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask [2B, T], targets [2B, T-1])``: the chosen rows then the
        rejected ones, right-padded to the longer of the two, for ONE forward of both.

        ``chosen`` and ``rejected`` hold ``input_ids``, ``completion_mask`` and optionally
        ``attention_mask``, each ``[B, T]`` (their T may differ).
        """
        parts = [_padded(side, max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1]))
                 for side in (chosen, rejected)]
        if parts[0][0].shape[0] != parts[1][0].shape[0]:
            raise ValueError(f"chosen has {parts[0][0].shape[0]} rows but rejected has "
                             f"{parts[1][0].shape[0]}; pass one rejected per chosen")
        input_ids, completion_mask, attention_mask = (torch.cat(pair) for pair in zip(*parts))
        return input_ids, attention_mask, completion_targets(input_ids, completion_mask,
                                                             attention_mask)

    def preference_logprobs(self, chosen: dict, rejected: dict, *, temperature: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen [B], rejected [B])`` summed sequence log-probs from one forward pass over
        both (``preference_inputs``)."""
        input_ids, attention_mask, targets = self.preference_inputs(chosen, rejected)
        per_token = self.forward_with_head(
            lambda hidden, weight, bias: self.head_logprobs(hidden, weight, bias, targets,
                                                            temperature=temperature),
            input_ids, attention_mask)
        return per_token.sum(-1).chunk(2)

    @contextlib.contextmanager
    def reference_context(self, disable_adapters: bool = False):
        """A context for reference passes: ``no_grad``, and with ``disable_adapters`` a PEFT
        model's ``disable_adapter()`` (the base model as the reference, no second copy)."""
        if disable_adapters and not hasattr(self.model, "disable_adapter"):
            raise ValueError("disable_adapters=True needs a PEFT model (one with LoRA "
                             f"adapters); {type(self.model).__name__} has none")
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if disable_adapters:
                stack.enter_context(self.model.disable_adapter())
            yield


class FrozenReference:
    """The reference policy of PPO and GRPO: ``ref_model`` when given; else, for a PEFT (LoRA)
    policy, its base model with the adapters disabled (no second copy of the weights); else a
    frozen copy of ``model``."""

    def __init__(self, model, ref_model=None, *, padding_free: bool = False):
        self.uses_base = ref_model is None and hasattr(model, "disable_adapter")
        if self.uses_base:
            self.adapter = CausalLMAdapter(model, padding_free=padding_free)
        else:
            reference = ref_model if ref_model is not None else copy.deepcopy(model)
            self.adapter = CausalLMAdapter(reference.eval().requires_grad_(False),
                                           padding_free=padding_free)

    def place(self, processes, root: torch.nn.Module, precision: str) -> None:
        """On several processes: the adapters-off reference runs through the policy's
        ``root``; a separate copy is sharded under FSDP2 (replicated under DDP)."""
        if self.uses_base:
            self.adapter.root = root
        else:
            processes.shard(self.adapter.model, precision, frozen=True)

    def completion_logprobs(self, input_ids, completion_mask, attention_mask=None, *,
                            position_ids=None, temperature: float = 1.0,
                            top_k: int | None = None, min_p: float | None = None
                            ) -> torch.Tensor:
        """``[B, T-1]`` per-token log-probs of the reference, without gradient."""
        with self.adapter.reference_context(disable_adapters=self.uses_base):
            return self.adapter.completion_logprobs(
                input_ids, completion_mask, attention_mask, position_ids=position_ids,
                temperature=temperature, top_k=top_k, min_p=min_p)[0]


def _padded(side: dict, length: int):
    """(input_ids, completion_mask, attention_mask) of one side, right-padded to ``length``."""
    input_ids, completion_mask = side["input_ids"], side["completion_mask"]
    attention_mask = side.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    extra = length - input_ids.shape[1]
    return (F.pad(input_ids, (0, extra)), F.pad(completion_mask, (0, extra)),
            F.pad(attention_mask, (0, extra)))
