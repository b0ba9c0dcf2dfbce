"""Elementwise helpers shared by the kernels: the logits transform, its derivative, and the
online log-sum-exp step.

Every kernel keeps its maxes in the *key* domain: ``key = softcap(z)`` (the raw logit without a
softcap), before the temperature divides. Differences are taken there and only then scaled:
``z' - max z' = (key - max key) / T``. So a finite logit's ``z / T`` is never formed (no
overflow for a tiny T, no rounding at ``|z / T|`` before the subtraction that cancels it), and
``key - max key`` is exact for the columns near the max (Sterbenz), whatever ``|z|`` is.

With a softcap the key is a product, ``s * tanh(z / s)``, and the compiler's default fusion of
``a * b - c`` into one FMA could round it where a max is taken and fuse it into the
subtraction of that max elsewhere: once ``1 / T`` scales that one-rounding difference it is
anything. The launchers therefore compile the softcap variants with ``enable_fp_fusion=False``
(``fp_fusion`` below); the others have no product before a subtraction.

A jit helper returns from one place: Triton 3.6 rejects a function whose constexpr branches
return a block in one case and a scalar in the other."""

import triton
import triton.language as tl

# The most negative finite float32: running maxes start here, not at -inf, so that
# ``key - max`` is never -inf - -inf; no finite logit lies below it.
FINITE_MIN = tl.constexpr(-3.4028234663852886e38)
# The entropy gradient clamps log p here: exp underflows to 0 below about -104, so no term with
# p > 0 changes, and a -inf logit gives 0 * finite instead of 0 * inf = NaN. (The same constant:
# fastalign/ops/_tiles.py LOG_P_FLOOR, csrc/rows.h kLogPFloor.)
LOG_P_FLOOR = tl.constexpr(-1000.0)



def fp_fusion(has_softcap: bool) -> dict:
    """The launch option that keeps every pass's keys bit-identical (see the module docstring)."""
    return {"enable_fp_fusion": not has_softcap}


def sampler_args(inv_temperature, support, fallback):
    """The launch arguments of a per-row temperature (a float32 ``[N]`` tensor, else a float)
    and the sampler's ``support`` (``fastalign.ops._sampler.Support`` or None): the pointers
    ``(1 / T, row max, k-th value)`` (``fallback`` where absent), the scalars and the constexpr
    flags."""
    per_row = not isinstance(inv_temperature, (int, float))  # a float32 [N] tensor
    kth = None if support is None else support.kth
    log_min_p = None if support is None else support.log_min_p
    pointers = (inv_temperature if per_row else fallback,
                fallback if support is None or support.row_max is None else support.row_max,
                fallback if kth is None else kth)
    scalars = dict(inv_temperature=1.0 if per_row else inv_temperature,
                   log_min_p=0.0 if log_min_p is None else log_min_p)
    flags = dict(ROW_TEMPERATURE=per_row, SUPPORT=support is not None,
                 HAS_TOP_K=kth is not None, HAS_MIN_P=log_min_p is not None)
    return pointers, scalars, flags


# tanh's Taylor coefficients (x, x^3, ..., x^13): used below |x| = 0.4, where the next term
# (1.5e-3 x^15) is under 1e-9 relative. Globals a jit function reads must be constexpr.
_T3 = tl.constexpr(-1.0 / 3.0)
_T5 = tl.constexpr(2.0 / 15.0)
_T7 = tl.constexpr(-17.0 / 315.0)
_T9 = tl.constexpr(62.0 / 2835.0)
_T11 = tl.constexpr(-1382.0 / 155925.0)
_T13 = tl.constexpr(21844.0 / 6081075.0)


@triton.jit
def tanh(x):
    # tl has no tanh on every Triton we support (3.6-3.9) and libdevice moved between releases.
    # 1 - 2 / (exp(2x) + 1) saturates to +-1 without overflow (exp -> inf gives 1, exp -> 0
    # gives -1), but its absolute error near 0 is ~1e-7: a relative error that grows as 1 / x,
    # and the softcap multiplies it by s. An odd polynomial keeps the relative precision of
    # small |x|; NaN fails the comparison and takes the exp branch, which keeps it.
    x2 = x * x
    poly = x + x * x2 * (_T3 + x2 * (_T5 + x2 * (_T7 + x2 * (_T9 + x2 * (_T11 + x2 * _T13)))))
    return tl.where(tl.abs(x) < 0.4, poly, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def logit_key(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """``softcap(z) = s * tanh(z / s)`` in fp32 (``z`` itself without a softcap): the value
    maxes are taken of; ``z' = key / T``."""
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def scaled_delta(old_max, new_max, inv_temperature):
    """``(old_max - new_max) / T`` for an online log-sum-exp: <= 0, never -inf (two maxes at
    opposite ends of the float range overflow to -inf; clamped to the most negative float it
    still gives ``exp = 0`` and ``exp(d) * d = 0``, where -inf would give ``0 * -inf = NaN``).
    NaN stays NaN (the comparison fails)."""
    delta = (old_max - new_max) * inv_temperature
    return tl.where(delta < FINITE_MIN, FINITE_MIN, delta)


@triton.jit
def softcap_grad(key, softcap):
    """d softcap(z) / dz = 1 - tanh(z / s)^2, from the key ``s * tanh(z / s)`` itself."""
    t = key / softcap
    return 1.0 - t * t


@triton.jit
def in_support(z, key, row_max, kth, log_min_p, inv_temperature,
               HAS_TOP_K: tl.constexpr, HAS_MIN_P: tl.constexpr):
    """The sampler's support (fastalign/ops/_sampler.py; at least one bound given): the raw
    logit ``z >= kth`` (top-k, ties kept) and ``(key - max) / T >= log(min_p)`` (min-p), the
    same difference every pass takes. ``row_max``, ``kth`` and ``inv_temperature`` broadcast
    against ``z`` (a row's scalars, or ``[BLOCK_N, 1]`` columns)."""
    if HAS_TOP_K:
        kept = z >= kth
        if HAS_MIN_P:
            kept = kept & ((key - row_max) * inv_temperature >= log_min_p)
    else:
        kept = (key - row_max) * inv_temperature >= log_min_p
    return kept
