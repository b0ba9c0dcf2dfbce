"""Sampler-aware log-probs (``top_k``, ``min_p`` of ``token_logprobs`` / ``linear_logprobs``):
each row's log-probs renormalized over the support a sampler with Hugging Face's warpers kept,
applied in ``generate``'s order (temperature, then ``TopKLogitsWarper``, then
``MinPLogitsWarper``):

    top-k:  keep z'_j >= (the k-th largest z')   (ties with the k-th value are kept)
    min-p:  keep p_j >= min_p * max p, i.e. z'_j - max z' >= log(min_p)
    log p   = z'_t - logsumexp_{j kept} z'_j,   -inf for a target outside the support

Both tests are taken where the kernels already work, so every pass decides a column alike:
top-k on the raw logit ``z`` (``softcap`` and ``1 / T`` are increasing, so the k-th largest
``z'`` is the ``z'`` of the k-th largest ``z``; a tie stays a tie), against ``kth``, the k-th
largest ``z`` of the row (:func:`token_thresholds`, :func:`linear_thresholds`); min-p on
``(key - M) / T >= log(min_p)`` with ``M`` the row's max key, the same difference the softmax
sums take. The max token passes both (k >= 1, min_p <= 1), so the kept set's max is ``M`` and
top-k before min-p is the same as both at once.

Three passes over the vocabulary: the k-th value (``top_k`` only), the row max ``M`` (the
backends' usual forward), then the backends' forward again with a :class:`Support`: the sums of
the kept columns relative to ``M`` (removed columns count as -inf logits). The backward's
gradient is the usual one with ``p = 0`` on removed columns (``onehot - p_renorm`` on kept ones):
the support is piecewise constant in the logits, so it adds no term. A target outside the
support has log-prob -inf and no gradient from it (its upstream gradient is dropped in the
op's backward: a constant -inf has derivative 0, and ``-inf * 0`` never forms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _validation as checks
from .._layout import iter_row_chunks

# Elements of the float32 candidates kept per row chunk while finding the k-th value of token
# logits (torch.topk's own output is [rows, k] values and int64 indices).
TOPK_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Support:
    """What a backend launcher needs to sum (forward) or differentiate (backward) over the
    sampler's support of each row: ``row_max`` the max key ``M`` (float32 ``[N]``, from the
    first pass; the backward reads it from its statistics), ``kth`` the k-th largest raw logit
    (float32 ``[N]``) or None without ``top_k``, ``log_min_p`` or None without ``min_p``."""
    row_max: torch.Tensor | None
    kth: torch.Tensor | None
    log_min_p: float | None


def log_min_p(min_p: float | None) -> float | None:
    return None if min_p is None else math.log(min_p)


def effective_top_k(top_k: int | None, vocab_size: int) -> int:
    """``top_k`` as the ops' options hold it: 0 where it keeps every token (None, or k >= V:
    HF's warper clamps k to V, whose k-th value is the row's minimum)."""
    return 0 if top_k is None or top_k >= vocab_size else int(top_k)


def check_options(*, top_k, min_p, top_p, temperature, topk_targets: bool,
                  row_stats: bool = False, sharded: bool = False) -> bool:
    """Checks the sampler options and refuses the combinations no backend supports, naming
    the arguments; True when the call filters (``top_k`` or ``min_p`` given)."""
    checks.check_sampler(top_k, min_p, top_p)
    filtering = top_k is not None or min_p is not None
    per_row = isinstance(temperature, torch.Tensor)
    for name, used in (("top_k/min_p", filtering), ("a per-row temperature tensor", per_row)):
        if not used:
            continue
        if topk_targets:
            raise ValueError(f"{name} is not supported with topk_targets (K ids per row); pass "
                             "one target per row in targets")
        if row_stats:
            raise ValueError(f"{name} is not supported with return_row_stats=True; leave it "
                             "False")
        if sharded:
            raise ValueError(f"{name} is not supported on a sharded head (process_group, "
                             "DTensor or ZeRO-3 weight): the support's k-th value would need "
                             "every rank's vocabulary; gather the head or drop the option")
    return filtering


def inverse_temperatures(temperature) -> torch.Tensor | None:
    """A per-row temperature tensor as the kernels take it: ``1 / T`` flattened to float32
    ``[N]``, divided in float64 so that a row whose T equals a float temperature gets the same
    float32 ``1 / T`` that float gets. None for a number. Temperatures are constants: no
    gradient reaches them."""
    if not isinstance(temperature, torch.Tensor):
        return None
    return (1.0 / temperature.detach().double()).float().reshape(-1).contiguous()


def row_slice(values, rows: slice):
    """``values[rows]`` of a per-row tensor; a number (one value for all rows) as it is."""
    return values[rows] if isinstance(values, torch.Tensor) else values


def kept_columns(z: torch.Tensor, shifted: torch.Tensor | None, kth: torch.Tensor | None,
                 log_min_p: float | None) -> torch.Tensor:
    """Bool ``[r, c]``: the columns of a block in its rows' support. ``z`` the raw logits (any
    float dtype), ``shifted`` ``(key - M) / T`` (float32; needed with ``log_min_p``), ``kth``
    the rows' k-th largest raw logits ``[r]`` or None."""
    kept = None
    if kth is not None:
        kept = z >= kth[:, None]
    if log_min_p is not None:
        above = shifted >= log_min_p
        kept = above if kept is None else kept.logical_and_(above)
    return kept


