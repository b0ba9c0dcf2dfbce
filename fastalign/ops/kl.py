"""``fastalign.token_kl`` and ``fastalign.linear_kl``: exact full-vocabulary
KL(softmax(z / T) || softmax(z_ref / T)) per token, differentiable w.r.t. the policy side.

Both run two online softmaxes in one pass over the vocabulary (``fastalign.kernels.kl`` or its
torch twin ``kl_torch``) and merge per-slice statistics with ``_vocab_stats.merge_kl_partials``.
``token_kl`` reads the two logits tensors where they lie; ``linear_kl`` forms both models'
logits one ``[N, cols]`` vocabulary slice at a time with a matmul, so neither model's
``[N, V]`` logits ever exist, and its backward feeds the slice gradients to
``_linear_backward``. Each is a pair of ``torch.library`` custom ops (no graph break under
``torch.compile``).
"""

from __future__ import annotations

import torch

from .. import _validation as checks
from .._backend import select_backend
from .._layout import RowLayout, row_layout
from . import _linear_backward, _sharded_head, _vocab_stats
from ._compact import (fake_saved_rows, kept_rows, rows_to_save, saved_rows, scatter_rows,
                       select_rows)
from ._backends import kl_launchers, linear_logprobs_launchers, new_gradient
from ._fused_op import Options, fused_op
from ._tiles import raw_logits_tile


def _tile_cols(backend: str, n_rows: int, vocab_size: int) -> int:
    """Vocabulary columns per logits slice: the backend's fused-linear tile size."""
    return linear_logprobs_launchers(backend).tile_cols(n_rows, vocab_size)


def _flat_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.reshape(-1).contiguous()


# ---------------------------------------------------------------------------------- token_kl

OPTIONS = Options("KLOptions", "float inv_temperature, str backend")
# linear_kl's backward also learns which gradients autograd wants.
LINEAR_GRAD_OPTIONS = OPTIONS.extended("LinearKLGradOptions",
                                       "bool need_hidden, bool need_weight, bool need_bias")


@fused_op("fastalign::token_kl_forward", OPTIONS,
          tensors="Tensor logits, Tensor ref_logits, Tensor? mask", returns="(Tensor, Tensor)")
def _token_kl_forward(logits, ref_logits, mask, o):
    """``(kl [N], stats [N, 4])``, float32, for ``[..., V]`` logits with N rows (``stats``: what
    the backward needs, see ``_vocab_stats.merge_kl_partials``)."""
    logits, layout = row_layout(logits)
    ref_logits, ref_layout = row_layout(ref_logits)
    partials = kl_launchers(o.backend).forward(
        logits, ref_logits, layout, ref_layout, _flat_mask(mask),
        inv_temperature=o.inv_temperature)
    return _vocab_stats.merge_kl_partials(*(x[None] for x in partials),
                                          inv_temperature=o.inv_temperature)


def _kl_fakes(like: torch.Tensor, n_rows: int):
    return (like.new_empty(n_rows, dtype=torch.float32),
            like.new_empty(n_rows, 4, dtype=torch.float32))


