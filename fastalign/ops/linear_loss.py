"""A fused-linear loss whose gradient is formed in the forward ("gradient in forward").

``linear_logprobs`` does not know, in its forward, what the loss will do with its log-probs, so
its backward must recompute every logits tile: 4 matmul passes over the head (8·N·D·V FLOPs).
A loss that can say, from a chunk's log-probs alone, how much the loss moves with each of them
(``dLoss/dlogp`` and ``dLoss/dentropy`` of those rows, its *coefficients*) lets that chunk's
logits turn into their own gradient while they exist, and the hidden and weight gradients follow
at once: 3 matmuls (6·N·D·V), no recompute, and the gradients wait in buffers for backward.

Per chunk of rows (whole sequences, or pairs, as the loss needs; at most ``rows_per_chunk``):

    Z   = hidden[chunk] @ weight.T + bias        one matmul, [rows, V] float32 (cuBLAS, MKL)
    stats, log p, entropy of each row            from Z: the token_logprobs kernels (Triton on
    g   = coefficients(chunk, log p, entropy)      CUDA, native C++ on the CPU) on the chunk;
    G   = dLoss/dZ written over Z                  the loss's own derivative, a few per row
    dHidden[chunk] = G @ weight ;  dWeight += G.T @ hidden[chunk] ;  dBias += G.sum(0)

so the extra memory is one chunk of float32 logits (``rows_per_chunk x V``) beside the
gradients themselves. The losses (``fastalign.nn``) then compute their value and metrics from
the log-probs with the same functions as the two-pass path, so both agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .._layout import row_layout
from . import _sampler
from ._backends import token_logprobs_launchers, work_buffer
from ._linear_backward import _addmm_fp32_
from ._tiles import NO_TARGET, raw_logits_tile

# A chunk of float32 logits: 256 MiB is 523 rows of a 128k vocabulary, wide enough for
# efficient matmuls, and far below a batch's logits.
DEFAULT_CHUNK_MB = 256.0


def rows_per_chunk(chunk_mb: float, vocab_size: int) -> int:
    """Rows of a float32 ``[rows, V]`` chunk within ``chunk_mb`` MiB (at least one)."""
    return max(1, int(chunk_mb * 2**20) // (4 * max(vocab_size, 1)))


def split_rows(rows: torch.Tensor, limit: int) -> list[torch.Tensor]:
    """``rows`` (flat row indices) in the fewest chunks of at most ``limit`` rows, of equal
    sizes (within one row). A chunk's matmuls re-read the whole head (and the weight gradient)
    whatever its height, so the count of chunks sets their cost; equal sizes then keep the
    buffers as small as that count allows (2048 rows within 392: 6 chunks of 341 or 342, not
    five of 392 and one of 88)."""
    if rows.numel() == 0:
        return []
    count = -(-rows.numel() // limit)
    return list(rows.tensor_split(count))


@dataclass
class Plan:
    """What one gradient-in-forward pass does.

    ``targets [N]`` (flattened, ``ignore_index`` rows are never in a chunk); ``chunks``: index
    tensors of rows, each a group the loss can differentiate on its own (disjoint);
    ``coefficients(index, logprobs, entropy) -> (dLoss/dlogp [r], dLoss/dentropy [r] or None)``
    float32, or None for a pass without gradient (a reference model's log-probs);
    ``need_entropy``: compute the entropy (for the coefficients or the metrics); ``top_k``
    (0: off) and ``log_min_p`` (None: off): log-probs and entropies over each row's sampler
    support (ops/_sampler.py), taken from the chunk's own logits."""
    targets: torch.Tensor
    chunks: list[torch.Tensor]
    coefficients: Callable | None
    inv_temperature: float
    softcap: float | None
    need_entropy: bool
    backend: str
    top_k: int = 0
    log_min_p: float | None = None


def _epilogues(plan: Plan, tile: torch.Tensor, targets: torch.Tensor):
    """``(log p [r], entropy [r] or None, write_grad)`` of a float32 logits chunk through the
    backend's ``token_logprobs`` kernels (Triton on CUDA, native on the CPU), over the
    sampler's support where the plan filters (the k-th value and row max from this chunk's
    logits, as ``token_logprobs`` takes them); ``write_grad(grad_logprobs, grad_entropy)`` then
    turns the chunk into ``dLoss/dZ`` in place."""
    launchers = token_logprobs_launchers(plan.backend)
    rows, layout = row_layout(tile)
    options = dict(inv_temperature=plan.inv_temperature, softcap=plan.softcap,
                   ignore_index=NO_TARGET)
    support = None
    if plan.top_k > 0 or plan.log_min_p is not None:
        kth = _sampler.token_thresholds(rows, layout, plan.top_k) if plan.top_k > 0 else None
        _, _, first = launchers.forward(rows, targets, layout, return_entropy=False, **options)
        support = _sampler.Support(first[:, 0].contiguous(), kth, plan.log_min_p)
    logprobs, entropy, stats = launchers.forward(rows, targets, layout, support=support,
                                                 return_entropy=plan.need_entropy, **options)
    backward_support = None if support is None else _sampler.Support(
        None, support.kth, support.log_min_p)

    def write_grad(grad_logprobs, grad_entropy):
        if support is not None:  # a target outside the support: a constant -inf, no gradient
            grad_logprobs = grad_logprobs.masked_fill(logprobs == float("-inf"), 0.0)
        launchers.backward(rows, targets, layout, stats,
                           entropy if grad_entropy is not None else None, grad_logprobs,
                           grad_entropy, rows, layout, support=backward_support, **options)
        return tile
    return logprobs, entropy, write_grad


def run(hidden, weight, bias, plan: Plan, *, need_hidden: bool, need_weight: bool,
        need_bias: bool):
    """``(logprobs [N], entropy [N] or None, dHidden [N, D] or None, dWeight or None,
    dBias or None)``: the chunked pass (module docstring), float32 results, gradients in the
    inputs' dtypes (accumulated in float32)."""
    n_rows = plan.targets.shape[0]
    new = dict(dtype=torch.float32, device=hidden.device)
    logprobs = torch.zeros(n_rows, **new)
    entropy = torch.zeros(n_rows, **new) if plan.need_entropy else None
    grad_hidden = work_buffer(hidden.shape, hidden.device, plan.backend, zero=True) \
        if need_hidden else None
    grad_weight = work_buffer(weight.shape, hidden.device, plan.backend, zero=True) \
        if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], **new) if need_bias else None
    # One float32 chunk buffer for all chunks: a fresh 256 MiB tensor per chunk would cost its
    # page faults again each time (a quarter of the logits matmul's time on a CPU).
    buffer = work_buffer((max((len(c) for c in plan.chunks), default=0), weight.shape[0]),
                         hidden.device, plan.backend)
    for index in plan.chunks:
        rows = hidden.index_select(0, index)
        targets = plan.targets.index_select(0, index).long()
        tile = _logits(rows, weight, bias, buffer[:len(index)])
        chunk_logprobs, chunk_entropy, write_grad = _epilogues(plan, tile, targets)
        logprobs.index_copy_(0, index, chunk_logprobs)
        if entropy is not None:
            entropy.index_copy_(0, index, chunk_entropy)
        if plan.coefficients is None:
            continue
        grad = write_grad(*plan.coefficients(index, chunk_logprobs, chunk_entropy))
        accumulate_head_grads(grad, index, rows, weight, grad_hidden, grad_weight, grad_bias)
    return (logprobs, entropy,
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


def accumulate_head_grads(grad, index, rows, weight, grad_hidden, grad_weight, grad_bias):
    """A chunk's logits-gradient ``grad [r, V]`` (``rows = hidden[index]``) into the float32
    gradient buffers that are not None: ``dHidden[index] = G @ weight``, ``dWeight += G.T @
    rows``, ``dBias += G.sum(0)`` (``G`` in the hidden states' dtype, for the matmuls)."""
    grad = grad if grad.dtype == rows.dtype else grad.to(rows.dtype)
    if grad_hidden is not None:
        grad_hidden.index_add_(0, index, _matmul_fp32(grad, weight))
    if grad_weight is not None:
        _addmm_fp32_(grad_weight, grad.t(), rows)
    if grad_bias is not None:
        grad_bias += grad.sum(0, dtype=torch.float32)


def _logits(rows, weight, bias, out: torch.Tensor) -> torch.Tensor:
    """``rows @ weight.T + bias`` as float32 ``[r, V]``, into ``out`` where the dtypes allow
    (float32 operands), else a fresh tile (``raw_logits_tile``: the inputs' rounding)."""
    if not (rows.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)):
        return raw_logits_tile(rows, weight, bias, 0, weight.shape[0])
    if bias is None:
        return torch.mm(rows, weight.t(), out=out)
    return torch.addmm(bias, rows, weight.t(), out=out)


