"""Per-sequence masked sums of the PPO/GRPO per-token math, the one pass
``fastalign.losses.policy_loss`` aggregates from. The backend ``select_backend`` picks gives the
launchers (``ops/_backends.py``, family ``policy``): a row with a ``backward`` launcher (Triton)
runs in a custom op whose autograd calls it; a row without one (torch, and native, which has no
policy kernel) is differentiable torch ops and is called as it is."""

from __future__ import annotations

import torch

from .._backend import select_backend
from ..kernels.policy_interface import KL_KINDS, KL_NONE, LOSS, STATS
from ._backends import policy_launchers
from ._fused_op import Options, fused_op

OPTIONS = Options("PolicyOptions", "float clip_low, float clip_high, float? dual_clip, "
                                   "float kl_coef, int kl_kind, bool sequence_level, str backend")
_TENSORS = "Tensor logprobs, Tensor old, Tensor advantages, Tensor mask, Tensor? ref"


def _launcher_options(o) -> dict:
    """The options as the launchers take them: all but the backend that picked them."""
    return {name: value for name, value in o._asdict().items() if name != "backend"}


@fused_op("fastalign::policy_stats", OPTIONS, tensors=_TENSORS, returns="Tensor")
def _stats_op(logprobs, old, advantages, mask, ref, o):
    return policy_launchers(o.backend).forward(logprobs, old, advantages, mask, ref,
                                               **_launcher_options(o))


@_stats_op.register_fake
def _stats_fake(logprobs, *_):
    return logprobs.new_empty(logprobs.shape[0], STATS)


@fused_op("fastalign::policy_stats_backward", OPTIONS, tensors=f"{_TENSORS}, Tensor weights",
          returns="Tensor")
def _grad_op(logprobs, old, advantages, mask, ref, weights, o):
    return policy_launchers(o.backend).backward(logprobs, old, advantages, mask, ref, weights,
                                                **_launcher_options(o))


@_grad_op.register_fake
def _grad_fake(logprobs, *_):
    return torch.empty_like(logprobs)


def _setup(ctx, tensors, o, output):
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad_stats):
    logprobs, old, advantages, mask, ref = ctx.saved_tensors
    # Only the loss column is differentiable; the other columns are metrics (counts, sums).
    weights = grad_stats[:, LOSS].float().contiguous()
    grad = _grad_op(logprobs, old, advantages, mask, ref, weights, ctx.options)
    return grad, None, None, None, None


_stats_op.register_autograd(_setup, _backward)


def policy_stats(logprobs, old, advantages, mask, ref, *, clip_low, clip_high, dual_clip,
                 kl_coef, kl_estimator, level):
    """``[B, STATS]`` float32 per-sequence masked sums (columns:
    ``kernels/policy_interface.py``); differentiable w.r.t. ``logprobs`` through the ``LOSS``
    column (on the torch and native backends w.r.t. ``advantages`` and ``ref`` too).
    ``advantages`` and ``mask`` are ``[B, T]``; ``ref`` is None or ``[B, T]``."""
    options = OPTIONS.new(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                          kl_coef=kl_coef,
                          kl_kind=KL_NONE if ref is None else KL_KINDS[kl_estimator],
                          sequence_level=level == "sequence",
                          backend=select_backend(logprobs.device))
    launchers = policy_launchers(options.backend)
    if launchers.backward is None:
        return launchers.forward(logprobs.float(), old.float(), advantages.float(), mask.float(),
                                 None if ref is None else ref.float(),
                                 **_launcher_options(options))
    prepared = [x.float().contiguous() for x in (logprobs, old, advantages, mask)]
    return _stats_op(*prepared, None if ref is None else ref.float().contiguous(), options)
