"""Per-sequence masked sums of the PPO/GRPO per-token math (``kernels/policy.py``), the one
pass ``fastalign.losses.policy_loss`` aggregates from. A custom op with autograd on the
Triton backend; the torch backend computes the same sums with torch ops (and autograd)."""

from __future__ import annotations

import torch

from .._backend import select_backend
from .._validation import check_choice
from ._backends import policy_launchers
from ._fused_op import Options, fused_op

# Columns of the [B, 7] sums (the same order as kernels/policy.py).
LOSS, COUNT, CLIP_LOW, CLIP_HIGH, RATIO, APPROX_KL, KL = range(7)
KL_KINDS = {"k1": 1, "k2": 2, "k3": 3}


OPTIONS = Options("PolicyOptions", "float clip_low, float clip_high, float? dual_clip, "
                                   "float kl_coef, int kl_kind, bool sequence_level")
_TENSORS = "Tensor logprobs, Tensor old, Tensor advantages, Tensor mask, Tensor? ref"


@fused_op("fastalign::policy_stats", OPTIONS, tensors=_TENSORS, returns="Tensor")
def _stats_op(logprobs, old, advantages, mask, ref, o):
    return policy_launchers("triton").forward(logprobs, old, advantages, mask, ref, **o._asdict())


@_stats_op.register_fake
def _stats_fake(logprobs, *_):
    return logprobs.new_empty(logprobs.shape[0], 7)


@fused_op("fastalign::policy_stats_backward", OPTIONS, tensors=f"{_TENSORS}, Tensor weights",
          returns="Tensor")
def _grad_op(logprobs, old, advantages, mask, ref, weights, o):
    return policy_launchers("triton").backward(logprobs, old, advantages, mask, ref, weights,
                                               **o._asdict())


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


# k3 = exp(r) - r - 1 = r^2 (1/2 + r/6 + r^2/24 + ...) for |r| below this: expm1(r) - r would
# cancel (float32 error 3e-4 relative at r = 1e-4, 2 / |r| ulps in general); at |r| = 0.1 the
# next term (r^7 / 5040) is 4e-9 of the sum, and above it the cancellation costs < 20 ulps.
K3_SERIES_BELOW = 0.1


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3"):
    """Sampled-token estimators of KL(pi || pi_ref) (Schulman, "Approximating KL divergence",
    2020), with ``r = ref_logprobs - logprobs``: ``k1 = -r``, ``k2 = r^2 / 2``,
    ``k3 = exp(r) - r - 1`` (unbiased and always >= 0). Elementwise, differentiable, in the
    inputs' (promoted) dtype; bf16/fp16 inputs are computed in float32 and rounded once.
    k3 keeps float32's relative precision for small ``|r|`` (a series, not exp(r) - r - 1);
    at ``r = +inf`` (a -inf log-prob under the policy) it is inf (its limit), not inf - inf."""
    check_choice("kind", kind, tuple(KL_KINDS))
    out_dtype = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    compute = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    r = ref_logprobs.to(compute) - logprobs.to(compute)
    if kind == "k1":
        kl = -r
    elif kind == "k2":
        kl = r.square() / 2
    else:
        kl = _k3(r)
    return kl.to(out_dtype)


def _k3(r: torch.Tensor) -> torch.Tensor:
    # float64's own cancellation (2 / |r| of 1e-16) is below the series' truncation.
    small = r.abs() < (K3_SERIES_BELOW if r.dtype != torch.float64 else 0.0)
    s = torch.where(small, r, 0.0)  # each branch sees only the inputs it is exact for
    series = s * s * (0.5 + s * (1 / 6 + s * (1 / 24 + s * (1 / 120 + s / 720))))
    # r = +inf replaced by the largest finite value gives expm1 = inf minus a finite number
    # (gradient 0 there), where inf - inf would be NaN; a NaN r stays NaN, gradient included.
    largest = torch.finfo(r.dtype).max
    big = torch.where(small, 1.0, r)
    big = torch.where(big > largest, largest, big)
    return torch.where(small, series, torch.expm1(big) - big)


def _torch_stats(logprobs, old, advantages, mask, ref, clip_low, clip_high, dual_clip, kl_coef,
                 kl_estimator, sequence_level):
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
    if kl_estimator is not None:
        kl = kl_estimate(logprobs, ref, kl_estimator)
        per_token = per_token + kl_coef * kl
    with torch.no_grad():
        ratio = ratio.detach()
        metrics = [mask.sum(1),
                   (((ratio < 1 - clip_low) & (advantages < 0)) * mask).sum(1),
                   (((ratio > 1 + clip_high) & (advantages > 0)) * mask).sum(1),
                   (ratio * mask).sum(1),
                   ((logprobs - old).square() / 2 * mask).sum(1),
                   torch.zeros_like(mask[:, 0]) if kl is None else (kl * mask).sum(1)]
    return torch.stack([(per_token * mask).sum(1), *metrics], dim=1)


def policy_stats(logprobs, old, advantages, mask, ref, *, clip_low, clip_high, dual_clip,
                 kl_coef, kl_estimator, level):
    """``[B, 7]`` float32 per-sequence masked sums (columns above); differentiable w.r.t.
    ``logprobs`` through the ``LOSS`` column. ``advantages`` and ``mask`` are ``[B, T]``;
    ``ref`` is None or ``[B, T]``. Triton on CUDA (or when forced), torch ops otherwise."""
    kl_estimator = None if ref is None else kl_estimator
    sequence_level = level == "sequence"
    if select_backend(logprobs.device) != "triton":
        return _torch_stats(logprobs.float(), old.float(), advantages.float(), mask.float(),
                            None if ref is None else ref.float(), clip_low, clip_high,
                            dual_clip, kl_coef, kl_estimator, sequence_level)
    prepared = [x.float().contiguous() for x in (logprobs, old, advantages, mask)]
    options = OPTIONS.new(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                          kl_coef=kl_coef, kl_kind=KL_KINDS.get(kl_estimator, 0),
                          sequence_level=sequence_level)
    return _stats_op(*prepared, None if ref is None else ref.float().contiguous(), options)
