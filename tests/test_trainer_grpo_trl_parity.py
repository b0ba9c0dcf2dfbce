"""Parity with TRL 1.16 through fastalign's GRPOTrainer: for each TRL loss type, with the options
it is used with, the trainer's step loss on its own rollouts (``trainer.compute_loss``: the
fused head, the sampler's log-probs as rollout log-probs, its config's mapping of the options)
and its gradients w.r.t. the model's parameters equal TRL's own ``GRPOTrainer._compute_loss``
(``trl_grpo_reference.py``) run on per-token log-probs and entropies of the same perturbed
model at the trainer's temperature, unfused in fp32 (as TRL takes them), backpropagated to a
copy of the model.

TRL's inputs are the trainer's: old log-probs = ``rollouts.old_logprobs``, its sampler's
(vLLM's) = ``rollouts.sampler_logprobs``, the reference's = ``trainer.reference_logprobs``,
advantages = the trainer's group advantages, mask = ``completion_mask[:, 1:]``,
``max_completion_length`` = ``max_new_tokens``. The config maps onto TRL's GRPOConfig by name
(``trl_settings``): clip_low / clip_high = epsilon / epsilon_high (cispo's default cap 5.0 is
fastalign's: TRL's epsilon_high has none), rollout_correction / rollout_clip_* =
vllm_importance_sampling_mode / _clip_*, sampler log-probs kept (rollout_correction or
rollout_dtype set) = use_vllm. TRL's use_bias_correction_kl defaults to True, fastalign's to
False: each case sets it where beta > 0. A bf16 sampler (``rollout_dtype="bf16"``) differs
from the trainer's fp32 log-probs by ~1e-3, so its cases set rollout bounds that this crosses.

Why fp32 and not float64 for TRL: TRL takes the top-entropy threshold of ``.float()``
entropies; on float64 ones the fp32-rounded threshold can sit just above tokens whose entropy
it equals (the generations of one prompt share their first token's context, so its entropy is
tied), which TRL's ``>=`` then drops, an artefact of feeding it float64.

Gradient accumulation (``test_accumulated_step_equals_trl``: one step of two micro-batches,
``trainer.prepare_step`` / ``updates``, against TRL's ``_compute_loss`` per micro-batch with
``gradient_accumulation_steps=2`` and ``num_items_in_batch`` of both): equal for grpo, sapo,
dr_grpo, luspo (micro-batches of equal size weigh 1/2 in both) and dapo, cispo, vespo (a token
mean over the step in both). Two definitions differ on purpose, and the test pins how: TRL's
bnpo is a mean of each micro-batch's token mean, fastalign's the step's token mean (the same
loss with or without accumulation); and with a token-mean loss type fastalign weighs each
micro-batch's entropy bonus by its share of the step's tokens, TRL by 1/2."""

import copy
import math

import pytest
import torch
from conftest import assert_close
from helpers import RL_PROMPTS, lowercase_share, small_policy

pytest.importorskip("trl")
from fastalign.trainer import GRPOConfig, GRPOTrainer, byte_tokenizer  # noqa: E402
from trl_grpo_reference import Batch, shared_metrics, trl_config, trl_loss  # noqa: E402

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

