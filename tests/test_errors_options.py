"""Every float option of the public ops, losses and fused modules at its edges (inf, NaN, 0,
negative, denormal, huge, bool, tensor): either a ValueError that names the option and its
range, or a well-defined result that matches float64 semantics. Never NaN from an accepted
option, never a flipped sign."""

import math

import pytest
import torch
from conftest import DEVICE, assert_close

import fastalign as fa
from fastalign.losses import (dpo_loss, gae, group_advantages, kl_estimate, policy_loss,
                              reward_loss, value_loss)
from fastalign.losses.dpo import LOSS_TYPES
from fastalign.reference import (linear_logprobs_reference, token_divergence_reference,
                                 token_kl_reference, token_logprobs_reference)

TINY, HUGE = torch.finfo(torch.float32).tiny, 1.0 / torch.finfo(torch.float32).tiny  # scales
NAN, INF = float("nan"), float("inf")
# Values no scale option (temperature, softcap, beta) accepts: their reciprocal or they
# themselves would be inf, a denormal or 0 in float32.
BAD_SCALES = [0.0, -1.0, INF, -INF, NAN, 5e-324, 1e-39, 1e38, 1e300, True, torch.tensor(1.0), "1"]


def _t(*shape):
    return torch.randn(*shape, device=DEVICE)


def _ids(n, high=10):
    return torch.randint(0, high, (n,), device=DEVICE)


B, T = 2, 3
OPTION_CALLS = {  # option -> a call with that option set to the value
    "token_logprobs.temperature": lambda v: fa.token_logprobs(_t(4, 10), _ids(4), temperature=v),
    "token_logprobs.softcap": lambda v: fa.token_logprobs(_t(4, 10), _ids(4), softcap=v),
    "linear_logprobs.temperature": lambda v: fa.linear_logprobs(_t(4, 8), _t(10, 8), _ids(4),
                                                                temperature=v),
    "linear_logprobs.softcap": lambda v: fa.linear_logprobs(_t(4, 8), _t(10, 8), _ids(4),
                                                            softcap=v),
    "token_kl.temperature": lambda v: fa.token_kl(_t(4, 10), _t(4, 10), temperature=v),
    "linear_kl.temperature": lambda v: fa.linear_kl(_t(4, 8), _t(10, 8), _t(4, 8), _t(10, 8),
                                                    temperature=v),
    "dpo_loss.beta": lambda v: dpo_loss(*[_t(4)] * 4, beta=v),
    "token_divergence.beta": lambda v: fa.token_divergence(_t(4, 10), _t(4, 10), beta=v),
    "linear_divergence.beta": lambda v: fa.linear_divergence(_t(4, 8), _t(10, 8), _t(4, 5),
                                                             _t(10, 5), beta=v),
    "dpo_loss.label_smoothing": lambda v: dpo_loss(*[_t(4)] * 4, label_smoothing=v),
    "FusedDPOLoss.beta": lambda v: fa.FusedDPOLoss(beta=v),
    "FusedDPOLoss.label_smoothing": lambda v: fa.FusedDPOLoss(label_smoothing=v),
    "FusedDPOLoss.temperature": lambda v: fa.FusedDPOLoss(temperature=v),
    "FusedDPOLoss.softcap": lambda v: fa.FusedDPOLoss(softcap=v),
    "FusedPolicyLoss.temperature": lambda v: fa.FusedPolicyLoss(temperature=v),
    "FusedPolicyLoss.softcap": lambda v: fa.FusedPolicyLoss(softcap=v),
    "value_loss.clip": lambda v: value_loss(_t(B, T), _t(B, T), _t(B, T), torch.ones(B, T),
                                            clip=v),
    "gae.gamma": lambda v: gae(_t(B, T), _t(B, T), torch.ones(B, T), gamma=v),
    "gae.lam": lambda v: gae(_t(B, T), _t(B, T), torch.ones(B, T), lam=v),
    "group_advantages.eps": lambda v: group_advantages(_t(4), 2, eps=v),
    "reward_loss.margin": lambda v: reward_loss(_t(4), _t(4), margin=v),
    "reward_loss.center_coef": lambda v: reward_loss(_t(4), _t(4), center_coef=v),
}
for _name in ("temperature", "softcap", "teacher_softcap"):
    OPTION_CALLS[f"token_divergence.{_name}"] = lambda v, n=_name: fa.token_divergence(
        _t(4, 10), _t(4, 10), beta=0.5, **{n: v})
    OPTION_CALLS[f"linear_divergence.{_name}"] = lambda v, n=_name: fa.linear_divergence(
        _t(4, 8), _t(10, 8), _t(4, 5), _t(10, 5), beta=0.0, **{n: v})
