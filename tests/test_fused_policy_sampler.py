"""FusedPolicyLoss with the sampler's top_k / min_p: its loss, metrics and gradients w.r.t. the
hidden states and head equal policy_loss of float64 log-probs and entropies renormalized over
the support Hugging Face's warpers keep (both modes, several chunks, every backend); an
unchanged policy scored with the settings it was sampled with has ratio 1; the options are
checked."""

import pytest
import torch
from conftest import DEVICE, assert_close
from helpers import warped_entropy, warped_log_softmax

import fastalign as fa
from fastalign.losses import policy_loss

TOL = 1e-5
VOCAB = 1000 + 7  # a multiple of no block


def chunk_mb(rows: int) -> float:
    """A ``chunk_mb`` of ``rows`` float32 rows of logits (``rows_per_chunk`` gives ``rows``)."""
    return rows * 4 * VOCAB / 2**20


# The 33 kept tokens in chunks of 7 rows (five chunks), or the three sequences (10, 12 and 11
# tokens) one per chunk of 12 rows where the loss needs whole sequences.
CHUNK_ROWS, SEQUENCE_CHUNK_ROWS = 7, 12
CASES = {
    "top_k": dict(sampler=dict(top_k=40), loss=dict(loss_type="clip", clip_high=0.28)),
    "min_p": dict(sampler=dict(min_p=0.05, temperature=0.7),
                  loss=dict(loss_type="cispo", clip_high=5.0, kl_coef=0.05)),
    "both_entropy": dict(sampler=dict(top_k=25, min_p=0.02, temperature=1.3),
                         loss=dict(loss_type="sapo", entropy_coef=0.03)),
    "sequence_level": dict(sampler=dict(top_k=60), loss=dict(level="sequence", entropy_coef=0.01)),
}


def batch(sampler: dict, seed: int, outside: bool = False):
    """hidden [3, 12, 24], weight [V, 24] (float64 leaves), targets drawn from the warped
    distribution (ignored positions at the ends of rows; ``outside``: one target the sampler
    could not have drawn), advantages [3], old log-probs near the policy's."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 12, 24, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, 24, generator=gen, dtype=torch.float64) * 0.6
    log_p = warped_log_softmax(hidden @ weight.T, **sampler)
    targets = torch.multinomial(log_p.exp().reshape(-1, VOCAB), 1, generator=gen).view(3, 12)
    targets[0, -2:] = -100
    targets[2, -1] = -100
    if outside:
        targets[1, 3] = int(log_p[1, 3].argmin())
        assert log_p[1, 3, targets[1, 3]] == float("-inf")
    advantages = torch.randn(3, generator=gen, dtype=torch.float64)
    logprobs = log_p.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    noise = 0.1 * torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    old = torch.where(targets == -100, 0.0, logprobs.clamp(min=-30.0) + noise)
    return hidden, weight, targets, advantages, old


def reference_of(old, loss_options):
    """The reference model's log-probs where the loss has a KL term (else None: a KL to a
    token outside the support would be infinite even at weight 0)."""
    return old - 0.05 if "kl_coef" in loss_options else None


def reference(hidden, weight, targets, advantages, old, sampler, loss_options):
    """(loss, metrics, dHidden, dWeight) in float64 through HF's warpers on the full logits."""
    hidden, weight = (t.clone().requires_grad_() for t in (hidden, weight))
    log_p = warped_log_softmax(hidden @ weight.T, **sampler)
    mask = targets != -100
    logprobs = log_p.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    logprobs = torch.where(mask, logprobs, 0.0)
    entropy = torch.where(mask, warped_entropy(log_p), 0.0)
    loss, metrics = policy_loss(logprobs, old, advantages, mask, entropy=entropy,
                                ref_logprobs=reference_of(old, loss_options), **loss_options)
    return (loss, metrics, *torch.autograd.grad(loss, (hidden, weight)))


