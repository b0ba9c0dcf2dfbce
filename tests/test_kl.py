"""token_kl and linear_kl against the float64 reference on every backend: values and the
gradients of the policy side; masks, strided logits, large and -inf logits."""

import pytest
import torch
from conftest import DEVICE, assert_close, relative_error, tolerance_for

import fastalign as fa
from fastalign.reference import linear_kl_reference, token_kl_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def policy_and_reference_logits(batch, seq, vocab, dtype, *, offset=0.0, seed=0):
    """``[B, T+1, V]`` policy logits (the test reads their ``[:, :-1]`` slice, strided) and
    ``[B, T, V]`` reference logits near them, both of std ~2 around ``offset``."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, seq + 1, vocab, generator=gen) * 2 + offset
    ref = full[:, :-1] + torch.randn(batch, seq, vocab, generator=gen)
    return full.to(DEVICE, dtype).requires_grad_(), ref.to(DEVICE, dtype)


def kl_and_grad(fn, full, ref, upstream, **options):
    kl = fn(full[:, :-1], ref, **options)
    return kl, torch.autograd.grad((kl * upstream).sum(), full)[0]


def check_token_kl(full, ref, **options):
    upstream = torch.randn(ref.shape[:-1], device=DEVICE)
    kl, grad = kl_and_grad(fa.token_kl, full, ref, upstream, **options)
    exact = full.detach().double().requires_grad_()
    ref_kl, ref_grad = kl_and_grad(token_kl_reference, exact, ref.double(), upstream, **options)
    own_kl, own_grad = kl_and_grad(  # torch in float32 from the same inputs
        lambda *a, **k: token_kl_reference(*a, compute_dtype=torch.float32, **k),
        full, ref, upstream, **options)
    dtype = full.dtype
    assert_close(kl, ref_kl, tolerance_for(dtype, relative_error(own_kl, ref_kl)), "kl")
    assert_close(grad, ref_grad, tolerance_for(dtype, relative_error(own_grad, ref_grad)), "grad")
    assert kl.dtype == torch.float32 and grad.dtype == dtype
    return kl, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_token_kl_matches_float64_reference(backend, small_tiles, dtype, temperature, masked):
    full, ref = policy_and_reference_logits(2, 9, 507, dtype)
    mask = torch.rand(2, 9, device=DEVICE) > 0.3 if masked else None
    kl, grad = check_token_kl(full, ref, temperature=temperature, mask=mask)
    if masked:
        assert (kl[~mask] == 0).all() and (grad[:, :-1][~mask] == 0).all()
    assert (grad[:, -1] == 0).all(), "the last position is not in the slice"


def test_token_kl_default_tiles_and_large_logits(backend):
    full, ref = policy_and_reference_logits(1, 5, 4097, torch.float32, offset=500.0)
    check_token_kl(full, ref)


def test_token_kl_of_equal_distributions_is_zero(backend):
    logits = torch.randn(6, 300, device=DEVICE).requires_grad_()
    kl = fa.token_kl(logits, logits.detach() + 3.0)  # a shift changes no softmax
    grad, = torch.autograd.grad(kl.sum(), logits)
    assert kl.abs().max() < 1e-6 and grad.abs().max() < 1e-6


def test_token_kl_skips_masked_rows_and_handles_minus_inf(backend, small_tiles):
    full, ref = policy_and_reference_logits(1, 6, 300, torch.float32)
    ref = ref.clone()
    with torch.no_grad():
        full[0, 2] = float("nan")  # a masked row may hold anything
        full[:, :, ::7] = float("-inf")  # a masked vocabulary on both sides
        ref[:, :, ::7] = float("-inf")
    mask = torch.ones(1, 6, dtype=torch.bool, device=DEVICE)
    mask[0, 2] = False
    kl, grad = kl_and_grad(fa.token_kl, full, ref, torch.ones(1, 6, device=DEVICE), mask=mask)
    assert kl[0, 2] == 0 and (grad[0, 2] == 0).all()
    keep = [0, 1, 3, 4, 5]
    exact = full.detach().double()[:, keep].requires_grad_()
    expected = token_kl_reference(exact, ref.double()[:, keep])
    expected_grad, = torch.autograd.grad(expected.sum(), exact)
    assert_close(kl[:, keep], expected, 1e-5, "kl")
    assert_close(grad[:, keep], expected_grad, 1e-5, "grad")


def test_token_kl_leaves_inputs_alone(backend):
    full, ref = policy_and_reference_logits(2, 3, 100, torch.float32)
    before = full.detach().clone(), ref.clone()
    kl_and_grad(fa.token_kl, full, ref, torch.ones(2, 3, device=DEVICE))
    assert torch.equal(full.detach(), before[0]) and torch.equal(ref, before[1])


def test_token_kl_of_degenerate_rows_is_never_silently_finite(backend):
    """Found by tests/test_fuzz_ops.py. A row whose KL is NaN (a NaN or +inf policy logit, a
    row of only -inf) used to get a clean gradient: where(p > 0, ...) dropped the NaN p. And a
    finite policy logit where the reference's is -inf makes the KL +inf even where p underflows
    to 0 in float32 (log p = -200): it came out finite."""
    logits = torch.randn(5, 40, device=DEVICE)
    ref_logits = torch.randn(5, 40, device=DEVICE)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[3, 5] = -200.0  # p = e^-200: 0 in float32, not in float64
    ref_logits[3, 5] = float("-inf")
    leaf = logits.clone().requires_grad_()
    kl = fa.token_kl(leaf, ref_logits)
    grad, = torch.autograd.grad(kl[:4].nansum() + kl[4], leaf)
    assert kl[:3].isnan().all() and kl[3] == float("inf") and torch.isfinite(kl[4])
    assert grad[:3].isnan().all(), "a NaN KL must not give a finite gradient"
    assert not torch.isfinite(grad[3]).all() and torch.isfinite(grad[4]).all()
    expected = token_kl_reference(logits.double(), ref_logits.double())
    assert expected[3] == float("inf") and expected[:3].isnan().all()
    assert_close(kl[4], expected[4], 1e-5, "the healthy row")


def test_token_kl_with_an_empty_leading_dim(backend):
    """Found by the fuzzer: a 0-sized dim between others made no row layout (torch does not
    copy empty tensors into a contiguous layout) and raised a bare unpacking error."""
    full = torch.randn(3, 2, 4, 33, device=DEVICE)
    logits = full[:, :0, :3]
    leaf = full.clone().requires_grad_()
    kl = fa.token_kl(leaf[:, :0, :3], logits + 1.0)
    assert kl.shape == (3, 0, 3)
    kl.sum().backward()
    assert (leaf.grad == 0).all()


def random_pair(shape, vocab, dtype, *, ref_dim=48, seed=0):
    """Policy (hidden, weight, bias) leaves and a reference (hidden, weight, bias) of another
    width, both giving logits of std ~2."""
    gen = torch.Generator().manual_seed(seed)
    policy = [torch.randn(*shape, 80, generator=gen),
              torch.randn(vocab, 80, generator=gen) * (2 / 80 ** 0.5), torch.randn(vocab, generator=gen)]
    reference = [torch.randn(*shape, ref_dim, generator=gen),
                 torch.randn(vocab, ref_dim, generator=gen) * (2 / ref_dim ** 0.5),
                 torch.randn(vocab, generator=gen)]
    policy = [x.to(DEVICE, dtype).requires_grad_() for x in policy]
    return policy, [x.to(DEVICE, dtype) for x in reference]


def linear_kl_and_grads(fn, policy, reference, upstream, **options):
    hidden, weight, bias = policy
    kl = fn(hidden, weight, reference[0], reference[1], bias=bias, ref_bias=reference[2], **options)
    wanted = [x for x in policy if x.requires_grad]
    return kl, torch.autograd.grad((kl * upstream).sum(), wanted)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_linear_kl_matches_float64_reference(backend, small_tiles, dtype, masked):
    policy, reference = random_pair((2, 11), 333, dtype)
    mask = torch.rand(2, 11, device=DEVICE) > 0.3 if masked else None
    upstream = torch.randn(2, 11, device=DEVICE)
    options = dict(temperature=0.8, mask=mask)
    kl, grads = linear_kl_and_grads(fa.linear_kl, policy, reference, upstream, **options)
    exact_policy = [x.detach().double().requires_grad_() for x in policy]
    exact_reference = [x.double() for x in reference]
    ref_kl, ref_grads = linear_kl_and_grads(linear_kl_reference, exact_policy, exact_reference,
                                            upstream, **options)
    own_kl, own_grads = linear_kl_and_grads(
        lambda *a, **k: linear_kl_reference(*a, compute_dtype=torch.float32, **k),
        policy, reference, upstream, **options)
    assert_close(kl, ref_kl, tolerance_for(dtype, relative_error(own_kl, ref_kl)), "kl")
    for name, ours, exact, own in zip(["hidden", "weight", "bias"], grads, ref_grads, own_grads):
        assert_close(ours, exact, tolerance_for(dtype, relative_error(own, exact)), name)
        assert ours.dtype == dtype
    if masked:
        assert (kl[~mask] == 0).all() and (grads[0][~mask] == 0).all()


def test_linear_kl_frozen_head(backend, small_tiles):
    policy, reference = random_pair((7,), 300, torch.float32)
    policy[1].requires_grad_(False)
    upstream = torch.ones(7, device=DEVICE)
    kl, (grad_hidden, grad_bias) = linear_kl_and_grads(fa.linear_kl, policy, reference, upstream)
    exact = [x.detach().double().requires_grad_(x.requires_grad) for x in policy]
    ref_kl, (ref_hidden, ref_bias) = linear_kl_and_grads(
        linear_kl_reference, exact, [x.double() for x in reference], upstream)
    assert_close(grad_hidden, ref_hidden, 1e-5, "hidden")
    assert_close(grad_bias, ref_bias, 1e-5, "bias")