for _name in ("clip_low", "clip_high", "dual_clip", "kl_coef", "max_length"):
    OPTION_CALLS[f"policy_loss.{_name}"] = lambda v, n=_name: policy_loss(
        _t(B, T), _t(B, T), _t(B), torch.ones(B, T), ref_logprobs=_t(B, T), **{n: v})
    OPTION_CALLS[f"FusedPolicyLoss.{_name}"] = lambda v, n=_name: fa.FusedPolicyLoss(**{n: v})

PROBABILITY = [-0.1, 0.5, 1.0, INF, NAN, True]
POSITIVE = [0.0, -0.2, INF, -INF, NAN, True, torch.tensor(0.2)]
INVALID = {  # option kind -> (values it refuses, the range its message names)
    "temperature": (BAD_SCALES, r"a finite number in \[1.18e-38, 8.51e\+37\]"),
    "softcap": (BAD_SCALES, r"None or a finite number in \[1.18e-38, 8.51e\+37\]"),
    "teacher_softcap": (BAD_SCALES, r"None or a finite number in \[1.18e-38, 8.51e\+37\]"),
    "beta": (BAD_SCALES, r"a finite number in \[1.18e-38, 8.51e\+37\]"),
    "label_smoothing": (PROBABILITY, r"a finite number in \[0, 0.5\)"),
    "clip_low": (POSITIVE, r"a finite number > 0"),
    "clip_high": (POSITIVE, r"None or a finite number > 0"),
    "dual_clip": ([1.0, 0.5, -2.0, INF, NAN, True], r"None or a finite number > 1"),
    "kl_coef": ([-0.1, -INF, INF, NAN, True], r"a finite number >= 0"),
    "max_length": ([0, -5, 2.5, True, NAN], r"None or an int >= 1"),
    "clip": ([-0.2, INF, NAN, True], r"a finite number >= 0"),
    "gamma": ([-0.1, 1.5, INF, NAN, True], r"a finite number in \[0, 1\]"),
    "lam": ([-0.1, 1.5, INF, NAN, True], r"a finite number in \[0, 1\]"),
    "eps": ([0.0, -1e-4, INF, NAN, 1e-40, True], r"a finite number >= 1.18e-38"),
    "margin": ([INF, -INF, NAN, True], r"None or a finite number|a finite number"),
    "center_coef": ([-0.1, INF, NAN, True], r"a finite number >= 0"),
}
# An op whose option has another range than the same name elsewhere: the divergences' beta
# (TRL's, a mixture weight) is not DPO's (a scale).
INVALID.update({f"{op}.beta": ([-0.1, 1.5, -INF, INF, NAN, True, torch.tensor(0.5), "0"],
                               r"a finite number in \[0, 1\] \(0 is the forward KL")
                for op in ("token_divergence", "linear_divergence")})


# The log-prob ops take a tensor temperature as one per row (tests/test_errors_sampler.py checks
# its shape and values); a 0-d tensor is refused there for its shape.
INVALID.update({f"{op}.temperature": ([v for v in BAD_SCALES if not isinstance(v, torch.Tensor)],
                                      INVALID["temperature"][1])
                for op in ("token_logprobs", "linear_logprobs")})


def _invalid(option):
    return INVALID.get(option) or INVALID[option.split(".")[1]]


CASES = [(option, value) for option in OPTION_CALLS for value in _invalid(option)[0]]


@pytest.mark.parametrize("option,value", CASES, ids=[f"{o}={v!r}" for o, v in CASES])
def test_invalid_option_values_are_refused_with_their_range(option, value):
    name = option.split(".")[1]
    with pytest.raises(ValueError, match=rf"^{name} must be ({_invalid(option)[1]})"):
        OPTION_CALLS[option](value)


def assert_float64_semantics(actual, expected, tol, what):
    """``actual`` is ``expected`` rounded to float32: +-inf exactly where float64's value is past
    float32's range, the finite rest within ``tol`` (norm-wise), no NaN anywhere."""
    rounded = expected.float().to(actual.device)
    assert not actual.isnan().any(), f"{what}: NaN"
    overflow = rounded.isinf()
    assert torch.equal(actual[overflow], rounded[overflow]), f"{what}: overflow differs"
    assert_close(actual[~overflow], expected.to(actual.device)[~overflow], tol, what)


def _with_grad(fn, x, *args, **options):
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf, *args, **options)
    out = out[0] if isinstance(out, tuple) else out
    grad, = torch.autograd.grad(out.sum(), leaf)
    return out, grad


