"""``fastalign.token_logprobs``: per-token log-probs (and entropy) of chosen tokens from logits."""

from __future__ import annotations

import torch

from .. import _validation as checks
from .._backend import select_backend
from .._layout import needs_copy, row_layout
from . import _sampler, _topk_targets
from ._backends import new_gradient, token_logprobs_launchers
from ._fused_op import Options, fused_op


# top_k: 0 keeps every token (None, or k >= V); min_p: None keeps every token (ops/_sampler.py).
OPTIONS = Options("TokenLogprobsOptions",
                  "float inv_temperature, float? softcap, int ignore_index, bool return_entropy, "
                  "bool inplace_backward, int top_k, float? min_p, str backend")
# inv_temperatures: None, or 1 / T per row (float32 [N]) overriding inv_temperature.
_BACKWARD_TENSORS = ("Tensor targets, Tensor? inv_temperatures, Tensor stats, Tensor entropy, "
                     "Tensor? grad_logprobs, Tensor? grad_entropy")


def _filtering(o) -> bool:
    return o.top_k > 0 or o.min_p is not None


def _inv_temperature(inv_temperatures, o):
    """What the launchers take: the per-row tensor, or the one float."""
    return o.inv_temperature if inv_temperatures is None else inv_temperatures


@fused_op("fastalign::token_logprobs_forward", OPTIONS,
          tensors="Tensor logits, Tensor targets, Tensor? inv_temperatures",
          returns="(Tensor, Tensor, Tensor)")
def _forward_op(logits, targets, inv_temperatures, o):
    """``(logprobs [N] or [N, K], entropy [N] or [0], stats [N, 2] or [N, 3])`` for
    ``[..., V]`` logits, ``targets [N]`` or ``[N, K]`` (``topk_targets``,
    ops/_topk_targets.py): ``stats`` holds each row's max key and log-sum
    (kernels/token_logprobs.py), what the backward needs, and with ``top_k`` the row's k-th
    largest logit (ops/_sampler.py); ``inplace_backward`` only matters to the backward."""
    rows, layout = row_layout(logits)
    topk = targets.dim() == 2
    launchers = token_logprobs_launchers(o.backend)
    inv_temperature = _inv_temperature(inv_temperatures, o)
    if _filtering(o):
        return _sampled_forward(launchers, rows, layout, targets, inv_temperature, o)
    logprobs, entropy, stats = launchers.forward(
        rows, _topk_targets.stand_in_targets(targets, o.ignore_index) if topk else targets,
        layout, inv_temperature=inv_temperature, softcap=o.softcap,
        ignore_index=o.ignore_index, return_entropy=o.return_entropy)
    if topk:
        logprobs, stats = _topk_targets.token_forward(
            rows, layout, targets, stats, ignore_index=o.ignore_index,
            inv_temperature=o.inv_temperature, softcap=o.softcap)
    return logprobs, logprobs.new_empty(0) if entropy is None else entropy, stats


def _sampled_forward(launchers, rows, layout, targets, inv_temperature, o):
    """The forward over each row's sampler support (ops/_sampler.py): the k-th largest logit,
    the row max (the backend's usual pass), then the kept columns' sums."""
    kth = _sampler.token_thresholds(rows, layout, o.top_k) if o.top_k > 0 else None
    options = dict(inv_temperature=inv_temperature, softcap=o.softcap,
                   ignore_index=o.ignore_index)
    _, _, first = launchers.forward(rows, targets, layout, return_entropy=False, **options)
    support = _sampler.Support(first[:, 0].contiguous(), kth, _sampler.log_min_p(o.min_p))
    logprobs, entropy, stats = launchers.forward(rows, targets, layout, support=support,
                                                 return_entropy=o.return_entropy, **options)
    if kth is not None:
        stats = torch.cat([stats, kth[:, None]], dim=1)
    return logprobs, logprobs.new_empty(0) if entropy is None else entropy, stats


@_forward_op.register_fake
def _forward_fake(logits, targets, inv_temperatures, o):
    per_target = logits.new_empty(targets.shape, dtype=torch.float32)
    entropy = logits.new_empty(targets.shape[0] if o.return_entropy else 0, dtype=torch.float32)
    stats_columns = 3 if o.top_k > 0 else 2
    return per_target, entropy, logits.new_empty(targets.shape[0], stats_columns,
                                                 dtype=torch.float32)


def _backward_into(grad_out, logits, targets, inv_temperatures, stats, entropy, grad_logprobs,
                   grad_entropy, o):
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
    support = None
    if _filtering(o):
        support = _sampler.Support(None, stats[:, 2].contiguous() if o.top_k > 0 else None,
                                   _sampler.log_min_p(o.min_p))
        stats = stats[:, :2].contiguous()
    token_logprobs_launchers(o.backend).backward(
        rows, targets, layout, stats, entropy if grad_entropy is not None else None,
        grad_logprobs, grad_entropy, rows if in_place else grad_out, grad_layout,
        inv_temperature=_inv_temperature(inv_temperatures, o), softcap=o.softcap,
        ignore_index=o.ignore_index, support=support)
    if columns is not None:
        _topk_targets.write_token_columns_(rows if in_place else grad_out, grad_layout, columns)


@fused_op("fastalign::token_logprobs_backward", OPTIONS,
          tensors=f"Tensor logits, {_BACKWARD_TENSORS}", returns="Tensor")
def _backward_op(logits, targets, inv_temperatures, stats, entropy, grad_logprobs, grad_entropy,
                 o):
    """The gradient w.r.t. ``logits``: a fresh contiguous tensor of their shape and dtype."""
    grad_out = new_gradient(logits, o.backend)
    _backward_into(grad_out, logits, targets, inv_temperatures, stats, entropy, grad_logprobs,
                   grad_entropy, o)
    return grad_out


