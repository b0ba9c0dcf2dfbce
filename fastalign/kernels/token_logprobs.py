"""Triton kernels for per-token log-probs and entropy from logits, and their launchers.

Forward: one program per row streams the row once in ``BLOCK_V`` tiles with an online
log-sum-exp, picks the target logit with a single load and (optionally) keeps the running
``sum(p * (z' - max))`` for the entropy. Nothing of size ``[N, V]`` is allocated. Each row's
statistics ``(m, log S)`` are kept apart, ``m`` the max of the keys (``_math``: softcap(z), before
the temperature) and ``S = sum exp((key - m) / T)``, never summed into one log-sum-exp: at
``|z| = 1e6`` that sum would round ``log p = z' - lse`` by 0.06, at 1e20 by everything.

Backward: one program per (row, tile) recomputes ``p = exp((key - m) / T - log S)`` from the
saved statistics and writes the gradient of ``go_lp * logprob + go_ent * entropy`` in the
logits' dtype, either into a fresh buffer or, on request, over the logits themselves.

With the sampler's support (``SUPPORT``: fastalign/ops/_sampler.py) the forward runs a second
time from each row's known max, with the keys of removed columns set to -inf as they are
loaded (the same online sums then count the kept columns only, and a removed target reads
-inf); the backward writes 0 there. ``ROW_TEMPERATURE``: each row's ``1 / T`` from a vector.

Rows address memory as ``(row // n_inner) * stride_outer + (row % n_inner) * stride_inner`` so a
``[:, :-1]`` slice of ``[B, T, V]`` logits is read where it lies. Offsets are int64: ``N * V``
passes 2**31 at 8k tokens of a 256k vocabulary.
"""

import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (records how these kernels were defined: fastalign/_backend.py)
from ._math import (FINITE_MIN, LOG_P_FLOOR, fp_fusion, in_support, logit_key, sampler_args,
                    scaled_delta, softcap_grad)
from ._rows import block_and_warps, row_offset

# One tuned default per kernel (bench/tune_token_logprobs.py sweeps these on a GPU); the
# launchers read them at call time, so the tests can shrink the tiles to cover the tails.
# Measured on an H200 (bench/results/tune_token_logprobs_cuda.csv): the forward reaches 87% (bf16)
# to 104% (fp32, read-only) of the device's copy bandwidth with 4096 x 4 warps, the backward
# 91% with 8192 x 8 warps, within 1% of the best of each sweep.
FORWARD_BLOCK_V = 4096
FORWARD_NUM_WARPS = 4
BACKWARD_BLOCK_V = 8192
BACKWARD_NUM_WARPS = 8


@triton.jit
def _token_logprobs_forward_kernel(
    logits_ptr, targets_ptr, logprobs_ptr, entropy_ptr, stats_ptr,
    inv_temperature_ptr, support_max_ptr, kth_ptr,
    n_inner, stride_outer, stride_inner, vocab_size, ignore_index, col_start,
    inv_temperature, softcap, log_min_p,
    HAS_SOFTCAP: tl.constexpr, RETURN_ENTROPY: tl.constexpr, ROW_TEMPERATURE: tl.constexpr,
    SUPPORT: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_MIN_P: tl.constexpr,
    PARTIALS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # PARTIALS: the row is one vocabulary slice whose first column is the id col_start.
    target = tl.load(targets_ptr + row).to(tl.int64) - col_start
    if not PARTIALS and target == ignore_index:
        # One branch per row costs nothing here, so ignored rows are not compacted away.
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(stats_ptr + 2 * row, 0.0)
        tl.store(stats_ptr + 2 * row + 1, 0.0)
        if RETURN_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    if ROW_TEMPERATURE:
        inv_temperature = tl.load(inv_temperature_ptr + row)

    # The running max of the keys starts at the most negative float (FINITE_MIN), not
    # -inf: key - max is then never -inf - -inf, and no finite logit lies below it.
    running_max = FINITE_MIN
    kth = 0.0
    if SUPPORT:  # the row's max is known: every kept key lies at or below it
        running_max = tl.load(support_max_ptr + row)
        if HAS_TOP_K:
            kth = tl.load(kth_ptr + row)
    sum_exp = 0.0  # sum exp((key - running_max) / T)
    sum_exp_shifted = 0.0  # sum exp(s) * s with s = (key - running_max) / T, for the entropy
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < vocab_size
        z = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
        # Columns past V must count as exp(-inf) = 0, never exp(0).
        key = tl.where(in_vocab, logit_key(z, softcap, HAS_SOFTCAP), -float("inf"))
        if SUPPORT:
            key = tl.where(in_support(z, key, running_max, kth, log_min_p, inv_temperature,
                                      HAS_TOP_K, HAS_MIN_P), key, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(key, axis=0))
        delta = scaled_delta(running_max, new_max, inv_temperature)
        rescale = tl.exp(delta)
        shifted = (key - new_max) * inv_temperature
        p = tl.exp(shifted)
        if RETURN_ENTROPY:
            # Kept relative to the running max (not as sum p*z') so entropy does not cancel
            # catastrophically when logits are large; exp(d) * d is 0 (not 0 * -inf) for a
            # far smaller old max. Clamping -inf (masked columns, -inf logits) to a finite
            # value makes their term 0 * finite = 0 rather than NaN.
            sum_exp_shifted = rescale * sum_exp_shifted + (rescale * delta) * sum_exp \
                + tl.sum(p * tl.maximum(shifted, FINITE_MIN), axis=0)
        sum_exp = sum_exp * rescale + tl.sum(p, axis=0)
        running_max = new_max

    # An id outside [0, V) is never read: its row reports NaN in every output and gradient
    # (in a slice: its key is 0, the sum over slices of the slice holding it).
    valid = (target >= 0) & (target < vocab_size)
    z_target = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32)
    key_target = logit_key(z_target, softcap, HAS_SOFTCAP)
    if SUPPORT:  # a target outside the support: log p = -inf
        key_target = tl.where(in_support(z_target, key_target, running_max, kth, log_min_p,
                                         inv_temperature, HAS_TOP_K, HAS_MIN_P),
                              key_target, -float("inf"))
    if PARTIALS:  # the slice's (max key, sum, entropy sum, target key) for _vocab_stats' merge
        tl.store(logprobs_ptr + row, tl.where(valid, key_target, 0.0))
        tl.store(stats_ptr + 2 * row, running_max)
        tl.store(stats_ptr + 2 * row + 1, sum_exp)
        if RETURN_ENTROPY:
            tl.store(entropy_ptr + row, sum_exp_shifted)
        return
    log_sum = tl.log(sum_exp)
    nan_if_invalid = tl.where(valid, 0.0, float("nan"))
    tl.store(logprobs_ptr + row,
             (key_target - running_max) * inv_temperature - log_sum + nan_if_invalid)
    tl.store(stats_ptr + 2 * row, running_max + nan_if_invalid)
    tl.store(stats_ptr + 2 * row + 1, log_sum + nan_if_invalid)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, log_sum - sum_exp_shifted / sum_exp + nan_if_invalid)


