"""``fastalign.linear_logprobs``: per-token log-probs (and entropy) of ``hidden @ weight.T``
without the ``[N, V]`` logits, in forward or backward.

Two ``torch.library`` custom ops (forward, backward) carry the work, so ``torch.compile`` treats
the whole thing as one opaque node with a fake (shape-only) implementation and no graph break.
Inside them: rows whose target is ``ignore_index`` are compacted out, the backend computes per
vocabulary-slice softmax statistics, ``_vocab_stats`` merges them (across ranks too, for a head
sharded by vocabulary), and the backward runs ``_linear_backward`` on the backend's
logits-gradient tiles.
"""

from __future__ import annotations

import torch

from .. import _validation as checks
from .._backend import select_backend
from . import _linear_backward, _sampler, _sharded_head, _topk_targets, _vocab_stats
from ._compact import (fake_saved_rows, kept_rows, rows_to_save, saved_rows, scatter_rows,
                       select_rows)
from ._backends import linear_logprobs_launchers
from ._fused_op import Options, fused_op


# top_k: 0 keeps every token (None, or k >= V); min_p: None keeps every token (ops/_sampler.py).
OPTIONS = Options("LinearLogprobsOptions",
                  "float inv_temperature, float? softcap, int ignore_index, bool return_entropy, "
                  "bool return_row_stats, int vocab_offset, int vocab_total, str group_name, "
                  "int top_k, float? min_p, str backend")
# The backward also learns which gradients autograd wants.
GRAD_OPTIONS = OPTIONS.extended("LinearLogprobsGradOptions",
                                "bool need_hidden, bool need_weight, bool need_bias")


def _filtering(o) -> bool:
    return o.top_k > 0 or o.min_p is not None


def _inv_temperature(inv_temperatures, o):
    """What the launchers take: the (kept rows') per-row tensor, or the one float."""
    return o.inv_temperature if inv_temperatures is None else inv_temperatures


@fused_op("fastalign::linear_logprobs_forward", OPTIONS,
          tensors="Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
                  "Tensor? inv_temperatures",
          returns="(Tensor, Tensor, Tensor, Tensor, Tensor)")
def _forward_op(hidden, weight, bias, targets, inv_temperatures, o):
    """``(logprobs [N] or [N, K], entropy [N] or [0], softmax_stats [N, 2] or [N, 3], rows [R],
    row_stats [N, 3] or [0])`` for ``hidden [N, D]``, ``targets [N]`` or ``[N, K]``
    (``topk_targets``: ops/_topk_targets.py), ``inv_temperatures`` None or float32 ``[N]``;
    ``softmax_stats`` (max and log-sum of each row, with ``top_k`` its k-th largest logit:
    ops/_sampler.py) and the kept rows' indices (``_compact.rows_to_save``) are what backward
    needs."""
    n_rows, topk = targets.shape[0], targets.dim() == 2
    kept = targets != o.ignore_index
    rows = kept_rows(kept.any(1) if topk else kept)
    kept_targets, hidden_kept = select_rows(targets, rows), select_rows(hidden, rows)
    inv_temperature = _inv_temperature(select_rows(inv_temperatures, rows), o)
    launchers = linear_logprobs_launchers(o.backend, hidden.device, hidden_kept.shape[0])
    row_targets = (_topk_targets.stand_in_targets(kept_targets, o.ignore_index) if topk
                   else kept_targets)
    options = dict(inv_temperature=inv_temperature, softcap=o.softcap,
                   return_row_stats=o.return_row_stats)
    support = None
    if _filtering(o):
        support = _sampled_support(launchers, hidden_kept, weight, bias, row_targets, options, o)
        options["support"] = support
    partials = launchers.forward(hidden_kept, weight, bias, row_targets - o.vocab_offset,
                                 return_entropy=o.return_entropy, **options)
    group = _vocab_stats.resolve_group(o.group_name)
    stats, entropy, logprobs, row_stats = _vocab_stats.merge_vocab_partials(
        *partials, process_group=group, inv_temperature=inv_temperature,
        vocab_total=o.vocab_total)
    if support is not None and support.kth is not None:
        stats = torch.cat([stats, support.kth[:, None]], dim=1)
    # An id outside [0, V) (possible only on CUDA without FASTALIGN_CHECK_TARGETS=1) is never
    # read: its row is NaN in every output and gradient.
    invalid = (kept_targets < 0) | (kept_targets >= o.vocab_total)
    if topk:
        invalid = (invalid & (kept_targets != o.ignore_index)).any(1)
    stats = stats.masked_fill(invalid[:, None], float("nan"))
    if topk:
        logprobs = _topk_targets.linear_forward(
            hidden_kept, weight, bias, kept_targets, stats, ignore_index=o.ignore_index,
            vocab_offset=o.vocab_offset, inv_temperature=o.inv_temperature, softcap=o.softcap,
            rounded=launchers.rounds_logits, group=group)
    else:
        logprobs = logprobs.masked_fill(invalid, float("nan"))
    logprobs = scatter_rows(logprobs, rows, n_rows)
    entropy = hidden.new_empty(0, dtype=torch.float32) if entropy is None \
        else scatter_rows(entropy.masked_fill(invalid, float("nan")), rows, n_rows)
    row_stats = hidden.new_empty(0, dtype=torch.float32) if row_stats is None \
        else scatter_rows(row_stats.masked_fill(invalid[:, None], float("nan")), rows, n_rows)
    return (logprobs, entropy, scatter_rows(stats, rows, n_rows),
            rows_to_save(rows, n_rows, targets.device), row_stats)