def fused(hidden, weight, targets, advantages, old, sampler, loss_options, *, one_pass,
          chunk_rows=CHUNK_ROWS):
    leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in (hidden, weight)]
    module = fa.FusedPolicyLoss(gradient_in_forward=one_pass, chunk_mb=chunk_mb(chunk_rows),
                                **sampler, **loss_options)
    loss, metrics = module(*leaves, targets.to(DEVICE), advantages.float().to(DEVICE),
                           old_logprobs=old.float().to(DEVICE),
                           ref_logprobs=reference_of(old.float().to(DEVICE), loss_options))
    return (loss, metrics, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_pass"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_policy_loss_over_the_sampler_support(backend, case, one_pass, chunk_counts):
    sampler, loss_options = CASES[case]["sampler"], CASES[case]["loss"]
    inputs = batch(sampler, seed=len(case))
    whole_sequences = loss_options.get("level") == "sequence"
    loss, metrics, grad_hidden, grad_weight = fused(
        *inputs, sampler, loss_options, one_pass=one_pass,
        chunk_rows=SEQUENCE_CHUNK_ROWS if whole_sequences else CHUNK_ROWS)
    assert chunk_counts == ([(3 if whole_sequences else 5)] if one_pass else [])
    expected, expected_metrics, want_hidden, want_weight = reference(*inputs, sampler,
                                                                     loss_options)
    assert_close(loss, expected, TOL, "loss")
    assert_close(grad_hidden, want_hidden, TOL, "dHidden")
    assert_close(grad_weight, want_weight, TOL, "dWeight")
    for name in ("entropy", "ratio/mean", "kl"):
        if name in expected_metrics:
            assert_close(metrics[name], expected_metrics[name], TOL, name)


@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_pass"])
def test_a_target_outside_the_support_adds_no_gradient(backend, one_pass):
    """A token the sampler could not draw has log-prob -inf: ratio 0, so the clipped term is
    the constant clamp(0) A and no gradient comes from it (as in float64 autograd)."""
    sampler, loss_options = dict(min_p=0.1), dict(loss_type="clip")
    hidden, weight, targets, advantages, old = batch(sampler, seed=5, outside=True)
    args = (hidden, weight, targets, advantages, old, sampler, loss_options)
    loss, _, grad_hidden, grad_weight = fused(*args, one_pass=one_pass)
    expected, _, want_hidden, want_weight = reference(*args)
    assert torch.isfinite(loss) and torch.isfinite(grad_weight).all()
    assert_close(loss, expected, TOL, "loss")
    assert_close(grad_hidden, want_hidden, TOL, "dHidden")
    assert_close(grad_weight, want_weight, TOL, "dWeight")


@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "two_pass"])
def test_an_unchanged_policy_scored_as_it_was_sampled_has_ratio_one(one_pass):
    """Old log-probs from linear_logprobs with the sampler's settings: the two-pass loss takes
    the very same log-probs (ratio exactly 1), the one-pass chunks the same up to the matmul's
    rounding; without the settings the ratio is far from 1."""
    sampler = dict(top_k=30, min_p=0.05, temperature=0.8)
    hidden, weight, targets, advantages, _ = batch(sampler, seed=9)
    hidden, weight = hidden.float().to(DEVICE), weight.float().to(DEVICE)
    targets = targets.to(DEVICE)
    old = fa.linear_logprobs(hidden, weight, targets, **sampler)
    hidden.requires_grad_()
    module = fa.FusedPolicyLoss(gradient_in_forward=one_pass, **sampler)
    _, metrics = module(hidden, weight, targets, advantages.float().to(DEVICE),
                        old_logprobs=old)
    if one_pass:
        assert abs(metrics["ratio/mean"].item() - 1) < 1e-6
        assert metrics["approx_kl"].item() < 1e-12
    else:
        assert metrics["ratio/mean"].item() == 1.0 and metrics["approx_kl"].item() == 0.0
    plain = fa.FusedPolicyLoss(gradient_in_forward=one_pass, temperature=0.8)
    _, unfiltered = plain(hidden, weight, targets, advantages.float().to(DEVICE),
                          old_logprobs=old)
    assert unfiltered["ratio/mean"].item() < 0.95  # full-vocabulary log-probs are lower


@pytest.mark.parametrize("options,message", [
    (dict(top_k=0), r"top_k must be"),
    (dict(min_p=1.5), r"min_p must be"),
    (dict(top_k=2.5), r"top_k must be"),
])
def test_bad_sampler_options_are_refused_at_construction(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fa.FusedPolicyLoss(**options)
