"""``fastalign.token_logprobs``: per-token log-probs (and entropy) of chosen tokens from logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validation as checks
from .._backend import select_backend
from .._layout import RowLayout, row_layout


@dataclass(frozen=True)
class _Options:
    """Everything but tensors, so that backward returns a short tuple."""

    backend: str
    inv_temperature: float
    softcap: float | None
    ignore_index: int
    return_entropy: bool
    inplace_backward: bool


def _launchers(backend: str):
    """(forward, backward) launchers of a backend; each backend's module has the same pair."""
    if backend == "triton":
        from .. import kernels as module
    elif backend == "torch":
        from . import token_logprobs_torch as module
    else:  # select_backend only returns what is available; native lands with csrc/.
        raise RuntimeError(f"token_logprobs has no {backend} backend")
    return module.token_logprobs_forward, module.token_logprobs_backward


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, layout: RowLayout,
                options: _Options):
        forward_launcher, _ = _launchers(options.backend)
        logprobs, entropy, lse = forward_launcher(
            logits, targets, layout.n_inner, layout.stride_outer, layout.stride_inner,
            inv_temperature=options.inv_temperature, softcap=options.softcap,
            ignore_index=options.ignore_index, return_entropy=options.return_entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.layout, ctx.options = layout, options
        return (logprobs, entropy) if options.return_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None = None):
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None
        logits, targets, lse, entropy = ctx.saved_tensors
        layout, options = ctx.layout, ctx.options
        if options.inplace_backward:
            grad_out = logits
            # Anything else that saved these logits for its backward now fails loudly instead
            # of reading gradients as if they were logits.
            torch.autograd.graph.increment_version(logits)
        else:
            grad_out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _, backward_launcher = _launchers(options.backend)
        backward_launcher(
            logits, targets, layout.n_inner, layout.stride_outer, layout.stride_inner,
            lse, entropy,
            None if grad_logprobs is None else grad_logprobs.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(),
            grad_out, inv_temperature=options.inv_temperature, softcap=options.softcap,
            ignore_index=options.ignore_index)
        return grad_out, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
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
        temperature: positive; divides the (soft-capped) logits.
        softcap: ``None`` or a positive cap ``s`` (Gemma-2's ``final_logit_softcapping``).
        ignore_index: rows whose target equals it give 0 in every output and zero gradient.
        return_entropy: also return the entropy ``-sum p log p`` of ``softmax(z')`` per row.
        inplace_backward: write the gradient over ``logits`` instead of a new ``[..., V]``
            buffer, saving one logits-sized allocation. Only for logits nobody reads after this
            call (and not for a leaf tensor); anything else that saved them for its backward
            then raises instead of reading gradients.

    Returns:
        ``logprobs [...]`` float32, or ``(logprobs, entropy)`` when ``return_entropy``; both are
        differentiable w.r.t. ``logits``. The gradient has the logits' dtype.

    Target ids outside ``[0, V)`` (other than ``ignore_index``) raise ``ValueError`` for CPU
    tensors. For CUDA tensors that check would cost a host sync, so it runs only when
    ``FASTALIGN_CHECK_TARGETS=1``; otherwise the kernel never reads out of bounds and reports the
    row as NaN in every output and in its gradient.

    Memory: forward allocates the outputs and one float32 per row (the log-sum-exp kept for
    backward); backward allocates only the gradient it returns (nothing with
    ``inplace_backward``). The backend follows the device
    (Triton on CUDA, the chunked torch path elsewhere) unless ``FASTALIGN_BACKEND`` forces one.
    """
    checks.check_float_tensor("logits", logits)
    checks.check_targets(targets, logits.shape[:-1], logits.shape[-1], logits.device, ignore_index)
    checks.check_positive("temperature", temperature)
    checks.check_positive("softcap", softcap, allow_none=True)
    checks.check_flag("return_entropy", return_entropy)
    checks.check_flag("inplace_backward", inplace_backward)
    if inplace_backward and logits.is_leaf and logits.requires_grad:
        raise ValueError("inplace_backward=True would overwrite a leaf tensor with its own "
                         "gradient; use it on logits produced by a layer, or leave it False")

    leading_shape = targets.shape
    if targets.numel() == 0:
        # Nothing to read; keep the result attached to the graph so .backward() still works.
        logprobs = logits.sum(-1, dtype=torch.float32) * 0.0
        return (logprobs, logprobs.clone()) if return_entropy else logprobs

    options = _Options(
        backend=select_backend(logits.device), inv_temperature=1.0 / float(temperature),
        softcap=None if softcap is None else float(softcap), ignore_index=int(ignore_index),
        return_entropy=return_entropy, inplace_backward=inplace_backward)
    logits, layout = row_layout(logits)
    outputs = _TokenLogprobs.apply(logits, targets.reshape(-1).contiguous(), layout, options)
    if return_entropy:
        logprobs, entropy = outputs
        return logprobs.view(leading_shape), entropy.view(leading_shape)
    return outputs.view(leading_shape)
