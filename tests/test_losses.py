"""fastalign.losses against independent float64 references written from the published
formulas (case by case, with other primitives than the library uses): values and gradients,
random inputs with padding, and the bad-input messages."""

import math
import statistics

import pytest
import torch
from conftest import DEVICE, assert_close
from helpers import policy_reference

import fastalign as fa
from fastalign.losses import (dpo_loss, gae, group_advantages, policy_loss, reward_loss,
                              value_loss)
from fastalign.losses.dpo import LOSS_TYPES

TOL = 1e-5  # float32 against float64 (the bound)


def logsig(x):
    return torch.log(torch.sigmoid(x))


def dpo_reference(pc, pr, rc, rr, beta, loss_type, eps):
    """Per pair, from each paper's formula; float64."""
    cr, rj = pc - rc, pr - rr
    d = cr - rj
    if loss_type == "sigmoid":
        losses = -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    elif loss_type == "robust":
        losses = (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.clamp(1 - beta * d, min=0)
    elif loss_type == "exo_pair":  # KL([p, 1-p] || [1-eps, eps]), p = sigmoid(beta d)
        eps = eps or 1e-3
        p = torch.sigmoid(beta * d)
        losses = p * torch.log(p / (1 - eps)) + (1 - p) * torch.log((1 - p) / eps)
    elif loss_type == "nca_pair":
        losses = -logsig(beta * cr) - 0.5 * logsig(-beta * cr) - 0.5 * logsig(-beta * rj)
    elif loss_type == "bco_pair":
        losses = -logsig(beta * cr) - logsig(-beta * rj)
    elif loss_type == "sppo_hard":
        losses = (cr - 1 / (2 * beta)) ** 2 + (rj + 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * cr)) + torch.sigmoid(beta * rj)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * cr) + (1 - torch.sigmoid(beta * (cr - rj)))
    else:  # discopop, tau = 0.05
        z = beta * d
        mix = torch.sigmoid(z / 0.05)
        losses = (1 - mix) * -logsig(z) + mix * torch.exp(-z)
    return losses.mean()


def _leaves(*shapes, scale=1.0, shift=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen) * scale + shift).to(DEVICE).requires_grad_()
            for shape in shapes]


def _check(ours_fn, reference_fn, leaves, what):
    ours = ours_fn(*leaves)
    grads = torch.autograd.grad(ours, leaves, allow_unused=True)
    exact = [x.detach().double().requires_grad_() for x in leaves]
    expected = reference_fn(*exact)
    expected_grads = torch.autograd.grad(expected, exact, allow_unused=True)
    assert_close(ours, expected, TOL, f"{what} value")
    for index, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        if expected_grad is None:
            assert grad is None or (grad == 0).all()
            continue
        assert_close(grad, expected_grad, TOL, f"{what} grad {index}")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_loss_matches_the_formula(loss_type, label_smoothing):
    leaves = _leaves(*[(16,)] * 4, scale=8.0, shift=-60.0)
    _check(lambda *x: dpo_loss(*x, beta=0.1, loss_type=loss_type,
                               label_smoothing=label_smoothing)[0],
           lambda *x: dpo_reference(*x, 0.1, loss_type, label_smoothing), leaves, loss_type)


def test_dpo_metrics():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0],
                                                 [-2.0, -2.0]))
    _, metrics = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # chosen rewards 0.5, 0; rejected -0.5, 0.5
    assert metrics["rewards/chosen"].item() == pytest.approx(0.25)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.0)
    assert metrics["rewards/accuracies"].item() == pytest.approx(0.5)
    assert metrics["rewards/margins"].item() == pytest.approx(0.25)
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())


POLICY_CASES = {
    "grpo": dict(aggregation="seq_mean_token_mean", per_sequence_advantages=True),
    "dapo_asymmetric": dict(clip_high=0.28, aggregation="token_mean"),
    "dual_clip_kl_k3": dict(dual_clip=3.0, ref=True, kl_coef=0.05, kl_estimator="k3"),
    "kl_k1_seq_sum": dict(ref=True, kl_coef=0.1, kl_estimator="k1",
                          aggregation="seq_mean_token_sum"),
    "dr_grpo_k2": dict(ref=True, kl_coef=0.1, kl_estimator="k2",
                       aggregation="seq_mean_token_sum_norm", max_length=12),
    "gspo": dict(level="sequence", per_sequence_advantages=True),
}