TEMPERATURE, MAX_NEW_TOKENS, GENERATIONS = 0.7, 10, 4
TOLERANCE = 1e-5  # loss, gradients and metrics, relative
KL = dict(beta=0.04, use_bias_correction_kl=False)
KL_BIAS = dict(beta=0.1, use_bias_correction_kl=True)
BONUS, TOP = dict(entropy_coef=0.05), dict(top_entropy_quantile=0.5)
OFF = dict(off_policy_mask_threshold=0.1)
# GSPO's own clip range at the sequence level (a sequence's ratio is close to 1).
SEQ = dict(importance_sampling_level="sequence", clip_low=3e-4, clip_high=4e-4)
# A bf16 sampler and rollout bounds its ~1e-3 mismatch crosses (per token; per sequence).
BF16_TOKEN = dict(rollout_dtype="bf16", rollout_clip_min=0.999, rollout_clip_max=1.001)
BF16_SEQUENCE = dict(rollout_dtype="bf16", rollout_clip_min=0.998, rollout_clip_max=1.002)
CASES = {
    "grpo_kl": dict(loss_type="grpo", **KL),
    "grpo_sequence_kl_bias": dict(loss_type="grpo", **SEQ, **KL_BIAS),
    "bnpo_kl_bias_entropy": dict(loss_type="bnpo", **KL_BIAS, **BONUS),
    "dr_grpo_token_truncate_bf16": dict(loss_type="dr_grpo", rollout_correction="token_truncate",
                                        **BF16_TOKEN, **KL),
    "dapo_delta_top_entropy_bonus": dict(loss_type="dapo", clip_high=0.28, delta=1.5, **TOP,
                                         **BONUS),
    "dapo_off_policy_token_mask_bf16": dict(loss_type="dapo", clip_high=0.28, **OFF,
                                            rollout_correction="token_mask", **BF16_TOKEN),
    "cispo_entropy_sequence_truncate": dict(loss_type="cispo", clip_high=1.5, **BONUS,
                                            rollout_correction="sequence_truncate"),
    "sapo_sequence_mask_bf16_kl_bias": dict(loss_type="sapo", rollout_correction="sequence_mask",
                                            **BF16_SEQUENCE, **KL_BIAS),
    "luspo_sequence_delta_kl_entropy": dict(loss_type="luspo", **SEQ, delta=1.1, **KL, **BONUS),
    "vespo_token_truncate_bf16_top_off": dict(loss_type="vespo", **BF16_TOKEN, **TOP, **OFF,
                                              rollout_correction="token_truncate", **KL),
    "grpo_off_policy_sampler_bf16": dict(loss_type="grpo", rollout_dtype="bf16", **OFF),
}
ACCUMULATED = {
    "grpo_kl_entropy": dict(loss_type="grpo", **KL, **BONUS),
    "sapo_kl_bias": dict(loss_type="sapo", **KL_BIAS),
    "dr_grpo_token_mask_bf16": dict(loss_type="dr_grpo", rollout_correction="token_mask",
                                    **BF16_TOKEN),
    "luspo_sequence_kl": dict(loss_type="luspo", **SEQ, **KL),
    "dapo_kl_bias_top_entropy": dict(loss_type="dapo", clip_high=0.28, **KL_BIAS, **TOP),
    "cispo_sequence_truncate_bf16": dict(loss_type="cispo", clip_high=1.5,
                                         rollout_correction="sequence_truncate", **BF16_SEQUENCE),
    "vespo_off_policy_kl": dict(loss_type="vespo", **OFF, **KL),
    "bnpo_kl": dict(loss_type="bnpo", **KL),  # TRL: the micro-batches' token means, halved
    "dapo_entropy": dict(loss_type="dapo", **BONUS),  # TRL: each micro-batch's bonus halved
}


def trl_settings(config: GRPOConfig) -> dict:
    """TRL's GRPOConfig fields for fastalign's ``config`` (one process)."""
    options = config.policy_loss_options()
    assert options["kl_estimator"] == "k3"  # TRL's only estimator
    settings = dict(
        loss_type=config.loss_type, epsilon=config.clip_low, epsilon_high=options["clip_high"],
        delta=config.delta, beta=config.beta, use_bias_correction_kl=config.use_bias_correction_kl,
        importance_sampling_level=config.importance_sampling_level,
        entropy_coef=config.entropy_coef, top_entropy_quantile=config.top_entropy_quantile,
        off_policy_mask_threshold=config.off_policy_mask_threshold,
        max_completion_length=config.max_new_tokens, temperature=config.temperature,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        **{name: getattr(config, name) for name in (
            "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
            "vespo_k_neg", "vespo_lambda_neg")})
    if config.keeps_sampler_logprobs:  # the sampler's log-probs: TRL's vLLM ones
        settings.update(use_vllm=True,
                        vllm_importance_sampling_correction=config.rollout_correction is not None)
    if config.rollout_correction is not None:
        settings.update(vllm_importance_sampling_mode=config.rollout_correction,
                        vllm_importance_sampling_clip_min=config.rollout_clip_min,
                        vllm_importance_sampling_clip_max=config.rollout_clip_max)
    return settings


