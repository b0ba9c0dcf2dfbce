"""The torch row of the policy family (``ops/_backends.py``), and the native row's: the per-token
PPO/GRPO math (ratio, clip, dual clip, KL penalty) in torch ops, the one torch home of it
(``kernels/policy.py`` is the Triton one).

Plain torch ops, not a custom op with a hand-written backward: autograd differentiates the loss
column through every input it depends on (``logprobs``, ``old``, ``advantages`` and ``ref``),
which the Triton row's backward (w.r.t. ``logprobs`` only) does not; so this row's record has no
``backward`` launcher.
"""

from __future__ import annotations

import torch

from ..kernels.policy_interface import (APPROX_KL, CLIP_HIGH, CLIP_LOW, COUNT, KL, KL_KINDS,
                                        KL_NONE, LOSS, RATIO, STATS)
from .kl_estimators import kl_estimate

_KL_NAMES = {code: name for name, code in KL_KINDS.items()}  # the launchers take codes


def policy_stats(logprobs, old, advantages, mask, ref, *, clip_low, clip_high, dual_clip,
                 kl_coef, kl_kind, sequence_level):
    """``[B, STATS]`` masked sums per sequence (columns: ``kernels/policy_interface.py``) of
    ``[B, T]`` float32 inputs (``ref`` None when ``kl_kind`` is ``KL_NONE``); differentiable
    through the ``LOSS`` column, the others are metrics computed without gradient."""
    log_ratio = logprobs - old
    if sequence_level:  # GSPO: one ratio per sequence, exp of its masked mean log-ratio
        mean = (log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        log_ratio = mean[:, None].expand_as(logprobs)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(ratio * advantages, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0,
                                torch.minimum(per_token, -dual_clip * advantages), per_token)
    kl = None
    if kl_kind != KL_NONE:
        kl = kl_estimate(logprobs, ref, _KL_NAMES[kl_kind])
        per_token = per_token + kl_coef * kl
    columns = [None] * STATS
    columns[LOSS] = (per_token * mask).sum(1)
    with torch.no_grad():
        ratio = ratio.detach()
        columns[COUNT] = mask.sum(1)
        columns[CLIP_LOW] = (((ratio < 1 - clip_low) & (advantages < 0)) * mask).sum(1)
        columns[CLIP_HIGH] = (((ratio > 1 + clip_high) & (advantages > 0)) * mask).sum(1)
        columns[RATIO] = (ratio * mask).sum(1)
        columns[APPROX_KL] = ((logprobs - old).square() / 2 * mask).sum(1)
        columns[KL] = torch.zeros_like(mask[:, 0]) if kl is None else (kl * mask).sum(1)
    return torch.stack(columns, dim=1)
