"""K target ids per row (``topk_targets``): their log-probs from one pass over the vocabulary,
and their gradient, on every backend, through the backends' one-target launchers.

Forward. Every backend's forward yields each row's softmax statistics, the max key ``M`` and the
log-sum ``log S`` (``_vocab_stats``), whichever target it is given. It runs with a stand-in
target per row, the row's first kept id (``ignore_index`` where all K are ignored, so that the
row is skipped like a plain ignored row), and the K ids need only their keys:
``log p_k = (key_k - M) / T - log S``. The keys are read apart from the vocabulary pass: gathered
from the logits (``token_logprobs``), or one small ``[N, K, D]`` product of the hidden states
with the K weight rows (``linear_logprobs``). No ``[N, V]`` tensor is formed beyond the
backends' own.

Backward. ``d(sum_k g_k log p_k) / dz' = sum_k g_k onehot(id_k) - (sum_k g_k) softmax(z')``. The
backend's one-target backward, given ``G = sum_k g_k`` and the stand-in target, writes every
column right except the K target columns (the stand-in's got ``G`` as its one-hot term). Those
few are then overwritten with their exact values, formed in float32 from the gathered logits by
the shared gradient (``_tiles.logits_grad_``: softmax, entropy and one-hot terms, a token listed
twice getting both) and rounded once, as every kernel forms its own target column. Adding the
one-hot terms to the rounded column instead would cancel in bf16 wherever p is near 1
(``-G p + G``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._layout import RowLayout, row_view
from ._tiles import logits_grad_, softcap_keys

# Elements of one float32 [rows, K, D] chunk of the gathered weight rows (16 MiB).
GATHER_ELEMENTS = 1 << 22


def stand_in_targets(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[N]``: each row's first id that is not ``ignore_index``, or ``ignore_index`` where the
    row has none (the backends then skip it)."""
    kept = targets != ignore_index
    first = kept.to(torch.uint8).argmax(1, keepdim=True)  # the first of equal maxima
    return torch.where(kept.any(1), targets.gather(1, first).squeeze(1), ignore_index)


def _target_log_probs(keys, stats, kept, inv_temperature: float) -> torch.Tensor:
    """``[N, K]`` log-probs of the keys under each row's ``(M, log S)``, 0 at ignored entries.
    At most 0: a key formed apart from the pass that found the max may exceed it by a rounding."""
    log_p = (keys - stats[:, :1]) * inv_temperature - stats[:, 1:]
    return torch.where(kept, log_p.clamp(max=0.0), 0.0)


