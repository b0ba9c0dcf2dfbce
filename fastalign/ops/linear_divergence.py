"""``fastalign.linear_divergence``: :func:`token_divergence` of two (hidden, head) pairs, the
student's and the teacher's, without either model's ``[N, V]`` logits. ``linear_kl`` is its
beta = 1 case (``ops/kl.py``).

The forward forms both models' logits one ``[N, cols]`` vocabulary slice at a time with a
matmul each and hands the pair of tiles to the divergence launchers (the slice width is the
fused-linear backend's, ``linear_logprobs``' ``tile_cols``); the JSD walks the slices a second
time once both normalizers are known. The backward recomputes each slice pair, turns the
student's tile into its logits-gradient and feeds it to ``_linear_backward``. Masked rows are
compacted out before any work; with a ``process_group`` both heads are vocabulary shards and
the statistics merge across ranks.
"""

from __future__ import annotations

import torch

from .. import _validation as checks
from .._layout import RowLayout
from . import _linear_backward, _sharded_head, _vocab_stats
from ._backends import divergence_launchers, linear_logprobs_launchers
from ._compact import (fake_saved_rows, kept_rows, rows_to_save, saved_rows, scatter_rows,
                       select_rows)
from ._fused_op import fused_op
from ._tiles import raw_logits_tile
from .token_divergence import (OPTIONS, check_options, fake_outputs, no_entropy, options_for,
                               spec_of, upstream_grads)

LINEAR_OPTIONS = OPTIONS.extended("LinearDivergenceOptions", "str group_name")
# The backward also learns which gradients autograd wants.
GRAD_OPTIONS = LINEAR_OPTIONS.extended("LinearDivergenceGradOptions",
                                       "bool need_hidden, bool need_weight, bool need_bias")
TEACHER_NAMES = ("teacher_hidden", "teacher_weight", "teacher_bias")

_TENSORS = ("Tensor hidden, Tensor weight, Tensor? bias, Tensor teacher_hidden, "
            "Tensor teacher_weight, Tensor? teacher_bias, Tensor? mask")


def _tile_cols(backend: str, hidden: torch.Tensor, vocab_size: int) -> int:
    """Vocabulary columns per logits slice: the backend's fused-linear tile size (on CUDA, of
    the matmul path ``linear_logprobs`` takes there)."""
    n_rows = hidden.shape[0]
    return linear_logprobs_launchers(backend, hidden.device, n_rows).tile_cols(n_rows, vocab_size)


def _logit_tiles(student, teacher, start, end):
    """Both models' float32 ``[N, end - start]`` logits tiles (``student``, ``teacher``:
    ``(hidden, weight, bias)`` each) and their (contiguous) layout."""
    tile = raw_logits_tile(*student, start, end)
    teacher_tile = raw_logits_tile(*teacher, start, end)
    return tile, teacher_tile, RowLayout(1, tile.shape[0], 0, tile.shape[1])


@fused_op("fastalign::linear_divergence_forward", LINEAR_OPTIONS, tensors=_TENSORS,
          returns="(Tensor, Tensor, Tensor, Tensor)")
def _forward_op(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask, o):
    """``(divergence [N], entropy [N] or [0], stats [N, ROW_STATS], rows [K])`` for ``hidden``,
    ``teacher_hidden`` ``[N, D]``, ``[N, D_t]``: as ``token_divergence``'s forward op, and the
    kept rows' indices (``_compact.rows_to_save``) for the backward."""
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    rows = None if mask is None else kept_rows(mask)
    student = (select_rows(hidden, rows), weight, bias)
    teacher = (select_rows(teacher_hidden, rows), teacher_weight, teacher_bias)
    launchers, spec = divergence_launchers(o.backend), spec_of(o)
    cols = _tile_cols(o.backend, student[0], vocab_size)

    def first_pass(start):
        tile, teacher_tile, layout = _logit_tiles(student, teacher, start,
                                                  min(start + cols, vocab_size))
        return launchers.forward(tile, teacher_tile, layout, layout, None, spec=spec,
                                 return_entropy=o.return_entropy)

    def second_pass(start, stats):
        tile, teacher_tile, layout = _logit_tiles(student, teacher, start,
                                                  min(start + cols, vocab_size))
        return launchers.mixture(tile, teacher_tile, layout, layout, None, stats, spec=spec)

    merged = _vocab_stats.divergence_over_slices(
        range(0, vocab_size, cols), first_pass, second_pass, spec=spec,
        process_group=_vocab_stats.resolve_group(o.group_name))
    divergence, entropy, stats = (scatter_rows(x, rows, n_rows) for x in merged)
    return (divergence, entropy if o.return_entropy else no_entropy(hidden), stats,
            rows_to_save(rows, n_rows, hidden.device))