@pytest.mark.parametrize("options", [dict(temperature=TINY), dict(temperature=HUGE * 0.999),
                                     dict(softcap=TINY), dict(softcap=HUGE * 0.999),
                                     dict(temperature=TINY, softcap=HUGE * 0.999)],
                         ids=["T_tiny", "T_huge", "s_tiny", "s_huge", "T_tiny_s_huge"])
def test_ops_at_the_edges_of_their_scales_match_float64(backend, options):
    """The extreme accepted temperatures and softcaps: z / 1.18e-38 overflows float32 for any
    |z| > 4, yet maxes taken before the scaling keep float64 semantics (a one-hot softmax and a
    gradient of size 1 / T); a tiny softcap saturates every logit to +-s."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 37, generator=gen) * 3).to(DEVICE)
    logits[:, 5] = logits[:, 4]  # a tie, so the softmax is not exactly one-hot
    targets = torch.randint(0, 37, (6,), generator=gen).to(DEVICE)
    lp, grad = _with_grad(fa.token_logprobs, logits, targets, **options)
    ref_lp, ref_grad = _with_grad(token_logprobs_reference, logits.double(), targets, **options)
    assert_float64_semantics(lp, ref_lp, 1e-5, "logprobs")  # -5e38 (T tiny) is -inf
    assert_float64_semantics(grad, ref_grad, 1e-5, "grad")
    hidden = torch.eye(6, device=DEVICE)  # logits = weight rows, exactly
    weight = logits.t().contiguous()[:, :6].clone()
    lin, lin_grad = _with_grad(lambda w, *a, **k: fa.linear_logprobs(hidden, w, *a, **k),
                               weight, targets, **options)
    ref_lin, ref_lin_grad = _with_grad(
        lambda w, *a, **k: linear_logprobs_reference(hidden.double(), w, *a, **k),
        weight.double(), targets, **options)
    assert_float64_semantics(lin, ref_lin, 1e-5, "linear logprobs")
    assert_float64_semantics(lin_grad, ref_lin_grad, 1e-5, "linear grad weight")
    ref_logits = logits.roll(1, dims=1)
    both = dict(options, teacher_softcap=options.get("softcap"))  # each model capped alike
    jsd, jsd_grad = _with_grad(fa.token_divergence, logits, ref_logits, beta=0.5, **both)
    ref_jsd, ref_jsd_grad = _with_grad(token_divergence_reference, logits.double(),
                                       ref_logits.double(), beta=0.5, **both)
    # The JSD is bounded (by log 2 here) and 0 where both softmaxes are uniform (T huge, s
    # tiny), where float64's own rounding is all there is: within 1e-6 absolute there.
    torch.testing.assert_close(jsd, ref_jsd.float(), rtol=1e-5, atol=1e-6)
    if options.get("temperature", 1.0) > 1:  # T tiny: gradients past float32
        torch.testing.assert_close(jsd_grad, ref_jsd_grad.float(), rtol=1e-5, atol=1e-6)
    if "softcap" not in options:
        kl, kl_grad = _with_grad(fa.token_kl, logits, ref_logits, **options)
        ref_kl, ref_kl_grad = _with_grad(token_kl_reference, logits.double(), ref_logits.double(),
                                         **options)
        assert_float64_semantics(kl, ref_kl, 1e-5, "kl")
        if options["temperature"] > 1:  # at T tiny the gradient is ~1e76: past float32
            assert_float64_semantics(kl_grad, ref_kl_grad, 1e-5, "kl grad")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,label_smoothing", [(TINY, 0.0), (HUGE * 0.999, 0.0), (0.1, 0.0),
                                                  (0.1, 0.4999), (1e-3, 0.25)])
def test_dpo_losses_at_their_edges_follow_float64(loss_type, beta, label_smoothing):
    """Accepted options and log-ratios of any size (|beta * d| from 0 to past float32's range,
    and +-inf log-probs): the float32 loss is the float64 one rounded (inf where that exceeds
    float32) and its gradient is never NaN. DiscoPOP's exp(-x) used to overflow from
    beta * d < -88 (NaN), and label_smoothing = 0 multiplied logsig(-inf) by 0 (NaN)."""
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    for d in (-1e4, -100.0, -1.0, 0.0, 0.5, 30.0, 1e4, INF, -INF):
        results = []
        for dtype in (torch.float32, torch.float64):
            pc = torch.tensor([d], dtype=dtype, requires_grad=True)
            zero = torch.zeros(1, dtype=dtype)
            loss, _ = dpo_loss(pc, zero, zero, zero, **options)
            loss.backward()
            results.append((loss, pc.grad))
        (loss, grad), (ref_loss, _) = results
        what = f"{loss_type} beta={beta:g} eps={label_smoothing} d={d}"
        assert not loss.isnan() and not grad.isnan().any(), what
        # rDPO divides by 1 - 2 eps: float32's rounding grows by as much (5000x at 0.4999).
        rtol = 1e-5 / (1 - 2 * label_smoothing) if loss_type == "robust" else 1e-5
        assert torch.allclose(loss, ref_loss.float(), rtol=rtol, atol=1e-6), \
            (what, loss.item(), ref_loss.item())


@pytest.mark.parametrize("options", [
    dict(clip_low=1e-30), dict(clip_low=1e30, clip_high=1e30), dict(clip_high=1e-30),
    dict(dual_clip=1.0 + 1e-7), dict(dual_clip=1e30), dict(kl_coef=0.0), dict(kl_coef=1e30),
    dict(max_length=1, aggregation="seq_mean_token_sum_norm"),
    dict(max_length=10**9, aggregation="seq_mean_token_sum_norm")])
def test_policy_loss_at_its_edges_is_finite_and_keeps_its_sign(backend, options):
    gen = torch.Generator().manual_seed(1)
    lp = (torch.randn(3, 5, generator=gen) * 0.3 - 1).to(DEVICE).requires_grad_()
    old = lp.detach() + (torch.randn(3, 5, generator=gen) * 0.3).to(DEVICE)
    ref = lp.detach() + (torch.randn(3, 5, generator=gen) * 0.3).to(DEVICE)
    adv = torch.tensor([1.0, -1.0, 0.5], device=DEVICE)
    mask = torch.ones(3, 5, device=DEVICE)
    loss, metrics = policy_loss(lp, old, adv, mask, ref_logprobs=ref, **options)
    grad, = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(math.isfinite(m.item()) for m in metrics.values())
    if options.get("kl_coef", 0.0) > 0:  # the KL term only ever adds (k3 >= 0)
        without, _ = policy_loss(lp, old, adv, mask, ref_logprobs=ref,
                                 **dict(options, kl_coef=0.0))
        assert loss >= without


def test_other_losses_at_their_edges():
    values, old, returns, mask = _t(B, T), _t(B, T), _t(B, T), torch.ones(B, T)
    for clip in (0.0, 1e30):
        assert torch.isfinite(value_loss(values, old, returns, mask, clip=clip)[0])
    for gamma, lam in ((0.0, 0.0), (1.0, 1.0), (TINY, 1.0)):
        advantages, targets = gae(_t(B, T), values, mask, gamma=gamma, lam=lam)
        assert torch.isfinite(advantages).all() and torch.isfinite(targets).all()
    equal = torch.full((4,), 0.1)  # a group of equal rewards: std 0
    for eps in (TINY, 1e-4, 1e30):
        assert torch.isfinite(group_advantages(equal, 2, eps=eps)).all()
    spread = group_advantages(torch.tensor([1.0, 3.0]), 2, eps=1e-4)
    assert spread[0] < 0 < spread[1], "the sign of an advantage must follow its reward"
    chosen, rejected = _t(4), _t(4)
    for margin, center_coef in ((1e30, 0.0), (-1e30, 0.0), (0.0, 1e-30), (0.0, 1e30)):
        loss, _ = reward_loss(chosen, rejected, margin=margin, center_coef=center_coef)
        assert not torch.isnan(loss) and loss >= 0


def test_k3_of_an_impossible_token_is_inf_not_nan(backend):
    """r = ref - logprobs = +inf (a -inf log-prob under the policy): k3 = exp(r) - r - 1 is inf
    (inf - inf = NaN before), on its own and inside policy_loss's fused pass."""
    lp = torch.tensor([[-1.0, float("-inf"), -2.0]], device=DEVICE)
    ref = torch.zeros(1, 3, device=DEVICE)
    k3 = kl_estimate(lp, ref, "k3")
    assert k3[0, 1] == INF and torch.isfinite(k3[0, [0, 2]]).all()
    leaf = lp.clone().requires_grad_()
    kl, = torch.autograd.grad(kl_estimate(leaf, ref, "k3").sum(), leaf)
    assert not kl.isnan().any()
    _, metrics = policy_loss(lp, lp, torch.ones(1, device=DEVICE), torch.ones(1, 3, device=DEVICE),
                             ref_logprobs=ref, kl_coef=0.1)
    assert metrics["kl"] == INF
