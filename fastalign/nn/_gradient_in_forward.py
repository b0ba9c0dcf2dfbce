"""The gradient-in-forward mode of the fused losses (``fastalign.nn``): whether it runs (one
decision per call, with the backend of all its passes), which rows go together in a chunk, and
each chunk's coefficients (``dLoss/dlogp`` of its rows) taken by autograd from the loss function
itself (``ops/linear_loss.py`` does the pass).

A chunk's coefficients come from the same ``policy_loss`` / ``dpo_loss`` the two-pass path
calls, on a full-size log-prob tensor whose other rows are constants: exact whenever the loss
is a sum of independent terms of the chunk's rows and of the others' — tokens for token-level
PPO/GRPO, whole sequences for GSPO's sequence ratios, chosen-rejected pairs for a DPO-family
loss whose ``losses.dpo.LOSSES`` entry is ``pair_separable`` (a mean of per-pair terms: every one
today). Chunks are grouped accordingly; a group too large for one chunk falls back to the
two-pass path, said in a debug log.
"""

from __future__ import annotations

import logging

import torch

from .. import _validation as checks
from .._backend import select_backend
from ..ops import _sampler
from ..ops.linear_loss import Plan, chunked_logprobs, linear_loss, rows_per_chunk, split_rows

logger = logging.getLogger("fastalign")


def backend_for(enabled: bool, hidden, weight, bias, *constants) -> str | None:
    """The one decision of a fused loss's call: the backend its gradient-in-forward passes run
    on (the policy's chunks, a reference's, and the two-pass fallback of a group too large for a
    chunk: one backend for all), or None where the two-pass path runs (``linear_logprobs``
    then selects its own). ``enabled``: the module's ``gradient_in_forward`` and any condition
    of its own; ``constants``: the loss's other inputs, which must not want a gradient."""
    if not (enabled and _applies(hidden, weight, bias, *constants)):
        return None
    return select_backend(hidden.device)


def _applies(hidden, weight, bias, *constants) -> bool:
    """Whether the one-pass mode can run here: gradients wanted w.r.t. the head's inputs only
    (none through the advantages, old or reference log-probs), plain tensors (a DTensor or a
    ZeRO-3 head goes through ``linear_logprobs``' gathering), and not while ``torch.compile``
    traces (the two-pass path is a custom op it captures whole)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False  # linear_logprobs names what is wrong
    if not any(t.requires_grad for t in tensors):
        return False  # forward only: the two-pass forward is the same work without a chunk
    if any(c is not None and c.requires_grad for c in constants):
        return False
    return plain_tensors(*tensors)


def plain_tensors(*tensors) -> bool:
    """Whether every tensor given (None aside) is a plain tensor or parameter: not a DTensor
    or a ZeRO-3 parameter, which the two-pass ops gather first."""
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter)
               and not hasattr(t, "ds_id") for t in tensors)


def _packed(groups: list[torch.Tensor], limit: int) -> list[torch.Tensor] | None:
    """Consecutive groups of row indices packed into chunks of at most ``limit`` rows; None
    when one group alone is larger."""
    chunks, current, size = [], [], 0
    for group in groups:
        if group.numel() > limit:
            return None
        if size + group.numel() > limit and current:
            chunks.append(torch.cat(current))
            current, size = [], 0
        current.append(group)
        size += group.numel()
    if current:
        chunks.append(torch.cat(current))
    return [chunk for chunk in chunks if chunk.numel()]


def _sequence_rows(mask: torch.Tensor) -> list[torch.Tensor]:
    """Flat indices of each row's kept positions of a ``[R, T]`` mask."""
    flat = mask.reshape(-1).nonzero().squeeze(1)
    return list(flat.split(mask.sum(-1).tolist()))


def _with_grad(index: torch.Tensor, logprobs: torch.Tensor, entropy: torch.Tensor | None,
               shape, loss_of):
    """``(dLoss/dlogprobs, dLoss/dentropy or None)`` of the chunk rows ``index``:
    ``loss_of(per_token [shape])`` (with ``entropy``: ``loss_of(per_token, entropy)``) on
    tensors that are the chunk's values there and 0 elsewhere."""
    with torch.enable_grad():
        lives = [t.detach().float().requires_grad_() for t in (logprobs, entropy)
                 if t is not None]
        fulls = [torch.zeros(shape.numel(), dtype=live.dtype, device=live.device)
                 .index_copy(0, index, live).view(shape) for live in lives]
        grads = torch.autograd.grad(loss_of(*fulls), lives, allow_unused=True)
    grads = [torch.zeros_like(live) if g is None else g for g, live in zip(grads, lives)]
    return grads[0], (grads[1] if entropy is not None else None)


