"""The backward of every fused-linear op: gradients of an lm_head from logits-gradient tiles.

For each slice ``[start, end)`` of the vocabulary the backend forms ``G = dLoss/dz`` for all
rows (``[N, end - start]``, in the inputs' dtype, recomputed from the hidden states; the
``[N, V]`` logits never exist), and two matmuls consume it:

    dHidden     += G @ weight[start:end]      accumulated over slices in float32
    dWeight[s]   = G.T @ hidden               one matmul over all N rows: no accumulator
    dBias[s]     = G.sum(0)                   in float32

so the extra memory is one tile plus, for bf16/fp16 inputs, a float32 ``[N, D]`` accumulator.
Rounding each slice's ``G @ W`` to bf16 before summing would bias training (TRL measured the
entropy drifting); the float32 accumulator avoids it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._compact import scatter_rows

# torch.addmm(..., out_dtype=float32) from bf16/fp16 operands exists on CUDA since torch 2.8.
_HAS_MM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc`` without rounding ``a @ b`` to the inputs' dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _HAS_MM_OUT_DTYPE and acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def linear_backward(hidden: torch.Tensor, weight: torch.Tensor, cols: int,
                    grad_tile: Callable[[int, int], torch.Tensor], *, need_hidden: bool,
                    need_weight: bool, need_bias: bool):
    """``(dHidden [N, D] float32 or None, dWeight [V, D] in weight.dtype or None,
    dBias [V] float32 or None)`` from ``grad_tile(start, end) -> G [N, end - start]`` in
    ``hidden``'s dtype (the weight may have another: its slices are cast as they are used)."""
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) \
        if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(vocab_size, dtype=torch.float32, device=weight.device) \
        if need_bias else None
    if n_rows == 0:
        for grad in (grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
        return grad_hidden, grad_weight, grad_bias
    for start in range(0, vocab_size, cols):
        end = min(start + cols, vocab_size)
        tile = grad_tile(start, end)  # in hidden's dtype, like the matmuls
        if need_hidden:
            _addmm_fp32_(grad_hidden, tile, weight[start:end].to(tile.dtype))
        if need_weight and grad_weight.dtype == tile.dtype:
            torch.mm(tile.t(), hidden, out=grad_weight[start:end])
        elif need_weight:  # a weight of another dtype (fp32 master weights under autocast)
            grad_weight[start:end] = torch.mm(tile.t(), hidden)
        if need_bias:
            torch.sum(tile, dim=0, dtype=torch.float32, out=grad_bias[start:end])
    return grad_hidden, grad_weight, grad_bias


def op_outputs(like: torch.Tensor, grads) -> tuple[torch.Tensor, ...]:
    """Custom ops return tensors only, and no two outputs may alias: a fresh empty tensor for
    each gradient that was not asked for."""
    return tuple(like.new_empty(0) if grad is None else grad for grad in grads)


def kept_rows_outputs(hidden, bias, grads, rows, group=None) -> tuple[torch.Tensor, ...]:
    """A backward op's outputs from :func:`linear_backward`'s gradients of the kept ``rows``
    (``_compact``; None: all): dHidden summed over the ranks of ``group`` (a head sharded by
    vocabulary: each rank's slice adds its part), placed back among all of ``hidden``'s rows,
    and each gradient in its input's dtype."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        if group is not None:
            import torch.distributed as dist
            dist.all_reduce(grad_hidden, group=group)
        grad_hidden = scatter_rows(grad_hidden, rows, hidden.shape[0]).to(hidden.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return op_outputs(hidden, (grad_hidden, grad_weight, grad_bias))


def fake_backward(hidden, weight, bias, *tensors_then_options):
    """The ``register_fake`` of a fused-linear backward op ``(hidden, weight, bias, ...,
    options)`` whose options carry ``need_hidden``, ``need_weight``, ``need_bias``: the
    shapes its ``op_outputs`` has."""
    o = tensors_then_options[-1]
    wanted = ((hidden, o.need_hidden), (weight, o.need_weight), (bias, o.need_bias))
    return op_outputs(hidden, [torch.empty_like(x) if need else None for x, need in wanted])
