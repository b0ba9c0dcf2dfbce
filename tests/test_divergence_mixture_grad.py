"""The JSD's second pass with its gradient (the divergence launchers' ``mixture_grad``, what
FusedDistillationLoss runs per chunk: ``csrc/jsd_grad.cpp`` natively, ``mixture`` then
``backward`` elsewhere) on every backend, against the float64 reference and against those two
launchers: odd vocabularies (one native block, several with a partial last one), temperature,
both softcaps, large logits, a strided row layout, masked rows full of NaN, -inf and NaN
logits; and the native entry point's argument checks."""

import pytest
import torch
from conftest import DEVICE, assert_close

from fastalign import _native
from fastalign._layout import RowLayout
from fastalign.kernels.divergence_interface import divergence_spec
from fastalign.ops._backends import divergence_launchers
from fastalign.ops._vocab_stats import merge_divergence_partials, merge_mixture_partials
from fastalign.reference import token_divergence_reference

# (beta, temperature, softcap, teacher_softcap, offset of both models' logits)
OPTIONS = [(0.5, 1.0, None, None, 0.0), (0.3, 0.7, 6.0, 4.0, 0.0), (0.9, 1.3, None, 5.0, 500.0)]


def logits_pair(rows, vocab, *, offset=0.0, seed=0):
    """``[2, rows + 1, V]`` student logits (read as their ``[:, :-1]`` slice: a strided layout)
    and ``[2, rows, V]`` teacher logits near them, std ~3 around ``offset``."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, rows + 1, vocab, generator=gen) * 3 + offset
    teacher = student[:, :-1] + torch.randn(2, rows, vocab, generator=gen) * 2
    return student.to(DEVICE), teacher.to(DEVICE)


def layouts(student, teacher):
    rows = teacher.shape[1]
    return (RowLayout(2, rows, student.stride(0), student.stride(1)),
            RowLayout(2, rows, teacher.stride(0), teacher.stride(1)))


def row_stats(launchers, student, teacher, mask, spec):
    layout, teacher_layout = layouts(student, teacher)
    partials = launchers.forward(student, teacher, layout, teacher_layout, mask, spec=spec,
                                 return_entropy=False)
    return merge_divergence_partials(partials[None], spec=spec)[2]


def mixture_grad(launchers, student, teacher, mask, coefficient, spec):
    """``(divergence [2 * rows], gradient [2, rows, V])`` from ``mixture_grad`` on copies."""
    student, teacher = student.clone(), teacher.clone()
    layout, teacher_layout = layouts(student, teacher)
    stats = row_stats(launchers, student, teacher, mask, spec)
    terms = launchers.mixture_grad(student, teacher, layout, teacher_layout, mask, stats.clone(),
                                   coefficient, spec=spec)
    return merge_mixture_partials(stats, terms[None], spec=spec), student[:, :-1]


def reference(student, teacher, coefficient, *, beta, temperature, softcap, teacher_softcap):
    exact = student[:, :-1].double().requires_grad_()
    divergence = token_divergence_reference(exact, teacher.double(), beta=beta,
                                            temperature=temperature, softcap=softcap,
                                            teacher_softcap=teacher_softcap)
    grad, = torch.autograd.grad((divergence * coefficient.reshape(2, -1).double()).nansum(),
                                exact)
    return divergence.reshape(-1), grad


@pytest.mark.parametrize("vocab", [1007, 2 * 2048 + 5])
@pytest.mark.parametrize("beta, temperature, softcap, teacher_softcap, offset", OPTIONS)
def test_mixture_grad_matches_float64_and_the_separate_passes(backend, small_tiles, vocab, beta,
                                                              temperature, softcap,
                                                              teacher_softcap, offset):
    student, teacher = logits_pair(3, vocab, offset=offset, seed=vocab)
    with torch.no_grad():
        student[0, 1] = float("nan")  # a masked row may hold anything
        teacher[1, 2] = float("nan")
    mask = torch.tensor([True, False, True, True, True, False], device=DEVICE)
    coefficient = torch.randn(6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    spec = divergence_spec(beta, 1.0 / temperature, softcap, teacher_softcap)
    launchers = divergence_launchers(backend)
    divergence, grad = mixture_grad(launchers, student, teacher, mask, coefficient, spec)

    kept = mask.reshape(2, 3)
    options = dict(beta=beta, temperature=temperature, softcap=softcap,
                   teacher_softcap=teacher_softcap)
    expected, expected_grad = reference(student, teacher, coefficient, **options)
    assert_close(divergence[mask], expected[mask], 1e-5, "divergence")
    assert_close(grad[kept], expected_grad[kept], 1e-5, "grad")
    assert (divergence[~mask] == 0).all() and (grad[~kept] == 0).all()

    # The separate passes: the same sums, the same gradient but for the order of its last
    # multiplications.
    layout, teacher_layout = layouts(student, teacher)
    stats = row_stats(launchers, student, teacher, mask, spec)
    terms = launchers.mixture(student, teacher, layout, teacher_layout, mask, stats, spec=spec)
    torch.testing.assert_close(merge_mixture_partials(stats, terms[None], spec=spec),
                               divergence, rtol=1e-6, atol=0)
    separate = torch.empty_like(student)
    launchers.backward(student, teacher, layout, teacher_layout, mask, stats, coefficient, None,
                       separate, layout, spec=spec)
    scale = separate[:, :-1].abs().amax(-1, keepdim=True).clamp(min=1e-30)
    assert ((grad - separate[:, :-1]).abs() / scale).max() < 1e-6


def test_minus_inf_and_nan_logits_follow_the_float64_conventions(backend, small_tiles):
    """p = 0 columns get 0 (a -inf student logit, where the teacher has mass too); a NaN teacher
    logit makes its row's divergence and every column of its gradient NaN."""
    student, teacher = logits_pair(3, 300, seed=3)
    with torch.no_grad():
        student[0, 0, 5] = float("-inf")
        teacher[0, 1, 7] = float("-inf")
        student[1, 0, ::7] = teacher[1, 0, ::7] = float("-inf")
        teacher[1, 1, 9] = float("nan")
    coefficient = torch.full((6,), 0.25, device=DEVICE)
    spec = divergence_spec(0.5, 1.0, None, None)
    divergence, grad = mixture_grad(divergence_launchers(backend), student, teacher, None,
                                    coefficient, spec)
    expected, expected_grad = reference(student, teacher, coefficient, beta=0.5, temperature=1.0,
                                        softcap=None, teacher_softcap=None)
    finite = torch.isfinite(expected)
    assert torch.equal(divergence.isnan(), expected.isnan()) and expected[4].isnan()
    assert_close(divergence[finite], expected[finite], 1e-5, "divergence")
    rows = finite.reshape(2, 3)
    assert_close(grad[rows], expected_grad[rows], 1e-5, "grad")
    assert grad[0, 0, 5] == 0 and (grad[1, 0, ::7] == 0).all()
    assert grad[1, 1].isnan().all(), "a NaN divergence must poison its whole gradient row"


