"""Native C++ backend of ``token_logprobs`` (``csrc/logprobs.cpp``): one vectorized pass over
each row forward, one backward, parallel over rows. Same launcher signatures as the Triton
kernels' and the torch twin's, so the op treats all three alike.

The kernel returns each row's softmax statistics (the max key and sums relative to it, see
``csrc/logprobs.cpp``); the few ``[N]``-sized steps that turn them into log-probs, entropy and
the saved ``(max, log-sum)`` pair run here in torch.
"""

from __future__ import annotations

import torch

from .._native import extension
from ._sampler import native_grad_support, native_support
from ._tiles import native_temperature, target_masks


def token_logprobs_forward(logits, targets, layout, *,
                           inv_temperature, softcap, ignore_index, return_entropy, support=None):
    n_rows, vocab_size = targets.numel(), logits.shape[-1]
    scalar, per_row = native_temperature(inv_temperature)
    # Ignored rows are not read at all (padding costs nothing).
    row_max, sum_exp, sum_shifted, target_logit = extension().softmax_stats(
        logits, layout.native_arg(), n_rows, targets.long(), 0, ignore_index,
        scalar, softcap, return_entropy, row_inv_temperature=per_row, **native_support(support))
    ignored, _, nan_if_invalid = target_masks(targets, vocab_size, ignore_index)
    log_sum = sum_exp.log()
    # (key - max) / T, the difference taken before the scaling, as the kernel does; a target
    # outside the sampler's support reads as -inf.
    logprobs = torch.where(ignored, 0.0,
                           (target_logit - row_max) * inv_temperature - log_sum + nan_if_invalid)
    stats = torch.stack([torch.where(ignored, 0.0, row_max + nan_if_invalid),
                         torch.where(ignored, 0.0, log_sum + nan_if_invalid)], dim=1)
    entropy = None
    if return_entropy:
        entropy = torch.where(ignored, 0.0, log_sum - sum_shifted / sum_exp + nan_if_invalid)
    return logprobs, entropy, stats


def token_logprobs_backward(logits, targets, layout, stats, entropy, grad_logprobs,
                            grad_entropy, grad_out, grad_layout, *,
                            inv_temperature, softcap, ignore_index, support=None):
    scalar, per_row = native_temperature(inv_temperature)
    extension().logprobs_grad(
        logits, layout.native_arg(), targets.numel(), grad_out, grad_layout.native_arg(),
        targets.long(), 0, ignore_index,
        scalar, softcap, stats[:, 0].contiguous(), stats[:, 1].contiguous(), entropy,
        grad_logprobs, grad_entropy, row_inv_temperature=per_row, **native_grad_support(support))
    return grad_out
