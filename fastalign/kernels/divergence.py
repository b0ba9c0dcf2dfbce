"""Triton kernels of the divergence family: forward KL, reverse KL and the generalized JSD
between the student's ``p = softmax(softcap(z) / T)`` and the teacher's ``q`` per row, exact
over the full vocabulary (``kernels/divergence_interface.py``: the modes, the statistics' rows
and columns, TRL's ``beta``).

First pass: one program per row streams both rows once, in ``BLOCK_V`` tiles, with two online
softmaxes: per side the max key ``m`` (``_math``: softcap(z), before the temperature) and
``sum exp(s)`` with ``s = (key - m) / T``; for a KL the cross term of its weighting side,
``sum exp(s_w) (s_w - s_o)`` (the student's for the reverse KL, the teacher's for the forward
one); and ``sum exp(s) s`` for the student's entropy. ``ops/_vocab_stats.py`` merges them (or
several slices of them) into ``KL = cross / S_w - log S_w + log S_o``.

Second pass (JSD only, ``mixture_partials``): with both sides' ``(m, log S)`` known, one
program per row sums ``q log(q / m)`` and ``p log(p / m)`` for the mixture
``m = (1 - beta) p + beta q``.

Backward: one program per (row, tile) writes the gradient w.r.t. the student's logits of
``go_div * divergence + go_ent * entropy``:
``p_j ((s_j - s_t,j) - shift)`` (reverse KL), ``p_j - q_j`` (forward KL),
``(1 - beta) p_j (log(p_j / m_j) - KL(p || m))`` (JSD), plus ``-p_j (log p_j + H)``, all / T
and through the softcap. Every difference is taken before the 1 / T scaling and relative to its
own side's max (``_math``): ``z / T`` never overflows for a tiny T, and neither a large common
offset nor student and teacher logits of very different sizes cost precision.

Rows are addressed through the same two-level layout as ``token_logprobs`` (a ``[:, :-1]``
slice of ``[B, T, V]`` logits is read in place); offsets are int64.
"""

import torch
import triton
import triton.language as tl

from . import _interpreter  # noqa: F401  (records how these kernels were defined: fastalign/_backend.py)
from . import divergence_interface as interface
from ._math import FINITE_MIN, LOG_P_FLOOR, fp_fusion, logit_key, scaled_delta, softcap_grad
from ._rows import block_and_warps, row_offset

FORWARD_BLOCK_V = 4096
FORWARD_NUM_WARPS = 8
BACKWARD_BLOCK_V = 4096
BACKWARD_NUM_WARPS = 8

# The interface's numbers, as the constexprs a jit function reads.
FORWARD_KL = tl.constexpr(interface.FORWARD_KL)
REVERSE_KL = tl.constexpr(interface.REVERSE_KL)
ROW_STATS = tl.constexpr(interface.ROW_STATS)
ROW_MAX = tl.constexpr(interface.ROW_MAX)
LOG_SUM = tl.constexpr(interface.LOG_SUM)
TEACHER_ROW_MAX = tl.constexpr(interface.TEACHER_ROW_MAX)
TEACHER_LOG_SUM = tl.constexpr(interface.TEACHER_LOG_SUM)
AUX = tl.constexpr(interface.AUX)
ENTROPY = tl.constexpr(interface.ENTROPY)
SMALLEST_NORMAL = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _fold_cross(cross, rescale_w, delta_w, delta_o, sum_w, exp_w, s_w, s_o):
    """The running KL cross term ``sum exp(s_w) (s_w - s_o)`` of the weighting side ``w``, moved
    to the new maxes (``exp(d_w) (cross + (d_w - d_o) S_w)``, written so that a vanishing
    ``exp(d_w)`` gives 0, not 0 * inf) with one tile added. Columns where ``w`` has probability
    0 add nothing, whatever the other side says; where only the other side has, +inf, even
    where ``exp(s_w)`` underflows (0 * inf would be NaN, and dropping it a finite KL)."""
    term = tl.where(s_w == -float("inf"), 0.0,
                    tl.where(s_o == -float("inf"), float("inf"), exp_w * (s_w - s_o)))
    return rescale_w * cross + (rescale_w * (delta_w - delta_o)) * sum_w + tl.sum(term, axis=0)


@triton.jit
def _keys(row_ptr, cols, in_vocab, softcap, HAS_SOFTCAP: tl.constexpr):
    """A tile of a row's keys in fp32; columns past V are -inf (exp 0)."""
    z = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
    return tl.where(in_vocab, logit_key(z, softcap, HAS_SOFTCAP), -float("inf"))


