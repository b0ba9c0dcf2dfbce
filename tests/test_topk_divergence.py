"""fastalign.losses.topk_divergence against a float64 definition in probability space (written
apart from the library's log-space one): every beta convention, tail on and off, zero
probabilities, masks; gradients by gradcheck; TRL's full-vocabulary divergence as the K = V
case; the student side from linear_logprobs(topk_targets=...) end to end."""

import math

import pytest
import torch
from conftest import DEVICE, assert_close

import fastalign as fa
from fastalign.losses import topk_divergence

BETAS = [0.0, 0.3, 0.5, 1.0]
NEG_INF = float("-inf")


def reference(student, teacher, beta, tail):
    """The divergence from the bins' probabilities, float64: ``p log(p / q)`` where ``p > 0``
    (+inf where ``q = 0``), the tail ``max(1 - sum p, eps)`` of the inputs' dtype; renormalized,
    a side without probability stays all 0."""
    eps = torch.finfo(student.dtype).eps
    p, q = student.detach().double().exp(), teacher.double().exp()
    if tail:
        p = torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp(min=eps)], -1)
        q = torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp(min=eps)], -1)
    else:
        p, q = (x / x.sum(-1, keepdim=True).clamp(min=1e-300) for x in (p, q))

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)

    if beta == 0.0:
        return kl(q, p)
    if beta == 1.0:
        return kl(p, q)
    m = (1 - beta) * p + beta * q
    return beta * kl(q, m) + (1 - beta) * kl(p, m)


def topk_pair(rows, k, vocab, *, seed, dtype=torch.float64):
    """Student and teacher log-probs of the teacher's top-k tokens of two random softmaxes."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.log_softmax(torch.randn(rows, vocab, generator=gen, dtype=dtype) * 2, -1)
    teacher = torch.log_softmax(torch.randn(rows, vocab, generator=gen, dtype=dtype) * 2, -1)
    teacher, ids = teacher.topk(k, dim=-1)
    return student.gather(-1, ids).to(DEVICE), teacher.to(DEVICE)


def with_zeros(student, teacher, beta):
    """Zero probabilities where the divergence stays finite: padding (-inf on both sides) in
    row 0, and one side alone in row 1 (the teacher's for beta < 1, the student's for
    beta > 0), as TRL's convention allows."""
    student, teacher = student.clone(), teacher.clone()
    student[0, -1] = teacher[0, -1] = NEG_INF
    if beta < 1.0:
        teacher[1, 0] = NEG_INF
    if beta > 0.0:
        student[1, -1] = NEG_INF
    return student, teacher


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalized"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_matches_float64_reference(beta, tail, k):
    student, teacher = topk_pair(5, k, 23, seed=k)
    if k > 1:
        student, teacher = with_zeros(student, teacher, beta)
    ours = topk_divergence(student, teacher, beta=beta, tail=tail)
    assert ours.shape == (5,) and ours.dtype == torch.float64
    assert_close(ours, reference(student, teacher, beta, tail), 1e-12, f"beta={beta}")


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalized"])
def test_gradcheck(beta, tail):
    student, teacher = topk_pair(4, 5, 17, seed=3)
    student, teacher = with_zeros(student, teacher, beta)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: topk_divergence(s, teacher, beta=beta, tail=tail), (student,))


def test_float32_leading_shape_and_mask():
    student, teacher = topk_pair(6, 3, 40, seed=5, dtype=torch.float32)
    student, teacher = student.view(2, 3, 3), teacher.view(2, 3, 3)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=DEVICE)
    student = student.masked_fill(~mask[..., None], float("nan")).requires_grad_()
    ours = topk_divergence(student, teacher, beta=0.5, mask=mask)
    assert ours.shape == (2, 3) and ours.dtype == torch.float32
    expected = reference(student.nan_to_num(0.0), teacher, 0.5, True).masked_fill(~mask, 0.0)
    assert_close(ours, expected.float(), 1e-5, "masked")
    ours.sum().backward()
    assert torch.isfinite(student.grad).all() and (student.grad[~mask] == 0).all()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renormalized"])