@_token_kl_forward.register_fake
def _token_kl_forward_fake(logits, ref_logits, mask, o):
    return _kl_fakes(logits, logits.numel() // logits.shape[-1])


@fused_op("fastalign::token_kl_backward", OPTIONS,
          tensors="Tensor logits, Tensor ref_logits, Tensor? mask, Tensor stats, Tensor grad_kl",
          returns="Tensor")
def _token_kl_backward(logits, ref_logits, mask, stats, grad_kl, o):
    """The gradient w.r.t. ``logits``: a fresh contiguous tensor of their shape and dtype."""
    grad_out = new_gradient(logits, o.backend)
    logits, layout = row_layout(logits)
    ref_logits, ref_layout = row_layout(ref_logits)
    grad_layout = layout.packed(logits.shape[-1])
    return kl_launchers(o.backend).backward(
        logits, ref_logits, layout, ref_layout, _flat_mask(mask), stats, grad_kl,
        grad_out, grad_layout, inv_temperature=o.inv_temperature)


@_token_kl_backward.register_fake
def _token_kl_backward_fake(logits, *_):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _token_kl_setup(ctx, tensors, o, output):
    kl, stats = output
    ctx.save_for_backward(*tensors, stats)
    ctx.set_materialize_grads(False)  # only kl is public: the stats' gradient stays None


def _token_kl_grad(ctx, grad_kl, _grad_stats):
    if grad_kl is None:
        return None, None, None
    logits, ref_logits, mask, stats = ctx.saved_tensors
    grad = _token_kl_backward(logits, ref_logits, mask, stats, grad_kl.float().contiguous(),
                              ctx.options)
    return grad, None, None


_token_kl_forward.register_autograd(_token_kl_setup, _token_kl_grad)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, *, temperature: float = 1.0,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``KL(softmax(z / T) || softmax(z_ref / T))`` per row, over the full vocabulary.

    Args:
        logits: ``[..., V]`` policy logits, float16/bfloat16/float32, any strides.
        ref_logits: ``[..., V]`` reference logits, same shape and device (any float dtype);
            treated as constant (no gradient flows to them).
        temperature: divides both sides' logits; a finite number in ``[1.18e-38, 8.51e37]``
            (as in :func:`token_logprobs`; ``z / T`` is never formed, so no finite logit
            overflows).
        mask: ``[...]`` bool or None. False rows give 0, get zero gradient and are skipped by
            the Triton kernels (the torch path computes and discards them).

    Returns:
        ``kl [...]`` float32, differentiable w.r.t. ``logits``. Extra memory: five float32 per
        row in forward; the returned gradient only, in backward. Logits of any finite size keep
        float32 precision (each side's differences are taken from its own max, before 1 / T).
        A NaN or +inf logit (either side) or a row of only -inf gives a NaN KL and a NaN
        gradient row; a finite policy logit where the reference's is -inf gives +inf (its
        gradient row is then not finite either). A KL within a factor V of float32's max may
        overflow to inf: the row's sum of p * log-ratio is accumulated before dividing by the
        sum of p.
    """
    checks.check_float_tensor("logits", logits)
    checks.check_float_tensor("ref_logits", ref_logits)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits has shape {tuple(ref_logits.shape)} but must equal "
                         f"logits.shape = {tuple(logits.shape)}")
    checks.check_same_device("ref_logits", ref_logits, "logits", logits)
    checks.check_mask(mask, logits.shape[:-1], logits.device, "logits")
    checks.check_temperature(temperature)
    if logits.numel() == 0:
        # No rows (a leading dim of 0, perhaps between others: no row layout describes that
        # without a copy that torch skips for empty tensors). Keep the result on the graph.
        return logits.sum(-1, dtype=torch.float32) * 0.0
    kl, _ = _token_kl_forward(logits, ref_logits.detach(), mask,
                              OPTIONS.new(1.0 / float(temperature), select_backend(logits.device)))
    return kl.view(logits.shape[:-1])


# --------------------------------------------------------------------------------- linear_kl

def _logit_tiles(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, start, end):
    """Both models' float32 ``[N, end - start]`` logits tiles and their (contiguous) layout."""
    tile = raw_logits_tile(hidden, weight, bias, start, end)
    ref_tile = raw_logits_tile(ref_hidden, ref_weight, ref_bias, start, end)
    return tile, ref_tile, RowLayout(1, tile.shape[0], 0, tile.shape[1])


_LINEAR_TENSORS = ("Tensor hidden, Tensor weight, Tensor? bias, Tensor ref_hidden, "
                   "Tensor ref_weight, Tensor? ref_bias, Tensor? mask")


@fused_op("fastalign::linear_kl_forward", OPTIONS, tensors=_LINEAR_TENSORS,
          returns="(Tensor, Tensor, Tensor)")
def _linear_kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, o):
    """``(kl [N], stats [N, 4], rows [K])`` as ``_token_kl_forward``, for ``hidden``/``ref_hidden``
    ``[N, D]``, and the kept rows' indices (``_compact.rows_to_save``) for the backward."""
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    rows = None if mask is None else kept_rows(mask)
    hidden, ref_hidden = select_rows(hidden, rows), select_rows(ref_hidden, rows)
    launchers = kl_launchers(o.backend)
    cols = _tile_cols(o.backend, hidden.shape[0], vocab_size)
    slices = []
    for start in range(0, vocab_size, cols):
        tile, ref_tile, layout = _logit_tiles(hidden, weight, bias, ref_hidden, ref_weight,
                                              ref_bias, start, min(start + cols, vocab_size))
        slices.append(launchers.forward(tile, ref_tile, layout, layout, None,
                                        inv_temperature=o.inv_temperature))
    stacked = (torch.stack(column) for column in zip(*slices))
    merged = _vocab_stats.merge_kl_partials(*stacked, inv_temperature=o.inv_temperature)
    kl, stats = (scatter_rows(x, rows, n_rows) for x in merged)
    return kl, stats, rows_to_save(rows, n_rows, hidden.device)


