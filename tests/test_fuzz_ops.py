"""Fuzzing the public ops against the float64 reference (fastalign/reference.py).

Each case is drawn from its own seed: an op (token_logprobs, linear_logprobs, token_kl,
linear_kl, token_divergence, linear_divergence, kl_estimate), a backend, a leading shape (empty and size-1 included), an odd
vocabulary, a memory layout (slices, transposes, stride-0 expands, overlapping rows, a strided
vocabulary), a dtype, values (huge offsets, +-inf, NaN, huge finite, -inf rows), ignored or
masked rows and options at their edges, some of them invalid on purpose. Then either

- the case is invalid and the call raises the ValueError/TypeError expected, naming the
  argument; or
- it is valid, and outputs and gradients equal the float64 reference rounded to their dtype:
  NaN exactly where the reference is NaN, +-inf where it is (or overflows the dtype), the
  rest within DESIGN.md's tolerance (fp32 1e-5, bf16/fp16 1e-2, relative norm-wise), loosened
  only to 1.5x what eager float32 torch gets from the same inputs (a bf16 matmul rounds the
  logits before anyone can do better), plus 1e-6 absolute per element for per-token outputs.

Ignored (masked) rows must give exactly 0 and zero gradient whatever they hold; the reference
sees zeros there, since it would otherwise spread their NaN through log_softmax's backward.

Anything else fails with the case's seed and description. ``FASTALIGN_FUZZ_CASES`` (default
300) sets the number of cases and ``FASTALIGN_FUZZ_SEED`` (default 0) the first seed; replay a
failure with ``FASTALIGN_FUZZ_SEED=<seed> FASTALIGN_FUZZ_CASES=1 pytest tests/test_fuzz_ops.py``.
Triton-interpreter cases are kept small.
"""

import math
import os
import re

import pytest
import torch
from conftest import BACKENDS, DEVICE, TOLERANCE
from fuzz_cases import (DTYPES, Case, common_flaws, layout, leading_shape, targets_for,
                        temperature_and_softcap, values)
from fuzz_checks import (check, check_grad, check_kl, eager_error, grad_floor, ignored_zeroed,
                         kl_rows_to_compare, run, tolerance)

import fastalign as fa
from fastalign import reference

N_CASES = int(os.environ.get("FASTALIGN_FUZZ_CASES", "300"))
FIRST_SEED = int(os.environ.get("FASTALIGN_FUZZ_SEED", "0"))
def fuzz_token_logprobs(case, small):
    shape = leading_shape(case, small)
    vocab = case.pick("V", [1, 2, 3, 7, 33, 129, 301] + ([] if small else [1000, 4099]))
    dtype = case.pick("dtype", DTYPES)
    storage, view = layout(case, shape, vocab, small)
    base = values(case, storage, dtype)
    targets, ignore_index = targets_for(case, shape, vocab)
    exact = dtype != torch.float16 and case.info["layout"] not in ("expand", "overlap")
    temperature, softcap = temperature_and_softcap(case, exact_logits=exact)
    options = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                   return_entropy=case.pick("entropy", [False, True]))
    inplace = case.pick("inplace", [False, False, False, True])
    leaf = base.to(dtype).requires_grad_()
    logits = view(leaf * 1) if inplace else view(leaf)
    if inplace and case.rng.random() < 0.3:
        logits = view(leaf)  # the leaf's own memory: refused
        case.invalid(ValueError, r"inplace_backward=True would (overwrite a leaf tensor|write "
                     r"the gradient into the memory of a leaf tensor)", "inplace on a leaf")
    if case.rng.random() < 0.03 and shape:
        targets = targets[..., :-1] if shape[-1] > 0 else targets.unsqueeze(-1)
        case.invalid(ValueError, r"targets has shape .* but must equal logits.shape\[:-1\]",
                     "targets shape")
    args = [logits, targets]
    common_flaws(case, args, options, "logits")
    if case.expect:
        return lambda: fa.token_logprobs(*args, inplace_backward=inplace, **options)
    ignored = targets == ignore_index
    upstream = [torch.randn(shape, generator=case.gen).to(DEVICE) for _ in range(2)]
    outs, (grad,) = run(fa.token_logprobs, [leaf], upstream, *args, inplace_backward=inplace,
                        **options)
    exact = base.clone().requires_grad_()
    ref_outs, (ref_grad,) = run(reference.token_logprobs_reference, [exact], upstream,
                                ignored_zeroed(view(exact), ignored), targets, **options)
    eager_leaf = base.to(dtype).requires_grad_()  # its gradient rounds to dtype, as ours
    eager_outs, (eager_grad,) = run(
        reference.token_logprobs_reference, [eager_leaf], upstream,
        ignored_zeroed(view(eager_leaf), ignored), targets, compute_dtype=torch.float32,
        **options)
    for out, ref, eager, what in zip(outs, ref_outs, eager_outs, ("logprobs", "entropy")):
        assert out.dtype == torch.float32 and (out[ignored] == 0).all(), f"{what} [{case}]"
        check(out, ref, tolerance(dtype, eager_error(eager, ref)), what, case, atol=1e-6)
    check_grad(grad, ref_grad, tolerance(dtype, eager_error(eager_grad, ref_grad)), "grad", case,
               atol=grad_floor(upstream, temperature, vocab))