def _sampled_support(launchers, hidden, weight, bias, targets, options, o) -> _sampler.Support:
    """The first passes of the sampler's forward (ops/_sampler.py): each kept row's k-th
    largest logit (``top_k``: from the backend's own logits tiles) and its max key (the
    backend's usual pass, merged over slices)."""
    kth = None
    if o.top_k > 0:
        kth = _sampler.linear_thresholds(
            lambda start, end: launchers.logits_tile(hidden, weight, bias, start, end),
            hidden.shape[0], weight.shape[0], o.top_k,
            launchers.tile_cols(hidden.shape[0], weight.shape[0]), hidden)
    first = launchers.forward(hidden, weight, bias, targets - o.vocab_offset,
                              return_entropy=False, **options)
    return _sampler.Support(first[0].amax(0), kth, _sampler.log_min_p(o.min_p))


@_forward_op.register_fake
def _forward_fake(hidden, weight, bias, targets, inv_temperatures, o):
    n_rows = targets.shape[0]
    per_target = hidden.new_empty(targets.shape, dtype=torch.float32)
    entropy = hidden.new_empty(n_rows if o.return_entropy else 0, dtype=torch.float32)
    row_stats = hidden.new_empty((n_rows, 3) if o.return_row_stats else (0,), dtype=torch.float32)
    stats_columns = 3 if o.top_k > 0 else 2
    return (per_target, entropy, hidden.new_empty(n_rows, stats_columns, dtype=torch.float32),
            fake_saved_rows(targets), row_stats)


@fused_op("fastalign::linear_logprobs_backward", GRAD_OPTIONS,
          tensors="Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
                  "Tensor? inv_temperatures, Tensor stats, Tensor entropy, Tensor rows, "
                  "Tensor? grad_logprobs, Tensor? grad_entropy",
          returns="(Tensor, Tensor, Tensor)")