@_forward_op.register_fake
def _forward_fake(hidden, *_tensors_then_options):
    return (*fake_outputs(hidden, hidden.shape[0], _tensors_then_options[-1]),
            fake_saved_rows(hidden))


@fused_op("fastalign::linear_divergence_backward", GRAD_OPTIONS,
          tensors=f"{_TENSORS}, Tensor stats, Tensor rows, Tensor? grad_divergence, "
                  "Tensor? grad_entropy",
          returns="(Tensor, Tensor, Tensor)")
def _backward_op(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask, stats,
                 rows, grad_divergence, grad_entropy, o):
    """``(dHidden, dWeight, dBias)`` of the student, each empty when not needed."""
    n_rows = hidden.shape[0]
    rows = saved_rows(rows, n_rows)  # the forward's kept rows: no second host sync
    student = (select_rows(hidden, rows), weight, bias)
    teacher = (select_rows(teacher_hidden, rows), teacher_weight, teacher_bias)
    stats = select_rows(stats, rows)
    grad_divergence, grad_entropy = (select_rows(g, rows) for g in (grad_divergence, grad_entropy))
    launchers, spec = divergence_launchers(o.backend), spec_of(o)

    def grad_tile(start: int, end: int) -> torch.Tensor:
        tile, teacher_tile, layout = _logit_tiles(student, teacher, start, end)
        # The student's tile is read before the kernel writes any of the gradient over it.
        launchers.backward(tile, teacher_tile, layout, layout, None, stats, grad_divergence,
                           grad_entropy, tile, layout, spec=spec)
        return tile if tile.dtype == hidden.dtype else tile.to(hidden.dtype)

    grads = _linear_backward.linear_backward(
        student[0], weight, _tile_cols(o.backend, student[0], weight.shape[0]),
        grad_tile, need_hidden=o.need_hidden, need_weight=o.need_weight, need_bias=o.need_bias)
    return _linear_backward.kept_rows_outputs(hidden, bias, grads, rows,
                                              _vocab_stats.resolve_group(o.group_name))


_backward_op.register_fake(_linear_backward.fake_backward)


def _setup_context(ctx, tensors, o, output):
    _, _, stats, rows = output
    ctx.save_for_backward(*tensors, stats, rows)
    # An output nobody differentiates (an entropy kept for logging, the stats) then gets None.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_divergence, grad_entropy, _grad_stats, _grad_rows):
    upstream = upstream_grads(ctx.options, grad_divergence, grad_entropy)
    if upstream is None:
        return (None,) * 7
    bias = ctx.saved_tensors[2]
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads = _backward_op(*ctx.saved_tensors, *upstream, GRAD_OPTIONS.of(
        ctx.options, need_hidden=need_hidden, need_weight=need_weight,
        need_bias=bias is not None and need_bias))
    grad_hidden, grad_weight, grad_bias = (g if need else None for g, need in
                                           zip(grads, (need_hidden, need_weight, need_bias)))
    return grad_hidden, grad_weight, grad_bias, None, None, None, None


_forward_op.register_autograd(_setup_context, _backward)


def run_linear_divergence(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias,
                          mask, *, teacher_names, beta, temperature, softcap, teacher_softcap,
                          return_entropy, process_group):
    """``linear_divergence`` on plain tensors (sharded heads already resolved), the teacher's
    arguments called ``teacher_names`` (hidden, weight, bias) in messages."""
    check_inputs(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, mask,
                 teacher_names=teacher_names)
    check_options(beta, temperature, softcap, teacher_softcap, return_entropy)
    checks.check_process_group(process_group)
    flat = lambda x: x.reshape(-1, x.shape[-1]).contiguous()  # noqa: E731
    detached = lambda x: None if x is None else x.detach().contiguous()  # noqa: E731
    group_name = "" if process_group is None else process_group.group_name
    divergence, entropy, _, _ = _forward_op(
        flat(hidden), weight.contiguous(), None if bias is None else bias.contiguous(),
        flat(teacher_hidden.detach()), detached(teacher_weight), detached(teacher_bias),
        None if mask is None else mask.reshape(-1).contiguous(),
        LINEAR_OPTIONS.new(*options_for(hidden.device, beta, temperature, softcap,
                                        teacher_softcap, return_entropy, group_name)))
    divergence = divergence.view(hidden.shape[:-1])
    return (divergence, entropy.view(hidden.shape[:-1])) if return_entropy else divergence