@pytest.mark.parametrize("case", POLICY_CASES.values(), ids=POLICY_CASES.keys())
def test_policy_loss_matches_the_formula(backend, case):
    case = dict(case)
    batch, length = 4, 10
    lp, old, ref = _leaves((batch, length), (batch, length), (batch, length), scale=0.3,
                           shift=-2.0, seed=1)
    old.requires_grad_(False)
    ref.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    advantages = torch.randn(batch if case.pop("per_sequence_advantages", False) else
                             (batch, length), generator=gen).to(DEVICE)
    mask = torch.ones(batch, length, device=DEVICE)
    mask[1, 6:] = 0  # right padding
    mask[3, :] = 0  # a sequence without completion tokens: defined, not NaN
    use_ref = case.pop("ref", False)
    options = dict(clip_low=0.2, clip_high=None, dual_clip=None, kl_coef=0.0,
                   kl_estimator="k3", level="token", aggregation="token_mean", max_length=None)
    options.update(case)

    def ours(lp):
        return policy_loss(lp, old, advantages, mask, ref_logprobs=ref if use_ref else None,
                           **options)[0]

    def reference(lp):
        clip_high = options["clip_high"] if options["clip_high"] is not None else options["clip_low"]
        return policy_reference(lp, old.double(), advantages.double(), mask.double(),
                                options["clip_low"], clip_high, options["dual_clip"],
                                ref.double() if use_ref else None, options["kl_coef"],
                                options["kl_estimator"], options["level"],
                                options["aggregation"], options["max_length"])
    _check(ours, reference, [lp], "policy_loss")


def test_policy_metrics_and_on_policy(backend):
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]], device=DEVICE)).requires_grad_()
    old = torch.log(torch.tensor([[0.5, 0.3, 0.7, 0.5]], device=DEVICE))
    advantages = torch.tensor([[1.0, 1.0, -1.0, 2.0]], device=DEVICE)
    mask = torch.tensor([[1, 1, 1, 0]], device=DEVICE)
    loss, metrics = policy_loss(lp, old, advantages, mask, ref_logprobs=old)
    # ratios 1, 1.667 (A > 0: clipped high), 0.714 (A < 0: clipped low); the 4th is padding
    assert metrics["clip_fraction/high"].item() == pytest.approx(1 / 3)
    assert metrics["clip_fraction/low"].item() == pytest.approx(1 / 3)
    assert metrics["ratio/mean"].item() == pytest.approx((1 + 5 / 3 + 5 / 7) / 3, rel=1e-5)
    assert "kl" in metrics and metrics["approx_kl"].item() > 0
    on_policy, on_metrics = policy_loss(lp, None, advantages, mask)
    grad, = torch.autograd.grad(on_policy, lp)
    assert on_metrics["ratio/mean"].item() == pytest.approx(1.0)
    assert_close(grad, -advantages * mask / 3, TOL, "on-policy gradient is -A / count")


def test_value_loss_matches_the_formula():
    values, old, returns = _leaves((3, 7), (3, 7), (3, 7), seed=4)
    old.requires_grad_(False)
    returns.requires_grad_(False)
    mask = torch.ones(3, 7, device=DEVICE)
    mask[2, 4:] = 0

    def reference(v):
        o, r, m = old.double(), returns.double(), mask.double()
        clipped = o + torch.minimum(torch.maximum(v - o, torch.full_like(v, -0.2)),
                                    torch.full_like(v, 0.2))
        worst = torch.maximum((v - r) ** 2, (clipped - r) ** 2)
        return 0.5 * (worst * m).sum() / m.sum()
    _check(lambda v: value_loss(v, old, returns, mask, clip=0.2)[0], reference, [values],
           "value_loss")


