"""Memory layouts, in-place backward, 64-bit offsets and out-of-range targets."""

import pytest
import torch
from conftest import DEVICE, assert_close
from helpers import run_both

import fastalign as fa
from fastalign._layout import RowLayout, row_layout
from fastalign.reference import token_logprobs_reference


def _check(logits, targets, tol=1e-5):
    (lp, ent, grad), (ref_lp, ref_ent, ref_grad) = run_both(logits, targets, softcap=6.0)
    assert_close(lp, ref_lp, tol, "logprobs")
    assert_close(ent, ref_ent, tol, "entropy")
    assert_close(grad, ref_grad, tol, "grad")


def test_shifted_slice_is_read_in_place(backend):
    """The [:, :-1] slice of [B, T, V] logits: the common causal-LM case, no hidden copy."""
    full = torch.randn(3, 11, 301, device=DEVICE) * 3
    logits = full[:, :-1]
    targets = torch.randint(0, 301, (3, 10), device=DEVICE)
    same, layout = row_layout(logits)
    assert same.data_ptr() == logits.data_ptr() and layout.n_outer == 3 and layout.n_inner == 10
    _check(logits, targets)


def test_transposed_leading_dims(backend):
    logits = (torch.randn(6, 4, 129, device=DEVICE) * 3).transpose(0, 1)  # [4, 6, V], no copy
    targets = torch.randint(0, 129, (4, 6), device=DEVICE)
    assert row_layout(logits)[0].data_ptr() == logits.data_ptr()
    _check(logits, targets)


@pytest.mark.parametrize("case", ["three_levels", "strided_vocab"])
def test_layouts_that_need_a_copy(backend, case):
    if case == "three_levels":  # rows at three unrelated strides
        logits = (torch.randn(2, 4, 5, 65, device=DEVICE) * 3)[:, :-1, :-1]
    else:  # vocabulary not unit-stride
        logits = (torch.randn(7, 130, device=DEVICE) * 3)[:, ::2]
    targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], device=DEVICE)
    _check(logits, targets)


def test_inplace_backward(backend):
    full = torch.randn(2, 9, 257, device=DEVICE, dtype=torch.bfloat16) * 3
    targets = torch.randint(0, 257, (2, 8), device=DEVICE)
    targets[0, 3] = -100
    leaf = full.clone().requires_grad_()
    logits = leaf[:, :-1] * 1  # a non-leaf the caller no longer needs
    lp, ent = fa.token_logprobs(logits, targets, return_entropy=True, inplace_backward=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    reference_leaf = full.clone().requires_grad_()
    lp_ref, ent_ref = fa.token_logprobs(reference_leaf[:, :-1] * 1, targets, return_entropy=True)
    (lp_ref.sum() + 0.5 * ent_ref.sum()).backward()
    assert torch.equal(leaf.grad, reference_leaf.grad)
    assert torch.equal(logits, leaf.grad[:, :-1]), "the gradient is written over the logits"


def test_inplace_backward_guards(backend):
    leaf = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 33, (4,), device=DEVICE)
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite a leaf"):
        fa.token_logprobs(leaf, targets, inplace_backward=True)
    # Another op saved the logits for its own backward: it must fail, not read gradients.
    logits = leaf * 2
    squared = (logits ** 2).sum()
    loss = fa.token_logprobs(logits, targets, inplace_backward=True).sum() + squared
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_one_column_vocabulary_with_a_stride(backend):
    """Found by tests/test_fuzz_ops.py: x[..., ::2] of a V = 2 tensor has V = 1 and stride 2,
    which torch's contiguous() keeps (a size-1 dim's stride is free); the native kernels
    refused it ("logits needs a unit stride in its last dim"). One column needs no stride."""
    full = torch.randn(4, 2, device=DEVICE)
    logits = full[:, ::2]
    assert logits.stride(-1) == 2
    targets = torch.zeros(4, dtype=torch.long, device=DEVICE)
    lp, ent = fa.token_logprobs(logits, targets, return_entropy=True)
    assert (lp == 0).all() and (ent == 0).all()
    assert (fa.token_kl(logits, logits + 1.0) == 0).all()


VIEWS_OF_A_LEAF = {
    "slice": lambda leaf: leaf[:, :-1],
    "view": lambda leaf: leaf.view(2, 3, 3, 33)[:, 0],
    "unbind": lambda leaf: leaf.unbind(0)[1],
}


@pytest.mark.parametrize("make", list(VIEWS_OF_A_LEAF.values()), ids=list(VIEWS_OF_A_LEAF))
def test_inplace_backward_refuses_a_view_of_a_leaf(backend, make):
    """A slice of a parameter or of a data tensor is not a leaf, but its memory is the leaf's:
    the gradient written there would replace the leaf's values (it did, on every backend)."""
    leaf = torch.randn(2, 9, 33, device=DEVICE, requires_grad=True)
    before = leaf.detach().clone()
    logits = make(leaf)
    targets = torch.randint(0, 33, logits.shape[:-1], device=DEVICE)
    with pytest.raises(ValueError, match=r"inplace_backward=True would write the gradient into "
                       r"the memory of a leaf tensor: logits is a view of one "
                       r"\(shape \(2, 9, 33\)\); pass logits produced by a layer \(or a copy"):
        fa.token_logprobs(logits, targets, inplace_backward=True)
    fa.token_logprobs(logits, targets).sum().backward()  # without the flag: a fresh gradient
    assert torch.equal(leaf.detach(), before) and leaf.grad is not None