@_backward_op.register_fake
def _backward_fake(logits, *_):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@fused_op("fastalign::token_logprobs_backward_inplace", OPTIONS,
          tensors=f"Tensor(a!) logits, {_BACKWARD_TENSORS}", returns="()", mutates=("logits",))
def _backward_inplace_op(logits, targets, inv_temperatures, stats, entropy, grad_logprobs,
                         grad_entropy, o):
    """Writes the gradient over ``logits`` (``inplace_backward=True``). Declaring the mutation
    bumps the logits' version, so anything else that saved them for its backward raises
    instead of reading gradients as if they were logits."""
    _backward_into(logits, logits, targets, inv_temperatures, stats, entropy, grad_logprobs,
                   grad_entropy, o)


def _setup_context(ctx, tensors, o, output):
    logits, targets, inv_temperatures = tensors
    logprobs, entropy, stats = output
    # The sampler's log-probs say which rows' targets lie outside the support (-inf).
    ctx.save_for_backward(logits, targets, inv_temperatures, stats, entropy,
                          logprobs if _filtering(o) else None)
    # Unused outputs (an entropy kept for logging) then get None, not zeros to differentiate.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_stats):
    o = ctx.options
    if not o.return_entropy:
        grad_entropy = None
    if grad_logprobs is None and grad_entropy is None:
        return None, None, None
    logits, targets, inv_temperatures, stats, entropy, logprobs = ctx.saved_tensors
    if grad_logprobs is not None and logprobs is not None:
        # A target outside the support has the constant log-prob -inf: no gradient from it.
        grad_logprobs = grad_logprobs.masked_fill(logprobs == float("-inf"), 0.0)
    args = (targets, inv_temperatures, stats, entropy,
            None if grad_logprobs is None else grad_logprobs.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(), o)
    if o.inplace_backward:
        _backward_inplace_op(logits, *args)
        return logits, None, None
    return _backward_op(logits, *args), None, None


_forward_op.register_autograd(_setup_context, _backward)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    topk_targets: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    top_k: int | None = None,
    min_p: float | None = None,
    top_p: float | None = None,
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
            are taken before the scaling), so a tiny T cannot overflow finite logits. Or a
            float tensor of one temperature per row, shaped ``[...]`` (``logits.shape[:-1]``)
            or ``[N]`` (the rows flattened), each in that range (checked on CPU; on CUDA only
            with ``FASTALIGN_CHECK_TARGETS=1``, a check that syncs); a constant (no gradient).
            Not with ``topk_targets``.
        softcap: ``None`` or a cap ``s`` in the same range (Gemma-2's
            ``final_logit_softcapping``); ``s * tanh(z / s)`` keeps float32 relative precision
            for ``|z| << s`` as for ``|z| >> s``.
        ignore_index: rows whose target equals it give 0 in every output and zero gradient.
        return_entropy: also return the entropy ``-sum p log p`` of ``softmax(z')`` per row
            (with ``top_k`` / ``min_p``: of the renormalized distribution over the support).
        top_k, min_p: score the tokens as a sampler with Hugging Face's ``TopKLogitsWarper`` /
            ``MinPLogitsWarper`` drew them, in ``generate``'s order (temperature, then top-k,
            then min-p): ``log p`` is ``z'_t - logsumexp`` over the kept tokens only. ``top_k``
            (an int >= 1) keeps the tokens whose ``z'`` is at least the k-th largest (ties with
            it kept; k >= V keeps all); ``min_p`` (in (0, 1]) keeps those with
            ``p >= min_p * max p``. A target outside the kept support gets ``-inf`` and no
            gradient (mask such rows before summing); the gradient on kept columns is
            ``onehot - p_renorm``, 0 on removed ones. Not with ``topk_targets``. Costs a pass
            for the row max and one for the kept sums (``top_k``: one more, ``torch.topk``
            over chunks of rows); ops/_sampler.py.
        top_p: only None or 1.0 (no filtering): exact top-p needs each row's probabilities
            sorted, which these passes cannot do (``ValueError``); use ``min_p`` / ``top_k``.
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
    checks.check_row_temperature(temperature, logits.shape[:-1], logits.device, "logits")
    _sampler.check_options(top_k=top_k, min_p=min_p, top_p=top_p, temperature=temperature,
                           topk_targets=topk)
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

    inv_temperatures = _sampler.inverse_temperatures(temperature)
    options = OPTIONS.new(
        inv_temperature=1.0 if inv_temperatures is not None else 1.0 / float(temperature),
        softcap=None if softcap is None else float(softcap), ignore_index=int(ignore_index),
        return_entropy=return_entropy,
        # Logits whose layout needs a copy get a fresh gradient (the copy is not theirs), as do
        # logits whose elements share memory (no room there for each element's gradient).
        inplace_backward=(inplace_backward and not needs_copy(logits)
                          and not checks.has_internal_overlap(logits)),
        top_k=_sampler.effective_top_k(top_k, logits.shape[-1]),
        min_p=None if min_p is None else float(min_p),
        backend=select_backend(logits.device))
    rows_of_ids = targets.reshape(-1, targets.shape[-1]) if topk else targets.reshape(-1)
    logprobs, entropy, _ = _forward_op(logits, rows_of_ids.contiguous(), inv_temperatures,
                                       options)
    if return_entropy:
        return logprobs.view(targets.shape), entropy.view(leading_shape)
    return logprobs.view(targets.shape)