@triton.jit
def _token_logprobs_backward_kernel(
    logits_ptr, targets_ptr, stats_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_ptr,
    inv_temperature_ptr, kth_ptr,
    n_inner, stride_outer, stride_inner, grad_stride_outer, grad_stride_inner,
    vocab_size, ignore_index, inv_temperature, softcap, log_min_p,
    HAS_SOFTCAP: tl.constexpr, HAS_LOGPROB_GRAD: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    ROW_TEMPERATURE: tl.constexpr, SUPPORT: tl.constexpr, HAS_TOP_K: tl.constexpr,
    HAS_MIN_P: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab_size
    grad_row_ptr = grad_ptr + row_offset(row, n_inner, grad_stride_outer, grad_stride_inner)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:
        tl.store(grad_row_ptr + cols, tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty),
                 mask=in_vocab)
        return
    row_ptr = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    if ROW_TEMPERATURE:
        inv_temperature = tl.load(inv_temperature_ptr + row)
    z = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
    key = logit_key(z, softcap, HAS_SOFTCAP)
    # NaN statistics (invalid target) make the row NaN.
    row_max = tl.load(stats_ptr + 2 * row)
    log_p = (key - row_max) * inv_temperature - tl.load(stats_ptr + 2 * row + 1)
    p = tl.exp(log_p)
    grad = tl.zeros([BLOCK_V], tl.float32)
    if HAS_LOGPROB_GRAD:
        go_lp = tl.load(grad_logprobs_ptr + row)
        grad += go_lp * (tl.where(cols == target, 1.0, 0.0) - p)
    if HAS_ENTROPY_GRAD:
        # d entropy / dz'_j = p_j * (-log p_j - entropy), log p clamped at LOG_P_FLOOR (_math).
        go_ent = tl.load(grad_entropy_ptr + row)
        row_entropy = tl.load(entropy_ptr + row)
        grad += go_ent * p * (-tl.maximum(log_p, LOG_P_FLOOR) - row_entropy)
    grad *= inv_temperature
    if HAS_SOFTCAP:
        grad *= softcap_grad(key, softcap)
    if SUPPORT:  # p = 0 off the sampler's support (a removed target's go_lp is 0 already)
        kth = 0.0
        if HAS_TOP_K:
            kth = tl.load(kth_ptr + row)
        grad = tl.where(in_support(z, key, row_max, kth, log_min_p, inv_temperature,
                                   HAS_TOP_K, HAS_MIN_P), grad, 0.0)
    tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)


