"""token_divergence and linear_divergence (forward KL, reverse KL, TRL's generalized JSD)
against the float64 reference on every backend: values, the student's entropy and the
student's gradients, temperature, both softcaps, masks, biases, models of different widths,
an odd vocabulary (V = 1000 + 7, no multiple of any tile), -inf and NaN logits; and against
TRL's own ``ChunkedDivergenceFunction``."""

import pytest
import torch
from helpers import slow_beyond
from conftest import DEVICE, assert_close, relative_error, tolerance_for

import fastalign as fa
from fastalign.reference import linear_divergence_reference, token_divergence_reference

BETAS = [0.0, 0.3, 0.5, 1.0]
DTYPES = [torch.float32, torch.bfloat16]
VOCAB = 1000 + 7
# Options beyond beta: none, or all of them (a temperature, each model its own softcap, a
# mask, the entropy returned and differentiated too).
VARIANTS = {"plain": {},
            "everything": dict(temperature=0.7, softcap=6.0, teacher_softcap=4.0,
                               return_entropy=True)}


def student_and_teacher_logits(batch, seq, vocab, dtype, *, offset=0.0, seed=0):
    """``[B, T+1, V]`` student logits (the tests read their ``[:, :-1]`` slice, strided) and
    ``[B, T, V]`` teacher logits near them, both of std ~2 around ``offset``."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, seq + 1, vocab, generator=gen) * 2 + offset
    teacher = full[:, :-1] + torch.randn(batch, seq, vocab, generator=gen)
    return full.to(DEVICE, dtype).requires_grad_(), teacher.to(DEVICE, dtype)


def loss_of(out, upstream):
    """``sum(divergence * u0) (+ sum(entropy * u1))`` of an op's result."""
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o * u).sum() for o, u in zip(outs, upstream)), outs


def token_run(fn, full, teacher, upstream, **options):
    loss, outs = loss_of(fn(full[:, :-1], teacher, **options), upstream)
    return outs, torch.autograd.grad(loss, full)[0]


def check_token_divergence(full, teacher, upstream, **options):
    """Ours against float64, the tolerance loosened only to 1.5x eager float32 torch's error
    from the same inputs; returns our outputs and gradient."""
    outs, grad = token_run(fa.token_divergence, full, teacher, upstream, **options)
    exact = full.detach().double().requires_grad_()
    ref_outs, ref_grad = token_run(token_divergence_reference, exact, teacher.double(),
                                   upstream, **options)
    own_outs, own_grad = token_run(
        lambda *a, **k: token_divergence_reference(*a, compute_dtype=torch.float32, **k),
        full, teacher, upstream, **options)
    dtype = full.dtype
    for ours, ref, own, what in zip(outs, ref_outs, own_outs, ("divergence", "entropy")):
        assert_close(ours, ref, tolerance_for(dtype, relative_error(own, ref)), what)
        assert ours.dtype == torch.float32
    assert_close(grad, ref_grad, tolerance_for(dtype, relative_error(own_grad, ref_grad)), "grad")
    assert grad.dtype == dtype
    return outs, grad


@pytest.mark.parametrize("variant", slow_beyond(list(VARIANTS), fast=["everything"]))
@pytest.mark.parametrize("dtype", slow_beyond(DTYPES, fast=[torch.float32]))
@pytest.mark.parametrize("beta", slow_beyond(BETAS, fast=[0.0, 0.5, 1.0]))
def test_token_divergence_matches_float64_reference(backend, small_tiles, beta, dtype, variant):
    full, teacher = student_and_teacher_logits(2, 5, VOCAB, dtype, seed=int(beta * 10))
    options = dict(VARIANTS[variant], beta=beta)
    mask = None
    if variant == "everything":
        mask = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]],
                            device=DEVICE)
        options["mask"] = mask
    upstream = [torch.randn(2, 5, device=DEVICE) for _ in range(2)]
    outs, grad = check_token_divergence(full, teacher, upstream, **options)
    if mask is not None:
        assert all((out[~mask] == 0).all() for out in outs)
        assert (grad[:, :-1][~mask] == 0).all()
    assert (grad[:, -1] == 0).all(), "the last position is not in the slice"


@pytest.mark.parametrize("beta", BETAS)
def test_token_divergence_default_tiles_and_large_logits(backend, beta):
    full, teacher = student_and_teacher_logits(1, 3, 4097, torch.float32, offset=500.0)
    upstream = [torch.randn(1, 3, device=DEVICE) for _ in range(2)]
    check_token_divergence(full, teacher, upstream, beta=beta, return_entropy=True)


@pytest.mark.parametrize("beta", BETAS)
def test_equal_distributions_diverge_by_zero_and_the_teacher_gets_no_gradient(backend, beta):
    logits = torch.randn(6, 300, device=DEVICE).requires_grad_()
    teacher = (logits.detach() + 3.0).requires_grad_()  # a shift changes no softmax
    divergence = fa.token_divergence(logits, teacher, beta=beta)
    divergence.sum().backward()
    assert divergence.abs().max() < 1e-6 and logits.grad.abs().max() < 1e-6
    assert teacher.grad is None


