"""FusedDistillationLoss against a float64 reference on every backend: each beta, temperature,
both softcaps, a bias, a teacher of another width, hard labels, ignored rows, bf16, chunks
smaller than the batch; the two-pass path, no-gradient calls, and its option checks."""

import pytest
import torch
from helpers import slow_beyond

from fastalign.nn import FusedDistillationLoss
from fastalign.reference import token_divergence_reference

V, D, D_TEACHER = 1007, 16, 24  # V is a multiple of no block


def inputs(dtype=torch.float32, n=37, seed=0):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, generator=generator)  # noqa: E731
                                       * scale).to(dtype)
    hidden = randn(n, D).requires_grad_()
    weight = randn(V, D, scale=0.5).requires_grad_()
    bias = randn(V, scale=0.1).requires_grad_()
    teacher = (randn(n, D_TEACHER), randn(V, D_TEACHER, scale=0.5), randn(V, scale=0.1))
    targets = torch.randint(0, V, (n,), generator=generator)
    targets[::5] = -100
    return hidden, weight, bias, teacher, targets


def reference(hidden, weight, bias, teacher, targets, *, beta, temperature, softcap,
              teacher_softcap, hard_label_weight):
    """The loss from float64 logits of both models, and its gradients w.r.t. the student."""
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    logits = exact[0] @ exact[1].T + exact[2]
    teacher_logits = teacher[0].double() @ teacher[1].double().T + teacher[2].double()
    kept = targets != -100
    divergence = token_divergence_reference(logits, teacher_logits, beta=beta,
                                            temperature=temperature, softcap=softcap,
                                            teacher_softcap=teacher_softcap)
    loss = divergence[kept].mean()
    if hard_label_weight:
        capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
        picked = torch.log_softmax(capped, -1)[kept].gather(-1, targets[kept][:, None])
        loss = loss - hard_label_weight * picked.mean()
    loss.backward()
    return loss.item(), [x.grad for x in exact]