def token_logprobs_forward(logits, targets, layout, *,
                           inv_temperature, softcap, ignore_index, return_entropy,
                           block_v=None, num_warps=None, support=None):
    """Launches the forward kernel over ``targets.numel()`` rows.

    Args:
        logits: the ``[..., V]`` logits, rows laid out as ``layout`` (a ``RowLayout``) says.
        targets: ``[N]`` contiguous int32/int64 ids.
    Returns:
        ``(logprobs [N], entropy [N] or None, stats [N, 2])``, float32; ``stats`` (each row's
        max key and log-sum, see the module docstring) is what the backward needs.
        ``inv_temperature``: a float or float32 ``[N]``; ``support``: the sampler's
        (``fastalign.ops._sampler.Support``), sums over it only.
    """
    logprobs, entropy, stats = _forward(logits, targets, layout, inv_temperature, softcap,
                                        ignore_index, return_entropy, block_v, num_warps,
                                        support, col_start=None)
    return logprobs, entropy, stats


def slice_partials(logits, targets, layout, col_start: int, *, inv_temperature, softcap,
                   return_entropy, block_v=None, num_warps=None, support=None):
    """One vocabulary slice's softmax statistics, as ``_vocab_stats.merge_vocab_partials``
    merges them: ``logits`` the ``[N, cols]`` logits of ids ``[col_start, col_start + cols)``,
    ``targets [N]`` whole-vocabulary ids (no row ignored). Returns ``(target key [N]``, 0 where
    the target lies in another slice, ``(max key, sum exp((key - max) / T)) [N, 2]``, the
    entropy's shifted sum ``[N]`` or None)``, float32; with the sampler's ``support`` every
    slice's max is the row's."""
    target_key, shifted, stats = _forward(logits, targets, layout, inv_temperature, softcap,
                                          0, return_entropy, block_v, num_warps, support,
                                          col_start=col_start)
    return target_key, stats, shifted


def _forward(logits, targets, layout, inv_temperature, softcap, ignore_index, return_entropy,
             block_v, num_warps, support, *, col_start):
    """The forward kernel over ``targets.numel()`` rows: whole rows, or (``col_start`` not
    None) one vocabulary slice's partials in the same three buffers."""
    n_rows, vocab_size = targets.numel(), logits.shape[-1]
    logprobs = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    stats = torch.empty(n_rows, 2, device=logits.device, dtype=torch.float32)
    entropy = torch.empty(n_rows, device=logits.device, dtype=torch.float32) if return_entropy else None
    block, warps = block_and_warps(vocab_size, block_v or FORWARD_BLOCK_V,
                                    num_warps or FORWARD_NUM_WARPS)
    pointers, scalars, flags = sampler_args(inv_temperature, support, stats)
    _token_logprobs_forward_kernel[(n_rows,)](
        logits, targets, logprobs, logprobs if entropy is None else entropy, stats, *pointers,
        layout.n_inner, layout.stride_outer, layout.stride_inner, vocab_size, ignore_index,
        0 if col_start is None else col_start,
        scalars["inv_temperature"], 1.0 if softcap is None else softcap, scalars["log_min_p"],
        HAS_SOFTCAP=softcap is not None, RETURN_ENTROPY=return_entropy,
        PARTIALS=col_start is not None, BLOCK_V=block, num_warps=warps, **flags,
        **fp_fusion(softcap is not None),
    )
    return logprobs, entropy, stats


def token_logprobs_backward(logits, targets, layout, stats, entropy, grad_logprobs,
                            grad_entropy, grad_out, grad_layout, *,
                            inv_temperature, softcap, ignore_index,
                            block_v=None, num_warps=None, support=None):
    """Writes the gradient w.r.t. ``logits`` into ``grad_out`` and returns it.

    ``grad_out`` is a fresh contiguous ``[..., V]`` tensor or ``logits`` itself (in-place
    backward); ``grad_logprobs`` / ``grad_entropy`` are contiguous ``[N]`` float32 or None.
    ``support``: the sampler's (its ``kth``; the max is the stats'), 0 off it.
    """
    n_rows, vocab_size = targets.numel(), logits.shape[-1]
    block, warps = block_and_warps(vocab_size, block_v or BACKWARD_BLOCK_V,
                                    num_warps or BACKWARD_NUM_WARPS)
    (inv_temperature_ptr, _, kth_ptr), scalars, flags = sampler_args(inv_temperature,
                                                                      support, stats)
    _token_logprobs_backward_kernel[(n_rows, triton.cdiv(vocab_size, block))](
        logits, targets, stats, stats if entropy is None else entropy,
        stats if grad_logprobs is None else grad_logprobs,
        stats if grad_entropy is None else grad_entropy, grad_out, inv_temperature_ptr, kth_ptr,
        layout.n_inner, layout.stride_outer, layout.stride_inner,
        grad_layout.stride_outer, grad_layout.stride_inner,
        vocab_size, ignore_index, scalars["inv_temperature"],
        1.0 if softcap is None else softcap, scalars["log_min_p"],
        HAS_SOFTCAP=softcap is not None, HAS_LOGPROB_GRAD=grad_logprobs is not None,
        HAS_ENTROPY_GRAD=grad_entropy is not None, BLOCK_V=block, num_warps=warps,
        **flags, **fp_fusion(softcap is not None),
    )
    return grad_out
