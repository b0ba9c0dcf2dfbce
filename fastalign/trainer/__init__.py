"""The thin trainer layer: runs Hugging Face causal LMs through fastalign's fused ops.

``CausalLMAdapter`` turns a model into completion-token log-probs without materializing logits
(the DPO/reward trainers of issue 6 build on it)."""

from .adapter import CausalLMAdapter, completion_targets

__all__ = ["CausalLMAdapter", "completion_targets"]