def token_thresholds(logits: torch.Tensor, layout, k: int) -> torch.Tensor:
    """The k-th largest raw logit of each row of ``[..., V]`` logits (``layout``: a
    ``RowLayout``), float32 ``[N]``, a chunk of rows at a time (``torch.topk``'s values and
    indices: ``[rows, k]``, never ``[N, V]``)."""
    rows_per_chunk = max(1, TOPK_CHUNK_ELEMENTS // max(k, 1))
    out = torch.empty(layout.n_rows, dtype=torch.float32, device=logits.device)
    for start, chunk in iter_row_chunks(logits, layout, rows_per_chunk):
        values = torch.topk(chunk, k, dim=1, sorted=False).values
        out[start:start + chunk.shape[0]] = values.amin(dim=1).float()
    return out


def linear_thresholds(logits_tile, n_rows: int, vocab_size: int, k: int, cols: int,
                      like: torch.Tensor) -> torch.Tensor:
    """The k-th largest logit of each row of ``hidden @ weight.T + bias``, float32 ``[N]``,
    from ``logits_tile(start, end) -> [N, end - start]`` float32 slices of the vocabulary,
    formed by the backend exactly as its other passes form them (a column's membership must not
    change between passes). A running ``[N, k]`` of the largest values meets each slice's own
    top k: extra memory one slice and ``[N, 2k]`` floats."""
    best = None
    for start in range(0, vocab_size, cols):
        tile = logits_tile(start, min(start + cols, vocab_size))
        if tile.shape[1] > k:
            tile = torch.topk(tile, k, dim=1, sorted=False).values
        best = tile if best is None else torch.cat([best, tile], dim=1)
        if best.shape[1] > k:
            best = torch.topk(best, k, dim=1, sorted=False).values
    if best is None:
        return like.new_empty(n_rows, dtype=torch.float32)
    return best.amin(dim=1).contiguous()


def native_support(support: Support | None) -> dict:
    """The sampler's keyword arguments of the C++ ``softmax_stats`` (csrc/kernels.h)."""
    if support is None:
        return {}
    return dict(support_max=support.row_max, kth=support.kth, log_min_p=support.log_min_p)


def native_grad_support(support: Support | None) -> dict:
    """The sampler's keyword arguments of the C++ ``logprobs_grad`` (its max: the stats')."""
    if support is None:
        return {}
    return dict(support=True, kth=support.kth, log_min_p=support.log_min_p)
