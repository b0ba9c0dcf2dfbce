"""Fused end-to-end losses: hidden states and an lm_head in, ``(loss, metrics)`` out, through
``linear_logprobs`` or the gradient-in-forward chunks (``_gradient_in_forward.py``), so no
``[N, V]`` logits exist in forward or backward. Each equals the unfused composition
(``linear_logprobs``, masked sums per sequence, the loss). One module per loss; what both share
(their options, the choice between the two paths) is ``_fused_loss.py``;
``FusedDistillationLoss`` compares two models' heads (``distill.py``)."""

from .distill import FusedDistillationLoss
from .dpo import FusedDPOLoss
from .policy import FusedPolicyLoss

__all__ = ["FusedDPOLoss", "FusedDistillationLoss", "FusedPolicyLoss"]
