"""``fastalign.token_logprobs``: per-token log-probs (and entropy) of chosen tokens from logits."""

from __future__ import annotations

import torch

from .. import _validation as checks
from .._backend import select_backend
from .._layout import needs_copy, row_layout
from . import _topk_targets
from ._backends import new_gradient, token_logprobs_launchers
from ._fused_op import Options, fused_op


OPTIONS = Options("TokenLogprobsOptions",
                  "float inv_temperature, float? softcap, int ignore_index, bool return_entropy, "
                  "bool inplace_backward, str backend")
_BACKWARD_TENSORS = ("Tensor targets, Tensor stats, Tensor entropy, Tensor? grad_logprobs, "
                     "Tensor? grad_entropy")


@fused_op("fastalign::token_logprobs_forward", OPTIONS, tensors="Tensor logits, Tensor targets",
          returns="(Tensor, Tensor, Tensor)")
def _forward_op(logits, targets, o):
    """``(logprobs [N] or [N, K], entropy [N] or [0], stats [N, 2])`` for ``[..., V]`` logits,
    ``targets [N]`` or ``[N, K]`` (``topk_targets``, ops/_topk_targets.py): ``stats`` holds each
    row's max key and log-sum (kernels/token_logprobs.py), what the backward needs;
    ``inplace_backward`` only matters to the backward."""
    rows, layout = row_layout(logits)
    topk = targets.dim() == 2
    logprobs, entropy, stats = token_logprobs_launchers(o.backend).forward(
        rows, _topk_targets.stand_in_targets(targets, o.ignore_index) if topk else targets,
        layout, inv_temperature=o.inv_temperature, softcap=o.softcap,
        ignore_index=o.ignore_index, return_entropy=o.return_entropy)
    if topk:
        logprobs, stats = _topk_targets.token_forward(
            rows, layout, targets, stats, ignore_index=o.ignore_index,
            inv_temperature=o.inv_temperature, softcap=o.softcap)
    return logprobs, logprobs.new_empty(0) if entropy is None else entropy, stats


@_forward_op.register_fake
def _forward_fake(logits, targets, o):
    per_target = logits.new_empty(targets.shape, dtype=torch.float32)
    entropy = logits.new_empty(targets.shape[0] if o.return_entropy else 0, dtype=torch.float32)
    return per_target, entropy, logits.new_empty(targets.shape[0], 2, dtype=torch.float32)


def _backward_into(grad_out, logits, targets, stats, entropy, grad_logprobs, grad_entropy, o):
    rows, layout = row_layout(logits)  # the public function never asks in-place for a copy
    in_place = grad_out is logits
    grad_layout = layout if in_place else layout.packed(rows.shape[-1])
    columns = None  # topk_targets: the target columns the launcher gets wrong
    if targets.dim() == 2:
        # Read before the gradient may overwrite the logits.
        columns = _topk_targets.token_columns(
            rows, layout, targets, stats, entropy, grad_logprobs, grad_entropy,
            ignore_index=o.ignore_index, inv_temperature=o.inv_temperature, softcap=o.softcap)
        targets, grad_logprobs = columns.stand_in, columns.grad_sum
    token_logprobs_launchers(o.backend).backward(
        rows, targets, layout, stats, entropy if grad_entropy is not None else None,
        grad_logprobs, grad_entropy, rows if in_place else grad_out, grad_layout,
        inv_temperature=o.inv_temperature, softcap=o.softcap, ignore_index=o.ignore_index)
    if columns is not None:
        _topk_targets.write_token_columns_(rows if in_place else grad_out, grad_layout, columns)


@fused_op("fastalign::token_logprobs_backward", OPTIONS,
          tensors=f"Tensor logits, {_BACKWARD_TENSORS}", returns="Tensor")
def _backward_op(logits, targets, stats, entropy, grad_logprobs, grad_entropy, o):
    """The gradient w.r.t. ``logits``: a fresh contiguous tensor of their shape and dtype."""
    grad_out = new_gradient(logits, o.backend)
    _backward_into(grad_out, logits, targets, stats, entropy, grad_logprobs, grad_entropy, o)
    return grad_out


@_backward_op.register_fake
def _backward_fake(logits, *_):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@fused_op("fastalign::token_logprobs_backward_inplace", OPTIONS,
          tensors=f"Tensor(a!) logits, {_BACKWARD_TENSORS}", returns="()", mutates=("logits",))
def _backward_inplace_op(logits, targets, stats, entropy, grad_logprobs, grad_entropy, o):
    """Writes the gradient over ``logits`` (``inplace_backward=True``). Declaring the mutation
    bumps the logits' version, so anything else that saved them for its backward raises
    instead of reading gradients as if they were logits."""
    _backward_into(logits, logits, targets, stats, entropy, grad_logprobs, grad_entropy, o)


def _setup_context(ctx, tensors, o, output):
    logits, targets = tensors
    _, entropy, stats = output
    ctx.save_for_backward(logits, targets, stats, entropy)
    # Unused outputs (an entropy kept for logging) then get None, not zeros to differentiate.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_stats):
    o = ctx.options
    if not o.return_entropy:
        grad_entropy = None
    if grad_logprobs is None and grad_entropy is None:
        return None, None
    logits, targets, stats, entropy = ctx.saved_tensors
    args = (targets, stats, entropy,
            None if grad_logprobs is None else grad_logprobs.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(), o)
    if o.inplace_backward:
        _backward_inplace_op(logits, *args)
        return logits, None
    return _backward_op(logits, *args), None


