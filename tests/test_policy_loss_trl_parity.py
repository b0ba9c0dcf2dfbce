"""Parity with TRL 1.16's GRPO loss for every TRL loss type, level and rollout-correction (IS)
mode: the loss, its gradient w.r.t. the per-token log-probs and entropies, and the metrics both
report, of ``fastalign.losses.policy_loss`` (fp32, relative error 1e-6) and of
``fastalign.nn.FusedPolicyLoss`` in both ``gradient_in_forward`` modes (gradients w.r.t. the
hidden states and lm_head, 1e-5), against TRL's own ``GRPOTrainer._compute_loss`` run on the
same tensors (``trl_grpo_reference.py``: a bare trainer whose log-prob function is stubbed).

The mapping under test (``trl_grpo_reference.LOSS_TYPE_MAP`` / ``fastalign_options``): grpo =
clip + seq_mean_token_mean, bnpo = clip + token_mean, dr_grpo = clip + seq_mean_token_sum_norm
(max_length = max_completion_length), dapo = clip + token_mean, cispo = cispo (clip_high =
epsilon_high) + token_mean, sapo = sapo + seq_mean_token_mean, luspo = luspo, vespo = vespo +
token_mean; beta = kl_coef (k3), epsilon / epsilon_high = clip_low / clip_high,
vllm_importance_sampling_* = rollout_correction / rollout_clip_*, sampling_per_token_logps =
rollout_logprobs.

Metrics defined differently on purpose, so not compared: at ``level="sequence"`` TRL's clip
fractions are means over sequences, fastalign's over tokens (each token counted with its
sequence's ratio); with ``delta < 1 + epsilon_high`` TRL counts high clipping on the
delta-capped ratio; fastalign's ``rollout/is_ratio_mean|max`` are of the ratios before
truncation or masking (TRL logs them after), and its ``rollout/mismatch_kl`` is a k3 estimate
(TRL logs the mean absolute log-prob difference)."""

import pytest
import torch
from conftest import assert_close
from helpers import slow_beyond

pytest.importorskip("trl")
import fastalign as fa  # noqa: E402
from fastalign.losses import policy_loss  # noqa: E402
from fastalign.losses.policy import DEFAULTS  # noqa: E402
from trl_grpo_reference import (TRL_DEFAULTS, Batch, fastalign_options,  # noqa: E402
                                fastalign_tensors, shared_metrics, trl_config, trl_loss)

B, T, V, D = 4, 7, 37, 8
LENGTHS = [7, 5, 3, 6]  # completion lengths: right padding in three rows
TOL, FUSED_TOL = 1e-6, 1e-5
# Per sequence, log(pi / pi_old) is shifted so that, with advantages + - + -, sequence-level
# ratios clip above (row 0) and below (row 1) and stay inside elsewhere; row 1 (A < 0, mean
# KL from the sampler 0.3) is dropped by a 0.05 off-policy threshold.
SHIFT = torch.tensor([0.3, -0.3, -0.25, 0.25])
ADVANTAGES = torch.tensor([1.0, -0.7, 0.6, -1.3])


def _is(mode, low=0.5, high=2.0):
    """TRL's rollout IS correction (vLLM's log-probs as the sampler's)."""
    return dict(use_vllm=True, vllm_importance_sampling_correction=True,
                vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=low,
                vllm_importance_sampling_clip_max=high)


SAMPLER = dict(use_vllm=True, vllm_importance_sampling_correction=False)  # log-probs, no IS
TOKEN_MODES, SEQUENCE_MODES = ("token_truncate", "token_mask"), ("sequence_truncate",
                                                                  "sequence_mask")