def divergence_options(case, kl_only):
    """A divergence op's options beyond the temperature and the mask: none for the KL ops (the
    reverse KL); for ``token_divergence``/``linear_divergence`` a beta (its edges, and out of
    range on purpose), each model's softcap and the student's entropy."""
    if kl_only:
        return {}
    beta = case.pick("beta", [0.0, 1.0, 0.5, 0.3, 1e-6, 1 - 1e-6, "invalid"], [2, 2, 2, 2, 1, 1, 1])
    if beta == "invalid":
        beta = case.pick("beta", [-0.1, 1.5, float("nan"), True])
        case.invalid(ValueError, r"beta must be a finite number in \[0, 1\]", "beta")
    return dict(beta=beta, softcap=case.pick("softcap", [None, None, 30.0, 1.0, 1e-3]),
                teacher_softcap=case.pick("teacher_softcap", [None, None, 30.0, 1.0]),
                return_entropy=case.pick("entropy", [False, True]))


def check_divergence_outputs(outs, ref_outs, eager_outs, skipped, dtype, case):
    """The entropy of a divergence op (when it returned one), as per-token log-probs' is; the
    divergence itself is checked with its gradient (``check_kl``)."""
    for out in outs:
        assert out.dtype == torch.float32 and (out[skipped] == 0).all(), \
            f"masked rows must give 0 [{case}]"
    if len(outs) == 2:
        check(outs[1], ref_outs[1], tolerance(dtype, eager_error(eager_outs[1], ref_outs[1])),
              "entropy", case, atol=1e-6)