needs_native = pytest.mark.skipif(_native.unavailable_reason() is not None,
                                  reason="the native extension is not available")


@needs_native
def test_the_native_entry_point_checks_its_arguments():
    ext = _native.extension()
    x, teacher, stats = torch.randn(4, 10), torch.randn(4, 10), torch.zeros(4, 6)
    go, jsd, layout = torch.ones(4), tuple(divergence_spec(0.5, 1.0, None, None)), (4, 0, 10)
    with pytest.raises(RuntimeError, match="divergence_mixture_grad is the JSD's"):
        ext.divergence_mixture_grad(x, layout, teacher, layout, 4, None, stats, go,
                                    tuple(divergence_spec(1.0, 1.0, None, None)))
    with pytest.raises(RuntimeError, match="logits and teacher_logits must be float32"):
        ext.divergence_mixture_grad(x, layout, teacher.bfloat16(), layout, 4, None, stats, go,
                                    jsd)
    with pytest.raises(RuntimeError, match="must not share memory"):
        ext.divergence_mixture_grad(x, layout, x, layout, 4, None, stats, go, jsd)
    with pytest.raises(RuntimeError, match="grad_divergence must be a contiguous CPU Float"):
        ext.divergence_mixture_grad(x, layout, teacher, layout, 4, None, stats, go[:3], jsd)
    with pytest.raises(RuntimeError, match="teacher_logits: the row layout reaches past"):
        ext.divergence_mixture_grad(x, layout, teacher, (4, 0, 11), 4, None, stats, go, jsd)