LOSS_TYPES = {  # each TRL loss type in its usual setting
    "grpo": dict(loss_type="grpo"), "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=9),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "cispo_cap": dict(loss_type="cispo", epsilon_high=1.1),  # a cap that clips here
    "sapo": dict(loss_type="sapo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
}
SEQ = dict(importance_sampling_level="sequence")
# TRL's use_bias_correction_kl defaults to True, fastalign's to False: each case says which.
KL = dict(beta=0.04, use_bias_correction_kl=False)
KL_BIAS = dict(beta=0.1, use_bias_correction_kl=True)
BONUS, TOP = dict(entropy_coef=0.05), dict(top_entropy_quantile=0.5)
OFF = dict(off_policy_mask_threshold=0.05)

CASES = {f"{name}": settings for name, settings in LOSS_TYPES.items()}
CASES.update({f"{name}_sequence": {**LOSS_TYPES[name], **SEQ}
              for name in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo_cap", "sapo")})
CASES.update({
    "luspo_token": dict(loss_type="luspo"),
    "grpo_delta": dict(loss_type="grpo", epsilon_high=0.28, delta=1.5),
    "grpo_delta_below_clip": dict(loss_type="grpo", epsilon_high=0.28, delta=1.1),
    "dapo_sequence_delta": {**LOSS_TYPES["dapo"], **SEQ, "delta": 1.3},
    "luspo_delta": {**LOSS_TYPES["luspo"], "delta": 1.3},
    "grpo_kl": {**LOSS_TYPES["grpo"], **KL},
    "dr_grpo_kl": {**LOSS_TYPES["dr_grpo"], **KL},
    "dapo_kl_bias": {**LOSS_TYPES["dapo"], **KL_BIAS},
    "grpo_sequence_kl_bias": {**LOSS_TYPES["grpo"], **SEQ, **KL_BIAS},
    "cispo_kl": {**LOSS_TYPES["cispo_cap"], **KL},
    "sapo_kl_bias": {**LOSS_TYPES["sapo"], **KL_BIAS},
    "luspo_kl": {**LOSS_TYPES["luspo"], **KL},
    "vespo_kl": {**LOSS_TYPES["vespo"], **KL},
    "vespo_sequence_kl_bias": {**LOSS_TYPES["vespo"], **SEQ, **KL_BIAS},
    "dapo_entropy": {**LOSS_TYPES["dapo"], **BONUS},
    "grpo_sequence_entropy": {**LOSS_TYPES["grpo"], **SEQ, **BONUS},
    "luspo_entropy": {**LOSS_TYPES["luspo"], **BONUS},
    "cispo_entropy": {**LOSS_TYPES["cispo_cap"], **BONUS},
    "grpo_top_entropy": {**LOSS_TYPES["grpo"], **TOP},
    "dapo_top_entropy_bonus": {**LOSS_TYPES["dapo"], "top_entropy_quantile": 0.6, **BONUS},
    "vespo_top_entropy": {**LOSS_TYPES["vespo"], **TOP},
    "dapo_off_policy": {**LOSS_TYPES["dapo"], **OFF},  # TRL: the old log-probs as the sampler's
    "grpo_off_policy_sampler": {**LOSS_TYPES["grpo"], **OFF, **SAMPLER},
    "luspo_off_policy": {**LOSS_TYPES["luspo"], **OFF},
    "vespo_off_policy_sampler": {**LOSS_TYPES["vespo"], **OFF, **SAMPLER},
})
for name, settings in LOSS_TYPES.items():  # every loss type x every IS mode it takes
    for mode in TOKEN_MODES + (() if name == "vespo" else SEQUENCE_MODES):
        CASES[f"{name}_{mode}"] = {**settings, **_is(mode)}
for mode in TOKEN_MODES + SEQUENCE_MODES:  # TRL's default bounds: no lower one, 3.0 above
    CASES[f"dapo_{mode}_default_bounds"] = {**LOSS_TYPES["dapo"], **_is(mode, None, 3.0)}
CASES.update({
    "dapo_token_mask_min_only": {**LOSS_TYPES["dapo"], **_is("token_mask", 0.5, None)},
    "dapo_everything": {**LOSS_TYPES["dapo"], "delta": 1.5, **KL_BIAS, **BONUS,
                        "top_entropy_quantile": 0.6, **OFF, **_is("token_mask")},
    "grpo_sequence_everything": {**LOSS_TYPES["grpo"], **SEQ, **KL_BIAS, **BONUS, **OFF,
                                 **_is("sequence_truncate")},
    "vespo_everything": {**LOSS_TYPES["vespo"], **KL, **BONUS, **TOP, **OFF,
                         **_is("token_truncate")},
    "sapo_everything": {**LOSS_TYPES["sapo"], **SEQ, **KL, **TOP, **_is("sequence_mask")},
    "luspo_everything": {**LOSS_TYPES["luspo"], "delta": 1.3, **KL_BIAS, **BONUS, **OFF,
                         **_is("token_truncate")},
    "cispo_everything": {**LOSS_TYPES["cispo_cap"], **KL, **BONUS, **TOP, **_is("token_mask")},
})
# Batch variants: on-policy (no old log-probs: TRL's per_token_logps.detach()), and a sampler
# log-prob that is NaN (vLLM could not score the token) on a completion token and on padding.
ON_POLICY = {"grpo_on_policy": "grpo_kl", "cispo_on_policy": "cispo_entropy",
             "vespo_on_policy": "vespo_kl"}
NAN_SAMPLER = {"dapo_nan_token_mask": "dapo_token_mask",
               "vespo_nan_token_truncate": "vespo_everything",
               "grpo_nan_sequence_mask": "grpo_sequence_mask",
               "grpo_nan_off_policy": "grpo_off_policy_sampler"}
CASES.update({name: CASES[base] for name, base in {**ON_POLICY, **NAN_SAMPLER}.items()})
FAST = ("grpo_kl", "dapo_everything", "grpo_sequence_everything", "vespo_everything",
        "sapo_everything", "luspo_everything", "cispo_everything", "vespo_on_policy",
        "grpo_nan_off_policy")
FUSED_FAST = ("dapo_everything", "grpo_sequence_everything", "vespo_nan_token_truncate")


def make_batch(logprobs: torch.Tensor, case: str, seed: int = 0) -> Batch:
    """The other per-token inputs around ``logprobs``: old log-probs with ratios spread
    ``exp(SHIFT +- 0.3)`` (clipped both ways, token and sequence level), the sampler's
    ``+- 0.5`` from the old (some rollout ratios outside [0.5, 2], most sequence ones), a
    reference ``+- 0.4`` away; padding holds finite garbage."""
    gen = torch.Generator().manual_seed(seed)
    lp = logprobs.detach().float()
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()
    old = lp - SHIFT[:, None] - 0.3 * torch.randn(B, T, generator=gen)
    sampling = old + 0.5 * torch.randn(B, T, generator=gen)
    ref = lp + 0.4 * torch.randn(B, T, generator=gen)
    if case in NAN_SAMPLER:
        sampling[1, 2] = sampling[2, 5] = float("nan")
    advantages = ADVANTAGES * (1 + 0.2 * torch.rand(B, generator=gen))
    return Batch(old=None if case in ON_POLICY else old, ref=ref, sampling=sampling,
                 advantages=advantages, mask=mask)


def random_logprobs_and_entropies(seed: int = 1):
    """Log-probs in [-2.55, -0.05], entropies in [0.1, 2.1]."""
    gen = torch.Generator().manual_seed(seed)
    logprobs = -(2.5 * torch.rand(B, T, generator=gen) + 0.05)
    return logprobs, 2 * torch.rand(B, T, generator=gen) + 0.1


def assert_loss_close(ours, theirs, tolerance, what):
    """Relative to the loss, or to 1 where it is smaller: its terms are of order 1 (|A| ~ 1,
    ratios ~ 1), and a loss that nearly cancels (-0.002 from terms of 0.1-1) carries their
    fp32 rounding (5e-8: the two sum in different orders), not a relative 1e-6 of itself."""
    error = abs(ours.item() - theirs.item()) / max(abs(theirs.item()), 1.0)
    assert error <= tolerance, f"{what}: error {error:.3g} > {tolerance:.3g}"


def _grads(loss, leaves):
    """d loss / d leaves, zeros where the loss does not use a leaf (no entropy bonus)."""
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _compare_metrics(args, ours, trl_metrics, tolerance, case):
    wanted = shared_metrics(args, trl_metrics)
    assert "entropy" in wanted
    for name, value in wanted.items():
        assert_close(ours[name], torch.tensor(value), tolerance, f"{case} metric {name}")


@pytest.mark.parametrize("case", slow_beyond(list(CASES), FAST))
def test_policy_loss_equals_trl(case):
    args = trl_config(**CASES[case])
    logprobs, entropies = random_logprobs_and_entropies()
    batch = make_batch(logprobs, case)
    theirs_leaves = [logprobs.clone().requires_grad_(), entropies.clone().requires_grad_()]
    theirs, trl_metrics = trl_loss(args, batch, *theirs_leaves)
    ours_leaves = [logprobs.clone().requires_grad_(), entropies.clone().requires_grad_()]
    ours, metrics = policy_loss(ours_leaves[0], advantages=batch.advantages, mask=batch.mask,
                                entropy=ours_leaves[1], **fastalign_tensors(args, batch),
                                **fastalign_options(args))
    assert_loss_close(ours, theirs, TOL, f"{case} loss")
    for name, grad, wanted in zip(("logprobs", "entropies"), _grads(ours, ours_leaves),
                                  _grads(theirs, theirs_leaves)):
        assert_close(grad, wanted, TOL, f"{case} gradient w.r.t. {name}")
    _compare_metrics(args, metrics, trl_metrics, TOL, case)


def _head(seed=2):
    """Policy leaves (hidden ``[B, T, D]``, lm_head ``[V, D]``) and targets (-100 on padding)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen)
    weight = 0.7 * torch.randn(V, D, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[torch.arange(T)[None] >= torch.tensor(LENGTHS)[:, None]] = -100
    return hidden, weight, targets


def _trl_logprobs(hidden, weight, targets):
    """Per-token log-probs and entropies from the naive fp32 logits, differentiable (TRL's
    stub returns these, so its gradient chains back to the hidden states and the head)."""
    log_p = torch.log_softmax(hidden @ weight.T, dim=-1)
    picked = log_p.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return picked, -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("gradient_in_forward", [True, False])
@pytest.mark.parametrize("case", slow_beyond(list(CASES), FUSED_FAST))
def test_fused_policy_loss_equals_trl(case, gradient_in_forward, chunk_counts):
    args = trl_config(**CASES[case])
    hidden, weight, targets = _head()
    theirs_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    logprobs, entropies = _trl_logprobs(*theirs_leaves, targets)
    batch = make_batch(logprobs, case)
    theirs, trl_metrics = trl_loss(args, batch, logprobs, entropies)
    # 0.0015 MiB of fp32 logits: 10 rows of V=37 a chunk, so the 21 tokens (whole sequences
    # of 3-7 where the loss needs them) take several chunks.
    module = fa.FusedPolicyLoss(gradient_in_forward=gradient_in_forward, chunk_mb=0.0015,
                                **fastalign_options(args))
    ours_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    ours, metrics = module(*ours_leaves, targets, batch.advantages,
                           **fastalign_tensors(args, batch))
    assert_loss_close(ours, theirs, FUSED_TOL, f"{case} loss")
    for name, grad, wanted in zip(("hidden", "weight"), _grads(ours, ours_leaves),
                                  _grads(theirs, theirs_leaves)):
        assert_close(grad, wanted, FUSED_TOL, f"{case} gradient w.r.t. {name}")
    _compare_metrics(args, metrics, trl_metrics, FUSED_TOL, case)
    one_pass = gradient_in_forward and args.top_entropy_quantile == 1.0
    assert (len(chunk_counts) == 1 and chunk_counts[0] >= 2) if one_pass else not chunk_counts


def test_the_inputs_reach_every_branch():
    """The cases above would pass vacuously if nothing clipped: here each branch is taken."""
    logprobs, entropies = random_logprobs_and_entropies()
    batch = make_batch(logprobs, "grpo")
    for level in ("token", "sequence"):
        metrics = trl_loss(trl_config(loss_type="grpo", importance_sampling_level=level),
                           batch, logprobs, entropies)[1]
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    assert trl_loss(trl_config(**CASES["cispo_cap"]), batch, logprobs,
                    entropies)[1]["cispo_clip_ratio"] > 0
    for mode in TOKEN_MODES + SEQUENCE_MODES:
        args = trl_config(**CASES[f"dapo_{mode}"])
        corrected = policy_loss(logprobs, advantages=batch.advantages, mask=batch.mask,
                                **fastalign_tensors(args, batch), **fastalign_options(args))[1]
        assert 0 < corrected["rollout/corrected_fraction"] < 1, mode
    args = trl_config(**CASES["dapo_off_policy"])
    dropped = policy_loss(logprobs, batch.old, batch.advantages, batch.mask,
                          **fastalign_options(args))[1]["off_policy_mask/dropped_fraction"]
    assert 0 < dropped < 1


def test_defaults_are_trl_defaults():
    """An option left unset means what TRL's GRPOConfig means by it."""
    for ours, theirs in (("clip_low", "epsilon"), ("delta", "delta"),
                         ("sapo_temperature_pos", None), ("sapo_temperature_neg", None),
                         ("vespo_k_pos", None), ("vespo_lambda_pos", None),
                         ("vespo_k_neg", None), ("vespo_lambda_neg", None),
                         ("level", "importance_sampling_level"), ("entropy_coef", None),
                         ("top_entropy_quantile", None), ("off_policy_mask_threshold", None),
                         ("kl_coef", "beta"),
                         ("rollout_clip_min", "vllm_importance_sampling_clip_min"),
                         ("rollout_clip_max", "vllm_importance_sampling_clip_max")):
        assert DEFAULTS[ours] == TRL_DEFAULTS[theirs or ours], ours
    # The one known exception: TRL multiplies the KL term by the importance ratio unless told
    # not to; fastalign's plain kl_coef is the classic per-token k3 (its fused kernel).
    assert TRL_DEFAULTS["use_bias_correction_kl"] and not DEFAULTS["use_bias_correction_kl"]
