"""Values at the edges of the float range, on every backend, against the float64 reference:
rows of huge logits (|z| up to 3e38, ties a few ulps apart), temperatures that would overflow
z / T in float32, and a softcap over small logits (where s * tanh(z / s) must keep z's relative
precision). The contract (DESIGN.md): float32 within 1e-5, bf16/fp16 within 1e-2, and a finite
input never gives NaN."""

import pytest
import torch
from conftest import DEVICE, TOLERANCE, assert_close

import fastalign as fa
from fastalign.reference import (linear_logprobs_reference, token_kl_reference,
                                 token_logprobs_reference)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS, VOCAB = 5, 301
# Offsets of the rows; each dtype takes those it can hold.
OFFSETS = [1e3, -1e5, 1e6, 1e20, -1e20, 3e38, -3e38]


def near(offset: float, dtype: torch.dtype, *, seed: int = 0) -> torch.Tensor:
    """``[ROWS, VOCAB]`` logits at most 3 ulps from ``offset`` in ``dtype``: ties and near-ties,
    so that the softmax is far from one-hot and every bit of ``z - max`` matters."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.full((ROWS, VOCAB), offset, dtype=dtype)
    toward_zero = torch.nextafter(base, torch.zeros_like(base))
    ulp = (base.double() - toward_zero.double()).abs()
    steps = torch.randint(0, 4, (ROWS, VOCAB), generator=gen).double()
    # Steps toward zero keep 3e38 rows below float32's max.
    logits = base.double() - torch.sign(base.double()) * steps * ulp
    return logits.to(dtype).to(DEVICE)


def offsets_for(dtype):
    return [c for c in OFFSETS if abs(c) < torch.finfo(dtype).max]


CASES = [(dtype, offset) for dtype in DTYPES for offset in offsets_for(dtype)]


def _logprobs_and_grads(fn, logits, targets, go_lp, go_ent, **options):
    leaf = logits.detach().clone().requires_grad_()
    lp, ent = fn(leaf * 1, targets, return_entropy=True, **options)
    ((lp * go_lp).sum() + (ent * go_ent).sum()).backward()
    return lp, ent, leaf.grad


def _assert_matches_reference(logits, targets, go_lp, go_ent, tol, **options):
    """token_logprobs' log-probs, entropy and gradient equal the float64 reference's."""
    lp, ent, grad = _logprobs_and_grads(fa.token_logprobs, logits, targets, go_lp, go_ent,
                                        **options)
    ref_lp, ref_ent, ref_grad = _logprobs_and_grads(token_logprobs_reference, logits.double(),
                                                    targets, go_lp, go_ent, **options)
    assert_close(lp, ref_lp, tol, "logprobs")
    assert_close(ent, ref_ent, tol, "entropy")
    assert_close(grad, ref_grad, tol, "grad")


@pytest.mark.parametrize("dtype,offset", CASES, ids=[f"{d}-{c:g}".removeprefix("torch.")
                                                       for d, c in CASES])
@pytest.mark.parametrize("temperature", [1.0, 0.25, 3.0])
def test_huge_logits_keep_their_precision(backend, dtype, offset, temperature):
    """Rows of near-ties at |z| up to 3e38: the gradient needs log p = (z - max) / T - log S
    with the max subtracted before anything rounds at |z| (z / T at 3e38 / 0.25 even overflows
    float32; float64 holds it)."""
    logits = near(offset, dtype)
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen).to(DEVICE)
    go_lp, go_ent = torch.randn(2, ROWS, generator=gen).to(DEVICE)
    _assert_matches_reference(logits, targets, go_lp, go_ent, TOLERANCE[dtype],
                              temperature=temperature)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_huge_column_among_minus_huge(backend, dtype):
    """z - max overflows to -inf for the columns at -max: they get p = 0, never NaN."""
    big = torch.finfo(dtype).max / 1.5
    logits = torch.full((3, VOCAB), -big, dtype=dtype, device=DEVICE)
    logits[:, 7] = big
    logits[1, 8] = big  # a tie
    logits[2, :5] = float("-inf")
    targets = torch.tensor([7, 8, 0], device=DEVICE)
    go = torch.ones(3, device=DEVICE)
    lp, ent, grad = _logprobs_and_grads(fa.token_logprobs, logits, targets, go, go)
    ref_lp, ref_ent, ref_grad = _logprobs_and_grads(token_logprobs_reference, logits.double(),
                                                    targets, go, go)
    assert torch.isfinite(lp[:2]).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert lp[2] == float("-inf") and ref_lp[2] == float("-inf")  # a -inf target
    assert_close(lp[:2], ref_lp[:2], TOLERANCE[dtype], "logprobs")
    assert_close(ent, ref_ent, TOLERANCE[dtype], "entropy")
    assert_close(grad, ref_grad, TOLERANCE[dtype], "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 40.0])
def test_softcap_keeps_the_relative_precision_of_small_logits(backend, dtype, scale):
    """s * tanh(z / s) for |z| << s is z to float32 precision; a tanh with an absolute error of
    1e-7 (1 - 2 / (exp(2x) + 1)) would give s * 1e-7 instead, 3e-6 at Gemma-2's s = 30."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(ROWS, VOCAB, generator=gen) * scale).to(dtype).to(DEVICE)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen).to(DEVICE)
    go_lp, go_ent = torch.randn(2, ROWS, generator=gen).to(DEVICE)
    # T small enough that the softmax of tiny logits is not uniform (uniform would hide errors).
    _assert_matches_reference(logits, targets, go_lp, go_ent, TOLERANCE[dtype], softcap=30.0,
                              temperature=scale / 4)