def relative(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("beta, temperature, softcaps, hard_label_weight", [
    (0.0, 1.0, (None, None), 0.0), (0.3, 1.3, (8.0, 6.0), 0.5), (0.5, 0.8, (None, 5.0), 0.0),
    (1.0, 1.0, (8.0, None), 1.0)])
@pytest.mark.parametrize("dtype", slow_beyond([torch.float32, torch.bfloat16],
                                               fast=[torch.float32]))
def test_matches_float64_on_every_backend(backend, beta, temperature, softcaps,
                                          hard_label_weight, dtype):
    hidden, weight, bias, teacher, targets = inputs(dtype)
    softcap, teacher_softcap = softcaps
    # 0.05 MiB chunks: 13 rows of 1007 columns, so 30 kept rows take three chunks.
    module = FusedDistillationLoss(beta=beta, temperature=temperature,
                                   hard_label_weight=hard_label_weight, softcap=softcap,
                                   teacher_softcap=teacher_softcap, chunk_mb=0.05)
    loss, metrics = module(hidden, weight, *teacher[:2], targets, bias=bias,
                           teacher_bias=teacher[2])
    loss.backward()
    exact, grads = reference(hidden, weight, bias, teacher, targets, beta=beta,
                             temperature=temperature, softcap=softcap,
                             teacher_softcap=teacher_softcap,
                             hard_label_weight=hard_label_weight)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert loss.item() == pytest.approx(exact, rel=tolerance)
    for ours, theirs in zip((hidden.grad, weight.grad, bias.grad), grads):
        assert relative(ours, theirs) < tolerance
    assert set(metrics) >= {"divergence", "entropy", "agreement"}
    assert ("hard_label_loss" in metrics) == bool(hard_label_weight)


@pytest.mark.parametrize("softcaps", [(None, None), (2.0, 3.0)])
def test_agreement_is_the_share_of_rows_whose_argmaxes_match(backend, softcaps):
    """A teacher near the student (its head the student's plus noise, its hidden states the
    student's plus columns of its own), so that some rows' argmaxes match and others do not:
    the metric is torch's argmax of each model's float64 logits, compared over kept rows."""
    hidden, weight, bias, _, targets = inputs()
    generator = torch.Generator().manual_seed(1)
    extra = torch.randn(hidden.shape[0], D_TEACHER - D, generator=generator)
    teacher = (torch.cat([hidden.detach(), extra], 1),
               torch.cat([weight.detach(), torch.randn(V, D_TEACHER - D, generator=generator)
                          * 0.05], 1) + torch.randn(V, D_TEACHER, generator=generator) * 0.01,
               bias.detach())
    top1 = [(h.double() @ w.double().T + b.double()).argmax(-1) for h, w, b in
            ((hidden, weight, bias), teacher)]
    kept = targets != -100
    expected = (top1[0] == top1[1])[kept].double().mean().item()
    assert 0 < expected < 1  # both outcomes occur, so a wrong side or row would show
    module = FusedDistillationLoss(beta=0.5, softcap=softcaps[0], teacher_softcap=softcaps[1],
                                   chunk_mb=0.05)
    _, metrics = module(hidden, weight, *teacher[:2], targets, bias=bias,
                        teacher_bias=teacher[2])
    assert metrics["agreement"].item() == pytest.approx(expected, abs=1e-6)


def test_the_two_pass_path_and_a_no_gradient_call_agree(backend):
    hidden, weight, bias, teacher, targets = inputs()
    options = dict(beta=0.5, temperature=1.2, hard_label_weight=0.3, softcap=7.0)
    results = []
    for gradient_in_forward in (True, False):
        module = FusedDistillationLoss(gradient_in_forward=gradient_in_forward, **options)
        loss, metrics = module(hidden, weight, *teacher[:2], targets, bias=bias,
                               teacher_bias=teacher[2])
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
        results.append((loss.detach(), metrics, grads))
    (one, one_metrics, one_grads), (two, two_metrics, two_grads) = results
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    for name in ("divergence", "entropy", "hard_label_loss"):
        torch.testing.assert_close(one_metrics[name], two_metrics[name], rtol=1e-5, atol=1e-6)
    assert "agreement" not in two_metrics  # the two-pass path has no argmax
    for a, b in zip(one_grads, two_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        value, metrics = FusedDistillationLoss(**options)(hidden, weight, *teacher[:2],
                                                          targets, bias=bias,
                                                          teacher_bias=teacher[2])
    torch.testing.assert_close(value, one, rtol=1e-6, atol=0)
    assert not value.requires_grad and "agreement" in metrics


def test_a_teacher_equal_to_the_student_gives_zero_and_full_agreement():
    hidden, weight, bias, _, targets = inputs()
    for beta in (0.0, 0.5, 1.0):
        loss, metrics = FusedDistillationLoss(beta=beta)(hidden, weight, hidden.detach(),
                                                         weight.detach(), targets, bias=bias,
                                                         teacher_bias=bias.detach())
        assert abs(loss.item()) < 1e-6 and metrics["agreement"].item() == 1.0
        weight_grad, = torch.autograd.grad(loss, weight)
        assert weight_grad.abs().max() < 1e-6


def test_ignored_rows_change_nothing():
    """Rows whose target is ignore_index (their hidden states here are NaN) are in no term
    and get a zero gradient."""
    hidden, weight, bias, teacher, targets = inputs()
    poisoned = hidden.detach().clone()
    poisoned[targets == -100] = float("nan")
    poisoned.requires_grad_()
    module = FusedDistillationLoss(beta=0.5, hard_label_weight=0.2)
    loss, _ = module(poisoned, weight, *teacher[:2], targets, bias=bias,
                     teacher_bias=teacher[2])
    loss.backward()
    clean, _ = module(hidden, weight, *teacher[:2], targets, bias=bias, teacher_bias=teacher[2])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(clean.item(), rel=1e-6)
    assert (poisoned.grad[targets == -100] == 0).all()


@pytest.mark.parametrize("options, message", [
    (dict(beta=1.5), "beta must be"), (dict(temperature=0.0), "temperature"),
    (dict(hard_label_weight=-1.0), "hard_label_weight must be"),
    (dict(teacher_softcap=-2.0), "teacher_softcap"), (dict(chunk_mb=0), "chunk_mb")])
def test_bad_options_are_refused_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        FusedDistillationLoss(**options)


def test_bad_inputs_are_refused_naming_them():
    hidden, weight, bias, teacher, targets = inputs()
    module = FusedDistillationLoss()
    with pytest.raises(ValueError, match="teacher_weight has 1000 vocabulary rows"):
        module(hidden, weight, teacher[0], teacher[1][:1000], targets)
    with pytest.raises(ValueError, match="teacher_hidden has leading shape"):
        module(hidden, weight, teacher[0][:5], teacher[1], targets)
    with pytest.raises(ValueError, match="targets has shape"):
        module(hidden, weight, *teacher[:2], targets[:5])
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        module(hidden, weight, *teacher[:2], targets.float())