@_linear_kl_forward.register_fake
def _linear_kl_forward_fake(hidden, *_):
    return (*_kl_fakes(hidden, hidden.shape[0]), fake_saved_rows(hidden))


@fused_op("fastalign::linear_kl_backward", LINEAR_GRAD_OPTIONS,
          tensors=f"{_LINEAR_TENSORS}, Tensor stats, Tensor rows, Tensor grad_kl",
          returns="(Tensor, Tensor, Tensor)")
def _linear_kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, stats,
                        rows, grad_kl, o):
    """``(dHidden, dWeight, dBias)`` of the policy side, each empty when not needed."""
    n_rows = hidden.shape[0]
    rows = saved_rows(rows, n_rows)  # the forward's kept rows: no second host sync
    hidden_kept, ref_hidden = select_rows(hidden, rows), select_rows(ref_hidden, rows)
    stats, grad_kl = select_rows(stats, rows), select_rows(grad_kl, rows)
    launchers = kl_launchers(o.backend)

    def grad_tile(start: int, end: int) -> torch.Tensor:
        tile, ref_tile, layout = _logit_tiles(hidden_kept, weight, bias, ref_hidden, ref_weight,
                                              ref_bias, start, end)
        # The policy tile is read before the kernel writes any of the gradient over it.
        launchers.backward(tile, ref_tile, layout, layout, None, stats, grad_kl, tile, layout,
                           inv_temperature=o.inv_temperature)
        return tile if tile.dtype == hidden.dtype else tile.to(hidden.dtype)

    grads = _linear_backward.linear_backward(
        hidden_kept, weight, _tile_cols(o.backend, hidden_kept.shape[0], weight.shape[0]),
        grad_tile, need_hidden=o.need_hidden, need_weight=o.need_weight, need_bias=o.need_bias)
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        grad_hidden = scatter_rows(grad_hidden, rows, n_rows).to(hidden.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return _linear_backward.op_outputs(hidden, (grad_hidden, grad_weight, grad_bias))


@_linear_kl_backward.register_fake
def _linear_kl_backward_fake(hidden, weight, bias, *_tensors_then_options):
    o = _tensors_then_options[-1]
    return _linear_backward.fake_grads(hidden, weight, bias, o.need_hidden, o.need_weight,
                                       o.need_bias)


def _linear_kl_setup(ctx, tensors, o, output):
    kl, stats, rows = output
    ctx.save_for_backward(*tensors, stats, rows)
    ctx.set_materialize_grads(False)  # only kl is public: the stats' gradient stays None


def _linear_kl_grad(ctx, grad_kl, _grad_stats, _grad_rows):
    if grad_kl is None:
        return (None,) * 7
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, stats, rows = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = _linear_kl_backward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, stats, rows,
        grad_kl.float().contiguous(),
        LINEAR_GRAD_OPTIONS.of(ctx.options, need_hidden=need_hidden, need_weight=need_weight,
                               need_bias=bias is not None and need_bias))
    grad_hidden, grad_weight, grad_bias = (g if need else None for g, need in
                                           zip(grads, (need_hidden, need_weight, need_bias)))
    return grad_hidden, grad_weight, grad_bias, None, None, None, None