def equal_id_sums(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For each entry of ``[N, K]`` ``values``, their sum over the entries of its row with the
    same id (a token listed twice gets both one-hot terms at its column); one sort per row."""
    sorted_ids, order = ids.sort(dim=1)
    run_starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    run_starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run = run_starts.long().cumsum(1) - 1
    totals = torch.zeros_like(values).scatter_add_(1, run, values.gather(1, order))
    return torch.empty_like(values).scatter_(1, order, totals.gather(1, run))


@dataclass(frozen=True)
class TargetColumns:
    """What a one-target backward launcher takes instead of K targets per row, and the exact
    gradient at the K columns it then gets wrong. Without a gradient of the log-probs (the
    entropy's alone) the launcher gets every column right: all but ``stand_in`` are None."""
    stand_in: torch.Tensor             # [N] the launcher's target per row
    grad_sum: torch.Tensor | None      # [N] float32, G: the launcher's incoming gradient
    cols: torch.Tensor | None = None   # [N, K] int64, each entry's column among the launcher's
    values: torch.Tensor | None = None     # [N, K] float32, the exact gradient there
    writable: torch.Tensor | None = None   # [N, K] bool: kept entries the launcher writes


def _columns(z, ids, cols, kept, writable, stats, entropy, grad, grad_entropy, stand_in, *,
             inv_temperature, softcap) -> TargetColumns:
    """``z [N, K]``: the raw logits at ``cols``, float32; ``ids``: the entries' token ids (equal
    ids, equal columns); ``grad [N, K]`` the incoming gradients of the K log-probs."""
    grad = torch.where(kept, grad, 0.0)
    grad_sum = grad.sum(1)
    positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
    values = logits_grad_(z, stats, entropy, grad_sum, grad_entropy, positions,
                          equal_id_sums(ids, grad), inv_temperature=inv_temperature,
                          softcap=softcap, cap_log_p=True)
    return TargetColumns(stand_in, grad_sum, cols, values, writable)


def write_columns_(out: torch.Tensor, cols, values, writable) -> None:
    """``out[..., cols[..., k]] = values[..., k]`` wherever ``writable``, in ``out``'s dtype,
    with no host sync. A scatter writes every entry, so one that is not writable repeats what a
    writable entry of its row writes (same column, same value), or, in a row without any,
    writes back the value at column 0. Duplicate columns thus always get one value."""
    values = values.to(out.dtype)
    first = writable.to(torch.uint8).argmax(-1, keepdim=True)
    has_any = writable.any(-1, keepdim=True)
    spare_col = torch.where(has_any, cols.gather(-1, first), 0)
    spare_value = torch.where(has_any, values.gather(-1, first), out[..., :1])
    out.scatter_(-1, torch.where(writable, cols, spare_col),
                 torch.where(writable, values, spare_value))


# ---------------------------------------------------------------------------- token_logprobs

def _token_logits(rows: torch.Tensor, layout: RowLayout, targets: torch.Tensor,
                  ignore_index: int):
    """``(kept, valid, safe ids, z)`` of ``[N, K]`` targets: z the raw logits at the ids
    (float32), read where the rows lie; ids outside ``[0, V)`` read column 0 instead."""
    kept = targets != ignore_index
    valid = (targets >= 0) & (targets < rows.shape[-1])
    safe = torch.where(valid, targets, 0).long()
    z = row_view(rows, layout).gather(-1, safe.view(layout.n_outer, layout.n_inner, -1))
    return kept, valid, safe, z.reshape(targets.shape).float()


def token_forward(rows, layout, targets, stats, *, ignore_index: int, inv_temperature: float,
                  softcap):
    """``(logprobs [N, K], stats [N, 2])`` from the backend's statistics of the rows; a row
    with an id outside ``[0, V)`` (CUDA without the range check) is NaN in both."""
    kept, valid, _, z = _token_logits(rows, layout, targets, ignore_index)
    stats = stats.masked_fill((kept & ~valid).any(1, keepdim=True), float("nan"))
    return _target_log_probs(softcap_keys(z, softcap), stats, kept, inv_temperature), stats


def token_columns(rows, layout, targets, stats, entropy, grad_logprobs, grad_entropy, *,
                  ignore_index: int, inv_temperature: float, softcap) -> TargetColumns:
    """The backward's :class:`TargetColumns`, read before the gradient may overwrite the
    logits (``inplace_backward``)."""
    stand_in = stand_in_targets(targets, ignore_index)
    if grad_logprobs is None:
        return TargetColumns(stand_in, None)
    kept, valid, safe, z = _token_logits(rows, layout, targets, ignore_index)
    return _columns(z, targets, safe, kept, kept & valid, stats, entropy, grad_logprobs,
                    grad_entropy, stand_in, inv_temperature=inv_temperature, softcap=softcap)


def write_token_columns_(grad: torch.Tensor, layout: RowLayout, columns: TargetColumns) -> None:
    """Overwrites the K target columns of the ``[..., V]`` gradient laid out as ``layout``."""
    if columns.values is None:
        return
    shape = (layout.n_outer, layout.n_inner, -1)
    write_columns_(row_view(grad, layout), columns.cols.view(shape),
                   columns.values.view(shape), columns.writable.view(shape))


# --------------------------------------------------------------------------- linear_logprobs

def target_logits(hidden, weight, bias, ids, *, rounded: bool) -> torch.Tensor:
    """``hidden[n] . weight[ids[n, k]] + bias[ids[n, k]]`` as float32 ``[n, K]``: the logits of
    a few columns per row, a product with the gathered weight rows, summed elementwise in
    float32 (a batched matmul could run in TF32) a chunk of rows at a time.

    The weight rows are cast to ``hidden``'s dtype first, as every backend's tiles cast them.
    ``rounded``: rounded to ``hidden``'s dtype (the bias cast to it before it is added), as the
    torch matmuls of the torch and native tiles round them; Triton's dots keep float32.
    """
    n_rows, k = ids.shape
    out = torch.empty(n_rows, k, dtype=torch.float32, device=hidden.device)
    step = max(1, GATHER_ELEMENTS // max(k * hidden.shape[1], 1))
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        products = weight[ids[rows]].to(hidden.dtype).float()  # [rows, K, D], a fresh copy
        z = products.mul_(hidden[rows, None, :].float()).sum(-1)
        if bias is not None:
            z += bias[ids[rows]].to(hidden.dtype if rounded else torch.float32).float()
        out[rows] = z.to(hidden.dtype) if rounded else z
    return out


def _linear_logits(hidden, weight, bias, targets, *, ignore_index, vocab_offset, rounded):
    """``(kept, in_shard, local ids, z)`` of ``[n, K]`` global ``targets`` against this rank's
    ``weight`` rows (the whole head without sharding); z is read at in-shard ids only."""
    kept = targets != ignore_index
    local = targets - vocab_offset
    in_shard = (local >= 0) & (local < weight.shape[0])
    safe = torch.where(in_shard, local, 0).long()
    return kept, in_shard, safe, target_logits(hidden, weight, bias, safe, rounded=rounded)


def linear_forward(hidden, weight, bias, targets, stats, *, ignore_index, vocab_offset,
                   inv_temperature, softcap, rounded, group=None) -> torch.Tensor:
    """``logprobs [n, K]`` of the kept rows from their merged statistics; with a vocabulary-
    sharded head each key comes from the rank holding its row (one all-reduce of ``[n, K]``)."""
    kept, in_shard, _, z = _linear_logits(hidden, weight, bias, targets, ignore_index=ignore_index,
                                          vocab_offset=vocab_offset, rounded=rounded)
    keys = torch.where(in_shard, softcap_keys(z, softcap), 0.0)
    if group is not None:
        import torch.distributed as dist
        dist.all_reduce(keys, group=group)
    return _target_log_probs(keys, stats, kept, inv_temperature)


def linear_columns(hidden, weight, bias, targets, stats, entropy, grad_logprobs, grad_entropy, *,
                   ignore_index, vocab_offset, inv_temperature, softcap,
                   rounded) -> TargetColumns:
    """The backward's :class:`TargetColumns` for the kept rows; columns are ids of this rank's
    weight rows, and only its own are written."""
    stand_in = stand_in_targets(targets, ignore_index) - vocab_offset
    if grad_logprobs is None:
        return TargetColumns(stand_in, None)
    kept, in_shard, local, z = _linear_logits(hidden, weight, bias, targets,
                                              ignore_index=ignore_index,
                                              vocab_offset=vocab_offset, rounded=rounded)
    return _columns(z, targets, local, kept, kept & in_shard, stats, entropy, grad_logprobs,
                    grad_entropy, stand_in, inv_temperature=inv_temperature, softcap=softcap)


def write_slice_columns_(tile: torch.Tensor, start: int, end: int,
                         columns: TargetColumns) -> None:
    """Overwrites the target columns in ``[start, end)`` of a ``[n, end - start]`` gradient
    tile (``_linear_backward``'s slices)."""
    if columns.values is None:
        return
    in_tile = columns.writable & (columns.cols >= start) & (columns.cols < end)
    write_columns_(tile, columns.cols - start, columns.values, in_tile)