def fuzz_token_divergence(case, small, kl_only=False):
    """``token_kl`` (``kl_only``) or ``token_divergence``: one reference, the divergence's."""
    op, teacher_name = (fa.token_kl, "ref_logits") if kl_only else \
        (fa.token_divergence, "teacher_logits")
    shape = leading_shape(case, small)
    vocab = case.pick("V", [1, 2, 7, 33, 129, 301] + ([] if small else [1000, 4099]))
    dtype = case.pick("dtype", DTYPES)
    ref_dtype = case.pick("ref_dtype", [dtype, dtype, torch.float32])
    storage, view = layout(case, shape, vocab, small)
    base = values(case, storage, dtype)
    ref = values(case, (*shape, vocab), ref_dtype, name="ref_")
    if case.rng.random() < 0.3:  # the reference near the policy, often the realistic case
        ref = (view(base) + case.randn(*shape, vocab).to(DEVICE)).to(ref_dtype).double()
    temperature, _ = temperature_and_softcap(case, exact_logits=False, with_softcap=False)
    mask = None
    if case.pick("mask", [False, True]):
        mask = (torch.rand(shape, generator=case.gen) < 0.7).to(DEVICE)
    kwargs = dict(temperature=temperature, mask=mask, **divergence_options(case, kl_only))
    leaf = base.to(dtype).requires_grad_()
    args = [view(leaf), ref.to(ref_dtype)]
    roll = case.rng.random()
    if roll < 0.03 and vocab > 1:
        args[1] = args[1][..., :-1]
        case.invalid(ValueError, rf"{teacher_name} has shape .* but must equal logits.shape",
                     "teacher shape")
    elif roll < 0.06 and mask is not None:
        kwargs["mask"] = mask.float()
        case.invalid(TypeError, r"mask must be a bool tensor", "float mask")
    common_flaws(case, args, kwargs, "logits")
    if case.expect:
        return lambda: op(*args, **kwargs)
    skipped = torch.zeros(shape, dtype=torch.bool, device=DEVICE) if mask is None else ~mask
    upstream = [torch.randn(shape, generator=case.gen).to(DEVICE) for _ in range(2)]
    # Gradients w.r.t. the logits as the op sees them (rows match the divergence's rows).
    outs, (grad,) = run(op, [args[0]], upstream, *args, **kwargs)
    results = []
    for leaf_dtype, compute in ((torch.float64, torch.float64), (dtype, torch.float32)):
        exact = view(base.to(leaf_dtype).requires_grad_())
        results.append(run(reference.token_divergence_reference, [exact], upstream,
                           ignored_zeroed(exact, skipped),
                           ignored_zeroed(ref.to(ref_dtype if compute == torch.float32
                                                 else compute), skipped),
                           compute_dtype=compute, **kwargs))
    (ref_outs, (ref_grad,)), (eager_outs, (eager_grad,)) = results
    check_divergence_outputs(outs, ref_outs, eager_outs, skipped, dtype, case)
    check_kl(outs[0], ref_outs[0], grad, ref_grad,
             tolerance(dtype, eager_error(eager_outs[0], ref_outs[0])),
             tolerance(dtype, eager_error(eager_grad, ref_grad)), vocab, upstream[0],
             temperature, case)