_linear_kl_forward.register_autograd(_linear_kl_setup, _linear_kl_grad)


def linear_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
              ref_weight: torch.Tensor, *, bias: torch.Tensor | None = None,
              ref_bias: torch.Tensor | None = None, temperature: float = 1.0,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact per-token ``KL(pi || pi_ref)`` with ``pi = softmax((hidden @ weight.T + bias) / T)``
    and ``pi_ref`` likewise from the reference model, never materializing either model's
    ``[N, V]`` logits.

    Args:
        hidden: ``[..., D]`` policy hidden states; weight ``[V, D]``; bias ``[V]`` or None.
        ref_hidden: ``[..., D_ref]`` reference hidden states (same leading shape); ref_weight
            ``[V, D_ref]``; ref_bias ``[V]`` or None. Treated as constant. The two models may
            differ in width and dtype, not in vocabulary.
        temperature: divides both sides' logits, in ``[1.18e-38, 8.51e37]``.
        mask: ``[...]`` bool or None; False rows give 0, get zero gradient and are compacted
            out before any work.

    Returns:
        ``kl [...]`` float32, differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (no
        weight gradient when ``weight`` does not require grad). Memory: two ``[N, cols]``
        float32 logits tiles at a time, plus what ``linear_logprobs`` needs in backward.

    Sharded heads, as in :func:`linear_logprobs` (``fastalign/ops/_sharded_head.py``): an FSDP2
    ``DTensor`` ``weight``/``bias`` with a plain ``hidden`` is gathered once per call, its
    gradient the average over ranks of each rank's; a ``DTensor`` ``hidden`` replicated on a
    1-D mesh with ``weight`` ``Shard(0)`` on it gathers the weight, each rank's gradient being
    its shard of the (identical) full one; a DTensor reference head is gathered without
    gradient; DeepSpeed ZeRO-3 ``ds_id`` parameters (either model's) are gathered in forward
    and again in backward, which recomputes the forward. The result is a plain tensor.
    """
    if not _sharded_head.is_plain(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask):
        return _sharded_head.linear_kl(_linear_kl, hidden, weight, ref_hidden, ref_weight,
                                       bias=bias, ref_bias=ref_bias, temperature=temperature,
                                       mask=mask)
    return _linear_kl(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
                      temperature=temperature, mask=mask)


def _linear_kl(hidden, weight, ref_hidden, ref_weight, *, bias, ref_bias, temperature, mask):
    """``linear_kl`` on plain tensors (sharded heads already resolved)."""
    checks.check_lm_head(hidden, weight, bias)
    checks.check_lm_head(ref_hidden, ref_weight, ref_bias, weight_name="ref_weight",
                         hidden_name="ref_hidden", bias_name="ref_bias")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden has leading shape {tuple(ref_hidden.shape[:-1])} but must "
                         f"equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])} (one row per token)")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has {ref_weight.shape[0]} vocabulary rows but weight has "
                         f"{weight.shape[0]}; both models must share one vocabulary")
    checks.check_same_device("ref_hidden", ref_hidden, "hidden", hidden)
    checks.check_mask(mask, hidden.shape[:-1], hidden.device, "hidden")
    checks.check_temperature(temperature)
    flat = lambda x: x.reshape(-1, x.shape[-1]).contiguous()  # noqa: E731
    detached = lambda x: None if x is None else x.detach().contiguous()  # noqa: E731
    kl, _, _ = _linear_kl_forward(
        flat(hidden), weight.contiguous(), None if bias is None else bias.contiguous(),
        flat(ref_hidden.detach()), detached(ref_weight), detached(ref_bias), _flat_mask(mask),
        OPTIONS.new(1.0 / float(temperature), select_backend(hidden.device)))
    return kl.view(hidden.shape[:-1])
