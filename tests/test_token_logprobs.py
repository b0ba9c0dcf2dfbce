"""token_logprobs against the float64 reference on every backend: values, entropy, gradients."""

import pytest
import torch
from conftest import DEVICE, TOLERANCE, assert_close
from helpers import run_both

import fastalign as fa
from fastalign.reference import token_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, V): odd sizes that are multiples of no tile, one row, a one-token vocabulary.
SHAPES = [((37,), 507), ((2, 5), 4097), ((1,), 1), ((3, 4), 33)]
TRANSFORMS = [dict(), dict(temperature=0.7), dict(temperature=1.3, softcap=4.0)]


def random_case(shape, vocab, dtype, *, scale=4.0, ignore_share=0.2, ignore_index=-100):
    """Peaky random logits and targets with a share of ignored positions (never all ignored)."""
    logits = (torch.randn(*shape, vocab, device=DEVICE) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, device=DEVICE)
    ignored = torch.rand(shape, device=DEVICE) < ignore_share
    ignored.view(-1)[0] = False
    return logits, targets.masked_fill(ignored, ignore_index)


@pytest.mark.parametrize("shape,vocab", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=["plain", "temperature", "softcap"])
def test_matches_float64_reference(backend, shape, vocab, dtype, transform):
    logits, targets = random_case(shape, vocab, dtype)
    (lp, ent, grad), (ref_lp, ref_ent, ref_grad) = run_both(logits, targets, **transform)
    tol = TOLERANCE[dtype]
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == targets.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close(lp, ref_lp, tol, "logprobs")
    assert_close(ent, ref_ent, tol, "entropy")
    assert_close(grad, ref_grad, tol, "grad")
    ignored = targets == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (grad[ignored] == 0).all(), "ignored rows must receive exactly zero gradient"


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiles_and_chunks_with_partial_tail(backend, small_tiles, dtype):
    logits, targets = random_case((2, 19), 507, dtype)
    (lp, ent, grad), (ref_lp, ref_ent, ref_grad) = run_both(logits, targets, softcap=9.0)
    for actual, expected, what in ((lp, ref_lp, "logprobs"), (ent, ref_ent, "entropy"),
                                   (grad, ref_grad, "grad")):
        assert_close(actual, expected, TOLERANCE[dtype], what)


@pytest.mark.parametrize("return_entropy", [False, True])
def test_logprobs_only(backend, return_entropy):
    logits, targets = random_case((29,), 300, torch.float32)
    leaf = logits.clone().requires_grad_()
    out = fa.token_logprobs(leaf, targets, return_entropy=return_entropy, temperature=0.9)
    logprobs = out[0] if return_entropy else out
    logprobs.sum().backward()  # entropy, if returned, takes no gradient
    ref_leaf = logits.double().requires_grad_()
    token_logprobs_reference(ref_leaf, targets, temperature=0.9).sum().backward()
    assert_close(leaf.grad, ref_leaf.grad, 1e-5, "grad")


def test_entropy_only_gradient(backend):
    logits, targets = random_case((23,), 257, torch.float32)
    leaf = logits.clone().requires_grad_()
    _, entropy = fa.token_logprobs(leaf, targets, return_entropy=True)
    entropy.sum().backward()
    ref_leaf = logits.double().requires_grad_()
    token_logprobs_reference(ref_leaf, targets, return_entropy=True)[1].sum().backward()
    assert_close(leaf.grad, ref_leaf.grad, 1e-5, "entropy grad")


def test_ignore_index_inside_vocabulary(backend):
    """A pad id that is also a real token id (0) is ignored wherever it is the target."""
    logits, targets = random_case((40,), 100, torch.float32, ignore_index=0)
    (lp, ent, grad), (ref_lp, ref_ent, ref_grad) = run_both(logits, targets, ignore_index=0)
    assert (lp[targets == 0] == 0).all()
    assert_close(lp, ref_lp, 1e-5, "logprobs")
    assert_close(grad, ref_grad, 1e-5, "grad")


def test_int32_targets(backend):
    logits, targets = random_case((17,), 129, torch.float32)
    expected = token_logprobs_reference(logits, targets)
    assert_close(fa.token_logprobs(logits, targets.int()), expected, 1e-5, "logprobs")


def test_large_logits_entropy_does_not_cancel(backend):
    """Entropy of near-uniform rows far from zero: sum p*z would cancel against lse in fp32."""
    logits = 3000.0 + torch.randn(8, 1000, device=DEVICE) * 1e-2
    targets = torch.randint(0, 1000, (8,), device=DEVICE)
    _, entropy = fa.token_logprobs(logits, targets, return_entropy=True)
    _, expected = token_logprobs_reference(logits, targets, return_entropy=True)
    assert_close(entropy, expected, 1e-5, "entropy")


def test_masked_vocabulary_with_minus_inf(backend):
    """-inf logits (banned tokens) behave as if those columns did not exist."""
    logits, targets = random_case((13,), 300, torch.float32, ignore_share=0.0)
    banned = torch.zeros(300, dtype=torch.bool, device=DEVICE)
    banned[::7] = True
    targets = torch.where(banned[targets], targets + 1, targets)  # no banned target
    masked = logits.masked_fill(banned, float("-inf"))
    kept_targets = targets - banned.cumsum(0)[targets]  # the id among the kept columns
    torch.manual_seed(1)  # the same upstream gradients for both calls
    (lp, ent, grad), _ = run_both(masked, targets)
    torch.manual_seed(1)
    (ref_lp, ref_ent, ref_grad), _ = run_both(logits[:, ~banned], kept_targets)
    assert_close(lp, ref_lp, 1e-5, "logprobs")
    assert_close(ent, ref_ent, 1e-5, "entropy")
    assert_close(grad[:, ~banned], ref_grad, 1e-5, "grad")
    assert (grad[:, banned] == 0).all()


def test_large_vocabulary_256k(backend):
    logits, targets = random_case((3,), 256_000, torch.bfloat16, ignore_share=0.0)
    (lp, ent, grad), (ref_lp, ref_ent, ref_grad) = run_both(logits, targets)
    assert_close(lp, ref_lp, 1e-2, "logprobs")
    assert_close(ent, ref_ent, 1e-2, "entropy")
    assert_close(grad, ref_grad, 1e-2, "grad")


def test_empty_input(backend):
    logits = torch.randn(0, 7, 50, device=DEVICE, requires_grad=True)
    logprobs, entropy = fa.token_logprobs(logits, torch.zeros(0, 7, dtype=torch.long, device=DEVICE),
                                          return_entropy=True)
    assert logprobs.shape == entropy.shape == (0, 7)
    (logprobs.sum() + entropy.sum()).backward()
    assert logits.grad.shape == logits.shape