def trainer_of(tmp_path, options, **more):
    """A GRPOTrainer of ``small_policy(0)`` on the first two prompts (a ``small_policy(1)``
    reference where beta > 0)."""
    torch.manual_seed(0)
    config = GRPOConfig(output_dir=str(tmp_path), num_generations=GENERATIONS,
                        max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, progress=False,
                        **options, **more)
    return GRPOTrainer(small_policy(0), byte_tokenizer(), config, RL_PROMPTS[:2],
                       [lowercase_share], ref_model=small_policy(1) if config.beta > 0 else None)


def perturbed(trainer):
    """The policy moved since its rollouts (as after an update): ratios != 1, some clipped."""
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return trainer.model


def trl_inputs(model, rollouts, advantages, ref_logprobs):
    """A copy of ``model``, its per-token log-probs and entropies ``[R, T-1]`` at the
    temperature (TRL's ``_get_per_token_logps_and_entropies``, unfused, fp32; differentiable
    w.r.t. the copy), and the other inputs of TRL's loss as a ``Batch``."""
    copied = copy.deepcopy(model)
    hidden = copied.model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                          position_ids=rollouts.position_ids).last_hidden_state
    logp = torch.log_softmax(copied.lm_head(hidden)[:, :-1] / TEMPERATURE, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    logprobs = logp.gather(-1, rollouts.input_ids[:, 1:, None]).squeeze(-1)
    batch = Batch(old=rollouts.old_logprobs, sampling=rollouts.sampler_logprobs,
                  ref=torch.zeros_like(logprobs) if ref_logprobs is None else ref_logprobs,
                  advantages=advantages, mask=rollouts.completion_mask[:, 1:].long())
    return copied, logprobs, entropy, batch


def rows(batch: Batch, start: int, end: int) -> Batch:
    return Batch(*(None if x is None else x[start:end] for x in (
        batch.old, batch.ref, batch.sampling, batch.advantages, batch.mask)))


def compared_parameters(model):
    """``{name: parameter}`` whose gradients are compared: the lm_head (tied to the
    embedding) and a projection of the first layer, the farthest from the loss."""
    return {"lm_head.weight": model.lm_head.weight,
            "q_proj.weight": model.model.layers[0].self_attn.q_proj.weight}


def assert_same(case, ours, theirs, policy, copied):
    """The losses within ``TOLERANCE`` of TRL's, and the gradients they left."""
    error = abs(ours.item() - theirs.item()) / abs(theirs.item())
    assert error <= TOLERANCE, f"{case} loss {ours.item()} vs TRL {theirs.item()}: {error:.3g}"
    wanted = compared_parameters(copied)
    for name, parameter in compared_parameters(policy).items():
        assert_close(parameter.grad, wanted[name].grad, TOLERANCE, f"{case} gradient {name}")


def assert_branches_taken(config, metrics, log_ratio, mask):
    """Each option of the case changes something here (the cases would otherwise pass with it
    ignored): ``log_ratio`` and ``mask`` ``[R, T-1]`` are TRL's."""
    if config.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo"):
        assert metrics.get("clip_fraction/low", 0) + metrics["clip_fraction/high"] > 0
    if config.delta is not None:
        if config.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1)
        assert log_ratio.max() > math.log(config.delta)
    if config.off_policy_mask_threshold is not None:
        assert 0 < metrics["off_policy_mask/dropped_fraction"] < 1
    if config.top_entropy_quantile < 1:
        assert 0 < metrics["entropy_mask/kept_fraction"] < 1
    if config.rollout_correction is not None and config.rollout_dtype is not None:
        assert 0 < metrics["rollout/corrected_fraction"] < 1
    if config.beta > 0:
        assert metrics["kl"] > 0
    assert 0 < mask.sum() < mask.numel()


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_step_loss_equals_trl(tmp_path, case):
    trainer = trainer_of(tmp_path, CASES[case], batch_size=2)
    config = trainer.config
    rollouts, rewards, advantages = trainer.rollout(RL_PROMPTS[:2])
    ref_logprobs = trainer.reference_logprobs(rollouts)
    assert (rollouts.sampler_logprobs is not None) == config.keeps_sampler_logprobs
    assert rewards.std() > 0
    policy = perturbed(trainer)
    loss, metrics = trainer.compute_loss((rollouts, advantages, ref_logprobs))
    loss.backward()
    metrics = {name: float(value) for name, value in metrics.items()}

    args = trl_config(**trl_settings(config))
    copied, logprobs, entropies, batch = trl_inputs(policy, rollouts, advantages, ref_logprobs)
    theirs, trl_metrics = trl_loss(args, batch, logprobs, entropies)
    theirs.backward()
    assert_branches_taken(config, metrics, logprobs.detach() - batch.old, batch.mask)
    assert_same(case, loss, theirs, policy, copied)
    for name, value in shared_metrics(args, trl_metrics).items():
        assert_close(torch.tensor(metrics[name]), torch.tensor(value), TOLERANCE,
                     f"{case} metric {name}")


