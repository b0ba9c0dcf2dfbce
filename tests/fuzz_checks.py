"""Comparisons for tests/test_fuzz_ops.py: an output or gradient against the float64 reference
rounded to its dtype (NaN where it is NaN, infinities where it overflows), within DESIGN.md's
tolerance loosened only as far as float32 itself allows."""

import math
import os

import torch
from conftest import TOLERANCE

from fastalign.kernels._interpreter import INTERPRETED


def check(actual, expected, tol, what, case, atol=0.0, overflow_margin=2.0):
    """``actual`` is ``expected`` (float64) rounded to ``actual``'s dtype: same NaN positions,
    same infinities (or an overflow of the dtype: values past max / overflow_margin may round
    either way), the finite rest within ``tol``."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape, \
        f"{what}: shape {actual.shape} != {expected.shape} [{case}]"
    nan, expected_nan = actual.isnan(), expected.isnan()
    assert torch.equal(nan, expected_nan), \
        f"{what}: NaN at {nan.sum()} positions, the reference at {expected_nan.sum()} [{case}]"
    dtype = actual.dtype
    big = torch.finfo(dtype).max
    rounded = expected.to(dtype).double()
    actual = actual.double()
    inf = rounded.isinf() | actual.isinf()
    near_overflow = expected.abs() > big / overflow_margin  # may land on inf either way
    bad_inf = inf & ~((actual == rounded) | near_overflow)
    assert not bad_inf.any(), f"{what}: infinities differ from the reference [{case}]"
    finite = ~inf & ~nan
    diff = (actual[finite] - expected[finite]).norm().item()
    # Per element, at least what the dtype loses below its normal range: fp16 rounds its
    # subnormals (steps of 6e-8), float32 and bf16 ones may be flushed to 0 (GPUs) below
    # 1.2e-38. The Triton 3.9 interpreter's fp32 -> bf16 cast is wrong there (-9.2e-41 becomes
    # -1.2e-38): a bf16 gradient tile below 1e-38 (T = 8.5e37) comes out ~1e-38 off per element,
    # which a matmul with the weights then sums (into a float32 weight's gradient too).
    info = torch.finfo(dtype)
    floor = max(atol, info.tiny * info.eps if dtype == torch.float16 else info.tiny)
    if INTERPRETED and os.environ.get("FASTALIGN_BACKEND") == "triton":
        floor = max(floor, 1e-35)
    bound = tol * expected[finite].norm().item() + floor * math.sqrt(finite.sum().item())
    assert diff <= bound or diff == 0, \
        f"{what}: error {diff:.3g} > {bound:.3g} (tol {tol:.3g}) [{case}]"


def check_grad(actual, expected, tol, what, case, atol=1e-6):
    """As :func:`check`, row by row of the last dim where a row holds NaN or inf: a gradient row
    of a degenerate output (an infinite KL, a NaN logit) is non-finite in both, but where it is
    -inf or NaN depends on which columns underflow to p = 0, at 1e-45 in float32 and 1e-308 in
    float64; so those rows must agree on being non-finite, and the finite rows are compared."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu().double()
    width = actual.shape[-1] if actual.dim() else 1
    rows, expected_rows = actual.reshape(-1, width), expected.reshape(-1, width)
    degenerate = ~torch.isfinite(rows).all(1)
    expected_degenerate = ~torch.isfinite(expected_rows.to(actual.dtype)).all(1)
    assert torch.equal(degenerate, expected_degenerate), \
        f"{what}: {degenerate.sum()} rows non-finite, the reference " \
        f"{expected_degenerate.sum()} [{case}]"
    check(rows[~degenerate], expected_rows[~degenerate], tol, what, case, atol)


def kl_rows_to_compare(ref_kl, vocab):
    """Rows whose gradient is compared, and the absolute error float32 leaves in it per unit
    of upstream gradient and temperature. A row of infinite or NaN KL has no gradient to
    compare (the KL itself reports it; the kernels poison the row, the reference keeps the
    finite terms). The kernels sum exp(s) (s - s_ref) over a row before dividing by
    sum exp(s) (<= V): a KL within a factor 2V of float32's max may overflow, so its gradient is
    not compared either. The gradient's terms are log-ratios of the KL's size, which float32
    resolves only to ~eps * KL per element."""
    margin = 2.0 * vocab
    rows = ref_kl.reshape(-1)
    keep = torch.isfinite(rows) & (rows.abs() <= torch.finfo(torch.float32).max / margin)
    largest = rows[keep].abs().max().item() if keep.any() else 0.0
    return keep, 8 * torch.finfo(torch.float32).eps * largest


def check_kl(kl, ref_kl, grad, ref_grad, tol, grad_tol, vocab, upstream, temperature, case):
    """The KL (overflow allowed within a factor 2V of the max) and its gradient ``[..., V]``
    w.r.t. the logits as the op saw them, on the rows :func:`kl_rows_to_compare` keeps."""
    check(kl, ref_kl, tol, "kl", case, atol=2e-6, overflow_margin=2.0 * vocab)
    keep, scale = kl_rows_to_compare(ref_kl, vocab)
    scale *= (upstream.abs().max().item() if upstream.numel() else 0.0) / temperature
    width = grad.shape[-1]
    check_grad(grad.reshape(-1, width)[keep], ref_grad.reshape(-1, width)[keep], grad_tol,
               "grad", case, atol=max(1e-6, scale))


def eager_error(eager, expected):
    """Relative norm error of eager float32 torch (inf where it fails outright)."""
    eager, expected = eager.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected)
    if not torch.equal(torch.isfinite(eager), finite):
        return 0.0  # eager overflows or NaNs where float64 does not: no excuse for us
    scale = expected[finite].norm().item()
    return (eager[finite] - expected[finite]).norm().item() / scale if scale > 0 else 0.0


def tolerance(dtype, eager=0.0, base_dtype=None):
    """DESIGN.md's bound for ``dtype`` (or the coarser of it and ``base_dtype``, the dtype the
    computation ran in), loosened to 2x eager float32's error: where rounding noise dominates
    (keys a few ulps apart, three-element gradients) two float32 computations of the same
    thing differ by that much, one way or the other."""
    base = TOLERANCE[dtype] if base_dtype is None else max(TOLERANCE[dtype], TOLERANCE[base_dtype])
    return max(base, 2.0 * eager)


def grad_floor(upstream, temperature, vocab):
    """Float32 resolves a logits gradient only to ~eps of its scale, |go| / T (times the
    entropy's log-probs): where the exact one is ~0 (a one-hot row at a small T, where
    1 - p cancels) that is all the error there is."""
    go = max((u.abs().max().item() for u in upstream if u.numel()), default=0.0)
    return 8 * torch.finfo(torch.float32).eps * go / temperature * (1 + math.log(vocab))


def run(fn, leaves, upstream, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the gradients of ``sum(out * upstream)`` w.r.t. ``leaves``."""
    out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    needs = [x for x in leaves if x.requires_grad]
    loss = sum((o.double() * u).nansum() for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(loss, needs, allow_unused=True) if needs and loss.requires_grad \
        else [None] * len(needs)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(needs, grads)]
    return outs, grads


def ignored_zeroed(x, ignored):
    """``x [..., V]`` with its ignored rows replaced by 0 (differentiably)."""
    return torch.where(ignored[..., None], 0.0, x)
