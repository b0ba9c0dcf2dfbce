"""policy_loss's newer options beyond TRL's parity file (tests/test_policy_loss_trl_parity.py):
the rollout-correction modes TRL lacks (icepop, the geometric mask) and the metrics against
float64 formulas, the classic kernel path against the general torch path, the entropy bonus's
gradient through FusedPolicyLoss's one-pass chunks, and every refusal's message."""

import math

import pytest
import torch
from conftest import DEVICE, assert_close

import fastalign as fa
from fastalign.losses import policy_loss
from fastalign.losses.rollout_correction import mismatch_kl

B, T = 4, 7


def inputs(seed=0, spread=0.6):
    """Per-token float32 inputs with a padded mask and ratios spread wide enough to clip."""
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=gen) * 3
    old = logprobs + spread * torch.randn(B, T, generator=gen)
    rollout = old + spread * torch.randn(B, T, generator=gen)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    advantages = torch.randn(B, generator=gen)
    entropy = torch.rand(B, T, generator=gen) * 2
    return logprobs.requires_grad_(), old, rollout, mask, advantages, entropy.requires_grad_()


def test_icepop_is_the_two_sided_token_mask_with_a_default_lower_bound():
    logprobs, old, rollout, mask, advantages, _ = inputs()
    icepop, metrics = policy_loss(logprobs, old, advantages, mask, rollout_logprobs=rollout,
                                  rollout_correction="icepop", rollout_clip_max=2.0)
    masked, _ = policy_loss(logprobs, old, advantages, mask, rollout_logprobs=rollout,
                            rollout_correction="token_mask", rollout_clip_min=0.5,
                            rollout_clip_max=2.0)
    assert_close(icepop, masked, 1e-7, "loss")
    ratio = torch.exp(old - rollout).double()[mask.bool()]
    outside = ((ratio < 0.5) | (ratio > 2.0)).double().mean()
    assert 0 < outside < 1  # the case masks some tokens and keeps others
    assert_close(metrics["rollout/corrected_fraction"], outside, 1e-6, "corrected")
    assert_close(metrics["rollout/is_ratio_max"], ratio.max(), 1e-6, "max")


def test_the_geometric_mask_rejects_whole_sequences_without_a_weight():
    """Kept sequences weigh 1 (no IS weight), rejected ones 0: the loss is the plain loss
    over the kept sequences (float64 reference: the mean over kept tokens)."""
    logprobs, old, rollout, mask, advantages, _ = inputs(seed=3, spread=0.3)
    loss, metrics = policy_loss(logprobs, old, advantages, mask, rollout_logprobs=rollout,
                                rollout_correction="sequence_geometric_mask",
                                rollout_clip_max=1.15)
    geometric = torch.exp(((old - rollout).double() * mask).sum(-1) / mask.sum(-1))
    kept = (geometric >= 1 / 1.15) & (geometric <= 1.15)
    assert 0 < kept.sum() < B
    ratio = torch.exp(logprobs.double() - old.double())
    a = advantages.double()[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) * kept[:, None]
    exact = (per_token * mask).sum() / mask.sum()
    assert_close(loss, exact, 1e-6, "loss")
    assert_close(metrics["rollout/corrected_fraction"], 1 - kept.double().mean(), 1e-6, "rejected")


def test_the_mismatch_kl_is_k3_of_the_sampler_against_the_trainer():
    _, old, rollout, mask, _, _ = inputs(seed=1)
    rollout[1, 2] = float("nan")  # a token the sampler could not score: left out
    kept = mask.bool() & ~torch.isnan(rollout)
    d = (old - rollout).double()[kept]
    assert_close(mismatch_kl(old, rollout, mask), (d.exp() - d - 1).mean(), 1e-6, "k3")


def test_the_general_path_equals_the_fused_kernel_path_for_the_clipped_surrogate():
    """A delta too large to bind sends the clipped surrogate through the torch path: the same
    loss, gradients and metrics as the per-token kernel's."""
    for level in ("token", "sequence"):
        logprobs, old, _, mask, advantages, _ = inputs(seed=2)
        ref = old - 0.3
        options = dict(level=level, dual_clip=3.0, kl_coef=0.1, clip_high=0.28,
                       ref_logprobs=ref, aggregation="seq_mean_token_mean")
        classic, m1 = policy_loss(logprobs, old, advantages, mask, **options)
        (g1,) = torch.autograd.grad(classic, logprobs)
        general, m2 = policy_loss(logprobs, old, advantages, mask, delta=1e6, **options)
        (g2,) = torch.autograd.grad(general, logprobs)
        assert_close(general, classic, 1e-6, "loss")
        assert_close(g2, g1, 1e-6, "grad")
        for name in m1:
            assert_close(m2[name], m1[name], 1e-6, name)


def entropy64(logits):
    logp = torch.log_softmax(logits.double(), -1)
    return logp, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("options", [
    dict(entropy_coef=0.05),
    dict(loss_type="cispo", clip_high=1.1, entropy_coef=0.2, aggregation="seq_mean_token_mean"),
    dict(loss_type="vespo", entropy_coef=0.1, rollout_correction="token_truncate"),
    dict(loss_type="sapo", off_policy_mask_threshold=0.05, entropy_coef=0.1,
         top_entropy_quantile=0.6, rollout_correction="sequence_mask"),
    dict(loss_type="luspo", level="sequence", kl_coef=0.1, use_bias_correction_kl=True,
         entropy_coef=0.1)], ids=["clip", "cispo", "vespo", "sapo", "luspo"])