def _backward_op(hidden, weight, bias, targets, inv_temperatures, stats, entropy, rows,
                 grad_logprobs, grad_entropy, o):
    """``(dHidden, dWeight, dBias)``, each empty when not needed."""
    n_rows = targets.shape[0]
    rows = saved_rows(rows, n_rows)  # the forward's kept rows: no second host sync
    hidden_kept, targets_kept = select_rows(hidden, rows), select_rows(targets, rows)
    stats = select_rows(stats, rows)
    inv_temperature = _inv_temperature(select_rows(inv_temperatures, rows), o)
    support = None
    if _filtering(o):
        support = _sampler.Support(None, stats[:, 2].contiguous() if o.top_k > 0 else None,
                                   _sampler.log_min_p(o.min_p))
        stats = stats[:, :2].contiguous()
    entropy = select_rows(entropy, rows) if grad_entropy is not None else None
    grad_logprobs, grad_entropy = select_rows(grad_logprobs, rows), select_rows(grad_entropy, rows)
    # The forward's path (the same kept rows).
    launchers = linear_logprobs_launchers(o.backend, hidden.device, hidden_kept.shape[0])
    columns = None  # topk_targets: the target columns the launcher's tiles get wrong
    if targets_kept.dim() == 2:
        columns = _topk_targets.linear_columns(
            hidden_kept, weight, bias, targets_kept, stats, entropy, grad_logprobs, grad_entropy,
            ignore_index=o.ignore_index, vocab_offset=o.vocab_offset,
            inv_temperature=o.inv_temperature, softcap=o.softcap, rounded=launchers.rounds_logits)
        local_targets, grad_logprobs = columns.stand_in, columns.grad_sum
    else:
        local_targets = targets_kept - o.vocab_offset

    def grad_tile(start: int, end: int) -> torch.Tensor:
        tile = launchers.backward(
            hidden_kept, weight, bias, local_targets, stats, entropy, grad_logprobs, grad_entropy,
            start, end, inv_temperature=inv_temperature, softcap=o.softcap, support=support)
        if columns is not None:
            _topk_targets.write_slice_columns_(tile, start, end, columns)
        return tile

    grads = _linear_backward.linear_backward(
        hidden_kept, weight, launchers.tile_cols(hidden_kept.shape[0], weight.shape[0]), grad_tile,
        need_hidden=o.need_hidden, need_weight=o.need_weight, need_bias=o.need_bias)
    return _linear_backward.kept_rows_outputs(hidden, bias, grads, rows,
                                              _vocab_stats.resolve_group(o.group_name))


_backward_op.register_fake(_linear_backward.fake_backward)


def _setup_context(ctx, tensors, o, output):
    logprobs, entropy, stats, rows, _ = output
    # The sampler's log-probs say which rows' targets lie outside the support (-inf).
    ctx.save_for_backward(*tensors, stats, entropy, rows, logprobs if _filtering(o) else None)
    # Unused outputs (an entropy kept for logging) then get None, not zeros to differentiate.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_stats, _grad_rows, _grad_row_stats):
    o = ctx.options
    if not o.return_entropy:
        grad_entropy = None
    if grad_logprobs is None and grad_entropy is None:
        return None, None, None, None, None
    hidden, weight, bias, targets, inv_temperatures, stats, entropy, rows, logprobs = \
        ctx.saved_tensors
    if grad_logprobs is not None and logprobs is not None:
        # A target outside the support has the constant log-prob -inf: no gradient from it.
        grad_logprobs = grad_logprobs.masked_fill(logprobs == float("-inf"), 0.0)
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = _backward_op(
        hidden, weight, bias, targets, inv_temperatures, stats, entropy, rows,
        None if grad_logprobs is None else grad_logprobs.float().contiguous(),
        None if grad_entropy is None else grad_entropy.float().contiguous(),
        GRAD_OPTIONS.of(o, need_hidden=need_hidden, need_weight=need_weight,
                        need_bias=bias is not None and need_bias))
    grad_hidden, grad_weight, grad_bias = (g if need else None for g, need in
                                           zip(grads, (need_hidden, need_weight, need_bias)))
    return grad_hidden, grad_weight, grad_bias, None, None


