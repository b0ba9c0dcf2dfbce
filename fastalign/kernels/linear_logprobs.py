"""Triton kernels for log-probs and entropy of ``hidden @ weight.T``, and their launchers.

Forward (fully fused): a 2-D grid of (token tile, vocabulary split). Each program walks its
split in ``BLOCK_V`` tiles; each tile of logits is a ``tl.dot`` over ``D`` in ``BLOCK_D`` steps
with an fp32 accumulator, soft-capped, masked (columns past V are -inf, never exp(0)) and folded
into an online log-sum-exp: the split's max key, ``sum exp(x)`` and, for the entropy,
``sum exp(x) * x`` with ``x = (key - max) / T`` (``_math``, ``fastalign.ops._vocab_stats``);
on request also the row statistics TRL logs (``ROW_STATS``: the sum of the keys, ``sum exp(2x)``
and the max key before the target). The target logit is picked inside the tile. Splits write
``[S, N]`` partial statistics that ``fastalign.ops._vocab_stats`` merges (as it merges ranks).
No logits leave the registers.

Backward: one program per (token tile, vocabulary tile) of a vocabulary slice recomputes the
logits tile the same way, turns it into ``dLoss/dz`` in registers from the saved per-row
softmax max and log-sum (and entropy), and stores it in ``hidden``'s dtype into a ``[N, cols]``
slice buffer that ``fastalign.ops._linear_backward`` feeds to two cuBLAS matmuls (dHidden,
dWeight). That slice is a buffer of about ``GRAD_TILE_ELEMENTS`` (never ``N * V``); a backward
that accumulates dHidden and dWeight straight from registers would drop it and is not written.

The sampler's support (``SUPPORT``: fastalign/ops/_sampler.py) reruns the forward from each
row's known max with the keys of removed columns set to -inf; the backward writes 0 there; its
k-th largest logit comes from ``linear_logits_tile``, tiles formed by the same ``_logits_tile``
with the backward's tiling, so every pass sees a column with the same value (a column's
membership must not change between passes). ``ROW_TEMPERATURE``: ``1 / T`` per row.

Offsets are int64: ``V * D`` passes 2**31 for a 256k vocabulary at D = 8192.
"""

import functools

import torch
import triton
import triton.language as tl

from ._interpreter import INTERPRETED
from ._math import (FINITE_MIN, LOG_P_FLOOR, fp_fusion, in_support, logit_key, sampler_args,
                    scaled_delta, softcap_grad)