def linear_inputs(case, shape, vocab, dim, hidden_dtype, weight_dtype, prefix=""):
    """hidden [..., D] (in a random layout), weight [V, D] (maybe a transposed view), bias."""
    storage, view = layout(case, shape, dim, small=True)
    case.info[f"{prefix}layout"] = case.info.pop("layout")
    # No huge hidden states: their logits overflow float32 in any float32 matmul (eager's
    # too) while float64's stay finite, a difference no kernel can close.
    hidden = values(case, storage, hidden_dtype, name=f"{prefix}h_", scales=(0.1, 1.0, 3.0),
                    offsets=(0.0,), specials=0.1, kinds=("-inf", "+inf", "nan", "-inf row"))
    transposed = case.pick(f"{prefix}weight_t", [False, True], [3, 1])
    weight = values(case, (vocab, dim), weight_dtype, name=f"{prefix}w_", scales=(0.1, 1.0),
                    offsets=(0.0,), specials=0.0)
    bias = None
    if case.pick(f"{prefix}bias", [False, True]):
        bias = values(case, (vocab,), weight_dtype, name=f"{prefix}b_", scales=(1.0, 10.0),
                      offsets=(0.0, 1e3), specials=0.0)
        if vocab > 1 and case.rng.random() < 0.3:  # banned tokens
            bias[torch.randperm(vocab, generator=case.gen)[: vocab // 3].to(DEVICE)] = -math.inf
    return hidden, view, weight, transposed, bias


def linear_leaves(hidden, weight, transposed, bias, hidden_dtype, weight_dtype, need):
    h = hidden.to(hidden_dtype).requires_grad_(need)
    w_storage = (weight.t().contiguous() if transposed else weight).to(weight_dtype)
    w_storage.requires_grad_(need)
    b = None if bias is None else bias.to(weight_dtype).requires_grad_(need)
    return h, w_storage, b


def fuzz_linear_logprobs(case, small):
    shape = leading_shape(case, small)
    vocab = case.pick("V", [1, 3, 33, 129, 301] + ([] if small else [1000]))
    dim = case.pick("D", [1, 3, 8, 17, 64])
    hidden_dtype = case.pick("dtype", DTYPES)
    weight_dtype = case.pick("weight_dtype", [hidden_dtype, hidden_dtype, torch.float32])
    hidden, view, weight, transposed, bias = linear_inputs(case, shape, vocab, dim,
                                                           hidden_dtype, weight_dtype)
    targets, ignore_index = targets_for(case, shape, vocab)
    temperature, softcap = temperature_and_softcap(case, exact_logits=False)
    options = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                   return_entropy=case.pick("entropy", [False, True]))
    h, w, b = linear_leaves(hidden, weight, transposed, bias, hidden_dtype, weight_dtype, True)
    weight_of = (lambda x: x.t()) if transposed else (lambda x: x)
    args = [view(h), weight_of(w), targets]
    if case.rng.random() < 0.03:
        args[1] = args[1][:, :-1] if dim > 1 else args[1].repeat(1, 2)
        case.invalid(ValueError, r"weight must have shape \[V, D\] with D = hidden.shape", "D")
    common_flaws(case, args, options, "hidden")
    if case.expect:
        return lambda: fa.linear_logprobs(*args, bias=b, **options)
    ignored = targets == ignore_index
    upstream = [torch.randn(shape, generator=case.gen).to(DEVICE) for _ in range(2)]
    leaves = [x for x in (h, w, b) if x is not None]
    outs, grads = run(fa.linear_logprobs, leaves, upstream, *args, bias=b, **options)
    references = []
    for compute in (torch.float64, torch.float32):
        cast = (lambda x: x.detach().to(compute if compute == torch.float64 else x.dtype))
        rh, rw, rb = (None if x is None else cast(x).requires_grad_() for x in (h, w, b))
        references.append(run(
            reference.linear_logprobs_reference, [x for x in (rh, rw, rb) if x is not None],
            upstream, ignored_zeroed(view(rh), ignored), weight_of(rw), targets, bias=rb,
            compute_dtype=compute, **options))
    (ref_outs, ref_grads), (eager_outs, eager_grads) = references
    for out, ref, eager, what in zip(outs, ref_outs, eager_outs, ("logprobs", "entropy")):
        assert out.dtype == torch.float32 and (out[ignored] == 0).all(), f"{what} [{case}]"
        check(out, ref, tolerance(hidden_dtype, eager_error(eager, ref)), what, case,
              atol=1e-6)
    for grad, ref, eager, what in zip(grads, ref_grads, eager_grads, ("hidden", "weight", "bias")):
        check_grad(grad, ref, tolerance(grad.dtype, eager_error(eager, ref), hidden_dtype),
                   f"grad {what}", case, atol=grad_floor(upstream, temperature, vocab))


def fuzz_linear_divergence(case, small, kl_only=False):
    """``linear_kl`` (``kl_only``) or ``linear_divergence``: one reference, the divergence's."""
    op, teacher = (fa.linear_kl, "ref") if kl_only else (fa.linear_divergence, "teacher")
    shape = leading_shape(case, small)
    vocab = case.pick("V", [1, 3, 33, 129, 301])
    dtype = case.pick("dtype", DTYPES)
    dims = case.pick("D", [1, 8, 17]), case.pick("ref_D", [3, 8])
    policy = linear_inputs(case, shape, vocab, dims[0], dtype, dtype)
    ref_dtype = case.pick("ref_dtype", [dtype, torch.float32])
    ref_side = linear_inputs(case, shape, vocab, dims[1], ref_dtype, ref_dtype, prefix="ref_")
    temperature, _ = temperature_and_softcap(case, exact_logits=False, with_softcap=False)
    mask = (torch.rand(shape, generator=case.gen) < 0.7).to(DEVICE) \
        if case.pick("mask", [False, True]) else None
    (hidden, view, weight, transposed, bias) = policy
    h, w, b = linear_leaves(hidden, weight, transposed, bias, dtype, dtype, True)
    rh, rw, rb = linear_leaves(*ref_side[0:1], *ref_side[2:], ref_dtype, ref_dtype, False)
    weight_of = (lambda x: x.t()) if transposed else (lambda x: x)
    ref_weight_of = (lambda x: x.t()) if ref_side[3] else (lambda x: x)
    args = [view(h), weight_of(w), ref_side[1](rh), ref_weight_of(rw)]
    options = dict(temperature=temperature, **divergence_options(case, kl_only))
    kwargs = dict(bias=b, mask=mask, **{f"{teacher}_bias": rb}, **options)
    h = args[0]  # gradients w.r.t. the hidden states as the op sees them (rows = KL rows)
    if case.rng.random() < 0.03:
        args[3] = args[3][:-1] if vocab > 1 else args[3].repeat(2, 1)
        case.invalid(ValueError, rf"{teacher}_weight has \d+ vocabulary rows but weight has|"
                     rf"{teacher}_bias must have shape \[V\]", "V")
    common_flaws(case, args, kwargs, "hidden")
    if case.expect:
        return lambda: op(*args, **kwargs)
    skipped = torch.zeros(shape, dtype=torch.bool, device=DEVICE) if mask is None else ~mask
    upstream = [torch.randn(shape, generator=case.gen).to(DEVICE) for _ in range(2)]
    leaves = [x for x in (h, w, b) if x is not None]
    outs, grads = run(op, leaves, upstream, *args, **kwargs)
    references = []
    kept = (~skipped).reshape(-1).nonzero().squeeze(1)
    for compute in (torch.float64, torch.float32):
        cast = (lambda x: x.detach().to(compute if compute == torch.float64 else x.dtype))
        pw, pb = (None if x is None else cast(x).requires_grad_() for x in (w, b))
        ph = cast(h).requires_grad_()
        qh, qw, qb = (None if x is None else cast(x) for x in (rh, rw, rb))

        def kept_rows(ph_view, pw_, qh_view, qw_, **options):
            # Masked rows only on the kept ones: a zeroed row would still meet the -inf of a
            # banned-token bias, and 0 * inf = NaN in log_softmax's backward would reach dW.
            rows = lambda x: x.reshape(-1, x.shape[-1])[kept]  # noqa: E731
            out = reference.linear_divergence_reference(rows(ph_view), pw_, rows(qh_view), qw_,
                                                        **options)
            return tuple(x.new_zeros(skipped.numel()).index_copy(0, kept, x).view(shape)
                         for x in (out if isinstance(out, tuple) else (out,)))
        references.append(run(
            kept_rows, [x for x in (ph, pw, pb) if x is not None], upstream, ph,
            weight_of(pw), ref_side[1](qh), ref_weight_of(qw), bias=pb, teacher_bias=qb,
            compute_dtype=compute, **options))
    (ref_outs, ref_grads), (eager_outs, eager_grads) = references
    check_divergence_outputs(outs, ref_outs, eager_outs, skipped, dtype, case)
    check(outs[0], ref_outs[0], tolerance(dtype, eager_error(eager_outs[0], ref_outs[0])),
          "divergence", case, atol=2e-6, overflow_margin=2.0 * vocab)
    keep, scale = kl_rows_to_compare(ref_outs[0], vocab)
    atol = max(1e-6, scale * (upstream[0].abs().max().item() if upstream[0].numel() else 0.0)
               / temperature)
    # dWeight and dBias sum over all rows: compared only when every row's KL is.
    every_row = bool(keep.all())
    for grad, ref, eager, what in zip(grads, ref_grads, eager_grads, ("hidden", "weight", "bias")):
        tol = tolerance(grad.dtype, eager_error(eager, ref), dtype)
        if what == "hidden":
            grad, ref = grad.reshape(-1, grad.shape[-1])[keep], ref.reshape(-1, ref.shape[-1])[keep]
        elif not every_row:
            continue
        check_grad(grad, ref, tol, f"grad {what}", case, atol=atol)


def fuzz_kl_estimate(case, small):
    shape = leading_shape(case, small) + (case.pick("T", [1, 7]),)
    dtype = case.pick("dtype", DTYPES + [torch.float64])
    ref_dtype = case.pick("ref_dtype", [dtype, torch.float32])
    lp = -values(case, shape, dtype, name="lp_", scales=(1e-3, 0.1, 1.0, 30.0),
                 offsets=(0.0, 1.0, 100.0)).abs()
    gap = case.pick("gap", [1e-6, 1e-3, 0.05, 1.0, 50.0])
    ref = (lp + case.randn(*shape).to(DEVICE) * gap).to(ref_dtype).double()
    kind = case.pick("kind", ["k1", "k2", "k3", "k3", "invalid"])
    leaf = lp.to(dtype).requires_grad_()
    if kind == "invalid":
        kind = "k4"
        case.invalid(ValueError, r"kind='k4' is not one of: 'k1', 'k2', 'k3'", "kind")
        return lambda: fa.kl_estimate(leaf, ref.to(ref_dtype), kind)
    upstream = [torch.randn(shape, generator=case.gen).to(DEVICE)]
    (kl,), (grad,) = run(fa.kl_estimate, [leaf], upstream, leaf, ref.to(ref_dtype), kind)
    r = ref - lp  # float64, from the values the inputs hold
    expected = {"k1": -r, "k2": r * r / 2,
                "k3": torch.where(r == math.inf, math.inf, torch.expm1(r) - r)}[kind]
    slope = {"k1": torch.ones_like(r), "k2": -r, "k3": -torch.expm1(r)}[kind]
    out_dtype = torch.promote_types(dtype, ref_dtype)
    assert kl.dtype == out_dtype, f"dtype {kl.dtype} [{case}]"
    check(kl, expected, TOLERANCE.get(out_dtype, 1e-12), "kl estimate", case, atol=1e-6)
    # run() gives NaN outputs no upstream gradient (nansum): so does the expected one. At
    # r = +inf k3's derivative is -inf times an upstream of either sign, and 0 is what
    # kl_estimate gives there: those positions must just not be NaN.
    seen = torch.where(expected.isnan(), 0.0, upstream[0])
    undefined = (r == math.inf) if kind == "k3" else torch.zeros_like(r, dtype=torch.bool)
    # exp(r) a hair past float32's max: the gradient u * exp(r) may be representable, the
    # intermediate is not.
    undefined |= expected.abs() > torch.finfo(torch.float32).max / 2
    assert not grad[undefined].isnan().any(), f"NaN gradient at r = inf [{case}]"
    check(grad[~undefined], (seen * slope)[~undefined], TOLERANCE.get(dtype, 1e-12), "grad", case,
          atol=1e-6)


OPS = {"token_logprobs": fuzz_token_logprobs, "linear_logprobs": fuzz_linear_logprobs,
       "token_kl": lambda case, small: fuzz_token_divergence(case, small, kl_only=True),
       "linear_kl": lambda case, small: fuzz_linear_divergence(case, small, kl_only=True),
       "kl_estimate": fuzz_kl_estimate, "token_divergence": fuzz_token_divergence,
       "linear_divergence": fuzz_linear_divergence}
OP_WEIGHTS = [4, 3, 2, 2, 1, 3, 2]


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + N_CASES),
                         ids=lambda s: f"seed{s}")
def test_fuzz_ops(seed, monkeypatch):
    case = Case(seed)
    op = case.pick("op", list(OPS), OP_WEIGHTS)
    backend = case.pick("backend", BACKENDS)
    monkeypatch.setenv("FASTALIGN_BACKEND", backend)
    # The interpreter runs Triton kernels in numpy: keep its cases small.
    call = OPS[op](case, small=backend == "triton")
    if not case.expect:
        return
    expected = " or ".join(f"{error.__name__} /{pattern}/" for error, pattern in case.expect)
    try:
        call()
    except (ValueError, TypeError) as raised:
        assert any(isinstance(raised, error) and re.search(pattern, str(raised))
                   for error, pattern in case.expect), \
            f"raised {type(raised).__name__}({raised}), expected {expected} [{case}]"
    else:
        pytest.fail(f"expected {expected}, nothing raised [{case}]")