@triton.jit
def _mixture_log_ratios(log_p, log_q, p, q, beta, one_minus_beta):
    """``(log(p / m), log(q / m))`` for the mixture ``m = (1 - beta) p + beta q`` of two
    probabilities (and their logs); ``m`` clamped to the smallest normal float, below which
    either term is ~1e-22 at most (``divergence_torch.mixture_log_ratios`` says why)."""
    log_m = tl.log(tl.maximum(one_minus_beta * p + beta * q, SMALLEST_NORMAL))
    return log_p - log_m, log_q - log_m


@triton.jit
def _divergence_forward_kernel(
    logits_ptr, teacher_ptr, mask_ptr, partials_ptr,
    n_inner, stride_outer, stride_inner, teacher_n_inner, teacher_stride_outer,
    teacher_stride_inner, n_rows, vocab_size, inv_temperature, softcap, teacher_softcap,
    MODE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_TEACHER_SOFTCAP: tl.constexpr, RETURN_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    out = partials_ptr + row  # row k of the [PARTIALS, N] statistics at out + k * n_rows
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            # Skipped entirely (interface.MASKED_PARTIALS): these merge to 0.
            tl.store(out, 0.0)
            tl.store(out + n_rows, 1.0)
            tl.store(out + 2 * n_rows, 0.0)
            tl.store(out + 3 * n_rows, 1.0)
            tl.store(out + 4 * n_rows, 0.0)
            tl.store(out + 5 * n_rows, 0.0)
            return
    s_row = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    t_row = teacher_ptr + row_offset(row, teacher_n_inner, teacher_stride_outer,
                                     teacher_stride_inner)
    # Maxes start at the most negative float (FINITE_MIN), not -inf: key - max is then never
    # -inf - -inf.
    max_s = FINITE_MIN
    sum_s = 0.0
    max_t = FINITE_MIN
    sum_t = 0.0
    cross = 0.0
    shifted_sum = 0.0  # sum exp(s) s, relative to the running max, for the entropy
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < vocab_size
        key_s = _keys(s_row, cols, in_vocab, softcap, HAS_SOFTCAP)
        key_t = _keys(t_row, cols, in_vocab, teacher_softcap, HAS_TEACHER_SOFTCAP)
        new_max_s = tl.maximum(max_s, tl.max(key_s, axis=0))
        new_max_t = tl.maximum(max_t, tl.max(key_t, axis=0))
        delta_s = scaled_delta(max_s, new_max_s, inv_temperature)
        delta_t = scaled_delta(max_t, new_max_t, inv_temperature)
        rescale_s = tl.exp(delta_s)
        rescale_t = tl.exp(delta_t)
        s = (key_s - new_max_s) * inv_temperature
        s_t = (key_t - new_max_t) * inv_temperature
        exp_s = tl.exp(s)
        exp_t = tl.exp(s_t)
        if MODE == REVERSE_KL:
            cross = _fold_cross(cross, rescale_s, delta_s, delta_t, sum_s, exp_s, s, s_t)
        elif MODE == FORWARD_KL:
            cross = _fold_cross(cross, rescale_t, delta_t, delta_s, sum_t, exp_t, s_t, s)
        if RETURN_ENTROPY:
            # exp(d) d is 0, not 0 * -inf, for a far smaller old max; -inf logits clamped to a
            # finite s give 0 * finite.
            shifted_sum = rescale_s * shifted_sum + (rescale_s * delta_s) * sum_s \
                + tl.sum(exp_s * tl.maximum(s, FINITE_MIN), axis=0)
        sum_s = sum_s * rescale_s + tl.sum(exp_s, axis=0)
        sum_t = sum_t * rescale_t + tl.sum(exp_t, axis=0)
        max_s = new_max_s
        max_t = new_max_t
    tl.store(out, max_s)
    tl.store(out + n_rows, sum_s)
    tl.store(out + 2 * n_rows, max_t)
    tl.store(out + 3 * n_rows, sum_t)
    tl.store(out + 4 * n_rows, cross)
    tl.store(out + 5 * n_rows, shifted_sum)


@triton.jit
def _mixture_kernel(
    logits_ptr, teacher_ptr, mask_ptr, stats_ptr, terms_ptr,
    n_inner, stride_outer, stride_inner, teacher_n_inner, teacher_stride_outer,
    teacher_stride_inner, n_rows, vocab_size, inv_temperature, softcap, teacher_softcap,
    beta, one_minus_beta,
    HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEACHER_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            tl.store(terms_ptr + row, 0.0)
            tl.store(terms_ptr + n_rows + row, 0.0)
            return
    s_row = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    t_row = teacher_ptr + row_offset(row, teacher_n_inner, teacher_stride_outer,
                                     teacher_stride_inner)
    stats = stats_ptr + ROW_STATS * row
    max_s = tl.load(stats + ROW_MAX)
    log_sum_s = tl.load(stats + LOG_SUM)
    max_t = tl.load(stats + TEACHER_ROW_MAX)
    log_sum_t = tl.load(stats + TEACHER_LOG_SUM)
    teacher_term = 0.0  # sum q log(q / m)
    student_term = 0.0  # sum p log(p / m)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < vocab_size
        log_p = (_keys(s_row, cols, in_vocab, softcap, HAS_SOFTCAP) - max_s) * inv_temperature \
            - log_sum_s
        log_q = (_keys(t_row, cols, in_vocab, teacher_softcap, HAS_TEACHER_SOFTCAP) - max_t) \
            * inv_temperature - log_sum_t
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        to_mixture_p, to_mixture_q = _mixture_log_ratios(log_p, log_q, p, q, beta,
                                                         one_minus_beta)
        # A side's p = 0 columns (those past V among them) add 0 to its term.
        teacher_term += tl.sum(tl.where(q == 0.0, 0.0, q * to_mixture_q), axis=0)
        student_term += tl.sum(tl.where(p == 0.0, 0.0, p * to_mixture_p), axis=0)
    tl.store(terms_ptr + row, teacher_term)
    tl.store(terms_ptr + n_rows + row, student_term)


@triton.jit
def _divergence_backward_kernel(
    logits_ptr, teacher_ptr, mask_ptr, stats_ptr, grad_divergence_ptr, grad_entropy_ptr,
    grad_ptr, n_inner, stride_outer, stride_inner, teacher_n_inner, teacher_stride_outer,
    teacher_stride_inner, grad_stride_outer, grad_stride_inner, vocab_size, inv_temperature,
    softcap, teacher_softcap, beta, one_minus_beta,
    MODE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_TEACHER_SOFTCAP: tl.constexpr, HAS_DIVERGENCE_GRAD: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab_size
    grad_row = grad_ptr + row_offset(row, n_inner, grad_stride_outer, grad_stride_inner)
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            tl.store(grad_row + cols, tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty),
                     mask=in_vocab)
            return
    s_row = logits_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    t_row = teacher_ptr + row_offset(row, teacher_n_inner, teacher_stride_outer,
                                     teacher_stride_inner)
    stats = stats_ptr + ROW_STATS * row
    key_s = _keys(s_row, cols, in_vocab, softcap, HAS_SOFTCAP)
    s = (key_s - tl.load(stats + ROW_MAX)) * inv_temperature
    log_p = s - tl.load(stats + LOG_SUM)
    p = tl.exp(log_p)
    grad = tl.zeros([BLOCK_V], tl.float32)
    if HAS_DIVERGENCE_GRAD:
        s_t = (_keys(t_row, cols, in_vocab, teacher_softcap, HAS_TEACHER_SOFTCAP)
               - tl.load(stats + TEACHER_ROW_MAX)) * inv_temperature
        aux = tl.load(stats + AUX)
        # 0, or NaN where the divergence is NaN or infinite: p = 0 columns then get NaN too,
        # as log_softmax's backward poisons a row (a NaN p fails p == 0 and stays NaN).
        poison = aux - aux
        if MODE == REVERSE_KL:
            # log p - log q - KL = (s - s_t) - shift, each s relative to its own side's max.
            d = tl.where(p == 0.0, poison, p * ((s - s_t) - aux))
        elif MODE == FORWARD_KL:
            d = p - tl.exp(s_t - tl.load(stats + TEACHER_LOG_SUM)) + poison
        else:
            log_q = s_t - tl.load(stats + TEACHER_LOG_SUM)
            to_mixture, _ = _mixture_log_ratios(log_p, log_q, p, tl.exp(log_q), beta,
                                                one_minus_beta)
            d = tl.where(p == 0.0, poison, one_minus_beta * p * (to_mixture - aux))
        grad += d * tl.load(grad_divergence_ptr + row)
    if HAS_ENTROPY_GRAD:
        # d entropy / dz'_j = -p_j (log p_j + entropy), log p floored at LOG_P_FLOOR (_math).
        entropy = tl.load(stats + ENTROPY)
        grad -= tl.load(grad_entropy_ptr + row) * p * (tl.maximum(log_p, LOG_P_FLOOR) + entropy)
    grad *= inv_temperature
    if HAS_SOFTCAP:
        grad *= softcap_grad(key_s, softcap)
    tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)


def _layouts(layout, teacher_layout):
    return (layout.n_inner, layout.stride_outer, layout.stride_inner, teacher_layout.n_inner,
            teacher_layout.stride_outer, teacher_layout.stride_inner)


def _softcaps(spec) -> dict:
    """The softcap scalars and flags of a launch (1.0 stands in for an absent cap), and the
    launch option that keeps soft-capped keys bit-identical across passes (``_math``)."""
    has_softcaps = (spec.softcap is not None, spec.teacher_softcap is not None)
    return dict(softcap=1.0 if spec.softcap is None else spec.softcap,
                teacher_softcap=1.0 if spec.teacher_softcap is None else spec.teacher_softcap,
                HAS_SOFTCAP=has_softcaps[0], HAS_TEACHER_SOFTCAP=has_softcaps[1],
                **fp_fusion(any(has_softcaps)))


def divergence_partials(logits, teacher_logits, layout, teacher_layout, mask, *, spec,
                        return_entropy):
    """The ``[PARTIALS, N]`` float32 first-pass statistics (``divergence_interface``) of the
    columns of ``logits``/``teacher_logits`` (rows addressed by their ``RowLayout``s); rows
    with ``mask == False`` get statistics that merge to 0."""
    n_rows, vocab_size = layout.n_rows, logits.shape[-1]
    partials = torch.empty(interface.PARTIALS, n_rows, device=logits.device, dtype=torch.float32)
    block, warps = block_and_warps(vocab_size, FORWARD_BLOCK_V, FORWARD_NUM_WARPS)
    if n_rows > 0:
        _divergence_forward_kernel[(n_rows,)](
            logits, teacher_logits, partials if mask is None else mask, partials,
            *_layouts(layout, teacher_layout), n_rows, vocab_size, spec.inv_temperature,
            MODE=spec.mode, HAS_MASK=mask is not None, RETURN_ENTROPY=return_entropy,
            BLOCK_V=block, num_warps=warps, **_softcaps(spec))
    return partials


def mixture_partials(logits, teacher_logits, layout, teacher_layout, mask, stats, *, spec):
    """The JSD's ``[2, N]`` second-pass sums ``(sum q log(q / m), sum p log(p / m))`` over the
    columns given, from the merged contiguous ``[N, ROW_STATS]`` statistics; masked rows 0."""
    n_rows, vocab_size = layout.n_rows, logits.shape[-1]
    terms = torch.empty(2, n_rows, device=logits.device, dtype=torch.float32)
    block, warps = block_and_warps(vocab_size, FORWARD_BLOCK_V, FORWARD_NUM_WARPS)
    if n_rows > 0:
        _mixture_kernel[(n_rows,)](
            logits, teacher_logits, terms if mask is None else mask, stats, terms,
            *_layouts(layout, teacher_layout), n_rows, vocab_size, spec.inv_temperature,
            beta=spec.beta, one_minus_beta=spec.student_weight, HAS_MASK=mask is not None,
            BLOCK_V=block, num_warps=warps, **_softcaps(spec))
    return terms


def divergence_grad(logits, teacher_logits, layout, teacher_layout, mask, stats,
                    grad_divergence, grad_entropy, grad_out, grad_layout, *, spec):
    """Writes the gradient of ``grad_divergence * divergence + grad_entropy * entropy`` (either
    ``[N]`` float32 or None) w.r.t. ``logits`` into ``grad_out`` and returns it; ``stats`` is
    the merged contiguous ``[N, ROW_STATS]`` float32, ``grad_layout`` has the same ``n_inner``
    as ``layout`` (``grad_out`` is the logits' shape, or the logits themselves)."""
    n_rows, vocab_size = layout.n_rows, logits.shape[-1]
    block, warps = block_and_warps(vocab_size, BACKWARD_BLOCK_V, BACKWARD_NUM_WARPS)
    if n_rows > 0:
        _divergence_backward_kernel[(n_rows, triton.cdiv(vocab_size, block))](
            logits, teacher_logits, stats if mask is None else mask, stats,
            stats if grad_divergence is None else grad_divergence,
            stats if grad_entropy is None else grad_entropy, grad_out,
            *_layouts(layout, teacher_layout), grad_layout.stride_outer,
            grad_layout.stride_inner, vocab_size, spec.inv_temperature,
            beta=spec.beta, one_minus_beta=spec.student_weight, MODE=spec.mode,
            HAS_MASK=mask is not None, HAS_DIVERGENCE_GRAD=grad_divergence is not None,
            HAS_ENTROPY_GRAD=grad_entropy is not None, BLOCK_V=block, num_warps=warps,
            **_softcaps(spec))
    return grad_out