def random_heads(shape, vocab, dtype, *, teacher_dim=48, seed=0):
    """Student (hidden, weight, bias) leaves of width 80 and a teacher (hidden, weight, bias) of
    another width, both giving logits of std ~2."""
    gen = torch.Generator().manual_seed(seed)

    def head(dim):
        return [torch.randn(*shape, dim, generator=gen),
                torch.randn(vocab, dim, generator=gen) * (2 / dim ** 0.5),
                torch.randn(vocab, generator=gen)]
    student = [x.to(DEVICE, dtype).requires_grad_() for x in head(80)]
    return student, [x.to(DEVICE, dtype) for x in head(teacher_dim)]


def linear_run(fn, student, teacher, upstream, **options):
    hidden, weight, bias = student
    out = fn(hidden, weight, teacher[0], teacher[1], bias=bias, teacher_bias=teacher[2],
             **options)
    loss, outs = loss_of(out, upstream)
    return outs, torch.autograd.grad(loss, [x for x in student if x.requires_grad])


@pytest.mark.parametrize("dtype", slow_beyond(DTYPES, fast=[torch.float32]))
@pytest.mark.parametrize("beta", slow_beyond(BETAS, fast=[0.0, 0.5, 1.0]))
def test_linear_divergence_matches_float64_reference(backend, small_tiles, beta, dtype):
    student, teacher = random_heads((2, 7), VOCAB, dtype, seed=int(beta * 10))
    mask = torch.rand(2, 7, device=DEVICE) > 0.3
    options = dict(VARIANTS["everything"], beta=beta, temperature=1.3, mask=mask)
    upstream = [torch.randn(2, 7, device=DEVICE) for _ in range(2)]
    outs, grads = linear_run(fa.linear_divergence, student, teacher, upstream, **options)
    exact = [x.detach().double().requires_grad_() for x in student]
    ref_outs, ref_grads = linear_run(linear_divergence_reference, exact,
                                     [x.double() for x in teacher], upstream, **options)
    own_outs, own_grads = linear_run(
        lambda *a, **k: linear_divergence_reference(*a, compute_dtype=torch.float32, **k),
        student, teacher, upstream, **options)
    for ours, ref, own, what in zip(outs, ref_outs, own_outs, ("divergence", "entropy")):
        assert_close(ours, ref, tolerance_for(dtype, relative_error(own, ref)), what)
        assert (ours[~mask] == 0).all()
    for ours, ref, own, what in zip(grads, ref_grads, own_grads, ("hidden", "weight", "bias")):
        assert_close(ours, ref, tolerance_for(dtype, relative_error(own, ref)), what)
        assert ours.dtype == dtype
    assert (grads[0][~mask] == 0).all()


def test_linear_divergence_gives_the_teacher_no_gradient(backend, small_tiles):
    student, teacher = random_heads((5,), 300, torch.float32)
    teacher = [x.requires_grad_() for x in teacher]
    divergence = fa.linear_divergence(student[0], student[1], teacher[0], teacher[1],
                                      bias=student[2], teacher_bias=teacher[2], beta=0.5)
    divergence.sum().backward()
    assert all(x.grad is not None for x in student) and all(x.grad is None for x in teacher)