def _matmul_fp32(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(grad.shape[0], weight.shape[1], dtype=torch.float32, device=grad.device)
    _addmm_fp32_(out, grad, weight.to(grad.dtype))
    return out


def save_grads(ctx, grads, backend: str) -> None:
    """Keeps the gradients formed in the forward (None where not asked) for ``scaled_grads``."""
    ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
    ctx.present, ctx.backend = [g is not None for g in grads], backend


def scaled_grads(ctx, grad_anchor: torch.Tensor) -> list:
    """``save_grads``' gradients times the loss's upstream gradient, each into a new buffer (a
    saved one may be returned again by a second backward), float32 ones from ``work_buffer``."""
    return [torch.mul(g, grad_anchor.to(g.dtype),
                      out=work_buffer(g.shape, g.device, ctx.backend)
                      if g.dtype == torch.float32 else None) if present else None
            for g, present in zip(ctx.saved_tensors, ctx.present)]


class _GradInForward(torch.autograd.Function):
    """Outputs ``(anchor, logprobs, entropy)``: ``anchor`` is a 0 whose gradient is the loss's
    (the caller adds it to the loss value it computes from the log-probs); the others carry no
    gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        logprobs, entropy, *grads = run(hidden, weight, bias, plan, need_hidden=need_hidden,
                                        need_weight=need_weight, need_bias=need_bias)
        save_grads(ctx, grads, plan.backend)
        entropy = logprobs.new_empty(0) if entropy is None else entropy
        ctx.mark_non_differentiable(logprobs, entropy)
        return logprobs.new_zeros(()), logprobs, entropy

    @staticmethod
    def backward(ctx, grad_anchor, _grad_logprobs, _grad_entropy):
        return (*scaled_grads(ctx, grad_anchor), None)


@torch.no_grad()
def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     plan: Plan) -> torch.Tensor:
    """``[N]`` float32 log-probs without gradient from the same chunks (one wide matmul per
    chunk instead of ``linear_logprobs``' narrow tiles): a reference model's side."""
    return run(hidden, weight, bias, plan, need_hidden=False, need_weight=False,
               need_bias=False)[0]


def linear_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                plan: Plan):
    """``(anchor, logprobs [N], entropy [N] or None)`` of ``hidden [N, D]`` (see
    ``_GradInForward``); the loss is ``value.detach() + anchor``."""
    anchor, logprobs, entropy = _GradInForward.apply(hidden, weight, bias, plan)
    return anchor, logprobs, entropy if plan.need_entropy else None