@pytest.mark.parametrize("case", list(ACCUMULATED))
def test_accumulated_step_equals_trl(tmp_path, case):
    """One step of two micro-batches of one prompt each, as ``training_step`` runs it
    (``prepare_step``, then ``updates``' weighted micro-batches), against TRL's loss summed
    over the same two micro-batches of its generation batch."""
    trainer = trainer_of(tmp_path, ACCUMULATED[case], batch_size=1, seed=3,  # 40, 33 tokens
                         gradient_accumulation_steps=2)
    config = trainer.config
    work = trainer.prepare_step([RL_PROMPTS[:1], RL_PROMPTS[1:2]])
    policy = perturbed(trainer)
    (micro_batches,) = list(trainer.updates(work))
    losses = [trainer.compute_loss(micro) for micro, _ in micro_batches]
    weights = [float(weight) for _, weight in micro_batches]
    # TRL's weights where it defines the step's loss otherwise (the module docstring).
    bonus_differs = config.loss_type == "dapo" and config.entropy_coef > 0
    trl_weights = [0.5, 0.5] if config.loss_type == "bnpo" else weights
    ours = sum(loss * weight for (loss, _), weight in zip(losses, trl_weights))
    ours.backward()
    if bonus_differs:  # TRL's bonus: halved
        ours = ours.detach() + config.entropy_coef * sum(
            (weight - 0.5) * metrics["entropy"] for (_, metrics), weight in zip(losses, weights))

    args = trl_config(**trl_settings(config))
    copied, logprobs, entropies, batch = trl_inputs(policy, work.rollouts, work.advantages,
                                                    work.ref_logprobs)
    theirs = sum(trl_loss(args, rows(batch, start, end), logprobs[start:end],
                          entropies[start:end], num_items_in_batch=batch.mask.sum())[0]
                 for start, end, _ in work.bounds)
    theirs.backward()
    tokens = [batch.mask[start:end].sum().item() for start, end, _ in work.bounds]
    assert work.bounds == [(0, GENERATIONS, True), (GENERATIONS, 2 * GENERATIONS, True)]
    assert tokens[0] != tokens[1]  # so that a token mean over the step is no mean of means
    assert all(work.rewards[start:end].std() > 0 for start, end, _ in work.bounds)
    assert_branches_taken(config, {name: float(value) for name, value in losses[0][1].items()},
                          logprobs.detach()[:GENERATIONS] - batch.old[:GENERATIONS],
                          batch.mask[:GENERATIONS])
    if config.loss_type == "bnpo" or bonus_differs:
        assert abs(weights[0] - 0.5) > 0.01  # the difference is real here
    if bonus_differs:
        # Only the loss: the bonus's gradient with TRL's weights is not the trainer's to give.
        error = abs(ours.item() - theirs.item()) / abs(theirs.item())
        assert error <= TOLERANCE, f"{case} loss {ours.item()} vs TRL {theirs.item()}"
    else:
        assert_same(case, ours, theirs, policy, copied)