@pytest.mark.parametrize("offsets", [(1e6, 1e6), (1e6, 0.0), (-3e38, 3e38), (1e20, 1e20)])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_kl_of_huge_logits(backend, offsets, temperature):
    policy, ref = near(offsets[0], torch.float32), near(offsets[1], torch.float32, seed=3)
    if offsets[1] == 0.0:
        ref = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    go = torch.randn(ROWS, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = []
    for fn, dtype in ((fa.token_kl, torch.float32), (token_kl_reference, torch.float64)):
        leaf = policy.to(dtype).detach().clone().requires_grad_()
        kl = fn(leaf, ref.to(dtype), temperature=temperature)
        (kl * go).sum().backward()
        results.append((kl, leaf.grad))
    (kl, grad), (ref_kl, ref_grad) = results
    # A small KL is a difference of O(1) terms: in float32 it carries a few 1e-7 nats of
    # absolute error, as eager torch's does (4e-5 relative for the near-ties at 1e6, where the
    # KL is 0.005; at (-3e38, 3e38) eager float32 gives NaN).
    assert torch.isfinite(kl).all()
    error = (kl.double() - ref_kl).abs().max().item()
    assert error <= 1e-6 + 1e-5 * ref_kl.abs().max().item(), f"kl: error {error:.3g}"
    assert_close(grad, ref_grad, 1e-5, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [1e6, -1e20, 3e38])
def test_linear_logprobs_of_huge_exact_logits(backend, small_tiles, dtype, offset):
    """hidden = one-hot rows, so the logits are the weight's entries exactly (no matmul
    rounding): then the fused-linear path must be as exact as token_logprobs. The weight's
    gradient is then the logits' gradient itself (dHidden would sum huge terms that cancel,
    in float64 as well as in float32, so it is no test of the kernels)."""
    weight = near(offset, dtype).t().contiguous()[:, :ROWS]  # [V, D = ROWS]
    hidden = torch.eye(ROWS, dtype=dtype, device=DEVICE)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(5))
    targets = targets.to(DEVICE)
    results = []
    for fn, cast in ((fa.linear_logprobs, dtype), (linear_logprobs_reference, torch.float64)):
        w = weight.to(cast).detach().clone().requires_grad_()
        lp, ent = fn(hidden.to(cast), w, targets, temperature=0.5, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        results.append((lp, ent, w.grad))
    for actual, expected, what in zip(*results, ("logprobs", "entropy", "grad weight")):
        assert_close(actual, expected, TOLERANCE[dtype], what)