def test_zero_probabilities_never_give_nan(beta, tail):
    """Rows of only -inf, K log-probs summing to 1 or past it (an empty tail), a token one side
    gives 0: finite where the divergence is, +inf only where it is, never NaN."""
    full, teacher_full = topk_pair(1, 4, 4, seed=7)  # K = V: the tail is empty
    rows = [
        torch.full((4,), NEG_INF, dtype=torch.float64),
        full[0], full[0] + 1e-9,  # an empty tail, and a sum rounding past 1
        torch.tensor([-0.1, NEG_INF, -3.0, -4.0], dtype=torch.float64),
    ]
    student = torch.stack(rows).to(DEVICE).requires_grad_()
    teacher = torch.stack([teacher_full[0], teacher_full[0], teacher_full[0],
                           torch.tensor([-0.2, -2.0, NEG_INF, -5.0], dtype=torch.float64)])
    ours = topk_divergence(student, teacher, beta=beta, tail=tail)
    (grad,) = torch.autograd.grad(ours.sum(), student)
    assert not ours.isnan().any() and not grad.isnan().any()
    expected = reference(student.nan_to_num(neginf=NEG_INF), teacher, beta, tail)
    assert torch.equal(ours.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert_close(ours[finite], expected[finite], 1e-9, "finite rows")


def test_k_equal_to_vocabulary_is_trl_full_divergence():
    """K = V: the teacher's 'top-k' is its whole distribution, and the divergence is TRL's own
    full-vocabulary one for every beta (its convention, checked against its implementation)."""
    chunked = pytest.importorskip("trl.kernels.chunked_divergence").ChunkedDivergenceFunction
    gen = torch.Generator().manual_seed(11)
    hs, ht = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    ws, wt = torch.randn(50, 8, generator=gen), torch.randn(50, 8, generator=gen)
    student = torch.log_softmax(hs.double() @ ws.double().T, -1)
    teacher = torch.log_softmax(ht.double() @ wt.double().T, -1)
    for beta in BETAS:
        trl_divergence, _ = chunked.apply(hs, ws, None, ht, wt, None, beta)
        for tail in (True, False):
            ours = topk_divergence(student, teacher, beta=beta, tail=tail)
            assert_close(ours, trl_divergence, 1e-5, f"beta={beta} tail={tail}")


def test_student_from_linear_logprobs_end_to_end(backend):
    """The distillation step as a user writes it: the student's log-probs of the teacher's top-k
    from linear_logprobs(topk_targets=...), padding masked to -inf, gradients into the head."""
    gen = torch.Generator().manual_seed(2)
    vocab, dim, k = 307, 24, 5
    hidden = torch.randn(2, 4, dim, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.5).to(DEVICE).requires_grad_()
    teacher_full = torch.log_softmax(torch.randn(2, 4, vocab, generator=gen) * 3, -1).to(DEVICE)
    teacher, ids = teacher_full.topk(k, dim=-1)
    ids[0, 1, 3:] = -100  # the teacher returned 3 tokens here
    teacher = teacher.masked_fill(ids == -100, NEG_INF)

    def loss(student_logps):
        student_logps = student_logps.masked_fill(ids == -100, NEG_INF)
        return topk_divergence(student_logps, teacher, beta=0.5).sum()

    ours = loss(fa.linear_logprobs(hidden, weight, topk_targets=ids))
    grads = torch.autograd.grad(ours, (hidden, weight))
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    student = torch.log_softmax(exact[0] @ exact[1].T, -1).gather(-1, ids.clamp(min=0))
    expected = loss(student)
    assert math.isclose(ours.item(), expected.item(), rel_tol=1e-5)
    for name, actual, wanted in zip(["hidden", "weight"], grads,
                                    torch.autograd.grad(expected, exact)):
        assert_close(actual, wanted, 1e-5, name)