def _checked(hidden, weight, bias, targets, ignore_index) -> None:
    """``linear_logprobs``' checks at the public boundary (the kernels below trust them)."""
    checks.check_lm_head(hidden, weight, bias)
    checks.check_targets(targets, hidden.shape[:-1], weight.shape[0], hidden.device,
                         ignore_index, source="hidden")


def one_pass(hidden, weight, bias, targets, *, groups, loss_of, chunk_mb, temperature,
             softcap, need_entropy, backend, what, ignore_index, entropy_grad=False,
             top_k=None, min_p=None):
    """``(anchor, per-token logprobs [targets.shape], entropy or None)`` from the one-pass
    chunks of ``groups`` (flat row indices that must share a chunk; a single tensor: rows that
    may be split anywhere), or None (fall back) when a group does not fit ``chunk_mb``.
    ``loss_of(per_token)`` is the whole loss from per-token log-probs; with ``entropy_grad``,
    ``loss_of(per_token, entropy)`` from the log-probs and the entropies, differentiated
    w.r.t. both (an entropy bonus). ``top_k`` / ``min_p``: over the sampler's support, as
    ``linear_logprobs`` (checked by the caller)."""
    _checked(hidden, weight, bias, targets, ignore_index)
    limit = rows_per_chunk(chunk_mb, weight.shape[0])
    chunks = split_rows(groups, limit) if torch.is_tensor(groups) else _packed(groups, limit)
    if chunks is None:
        logger.debug("%s: a group of rows exceeds the %s MiB chunk (%d rows of V=%d); using "
                     "the two-pass path", what, chunk_mb, limit, weight.shape[0])
        return None
    shape = targets.shape
    plan = Plan(targets=targets.reshape(-1), chunks=chunks,
                coefficients=lambda index, logprobs, entropy: _with_grad(
                    index, logprobs, entropy if entropy_grad else None, shape, loss_of),
                inv_temperature=1.0 / float(temperature),
                softcap=None if softcap is None else float(softcap),
                need_entropy=need_entropy or entropy_grad, backend=backend,
                top_k=_sampler.effective_top_k(top_k, weight.shape[0]),
                log_min_p=_sampler.log_min_p(min_p))
    anchor, logprobs, entropy = linear_loss(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                            plan)
    return (anchor, logprobs.view(shape),
            None if entropy is None else entropy.view(shape))


def reference_logprobs(hidden, weight, bias, targets, *, ignore_index, chunk_mb, temperature,
                       softcap, backend) -> torch.Tensor:
    """A reference model's per-token log-probs ``[targets.shape]`` (0 at ignored targets),
    without gradient, in chunks of ``chunk_mb``."""
    _checked(hidden, weight, bias, targets, ignore_index)
    kept = (targets != ignore_index).reshape(-1).nonzero().squeeze(1)
    plan = Plan(targets=targets.reshape(-1), coefficients=None,
                chunks=split_rows(kept, rows_per_chunk(chunk_mb, weight.shape[0])),
                inv_temperature=1.0 / float(temperature),
                softcap=None if softcap is None else float(softcap), need_entropy=False,
                backend=backend)
    return chunked_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                            plan).view(targets.shape)


def token_groups(mask: torch.Tensor, sequence_level: bool):
    """Row groups of a policy loss: every kept token on its own (one tensor: split anywhere),
    or each sequence whole (GSPO)."""
    if sequence_level:
        return _sequence_rows(mask)
    return mask.reshape(-1).nonzero().squeeze(1)


def pair_groups(mask: torch.Tensor) -> list[torch.Tensor]:
    """Row groups of a DPO-family loss: pair ``i`` is rows ``i`` and ``B + i`` of ``[2B, T]``."""
    rows = _sequence_rows(mask)
    half = len(rows) // 2
    return [torch.cat([rows[i], rows[half + i]]) for i in range(half)]