@pytest.mark.parametrize("gradient_in_forward", [True, False])
def test_fused_policy_loss_differentiates_the_entropy_bonus(options, gradient_in_forward):
    """Loss and head gradients of FusedPolicyLoss (one-pass chunks of a few rows, or two-pass)
    against policy_loss on float64 log-probs and entropies of the full logits."""
    gen = torch.Generator().manual_seed(0)
    vocab, dim = 37, 8
    hidden = torch.randn(B, T, dim, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.7).to(DEVICE).requires_grad_()
    targets = torch.randint(0, vocab, (B, T), generator=gen).to(DEVICE)
    targets[0, 5:] = -100
    targets[2, 3:] = -100
    mask = targets != -100
    with torch.no_grad():
        logp, _ = entropy64(hidden @ weight.T)
        current = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0].float()
    old = current + 0.3 * torch.randn(B, T, generator=gen).to(DEVICE)
    rollout = old + 0.3 * torch.randn(B, T, generator=gen).to(DEVICE)
    ref = old - 0.2
    advantages = torch.randn(B, generator=gen).to(DEVICE)
    module = fa.FusedPolicyLoss(gradient_in_forward=gradient_in_forward, chunk_mb=0.0003,
                                **options)
    loss, metrics = module(hidden, weight, targets, advantages, old_logprobs=old,
                           ref_logprobs=ref, rollout_logprobs=rollout)
    grads = torch.autograd.grad(loss, [hidden, weight])
    exact_leaves = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    logp, entropy = entropy64(exact_leaves[0] @ exact_leaves[1].T)
    per_token = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    exact, exact_metrics = policy_loss(
        per_token, old.double(), advantages.double(), mask, entropy=entropy,
        ref_logprobs=ref.double(), rollout_logprobs=rollout.double(), **options)
    exact_grads = torch.autograd.grad(exact, exact_leaves)
    # VESPO's weight exp(k log w - lambda w) of a sequence's summed log-ratios amplifies the
    # float32 rounding of the log-probs (the same error with gradient_in_forward off).
    tolerance = 3e-5 if options.get("loss_type") == "vespo" else 1e-5
    assert_close(loss, exact, tolerance, "loss")
    for grad, wanted, name in zip(grads, exact_grads, ("hidden", "weight")):
        assert_close(grad, wanted, tolerance, name)
    for name, value in exact_metrics.items():
        assert_close(metrics[name], value, tolerance, name)


@pytest.mark.parametrize("options, message", [
    (dict(loss_type="cispo"), "loss_type='cispo' needs clip_high: the absolute cap"),
    (dict(loss_type="luspo", aggregation="token_mean"),
     "loss_type='luspo' is aggregated as 'seq_mean_token_sum'"),
    (dict(loss_type="vespo", rollout_correction="sequence_mask"),
     "loss_type='vespo' folds token-level rollout ratios"),
    (dict(rollout_correction="icepop", rollout_clip_max=None), "'icepop' is two-sided"),
    (dict(rollout_clip_min=2.0, rollout_clip_max=1.5), "rollout_clip_min \\(2.0\\) must be <="),
    (dict(rollout_correction="token_trunc"), "rollout_correction"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(delta=0.5), "delta"),
    (dict(entropy_coef=-0.1), "entropy_coef"),
    (dict(top_entropy_quantile=0.0), "top_entropy_quantile"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(vespo_k_pos=-1.0), "vespo_k_pos"),
    (dict(off_policy_mask_threshold=-1.0), "off_policy_mask_threshold"),
    (dict(entropy_coef=0.1), "entropy_coef > 0 / top_entropy_quantile < 1 needs entropy"),
    (dict(rollout_correction="token_mask"), "rollout_correction='token_mask' needs "
                                            "rollout_logprobs"),
])
def test_bad_options_are_refused_naming_them(options, message):
    logprobs, old, _, mask, advantages, _ = inputs()
    with pytest.raises(ValueError, match=message):
        policy_loss(logprobs, old, advantages, mask, **options)
    if "needs entropy" not in message and "needs rollout" not in message:
        with pytest.raises(ValueError, match=message):
            fa.FusedPolicyLoss(**options)


def test_unknown_options_and_flags_are_type_errors():
    logprobs, old, _, mask, advantages, _ = inputs()
    with pytest.raises(TypeError, match="unknown policy loss option\\(s\\) \\['clip_ratio'\\]"):
        policy_loss(logprobs, old, advantages, mask, clip_ratio=0.2)
    with pytest.raises(TypeError, match="use_bias_correction_kl must be True or False"):
        fa.FusedPolicyLoss(use_bias_correction_kl=1)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(logprobs, old, advantages, mask, rollout_logprobs=torch.zeros(B, T + 1))


def test_a_nan_rollout_log_prob_counts_as_ratio_1():
    """As TRL: a token the sampler did not score is neither weighted nor masked."""
    logprobs, old, rollout, mask, advantages, _ = inputs()
    rollout = old.clone()
    rollout[1, 1] = float("nan")
    loss, metrics = policy_loss(logprobs, old, advantages, mask, rollout_logprobs=rollout,
                                rollout_correction="token_mask", rollout_clip_min=0.9,
                                rollout_clip_max=1.1)
    plain, _ = policy_loss(logprobs, old, advantages, mask)
    assert_close(loss, plain, 1e-7, "loss")
    assert metrics["rollout/corrected_fraction"] == 0
    assert math.isfinite(float(metrics["rollout/mismatch_kl"]))