# One default per kernel, read at call time (tests shrink them to cover tails). The best of
# bench/tune_linear_logprobs.py's sweep on an H100 (bench/results/tune_linear_logprobs_cuda.csv:
# the forward at 70% of cuBLAS, 17 ms where 64 x 128 tiles took 36 ms, and the gradient slice
# at 81%); ``_tiles`` shrinks them where shared memory is smaller, fp32 operands included.
FORWARD_BLOCK_N = 128
FORWARD_BLOCK_V = 256
FORWARD_BLOCK_D = 64
FORWARD_NUM_WARPS = 8
FORWARD_NUM_STAGES = 3
GRAD_BLOCK_N = 128
GRAD_BLOCK_V = 256
GRAD_BLOCK_D = 64
GRAD_NUM_WARPS = 8
GRAD_NUM_STAGES = 3
# Programs the forward aims for (vocabulary splits x token tiles): a few waves of any GPU.
FORWARD_TARGET_PROGRAMS = 1024
# The backward's logits-gradient slice: about 16M elements (32 MiB in bf16).
GRAD_TILE_ELEMENTS = 1 << 24


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, hidden_dim,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """``hidden[rows] @ weight[cols].T (+ bias[cols])`` as an fp32 ``[BLOCK_N, BLOCK_V]`` block;
    ``rows``/``cols`` are int64 and both matrices are row-major with ``hidden_dim`` columns."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, hidden_dim, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        in_dims = dims < hidden_dim
        h = tl.load(hidden_ptr + rows[:, None] * hidden_dim + dims[None, :],
                    mask=row_mask[:, None] & in_dims[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * hidden_dim + dims[None, :],
                    mask=col_mask[:, None] & in_dims[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong (triton-lang/triton#11584)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        else:  # the dot runs in hidden's dtype; a weight of another dtype is cast on load
            w = w.to(h.dtype)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _row_inv_temperature(inv_temperature_ptr, inv_temperature, rows, row_mask,
                         ROW_TEMPERATURE: tl.constexpr, BLOCK_N: tl.constexpr):
    """``1 / T`` of each row of a tile, ``[BLOCK_N]``: loaded per row, or the one value."""
    if ROW_TEMPERATURE:
        inv_t = tl.load(inv_temperature_ptr + rows, mask=row_mask, other=1.0)
    else:
        inv_t = tl.zeros((BLOCK_N,), dtype=tl.float32) + inv_temperature
    return inv_t


@triton.jit
def _linear_logprobs_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    row_max_ptr, sum_exp_ptr, sum_exp_shifted_ptr, target_logit_ptr,
    key_sum_ptr, sum_sq_exp_ptr, max_before_ptr, inv_temperature_ptr, support_max_ptr, kth_ptr,
    n_rows, vocab_size, hidden_dim, cols_per_split, inv_temperature, softcap, log_min_p,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
    ROW_STATS: tl.constexpr, ROW_TEMPERATURE: tl.constexpr, SUPPORT: tl.constexpr,
    HAS_TOP_K: tl.constexpr, HAS_MIN_P: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    inv_t = _row_inv_temperature(inv_temperature_ptr, inv_temperature, rows, row_mask,
                                 ROW_TEMPERATURE, BLOCK_N)
    # Maxes of the keys (softcap(z), before the temperature: _math) start at the most negative
    # float, not -inf, so key - max is never -inf - -inf.
    running_max = tl.full((BLOCK_N,), FINITE_MIN, dtype=tl.float32)
    kth = running_max
    if SUPPORT:  # the rows' maxes are known: every kept key lies at or below them
        running_max = tl.load(support_max_ptr + rows, mask=row_mask, other=0.0)
        if HAS_TOP_K:
            kth = tl.load(kth_ptr + rows, mask=row_mask, other=0.0)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_shifted = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # ROW_STATS: sum of the keys, sum exp(2 x) (relative to the running max, like sum_exp), and
    # the max key of the columns before the target (-inf where none: the first-max tie rule).
    key_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_sq_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    max_before = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    split_start = split * cols_per_split
    split_end = tl.minimum(split_start + cols_per_split, vocab_size)
    for v_start in range(split_start, split_end, BLOCK_V):
        cols = (v_start + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < split_end
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask,
                         hidden_dim, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        key = tl.where(col_mask[None, :], logit_key(z, softcap, HAS_SOFTCAP), -float("inf"))
        if SUPPORT:  # removed columns (a removed target too) read as -inf
            key = tl.where(in_support(z, key, running_max[:, None], kth[:, None], log_min_p,
                                      inv_t[:, None], HAS_TOP_K, HAS_MIN_P), key, -float("inf"))
        is_target = (cols[None, :] == targets[:, None]) & col_mask[None, :]
        target_logit += tl.sum(tl.where(is_target, key, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(key, axis=1))
        delta = scaled_delta(running_max, new_max, inv_t)
        rescale = tl.exp(delta)
        shifted = (key - new_max[:, None]) * inv_t[:, None]
        p = tl.exp(shifted)
        if RETURN_ENTROPY:
            # Relative to the running max, so large logits do not cancel; exp(d) * d is 0 for
            # a far smaller old max, and -inf is clamped so its term is 0 * finite.
            sum_exp_shifted = rescale * sum_exp_shifted + (rescale * delta) * sum_exp \
                + tl.sum(p * tl.maximum(shifted, FINITE_MIN), axis=1)
        if ROW_STATS:
            key_sum += tl.sum(tl.where(col_mask[None, :], key, 0.0), axis=1)
            sum_sq_exp = sum_sq_exp * (rescale * rescale) + tl.sum(p * p, axis=1)
            before = (cols[None, :] < targets[:, None]) & col_mask[None, :]
            max_before = tl.maximum(max_before,
                                    tl.max(tl.where(before, key, -float("inf")), axis=1))
        sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
        running_max = new_max
    out = split.to(tl.int64) * n_rows + rows
    tl.store(row_max_ptr + out, running_max, mask=row_mask)
    tl.store(sum_exp_ptr + out, sum_exp, mask=row_mask)
    if RETURN_ENTROPY:
        tl.store(sum_exp_shifted_ptr + out, sum_exp_shifted, mask=row_mask)
    # Each target lies in one split: partial sums over splits give its logit (0 elsewhere).
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    if ROW_STATS:
        tl.store(key_sum_ptr + out, key_sum, mask=row_mask)
        tl.store(sum_sq_exp_ptr + out, sum_sq_exp, mask=row_mask)
        tl.store(max_before_ptr + out, max_before, mask=row_mask)


@triton.jit
def _linear_logprobs_grad_tile_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, stats_ptr, entropy_ptr,
    grad_logprobs_ptr, grad_entropy_ptr, grad_tile_ptr, inv_temperature_ptr, kth_ptr,
    n_rows, col_start, n_cols, hidden_dim, inv_temperature, softcap, log_min_p,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LOGPROB_GRAD: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr, ROW_TEMPERATURE: tl.constexpr, SUPPORT: tl.constexpr,
    HAS_TOP_K: tl.constexpr, HAS_MIN_P: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = tile_cols < n_cols
    cols = col_start + tile_cols
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask,
                     hidden_dim, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    # log p = (key - max) / T - log sum, never z' - lse: near 1e6, lse would have lost the low
    # bits, near 1e20 all of them.
    row_max = tl.load(stats_ptr + 2 * rows, mask=row_mask, other=0.0)
    log_sum = tl.load(stats_ptr + 2 * rows + 1, mask=row_mask, other=0.0)
    key = logit_key(z, softcap, HAS_SOFTCAP)
    inv_t = _row_inv_temperature(inv_temperature_ptr, inv_temperature, rows, row_mask,
                                 ROW_TEMPERATURE, BLOCK_N)
    log_p = (key - row_max[:, None]) * inv_t[:, None] - log_sum[:, None]
    # The forward formed this tile with other tiles and splits: a logit an ulp above the max
    # it saved would give log p > 0, and p > 1 once a tiny T scales it. log p <= 0 holds
    # exactly; NaN (an invalid target's row) fails the comparison and stays.
    log_p = tl.where(log_p > 0.0, 0.0, log_p)
    p = tl.exp(log_p)
    grad = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_LOGPROB_GRAD:
        go_lp = tl.load(grad_logprobs_ptr + rows, mask=row_mask, other=0.0)
        targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
        grad += go_lp[:, None] * (tl.where(cols[None, :] == targets[:, None], 1.0, 0.0) - p)
    if HAS_ENTROPY_GRAD:
        # d entropy / dz'_j = p_j * (-log p_j - entropy), log p clamped at LOG_P_FLOOR (_math).
        go_ent = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
        row_entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        grad += go_ent[:, None] * p * (-tl.maximum(log_p, LOG_P_FLOOR) - row_entropy[:, None])
    grad *= inv_t[:, None]
    if HAS_SOFTCAP:
        grad *= softcap_grad(key, softcap)
    if SUPPORT:  # p = 0 off the sampler's support (a removed target's go_lp is 0 already)
        kth = row_max
        if HAS_TOP_K:
            kth = tl.load(kth_ptr + rows, mask=row_mask, other=0.0)
        grad = tl.where(in_support(z, key, row_max[:, None], kth[:, None], log_min_p,
                                   inv_t[:, None], HAS_TOP_K, HAS_MIN_P), grad, 0.0)
    tl.store(grad_tile_ptr + rows[:, None] * n_cols + tile_cols[None, :],
             grad.to(grad_tile_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _linear_logits_tile_kernel(
    hidden_ptr, weight_ptr, bias_ptr, tile_ptr, n_rows, col_start, n_cols, hidden_dim,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = tile_cols < n_cols
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, col_start + tile_cols, row_mask,
                     col_mask, hidden_dim, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V,
                     BLOCK_D)
    tl.store(tile_ptr + rows[:, None] * n_cols + tile_cols[None, :], z,
             mask=row_mask[:, None] & col_mask[None, :])


@functools.lru_cache(maxsize=None)
def _shared_memory_bytes(device_index: int) -> int:
    """Shared memory one block may opt into (227 KiB on an H100, 99 KiB on an RTX 4090)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _fit_shared_memory(block_n, block_v, block_d, num_warps, num_stages, element_size, budget):
    """The tiling, shrunk until its pipelined operand tiles (``num_stages`` copies of a
    ``BLOCK_N x BLOCK_D`` and a ``BLOCK_V x BLOCK_D`` tile) fit ``budget`` bytes of shared memory:
    fewer stages first (down to 2, still double-buffered), then narrower vocabulary and token
    tiles. A launch that asks for more fails with "out of resource: shared memory" instead."""
    while num_stages * (block_n + block_v) * block_d * element_size > budget:
        if num_stages > 2:
            num_stages -= 1
        elif block_v > 64:
            block_v //= 2
        elif block_n > 32:
            block_n //= 2
        else:
            break
    return block_n, block_v, block_d, num_warps, num_stages