ALIASED_ROWS = {
    # rows that are the same memory (a stride-0 dim) and rows closer than V apart
    "expand": lambda base: base[:, None].expand(4, 3, 33),
    "overlapping_rows": lambda base: base.reshape(-1).as_strided((7, 33), (16, 1)),
    "expand_outer": lambda base: base[None].expand(2, 4, 33),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("make", list(ALIASED_ROWS.values()), ids=list(ALIASED_ROWS))
def test_aliased_rows_get_the_right_gradient(backend, make, inplace):
    """Elements sharing memory: their gradient has more elements than the memory holds, so an
    in-place write let rows overwrite each other (relative error ~1 on every backend). The op
    falls back to a fresh gradient, which autograd sums into the shared memory."""
    base = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 33, make(base).shape[:-1], device=DEVICE)
    logits = make(base * 1)
    before = logits.detach().clone()
    lp, ent = fa.token_logprobs(logits, targets, return_entropy=True, inplace_backward=inplace)
    grad, = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), base)
    exact = base.detach().double().requires_grad_()
    ref_lp, ref_ent = token_logprobs_reference(make(exact), targets, return_entropy=True)
    ref_grad, = torch.autograd.grad(ref_lp.sum() + 0.5 * ref_ent.sum(), exact)
    assert_close(lp, ref_lp, 1e-5, "logprobs")
    assert_close(grad, ref_grad, 1e-5, "grad")
    assert torch.equal(logits, before), "the shared memory must not be written over"


@pytest.mark.parametrize("make,overlaps", [
    (lambda x: x, False), (lambda x: x[:, :-1], False), (lambda x: x.transpose(0, 1), False),
    (lambda x: x[:, ::2], False), (lambda x: x[:1].expand(3, 5, 33), True),
    (lambda x: x.reshape(-1).as_strided((7, 33), (16, 1)), True),
    (lambda x: x.reshape(-1).as_strided((5, 33), (33, 1)), False)])
def test_internal_overlap_detection(make, overlaps):
    from fastalign._validation import has_internal_overlap
    assert has_internal_overlap(make(torch.randn(4, 5, 33))) == overlaps


def test_offsets_past_two_to_the_31(backend):
    """A row that starts beyond 2**31 elements while the row stride itself fits in int32, so
    only 64-bit row offsets reach it. Pages never touched cost no memory."""
    vocab, row_stride = 1000, 2**30 + 1
    # An untyped storage, so that the NaN poisoning of torch.empty does not touch 4 GiB.
    storage = torch.UntypedStorage((2 * row_stride + vocab) * 2, device=DEVICE)
    logits = torch.tensor([], dtype=torch.float16, device=DEVICE).set_(
        storage, 0, (3, vocab), (row_stride, 1))
    logits.copy_(torch.randn(3, vocab, device=DEVICE) * 3)
    targets = torch.tensor([5, 999, 0], device=DEVICE)
    expected = token_logprobs_reference(logits.clone(), targets)
    assert_close(fa.token_logprobs(logits, targets), expected, 1e-2, "logprobs")


def _launchers(backend):
    from fastalign.ops._backends import token_logprobs_launchers
    launchers = token_logprobs_launchers(backend)
    return launchers.forward, launchers.backward


def test_out_of_range_targets_are_nan_not_read(backend):
    """What CUDA callers get without FASTALIGN_CHECK_TARGETS=1: the launchers never read
    outside a row and report its outputs and gradient as NaN; other rows are untouched."""
    forward, backward = _launchers(backend)
    logits = torch.randn(4, 50, device=DEVICE)
    targets = torch.tensor([3, 50, -1, 7], device=DEVICE)
    options = dict(inv_temperature=1.0, softcap=None, ignore_index=-100)
    layout = RowLayout(1, 4, 0, 50)
    lp, ent, lse = forward(logits, targets, layout, return_entropy=True, **options)
    assert torch.isnan(lp[1:3]).all() and torch.isnan(ent[1:3]).all()
    expected_lp, expected_ent = token_logprobs_reference(logits, targets.clamp(0, 49),
                                                         return_entropy=True)
    assert_close(lp[[0, 3]], expected_lp[[0, 3]], 1e-5, "valid rows")
    assert_close(ent[[0, 3]], expected_ent[[0, 3]], 1e-5, "valid rows")
    grad = backward(logits, targets, layout, lse, ent, torch.ones(4, device=DEVICE), None,
                    torch.empty_like(logits), layout, **options)
    assert torch.isnan(grad[1:3]).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="on CPU the range check always runs")
def test_cuda_out_of_range_reporting(backend, monkeypatch):
    logits = torch.randn(3, 50, device=DEVICE)
    targets = torch.tensor([1, 60, 2], device=DEVICE)
    lp = fa.token_logprobs(logits, targets)
    assert torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2]]).all()
    monkeypatch.setenv("FASTALIGN_CHECK_TARGETS", "1")
    with pytest.raises(ValueError, match="outside"):
        fa.token_logprobs(logits, targets)


@pytest.mark.cuda
def test_cuda_more_than_two_to_the_31_elements():
    """N * V > 2**31 with real tensors: 8448 rows of a 256k vocabulary in bf16 (4.3 GB)."""
    n_rows, vocab = 8448, 256_000
    logits = torch.randn(n_rows, vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (n_rows,), device="cuda")
    rows = torch.tensor([0, 4000, n_rows - 1], device="cuda")
    logits.requires_grad_()
    logprobs = fa.token_logprobs(logits, targets)
    logprobs[rows].sum().backward()
    sample = logits.detach()[rows].double().requires_grad_()
    expected = token_logprobs_reference(sample, targets[rows])
    expected.sum().backward()
    assert_close(logprobs[rows], expected, 1e-2, "logprobs")
    assert_close(logits.grad[rows], sample.grad, 1e-2, "grad")