def test_gae_matches_the_recursion():
    gen = torch.Generator().manual_seed(5)
    rewards, values = torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen)
    lengths = [9, 5, 1]
    mask = torch.zeros(3, 9)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(9)):
            if t >= n:
                assert advantages[b, t] == 0 and returns[b, t] == 0
                continue
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + 0.9 * next_value - float(values[b, t])
            running = delta + 0.9 * 0.8 * running
            assert advantages[b, t].item() == pytest.approx(running, rel=1e-5, abs=1e-6)
            assert returns[b, t].item() == pytest.approx(running + float(values[b, t]),
                                                         rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    gen = torch.Generator().manual_seed(6)
    rewards = torch.randn(12, generator=gen)
    ours = group_advantages(rewards, 4, scale=scale, eps=1e-4)
    values = rewards.tolist()
    batch_std = statistics.stdev(values)
    for g in range(3):
        group = values[4 * g:4 * g + 4]
        mean = statistics.fmean(group)
        std = {"group": statistics.stdev(group), "batch": batch_std}.get(scale)
        for i, r in enumerate(group):
            expected = (r - mean) if std is None else (r - mean) / (std + 1e-4)
            assert ours[4 * g + i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    single = group_advantages(rewards[:3], 1)
    assert (single == 0).all(), "a group of one has advantage 0, not NaN"


def test_reward_loss_matches_the_formula():
    chosen, rejected = _leaves((10,), (10,), seed=7)
    gen = torch.Generator().manual_seed(8)
    margin = torch.rand(10, generator=gen).to(DEVICE)

    def reference(c, r):
        return (-torch.log(torch.sigmoid(c - r - margin.double()))).mean() \
            + 0.01 * ((c + r) ** 2).mean()
    _check(lambda c, r: reward_loss(c, r, margin=margin, center_coef=0.01)[0], reference,
           [chosen, rejected], "reward_loss")
    _, metrics = reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert metrics["accuracy"].item() == 0.5 and metrics["margin"].item() == 0.0


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate(kind):
    logprobs, ref = _leaves((20,), (20,), scale=0.5, shift=-1.0, seed=9)

    def reference(lp, rf):
        r = rf - lp
        return {"k1": -r, "k2": r * r / 2, "k3": torch.exp(r) - r - 1}[kind].sum()
    _check(lambda lp, rf: fa.kl_estimate(lp, rf, kind).sum(), reference, [logprobs, ref], kind)
    if kind == "k3":
        assert (fa.kl_estimate(logprobs, ref, kind) >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k3_keeps_its_precision_for_small_ratios(backend, dtype):
    """k3 = exp(r) - r - 1 cancels for small |r|: evaluated as written its float32 error was
    3e-4 relative at r = 1e-4 (bf16: 100%, computed in bf16). A series below |r| = 0.1 and a
    float32 evaluation for bf16/fp16 inputs keep it within the dtype's tolerance, in
    kl_estimate and in policy_loss's fused pass (the "kl" metric, the kl_coef term)."""
    r = torch.tensor([1e-5, -3e-4, 2e-3, -0.05, 0.0999, 0.1, -0.7, 3.0], dtype=torch.float64)
    lp = torch.zeros_like(r)  # so that bf16 holds r itself
    ref = r.to(dtype).double()  # what the inputs hold
    r = ref - lp
    expected = torch.expm1(r) - r
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    k3 = fa.kl_estimate(lp.to(dtype), ref.to(dtype), "k3")
    assert ((k3.double() - expected).abs() / expected).max() < tol
    if dtype == torch.float32:
        lp32 = (lp.float() - 2.0).to(DEVICE)[None].requires_grad_()
        mask = torch.ones_like(lp32)
        _, metrics = policy_loss(lp32, lp32.detach(), torch.zeros(1, device=DEVICE), mask,
                                 ref_logprobs=(ref.float() - 2.0).to(DEVICE)[None], kl_coef=1.0)
        assert abs(metrics["kl"].item() - expected.mean().item()) < 1e-6 * expected.mean().item()


BAD = [
    (lambda: dpo_loss(*[torch.zeros(4)] * 4, loss_type="dpo"), ValueError,
     r"loss_type='dpo' is not one of: 'sigmoid', 'robust', 'ipo'"),
    (lambda: dpo_loss(*[torch.zeros(4)] * 4, label_smoothing=0.5), ValueError,
     r"label_smoothing must be a finite number in \[0, 0.5\) \(the assumed probability that "
     r"a preference label is flipped\), got 0.5"),
    (lambda: dpo_loss(torch.zeros(4), torch.zeros(3), torch.zeros(4), torch.zeros(4)),
     ValueError, r"policy_rejected_logps has shape \(3,\) but policy_chosen_logps has \(4,\)"),
    (lambda: dpo_loss(*[torch.zeros(4, dtype=torch.long)] * 4), TypeError,
     r"policy_chosen_logps must be a floating-point tensor"),
    (lambda: policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                         torch.ones(2, 4)), ValueError,
     r"mask has shape \(2, 4\) but logprobs has \(2, 3\)"),
    (lambda: policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3),
                         torch.ones(2, 3)), ValueError,
     r"advantages must be \[B, T\] = \(2, 3\) or \[B\] = \(2,\), got \(3,\)"),
    (lambda: policy_loss(torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3),
                         aggregation="mean"), ValueError,
     r"aggregation='mean' is not one of: 'token_mean', 'seq_mean_token_mean'"),
    (lambda: policy_loss(torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3),
                         kl_estimator="k4"), ValueError, r"kl_estimator='k4' is not one of"),
    (lambda: policy_loss(torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3),
                         dual_clip=0.5), ValueError,
     r"dual_clip must be None or a finite number > 1 \(it caps the loss at -dual_clip \* A "
     r"where A < 0\), got 0.5"),
    (lambda: group_advantages(torch.zeros(6), 4), ValueError,
     r"group_size must be a positive int dividing B = 6"),
    (lambda: group_advantages(torch.zeros(4), 2, scale="std"), ValueError,
     r"scale='std' is not one of: 'group', 'batch', 'none'"),
    (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4)), ValueError,
     r"rewards, values and mask must all be \[B, T\]"),
    (lambda: fa.kl_estimate(torch.zeros(2), torch.zeros(2), "k5"), ValueError,
     r"kind='k5' is not one of: 'k1', 'k2', 'k3'"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=range(len(BAD)))
def test_bad_input_messages(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_empty_masks_give_zero_not_nan(backend):
    lp = torch.zeros(2, 3, device=DEVICE, requires_grad=True)
    empty = torch.zeros(2, 3, device=DEVICE)
    for aggregation in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                        "seq_mean_token_sum_norm"):
        loss, metrics = policy_loss(lp, None, torch.ones(2, device=DEVICE), empty,
                                    aggregation=aggregation)
        assert loss.item() == 0 and all(math.isfinite(m.item()) for m in metrics.values())
    loss, _ = value_loss(lp, lp.detach(), torch.ones(2, 3, device=DEVICE), empty)
    assert loss.item() == 0