def linear_divergence(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                      teacher_weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                      teacher_bias: torch.Tensor | None = None, beta: float = 1.0,
                      temperature: float = 1.0, softcap: float | None = None,
                      teacher_softcap: float | None = None, mask: torch.Tensor | None = None,
                      return_entropy: bool = False, process_group=None):
    """:func:`token_divergence` of the student's logits ``hidden @ weight.T + bias`` and the
    teacher's ``teacher_hidden @ teacher_weight.T + teacher_bias``, exact over the full
    vocabulary, never materializing either model's ``[N, V]`` logits (TRL's
    ``ChunkedDivergenceFunction``: same ``beta`` convention and numbers).

    Args:
        hidden: ``[..., D]`` student hidden states; weight ``[V, D]``; bias ``[V]`` or None (any
            float dtypes: the matmuls run in ``hidden``'s, slice by slice).
        teacher_hidden: ``[..., D_t]`` teacher hidden states (same leading shape; ``D_t`` may
            differ from ``D``); teacher_weight ``[V, D_t]`` (the same vocabulary ``V``);
            teacher_bias ``[V]`` or None. Constant: no gradient reaches them.
        beta, temperature, softcap, teacher_softcap, return_entropy: as in
            :func:`token_divergence`.
        mask: ``[...]`` bool or None; False rows give 0, get zero gradient and are compacted
            out before any work.
        process_group: a ``torch.distributed`` group over which both heads (weights and
            biases) are sharded by vocabulary, in rank order with the same shards; every rank
            passes the same hidden states and gets the full results and the full ``hidden``
            gradient (all-reduces of a few floats per row in forward, of ``[N, D]`` in
            backward). Eager mode only.

    Returns:
        ``divergence [...]`` float32, or ``(divergence, entropy)``, differentiable w.r.t.
        ``hidden``, ``weight`` and ``bias`` (no weight gradient when ``weight`` does not require
        grad). Memory: two ``[N, cols]`` float32 logits tiles at a time, plus what
        ``linear_logprobs`` needs in backward. The JSD computes each slice's two matmuls twice
        in forward (once per pass), the KLs once.

    Sharded heads as for :func:`linear_kl` (``fastalign/ops/_sharded_head.py``): FSDP2
    ``DTensor`` heads are gathered (the student's gradient averaged over ranks), the teacher's
    without gradient; DeepSpeed ZeRO-3 parameters are gathered in forward and backward.
    """
    arguments = (hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, mask)
    options = dict(beta=beta, temperature=temperature, softcap=softcap,
                   teacher_softcap=teacher_softcap, return_entropy=return_entropy,
                   teacher_names=TEACHER_NAMES)
    if not _sharded_head.is_plain(*arguments):
        return _sharded_head.linear_pair(run_linear_divergence, *arguments,
                                         process_group=process_group, **options)
    return run_linear_divergence(*arguments, process_group=process_group, **options)


def check_inputs(hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, mask, *,
                 teacher_names=TEACHER_NAMES) -> None:
    """The tensors of a student and a teacher head, as ``linear_divergence`` and
    ``FusedDistillationLoss`` take them: each a head of its hidden states, one row per token on
    both sides, one vocabulary, one device; ``teacher_names`` name the teacher's in messages."""
    teacher_hidden_name, teacher_weight_name, teacher_bias_name = teacher_names
    checks.check_lm_head(hidden, weight, bias)
    checks.check_lm_head(teacher_hidden, teacher_weight, teacher_bias,
                         weight_name=teacher_weight_name, hidden_name=teacher_hidden_name,
                         bias_name=teacher_bias_name)
    if teacher_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"{teacher_hidden_name} has leading shape "
                         f"{tuple(teacher_hidden.shape[:-1])} but must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])} (one row per token)")
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"{teacher_weight_name} has {teacher_weight.shape[0]} vocabulary rows "
                         f"but weight has {weight.shape[0]}; both models must share one "
                         f"vocabulary")
    checks.check_same_device(teacher_hidden_name, teacher_hidden, "hidden", hidden)
    checks.check_mask(mask, hidden.shape[:-1], hidden.device, "hidden")