@pytest.mark.parametrize("beta", BETAS)
def test_minus_inf_and_nan_logits_follow_the_float64_conventions(backend, small_tiles, beta):
    """A side's p = 0 columns add nothing to its terms; a KL is +inf where its weighting side
    has mass and the other none, even where that mass underflows float32 (its gradient row is
    then not finite); the JSD stays finite there; NaN poisons value and gradient."""
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(7, 300, generator=gen) * 2
    teacher = student + torch.randn(7, 300, generator=gen)
    teacher[0, 3] = float("-inf")  # the student has mass, the teacher none
    student[1, 5] = float("-inf")  # the other way round
    student[2, ::7] = teacher[2, ::7] = float("-inf")  # a vocabulary both mask
    student[3, 8], teacher[3, 8] = -200.0, float("-inf")  # p = e^-200: 0 in float32 only
    teacher[4, 9] = float("nan")
    student[5, 10] = float("nan")
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    leaf = student.clone().requires_grad_()
    divergence, entropy = fa.token_divergence(leaf, teacher, beta=beta, return_entropy=True)
    grad, = torch.autograd.grad(divergence.nansum() + entropy.nansum(), leaf)
    exact = student.double().requires_grad_()
    expected, expected_entropy = token_divergence_reference(exact, teacher.double(), beta=beta,
                                                            return_entropy=True)
    finite = torch.isfinite(expected)
    expected_grad, = torch.autograd.grad(expected[finite].sum() + expected_entropy.nansum(),
                                         exact)
    assert torch.equal(divergence.isnan(), expected.isnan().to(DEVICE))
    assert torch.equal(divergence.isposinf(), expected.isposinf().to(DEVICE))
    assert expected[[4, 5]].isnan().all() and finite[[2, 6]].all()
    if beta == 1.0:
        assert (expected[[0, 3]] == float("inf")).all()
    elif beta == 0.0:
        assert expected[1] == float("inf") and finite[3]
    else:
        assert finite[:4].all(), "the mixture never vanishes where either side has mass"
    assert_close(divergence[finite], expected[finite], 1e-5, "divergence")
    entropy_finite = torch.isfinite(expected_entropy)
    assert torch.equal(entropy.isnan(), expected_entropy.isnan().to(DEVICE))
    assert_close(entropy[entropy_finite], expected_entropy[entropy_finite], 1e-5, "entropy")
    assert_close(grad[finite], expected_grad[finite], 1e-5, "grad")
    assert not torch.isfinite(grad[~finite]).all(1).any(), \
        "an infinite or NaN divergence must not give a finite gradient row"


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_masked_rows_are_skipped_whatever_they_hold(backend, small_tiles, beta):
    full, teacher = student_and_teacher_logits(1, 6, 300, torch.float32)
    teacher = teacher.clone()
    with torch.no_grad():
        full[0, 2] = float("nan")  # masked rows may hold anything
        teacher[0, 4] = float("nan")
    mask = torch.tensor([[True, True, False, True, False, True]], device=DEVICE)
    (divergence, entropy), grad = token_run(fa.token_divergence, full, teacher,
                                            [torch.ones(1, 6, device=DEVICE)] * 2, beta=beta,
                                            mask=mask, return_entropy=True)
    assert (divergence[~mask] == 0).all() and (entropy[~mask] == 0).all()
    assert (grad[:, :-1][~mask] == 0).all()
    keep = [0, 1, 3, 5]
    exact = full.detach().double()[:, keep].requires_grad_()
    expected = token_divergence_reference(exact, teacher.double()[:, keep], beta=beta)
    expected_grad, = torch.autograd.grad(expected.sum(), exact)
    _, grad_divergence_only = token_run(fa.token_divergence, full, teacher,
                                        [torch.ones(1, 6, device=DEVICE)], beta=beta, mask=mask)
    assert_close(divergence[:, keep], expected, 1e-5, "divergence")
    assert_close(grad_divergence_only[:, keep], expected_grad, 1e-5, "grad")


def test_token_kl_is_the_reverse_kl_of_token_divergence(backend):
    full, teacher = student_and_teacher_logits(2, 4, 257, torch.float32)
    kl = fa.token_kl(full[:, :-1], teacher, temperature=0.8)
    assert torch.equal(kl, fa.token_divergence(full[:, :-1], teacher, beta=1.0, temperature=0.8))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_linear_divergence_equals_trl(beta, monkeypatch):
    """TRL's ``ChunkedDivergenceFunction`` (its torch path, on the CPU, fp32) on the same
    inputs: the same divergence, entropy and student gradients, on every CPU backend."""
    chunked = pytest.importorskip("trl.kernels.chunked_divergence")
    gen = torch.Generator().manual_seed(2)
    student = [torch.randn(13, 40, generator=gen), torch.randn(VOCAB, 40, generator=gen) * 0.3,
               torch.randn(VOCAB, generator=gen)]
    teacher = [torch.randn(13, 24, generator=gen), torch.randn(VOCAB, 24, generator=gen) * 0.4,
               torch.randn(VOCAB, generator=gen)]
    options = dict(temperature=1.3, softcap=6.0, teacher_softcap=5.0)
    trl_leaves = [x.clone().requires_grad_() for x in student]
    trl_divergence, trl_entropy = chunked.ChunkedDivergenceFunction.apply(
        *trl_leaves, *teacher, beta, options["temperature"], 1.0, options["softcap"], 1.0,
        options["teacher_softcap"])
    trl_grads = torch.autograd.grad(trl_divergence.sum(), trl_leaves)
    for backend in fa.available_backends("cpu"):
        monkeypatch.setenv("FASTALIGN_BACKEND", backend)
        leaves = [x.clone().requires_grad_() for x in student]
        divergence, entropy = fa.linear_divergence(
            leaves[0], leaves[1], teacher[0], teacher[1], bias=leaves[2], teacher_bias=teacher[2],
            beta=beta, return_entropy=True, **options)
        grads = torch.autograd.grad(divergence.sum(), leaves)
        assert_close(divergence, trl_divergence, 1e-5, f"{backend} divergence")
        assert_close(entropy, trl_entropy, 1e-5, f"{backend} entropy")
        for ours, theirs, what in zip(grads, trl_grads, ("hidden", "weight", "bias")):
            assert_close(ours, theirs, 1e-5, f"{backend} grad {what}")
