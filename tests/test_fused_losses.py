"""FusedDPOLoss and FusedPolicyLoss: equal to the unfused composition (linear_logprobs, masked
sums, the loss) and to Liger's LigerFusedLinearDPOLoss, loss and gradients."""

import pytest
import torch
from conftest import DEVICE, assert_close

import fastalign as fa
from fastalign.losses import dpo_loss, policy_loss

TOL = 1e-5


def assert_same_loss(loss, grads, metrics, expected, expected_grads, expected_metrics):
    """The fused module's loss, gradients and every metric of the composition agree."""
    assert_close(loss, expected, TOL, "loss")
    for grad, wanted in zip(grads, expected_grads):
        assert_close(grad, wanted, TOL, "grad")
    for name, value in expected_metrics.items():
        assert_close(metrics[name], value, TOL, name)


def preference_batch(pairs=2, length=9, dim=24, vocab=300, seed=0):
    """Policy leaves (hidden [2B, T, D], head), reference hidden and head, shifted targets with
    a prompt (ignored) prefix of different lengths and right padding."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, length, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.3
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=gen)
    ref_weight = weight + 0.01 * torch.randn(weight.shape, generator=gen)
    targets = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    for row in range(2 * pairs):
        targets[row, : 1 + row % 3] = -100  # prompt
        targets[row, length - row % 2:] = -100  # padding
    leaves = [x.to(DEVICE).requires_grad_() for x in (hidden, weight)]
    return leaves, ref_hidden.to(DEVICE), ref_weight.to(DEVICE), targets.to(DEVICE)


def composed_dpo(hidden, weight, targets, ref_hidden, ref_weight, average=False, **options):
    def sequence(h, w):
        logprobs = fa.linear_logprobs(h, w, targets)
        sums = logprobs.sum(-1)
        return sums / (targets != -100).sum(-1).clamp(min=1) if average else sums
    chosen, rejected = sequence(hidden, weight).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence(ref_hidden, ref_weight).chunk(2)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, **options)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "apo_down"])
def test_fused_dpo_equals_the_composition(loss_type):
    (hidden, weight), ref_hidden, ref_weight, targets = preference_batch()
    module = fa.FusedDPOLoss(beta=0.2, loss_type=loss_type, label_smoothing=0.1)
    loss, metrics = module(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected, expected_metrics = composed_dpo(hidden, weight, targets, ref_hidden, ref_weight,
                                              average=loss_type == "ipo", beta=0.2,
                                              loss_type=loss_type, label_smoothing=0.1)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    assert_same_loss(loss, grads, metrics, expected, expected_grads, expected_metrics)
    assert {"logps/chosen", "logps/rejected"} <= metrics.keys()


def test_fused_dpo_softcap_and_preference_accuracy():
    (hidden, weight), ref_hidden, ref_weight, targets = preference_batch(seed=2)
    module = fa.FusedDPOLoss(beta=0.3, softcap=2.0)
    loss, metrics = module(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)
    grads = torch.autograd.grad(loss, (hidden, weight))

    def sums(h, w):
        return fa.linear_logprobs(h, w, targets, softcap=2.0).sum(-1)
    chosen, rejected = sums(hidden, weight).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = sums(ref_hidden, ref_weight).chunk(2)
    expected, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3)
    assert_same_loss(loss, grads, {}, expected, torch.autograd.grad(expected, (hidden, weight)),
                     {})
    uncapped, _ = fa.FusedDPOLoss(beta=0.3)(hidden, weight, targets, ref_hidden=ref_hidden,
                                            ref_weight=ref_weight)
    assert abs(uncapped.item() - loss.detach().item()) > 1e-3  # the cap changes the loss
    counts = (targets != -100).sum(-1)
    mean_chosen, mean_rejected = (sums(hidden, weight).detach() / counts).chunk(2)
    assert float(metrics["preference_accuracy"]) == float(
        (mean_chosen > mean_rejected).float().mean())
    with pytest.raises(ValueError, match="softcap"):
        fa.FusedDPOLoss(softcap=-1.0)


def test_fused_dpo_averages_an_empty_completion_to_zero():
    (hidden, weight), ref_hidden, ref_weight, targets = preference_batch(seed=3)
    targets[1] = -100  # a chosen row without completion tokens
    loss, metrics = fa.FusedDPOLoss(loss_type="ipo")(hidden, weight, targets,
                                                     ref_hidden=ref_hidden, ref_weight=ref_weight)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected, _ = composed_dpo(hidden, weight, targets, ref_hidden, ref_weight, average=True,
                               loss_type="ipo")
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert_close(loss, expected, TOL, "loss")


def test_fused_dpo_with_precomputed_reference():
    (hidden, weight), ref_hidden, ref_weight, targets = preference_batch(seed=1)
    module = fa.FusedDPOLoss()
    with torch.no_grad():
        ref_chosen, ref_rejected = fa.linear_logprobs(ref_hidden, ref_weight, targets).sum(-1).chunk(2)
    loss, _ = module(hidden, weight, targets, ref_chosen_logps=ref_chosen,
                     ref_rejected_logps=ref_rejected)
    same, _ = module(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)
    assert_close(loss, same, TOL, "precomputed vs from hidden states")


LIGER_TYPES = [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.1), ("exo_pair", 1e-3),
               ("nca_pair", 0.0), ("bco_pair", 0.0), ("sppo_hard", 0.0), ("apo_zero", 0.0),
               ("apo_down", 0.0), ("discopop", 0.0)]


@pytest.mark.parametrize("loss_type,label_smoothing", LIGER_TYPES)
@pytest.mark.parametrize("average", [False, True])
def test_fused_dpo_equals_liger(loss_type, label_smoothing, average):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    (hidden, weight), ref_hidden, ref_weight, targets = preference_batch(seed=2)
    ours = fa.FusedDPOLoss(beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing,
                           average_logprobs=average)
    loss, metrics = ours(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)
    grads = torch.autograd.grad(loss, (hidden, weight))
    theirs = liger.LigerFusedLinearDPOLoss(beta=0.1, loss_type=loss_type,
                                           label_smoothing=label_smoothing, compiled=False,
                                           average_log_prob=average)
    liger_loss, _ = theirs(weight, hidden, targets, None, ref_hidden, ref_weight, None)
    liger_grads = torch.autograd.grad(liger_loss, (hidden, weight))
    assert_close(loss, liger_loss, TOL, f"{loss_type} loss")
    for name, grad, wanted in zip(["hidden", "weight"], grads, liger_grads):
        assert_close(grad, wanted, TOL, f"{loss_type} grad {name}")


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_fused_policy_equals_the_composition(aggregation):
    (hidden, weight), _, _, targets = preference_batch(seed=3)
    gen = torch.Generator().manual_seed(4)
    advantages = torch.randn(targets.shape[0], generator=gen).to(DEVICE)
    with torch.no_grad():
        old = fa.linear_logprobs(hidden, weight, targets) + 0.05 * torch.randn(
            targets.shape, generator=gen).to(DEVICE)
        ref = old - 0.1
    options = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, aggregation=aggregation)
    module = fa.FusedPolicyLoss(**options)
    loss, metrics = module(hidden, weight, targets, advantages, old_logprobs=old,
                           ref_logprobs=ref)
    grads = torch.autograd.grad(loss, (hidden, weight))
    logprobs, entropy = fa.linear_logprobs(hidden, weight, targets, return_entropy=True)
    mask = targets != -100
    expected, expected_metrics = policy_loss(logprobs, old, advantages, mask,
                                             ref_logprobs=ref, **options)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    assert_same_loss(loss, grads, metrics, expected, expected_grads, expected_metrics)
    assert_close(metrics["entropy"], entropy[mask].mean(), TOL, "entropy")


def test_fused_bad_input():
    (hidden, weight), ref_hidden, ref_weight, targets = preference_batch()
    module = fa.FusedDPOLoss()
    with pytest.raises(ValueError, match=r"hidden must be \[2B, T, D\] \(chosen rows, then "):
        module(hidden[:3], weight, targets[:3], ref_hidden=ref_hidden, ref_weight=ref_weight)
    with pytest.raises(ValueError, match=r"give the reference either as ref_chosen_logps"):
        module(hidden, weight, targets)
    with pytest.raises(ValueError, match=r"loss_type='kto' is not one of"):
        fa.FusedDPOLoss(loss_type="kto")
    with pytest.raises(ValueError, match=r"aggregation='sum' is not one of"):
        fa.FusedPolicyLoss(aggregation="sum")