_forward_op.register_autograd(_setup_context, _backward)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    topk_targets: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_row_stats: bool = False,
    process_group=None,
    top_k: int | None = None,
    min_p: float | None = None,
    top_p: float | None = None,
):
    """Log-probabilities of the chosen tokens under ``softmax(z')`` with
    ``z = hidden @ weight.T + bias`` and ``z' = softcap(z) / temperature``, never materializing
    the ``[N, V]`` logits.

    Args:
        hidden: ``[..., D]`` float16, bfloat16 or float32 hidden states (the lm_head's input).
        weight: ``[V, D]`` lm_head weight on the same device, any float dtype: the matmuls run
            in ``hidden``'s dtype, each weight slice cast as it is used (autocast's bf16
            activations against fp32 master weights need no copy); with ``process_group``, this
            rank's rows of it (shards in rank order, sizes may differ).
        targets: ``[...]`` integer ids in ``[0, V)`` (global ids when sharded), or
            ``ignore_index``. Already shifted: target ``t`` is the token after position ``t``.
        topk_targets: instead of ``targets``, ``[..., K]`` ids per row (a teacher's top-k
            tokens), as in :func:`token_logprobs`: log-probs ``[..., K]`` from one pass over the
            vocabulary (the K logits are a small ``[N, K, D]`` product with their weight rows).
            Not with ``return_row_stats``.
        bias: ``[V]`` or None (any float dtype, like ``weight``).
        temperature, softcap, ignore_index, return_entropy: as in :func:`token_logprobs` (a
            per-row ``temperature`` tensor is ``[...]`` = ``hidden.shape[:-1]`` or ``[N]``).
        top_k, min_p, top_p: the sampler's support, as in :func:`token_logprobs`: log-probs
            (and entropy) renormalized over the tokens Hugging Face's top-k / min-p warpers
            keep, -inf (no gradient) for a target outside it. The k-th largest logit of each
            row comes from the backend's logits tiles, one vocabulary slice at a time (a
            float32 ``[N, 2 top_k]`` of candidates beside one tile, never ``[N, V]``); then
            the max pass and the kept sums' pass, each one more matmul per slice. They (and a
            per-row ``temperature`` tensor) raise ``ValueError`` with ``topk_targets``,
            ``return_row_stats`` or a sharded head (``process_group``, DTensor, ZeRO-3).
        return_row_stats: also return, from the same pass over the vocabulary, a dict of the
            per-token statistics TRL logs, without gradient: ``mean_logit`` (the mean of
            ``z'`` over the vocabulary), ``is_top1`` (bool: the target is the most likely
            token, the first of equal maxima counting) and ``log_sum_sq_probs``
            (``log sum_v p_v^2``); 0 / False at ignored rows. A few extra sums per row.
        process_group: a ``torch.distributed`` group over which ``weight`` is sharded by
            vocabulary; every rank passes the same ``hidden`` and ``targets`` and gets the full
            results and the full ``hidden`` gradient (one all-reduce of three floats per row in
            forward, one of ``[N, D]`` in backward). Eager mode only.

    Returns:
        ``logprobs [...]`` float32 (``[..., K]`` with ``topk_targets``; entropy stays
        ``[...]``), or ``(logprobs, entropy)``, each followed by the row
        statistics' dict with ``return_row_stats``; differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``. No weight gradient is computed when ``weight`` does not require
        grad (a frozen head, LoRA). Ignored rows cost nothing: they are compacted out first.

    Memory: forward needs a few float32 per row and vocabulary slice; backward one
    ``[N, cols]`` logits-gradient tile, plus a float32 ``[N, D]`` accumulator for bf16/fp16
    inputs, beyond the gradients it returns. Targets outside ``[0, V)`` raise for CPU tensors;
    on CUDA they give NaN rows unless ``FASTALIGN_CHECK_TARGETS=1`` (see :func:`token_logprobs`).

    Sharded heads (``fastalign/ops/_sharded_head.py``):

    * an FSDP2 ``DTensor`` ``weight`` (and ``bias``) with a plain ``hidden`` (data parallel:
      each rank its own rows) is gathered once per call; its gradient comes back sharded like
      the weight, holding the average over ranks of each rank's gradient (as FSDP2 and DDP
      reduce every other parameter's);
    * a ``DTensor`` ``hidden`` replicated on a 1-D mesh with ``weight`` ``Shard(0)`` on it (a
      vocabulary-parallel head) runs the ``process_group`` path on the local shards;
    * a DeepSpeed ZeRO-3 ``weight``/``bias`` (a ``ds_id`` parameter) is gathered with
      ``deepspeed.zero.GatheredParameters`` in forward and again in backward, where the
      forward pass is recomputed (one more pass over the vocabulary).

    The results are plain tensors; any other layout raises, saying what to do.
    """
    targets, topk = checks.choose_targets(targets, topk_targets)
    return linear_logprobs_on(None, hidden, weight, targets, bias=bias, temperature=temperature,
                              softcap=softcap, ignore_index=ignore_index,
                              return_entropy=return_entropy, return_row_stats=return_row_stats,
                              process_group=process_group, topk=topk, top_k=top_k, min_p=min_p,
                              top_p=top_p)