def _tiles(prefix: str, tensor: torch.Tensor):
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) of kernel ``prefix`` (FORWARD, GRAD),
    fitted to the shared memory of ``tensor``'s GPU for its dtype."""
    tiles = [globals()[f"{prefix}_{name}"]
             for name in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "NUM_WARPS", "NUM_STAGES")]
    if INTERPRETED:  # no shared memory to fit
        return tuple(tiles)
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    budget = _shared_memory_bytes(index) - 8 * 1024  # room for the kernel's own scratch
    return _fit_shared_memory(*tiles, tensor.element_size(), budget)


def _dot_options(dtype: torch.dtype) -> dict:
    # fp32 inputs get IEEE fp32 dots: TF32 would cost ~1e-3 relative error on the logits.
    return dict(UPCAST=INTERPRETED, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def tile_cols(n_rows: int, vocab_size: int) -> int:
    """Vocabulary columns per backward slice: a multiple of GRAD_BLOCK_V near
    ``GRAD_TILE_ELEMENTS / n_rows``."""
    cols = max(GRAD_BLOCK_V, GRAD_TILE_ELEMENTS // max(n_rows, 1) // GRAD_BLOCK_V * GRAD_BLOCK_V)
    return min(cols, triton.cdiv(vocab_size, GRAD_BLOCK_V) * GRAD_BLOCK_V)


def linear_logprobs_partials(hidden, weight, bias, targets, *, inv_temperature, softcap,
                             return_entropy, return_row_stats=False, support=None):
    """Same contract as ``fastalign.ops.linear_logprobs_torch.linear_logprobs_partials``. With
    the sampler's ``support`` it runs with the backward's tiling, as ``linear_logits_tile``
    does: the three form every logit alike, so a column's membership never differs."""
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    block_n, block_v, block_d, num_warps, num_stages = _tiles(
        "FORWARD" if support is None else "GRAD", hidden)
    row_tiles = max(1, triton.cdiv(n_rows, block_n))
    vocab_tiles = triton.cdiv(vocab_size, block_v)
    # Enough splits to fill the GPU when there are few token tiles, each a whole number of tiles.
    n_splits = max(1, min(vocab_tiles, FORWARD_TARGET_PROGRAMS // row_tiles))
    cols_per_split = triton.cdiv(vocab_tiles, n_splits) * block_v
    n_splits = triton.cdiv(vocab_size, cols_per_split)
    new = dict(device=hidden.device, dtype=torch.float32)
    row_max = torch.empty(n_splits, n_rows, **new)
    sum_exp = torch.empty(n_splits, n_rows, **new)
    sum_exp_shifted = torch.empty(n_splits, n_rows, **new) if return_entropy else None
    target_logit = torch.empty(n_splits, n_rows, **new)
    row_stats = tuple(torch.empty(n_splits, n_rows, **new) for _ in range(3)) \
        if return_row_stats else None
    pointers, scalars, flags = sampler_args(inv_temperature, support, sum_exp)
    if n_rows > 0:
        _linear_logprobs_forward_kernel[(row_tiles, n_splits)](
            hidden, weight, hidden if bias is None else bias, targets,
            row_max, sum_exp, sum_exp if sum_exp_shifted is None else sum_exp_shifted,
            target_logit, *(row_stats or (sum_exp,) * 3), *pointers, n_rows, vocab_size,
            hidden.shape[1], cols_per_split, scalars["inv_temperature"],
            1.0 if softcap is None else softcap, scalars["log_min_p"],
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            RETURN_ENTROPY=return_entropy, ROW_STATS=return_row_stats, **flags,
            **_dot_options(hidden.dtype),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages, **fp_fusion(softcap is not None),
        )
    return row_max, sum_exp, sum_exp_shifted, target_logit.sum(0), row_stats


def linear_logprobs_grad_tile(hidden, weight, bias, targets, stats, entropy, grad_logprobs,
                              grad_entropy, start: int, end: int, *, inv_temperature, softcap,
                              support=None):
    """Same contract as ``fastalign.ops.linear_logprobs_torch.linear_logprobs_grad_tile``."""
    n_rows, n_cols = hidden.shape[0], end - start
    grad_tile = torch.empty(n_rows, n_cols, device=hidden.device, dtype=hidden.dtype)
    block_n, block_v, block_d, num_warps, num_stages = _tiles("GRAD", hidden)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_v))
    (inv_temperature_ptr, _, kth_ptr), scalars, flags = sampler_args(inv_temperature, support,
                                                                     stats)
    _linear_logprobs_grad_tile_kernel[grid](
        hidden, weight, hidden if bias is None else bias, targets, stats,
        stats if entropy is None else entropy,
        stats if grad_logprobs is None else grad_logprobs,
        stats if grad_entropy is None else grad_entropy, grad_tile, inv_temperature_ptr, kth_ptr,
        n_rows, start, n_cols, hidden.shape[1], scalars["inv_temperature"],
        1.0 if softcap is None else softcap, scalars["log_min_p"],
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        HAS_LOGPROB_GRAD=grad_logprobs is not None, HAS_ENTROPY_GRAD=grad_entropy is not None,
        **flags, **_dot_options(hidden.dtype),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages, **fp_fusion(softcap is not None),
    )
    return grad_tile


def linear_logits_tile(hidden, weight, bias, start: int, end: int):
    """``hidden @ weight[start:end].T + bias[start:end]``: a float32 ``[N, end - start]`` tile
    formed as the backward's kernel (and the sampler's forward) form it, for the sampler's
    k-th value (fastalign/ops/_sampler.py). ``start`` is a multiple of ``GRAD_BLOCK_V`` (a
    ``tile_cols`` slice), so its blocks are theirs."""
    n_rows, n_cols = hidden.shape[0], end - start
    tile = torch.empty(n_rows, n_cols, device=hidden.device, dtype=torch.float32)
    if n_rows == 0:
        return tile
    block_n, block_v, block_d, num_warps, num_stages = _tiles("GRAD", hidden)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_v))
    _linear_logits_tile_kernel[grid](
        hidden, weight, hidden if bias is None else bias, tile, n_rows, start, n_cols,
        hidden.shape[1], HAS_BIAS=bias is not None, **_dot_options(hidden.dtype),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    return tile
