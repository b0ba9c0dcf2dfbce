"""Plain torch references: the definitions every kernel is tested against.

Each materializes the full ``[..., V]`` log-softmax in ``compute_dtype``. Tests call them in
float64 as ground truth; benchmarks call them in float32 as "torch eager", the code a user writes
before reaching for fastalign.
"""

from __future__ import annotations

import torch


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor, *,
                             temperature: float = 1.0, softcap: float | None = None,
                             ignore_index: int = -100, return_entropy: bool = False,
                             compute_dtype: torch.dtype = torch.float64):
    """``log_softmax(softcap(z) / temperature).gather(target)`` (and entropy), differentiable."""
    z = logits.to(compute_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0).long()
    logprobs = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if not return_entropy:
        return logprobs
    # entr(p) = -p log p with entr(0) = 0, so -inf logits (masked vocabulary) stay finite.
    entropy = torch.special.entr(log_p.exp()).sum(-1).masked_fill(ignored, 0.0)
    return logprobs, entropy