def linear_logprobs_on(backend: str | None, hidden, weight, targets, *, bias, temperature,
                       softcap, ignore_index, return_entropy, return_row_stats=False,
                       process_group=None, topk=False, top_k=None, min_p=None, top_p=None):
    """``linear_logprobs`` on ``backend``, one ``select_backend`` has named already: a caller
    that runs other passes over the same head in one call (``fastalign.nn``) decides the backend
    once for all of them. None selects it here by ``hidden``'s device, after the checks (so a
    bad argument is reported before a bad ``FASTALIGN_BACKEND``). ``topk``: ``targets`` are
    ``topk_targets``, ``[..., K]``."""
    options = dict(bias=bias, temperature=temperature, softcap=softcap,
                   ignore_index=ignore_index, return_entropy=return_entropy,
                   return_row_stats=return_row_stats, process_group=process_group,
                   backend=backend, topk=topk, top_k=top_k, min_p=min_p, top_p=top_p)
    if not _sharded_head.is_plain(hidden, weight, bias, targets):
        _sampler.check_options(top_k=top_k, min_p=min_p, top_p=top_p, temperature=temperature,
                               topk_targets=topk, sharded=True)
        return _sharded_head.linear_logprobs(_linear_logprobs, hidden, weight, targets, **options)
    return _linear_logprobs(hidden, weight, targets, **options)


def _linear_logprobs(hidden, weight, targets, *, bias, temperature, softcap, ignore_index,
                     return_entropy, return_row_stats, process_group, backend, topk, top_k,
                     min_p, top_p):
    """``linear_logprobs`` on plain tensors (a sharded head already resolved)."""
    checks.check_lm_head(hidden, weight, bias)
    checks.check_row_temperature(temperature, hidden.shape[:-1], hidden.device, "hidden")
    checks.check_flag("return_row_stats", return_row_stats)
    _sampler.check_options(top_k=top_k, min_p=min_p, top_p=top_p, temperature=temperature,
                           topk_targets=topk, row_stats=return_row_stats,
                           sharded=process_group is not None)
    checks.check_softcap(softcap)
    checks.check_flag("return_entropy", return_entropy)
    checks.check_process_group(process_group)
    vocab_offset, vocab_total = _vocab_stats.vocab_shard(process_group, weight.shape[0],
                                                         weight.device)
    checks.check_targets(targets, hidden.shape[:-1], vocab_total, hidden.device, ignore_index,
                         source="hidden", topk=topk)
    if topk and return_row_stats:
        raise ValueError("return_row_stats=True takes one target per row (targets=); with "
                         "topk_targets leave it False")
    group_name = "" if process_group is None else process_group.group_name
    inv_temperatures = _sampler.inverse_temperatures(temperature)
    options = OPTIONS.new(
        inv_temperature=1.0 if inv_temperatures is not None else 1.0 / float(temperature),
        softcap=None if softcap is None else float(softcap), ignore_index=int(ignore_index),
        return_entropy=return_entropy, return_row_stats=return_row_stats,
        vocab_offset=vocab_offset, vocab_total=vocab_total, group_name=group_name,
        top_k=_sampler.effective_top_k(top_k, vocab_total),
        min_p=None if min_p is None else float(min_p),
        backend=select_backend(hidden.device) if backend is None else backend)
    rows_of_ids = targets.reshape(-1, targets.shape[-1]) if topk else targets.reshape(-1)
    logprobs, entropy, _, _, row_stats = _forward_op(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), rows_of_ids.contiguous(), inv_temperatures,
        options)
    leading_shape = hidden.shape[:-1]
    results = [logprobs.view(targets.shape)]
    if return_entropy:
        results.append(entropy.view(leading_shape))
    if return_row_stats:
        stats = row_stats.detach().view(*leading_shape, 3).unbind(-1)
        results.append({"mean_logit": stats[0], "is_top1": stats[1] > 0.5,
                        "log_sum_sq_probs": stats[2]})
    return results[0] if len(results) == 1 else tuple(results)