_forward_op.register_autograd(_setup_context, _backward)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    topk_targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
):
    """Log-probabilities of the chosen tokens, ``log_softmax(z')[target]``, without a
    full-vocabulary softmax in memory.

    ``z' = softcap(z) / temperature`` with ``softcap(z) = s * tanh(z / s)`` when ``softcap=s``.

    Args:
        logits: ``[..., V]`` float16, bfloat16 or float32; any leading shape and strides (the
            ``[:, :-1]`` slice of ``[B, T, V]`` logits is read in place, not copied).
        targets: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``.
        topk_targets: instead of ``targets``, ``[..., K]`` ids (K >= 1 per row, e.g. a
            teacher's top-k tokens): the log-prob of each, ``[..., K]``, from one pass over the
            vocabulary. Exactly one of ``targets`` and ``topk_targets`` is given; the keyword
            says which, never the shape. Entries equal to ``ignore_index`` give 0 and no
            gradient; a row whose K are all ignored is skipped (entropy 0). An id may repeat.
        temperature: divides the (soft-capped) logits; a finite number in
            ``[1.18e-38, 8.51e37]`` (it and its reciprocal normal float32 numbers), else
            ``ValueError``. Any such T gives float64 semantics: ``z / T`` is never formed (maxes
            are taken before the scaling), so a tiny T cannot overflow finite logits.
        softcap: ``None`` or a cap ``s`` in the same range (Gemma-2's
            ``final_logit_softcapping``); ``s * tanh(z / s)`` keeps float32 relative precision
            for ``|z| << s`` as for ``|z| >> s``.
        ignore_index: rows whose target equals it give 0 in every output and zero gradient.
        return_entropy: also return the entropy ``-sum p log p`` of ``softmax(z')`` per row.
        inplace_backward: write the gradient over ``logits`` instead of a new ``[..., V]``
            buffer, saving one logits-sized allocation. Only for logits nobody reads after this
            call; anything else that saved them for its backward then raises instead of reading
            gradients. Memory the caller owns is refused with ``ValueError``: a leaf tensor
            that requires grad, or a view of any leaf (``param[:, :-1]``, ``data.view(...)``),
            whose values the gradient would overwrite. Where the flag cannot be honoured
            without a wrong gradient the op returns a fresh one instead (as without the flag):
            layouts that need a copy (non-unit vocabulary stride, more than two non-mergeable
            leading dims) and logits whose elements share memory (``expand``, overlapping
            ``as_strided`` rows), since their gradient has more elements than that memory
            holds and writing it there would let rows overwrite each other.

    Returns:
        ``logprobs [...]`` float32 (``[..., K]`` with ``topk_targets``), or
        ``(logprobs, entropy)`` when ``return_entropy`` (entropy ``[...]``, one per row); both
        are differentiable w.r.t. ``logits``. The gradient has the logits' dtype.

    Target ids outside ``[0, V)`` (other than ``ignore_index``) raise ``ValueError`` for CPU
    tensors. For CUDA tensors that check would cost a host sync, so it runs only when
    ``FASTALIGN_CHECK_TARGETS=1``; otherwise the kernel never reads out of bounds and reports the
    row as NaN in every output and in its gradient.

    Edges: logits of any finite size (up to 3.4e38) keep float32 precision in the outputs and
    the gradient (each row's max and log-sum are kept apart, never summed into one rounded
    log-sum-exp); -inf logits are columns of probability 0; a NaN logit, a +inf logit or a row
    of only -inf gives NaN in its row (as float64 torch does); no finite input gives NaN.

    Memory: forward allocates the outputs and two float32 per row (the max and log-sum kept for
    backward); backward allocates only the gradient it returns (nothing with
    ``inplace_backward``). The backend follows the device
    (Triton on CUDA, the native C++ kernels on CPU when built, else the chunked torch path)
    unless ``FASTALIGN_BACKEND`` forces one.
    """
    targets, topk = checks.choose_targets(targets, topk_targets)
    checks.check_float_tensor("logits", logits)
    checks.check_targets(targets, logits.shape[:-1], logits.shape[-1], logits.device, ignore_index,
                         topk=topk)
    checks.check_temperature(temperature)
    checks.check_softcap(softcap)
    checks.check_flag("return_entropy", return_entropy)
    checks.check_flag("inplace_backward", inplace_backward)
    if inplace_backward:
        checks.check_inplace_target("logits", logits)

    leading_shape = logits.shape[:-1]
    if targets.numel() == 0:
        # Nothing to read; keep the result attached to the graph so .backward() still works.
        entropy = logits.sum(-1, dtype=torch.float32) * 0.0
        logprobs = entropy[..., None].expand(targets.shape).clone() if topk else entropy.clone()
        return (logprobs, entropy) if return_entropy else logprobs

    options = OPTIONS.new(
        inv_temperature=1.0 / float(temperature),
        softcap=None if softcap is None else float(softcap), ignore_index=int(ignore_index),
        return_entropy=return_entropy,
        # Logits whose layout needs a copy get a fresh gradient (the copy is not theirs), as do
        # logits whose elements share memory (no room there for each element's gradient).
        inplace_backward=(inplace_backward and not needs_copy(logits)
                          and not checks.has_internal_overlap(logits)),
        backend=select_backend(logits.device))
    rows_of_ids = targets.reshape(-1, targets.shape[-1]) if topk else targets.reshape(-1)
    logprobs, entropy, _ = _forward_op(logits, rows_of_ids.contiguous(), options)
    if return_entropy:
        return logprobs.view(targets.shape), entropy.view(leading_shape)
    return logprobs.view(targets.shape)
