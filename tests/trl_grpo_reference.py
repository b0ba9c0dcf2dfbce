"""TRL 1.16's own GRPO loss on given per-token tensors, for parity tests: its real
``GRPOTrainer._compute_loss`` run on a bare trainer object (no model, no data, no generation)
whose log-prob function is stubbed to return the given log-probs and entropies; and the mapping
of TRL's ``GRPOConfig`` names onto ``fastalign.losses.policy_loss``'s options.

The one thing transcribed rather than called is the rollout importance-sampling ratio
(``trl_rollout_ratio``): TRL computes it inline in ``_generate_and_score_completions``, the
method that also generates, scores and gathers, so it cannot be called on given tensors.

Imported by test files (as ``helpers.py`` is); it needs ``trl`` (callers importorskip it)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from trl import GRPOConfig, GRPOTrainer

# GRPOConfig's own defaults, read off the dataclass rather than instantiated (a GRPOConfig
# builds TrainingArguments: an output dir, accelerate state): a case overrides only what it sets.
TRL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)
                if f.default is not dataclasses.MISSING}

# TRL's loss_type -> (fastalign loss_type, aggregation) (fastalign's aggregation None: the
# loss type's own; dapo/cispo/vespo normalize by num_items_in_batch, which for one process,
# one micro-batch and steps_per_generation = 1 is the token count: token_mean).
LOSS_TYPE_MAP = {
    "grpo": ("clip", "seq_mean_token_mean"), "bnpo": ("clip", "token_mean"),
    "dr_grpo": ("clip", "seq_mean_token_sum_norm"), "dapo": ("clip", "token_mean"),
    "cispo": ("cispo", "token_mean"), "sapo": ("sapo", "seq_mean_token_mean"),
    "luspo": ("luspo", None), "vespo": ("vespo", "token_mean"),
}


@dataclass
class Batch:
    """The per-token inputs of one micro-batch, ``[B, T]`` unless said: ``old`` None means
    on-policy (TRL: no ``old_per_token_logps``), ``sampling`` the sampler's log-probs (TRL's
    ``sampling_per_token_logps``; None: no vLLM), ``advantages`` ``[B]``, ``mask`` int64 as
    TRL builds ``completion_mask``."""
    old: torch.Tensor | None
    ref: torch.Tensor
    sampling: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor


def trl_config(**settings) -> SimpleNamespace:
    """GRPOConfig's defaults with ``settings``, plus what its ``__post_init__`` would resolve
    and ``_compute_loss`` reads: one generation step per optimizer step (its default
    ``steps_per_generation = gradient_accumulation_steps``)."""
    unknown = set(settings) - set(TRL_DEFAULTS)
    assert not unknown, f"not GRPOConfig fields: {sorted(unknown)}"
    args = SimpleNamespace(**{**TRL_DEFAULTS, **settings})
    args.steps_per_generation = args.gradient_accumulation_steps
    return args


class _OneProcess:
    """The accelerator of a single process: every collective is the identity."""
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor

    @staticmethod
    def pad_across_processes(tensor, dim=0, pad_index=0):
        return tensor


def bare_trainer(args: SimpleNamespace, logprobs: torch.Tensor, entropies: torch.Tensor):
    """A GRPOTrainer without ``__init__``: the attributes ``_compute_loss`` and its helpers
    read, set as ``GRPOTrainer.__init__`` sets them from ``args`` (trl 1.16,
    grpo_trainer.py ~L782-L1080; ``current_gradient_accumulation_steps`` is a plain attribute
    that transformers' Trainer sets per step: ``args.gradient_accumulation_steps``), and the
    model's log-prob function stubbed to return the given tensors (the gradient flows to
    them)."""
    trainer = object.__new__(GRPOTrainer)
    trainer.args = args
    trainer.loss_type = args.loss_type
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.beta = args.beta
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.use_vllm = args.use_vllm
    trainer.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    trainer.entropy_coef = args.entropy_coef
    trainer.use_adaptive_entropy = args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    trainer._last_world_entropy = float("inf")
    trainer._entropy_window_stats = None
    trainer.max_completion_length = args.max_completion_length
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = _OneProcess()

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                      compute_entropy=False, **_):
        assert compute_entropy and logits_to_keep == logprobs.shape[1]
        return logprobs, entropies, None
    trainer._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    return trainer


@torch.no_grad()
def trl_rollout_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL's ``importance_sampling_ratio`` (``[B, T]`` token modes, ``[B, 1]`` sequence modes),
    transcribed from ``GRPOTrainer._generate_and_score_completions`` (trl 1.16, grpo_trainer.py
    ~L2660-L2704; inline there, so it cannot be called): ``exp(old - sampling)`` of each token
    (NaN differences as 0), or of each sequence's sum, truncated to or masked outside
    ``[clip_min, clip_max]``."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    assert mode in ("sequence_mask", "token_mask"), mode
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)


def trl_loss(args: SimpleNamespace, batch: Batch, logprobs, entropies,
             num_items_in_batch: torch.Tensor | None = None):
    """``(loss, metrics)`` of TRL's ``GRPOTrainer._compute_loss`` on ``batch``: the loss
    differentiable to ``logprobs`` and ``entropies``, the metrics its last logged values.
    With ``args.gradient_accumulation_steps`` > 1, ``batch`` is one micro-batch of the
    generation batch and ``num_items_in_batch`` the completion tokens of all of them (default:
    ``batch``'s own)."""
    trainer = bare_trainer(args, logprobs, entropies)
    size, length = logprobs.shape
    mask = batch.mask
    if num_items_in_batch is None:
        num_items_in_batch = mask.sum()
    inputs = {
        "prompt_ids": torch.zeros(size, 1, dtype=torch.long),
        "prompt_mask": torch.ones(size, 1, dtype=torch.long),
        "completion_ids": torch.zeros(size, length, dtype=torch.long),
        "completion_mask": mask, "advantages": batch.advantages,
        "old_per_token_logps": batch.old, "num_items_in_batch": num_items_in_batch,
    }
    if args.beta != 0.0:
        inputs["ref_per_token_logps"] = batch.ref
    if args.use_vllm:
        assert batch.sampling is not None and batch.old is not None
        inputs["sampling_per_token_logps"] = batch.sampling
        if args.vllm_importance_sampling_correction:
            inputs["importance_sampling_ratio"] = trl_rollout_ratio(
                batch.old, batch.sampling, mask, args.vllm_importance_sampling_mode,
                args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max)
    loss = trainer._compute_loss(trainer.model, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def fastalign_options(args: SimpleNamespace) -> dict:
    """``policy_loss``'s options for TRL's ``args`` (the mapping fastalign documents)."""
    loss_type, aggregation = LOSS_TYPE_MAP[args.loss_type]
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    options = dict(
        loss_type=loss_type, aggregation=aggregation, clip_low=args.epsilon,
        clip_high=epsilon_high, delta=args.delta, level=args.importance_sampling_level,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg, vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg, entropy_coef=args.entropy_coef,
        top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        use_bias_correction_kl=args.use_bias_correction_kl, kl_coef=args.beta,
        kl_estimator="k3")
    if args.loss_type == "dr_grpo":
        options["max_length"] = args.max_completion_length
    if args.use_vllm and args.vllm_importance_sampling_correction:
        options.update(rollout_correction=args.vllm_importance_sampling_mode,
                       rollout_clip_min=args.vllm_importance_sampling_clip_min,
                       rollout_clip_max=args.vllm_importance_sampling_clip_max)
    return options


def fastalign_tensors(args: SimpleNamespace, batch: Batch) -> dict:
    """``policy_loss``'s (and ``FusedPolicyLoss``'s) keyword tensors for the same case: the
    reference only where TRL reads it (beta != 0), the sampler's log-probs where TRL has them."""
    return dict(old_logprobs=batch.old, ref_logprobs=batch.ref if args.beta != 0.0 else None,
                rollout_logprobs=batch.sampling if args.use_vllm else None)


def shared_metrics(args: SimpleNamespace, trl_metrics: dict) -> dict:
    """``{fastalign metric name: TRL's value}`` for the quantities both report the same way.
    Left out (deliberately different definitions; the test file's docstring says how): the
    clip fractions at the sequence level (TRL: a mean over sequences, fastalign: over tokens)
    and with ``delta < 1 + epsilon_high`` (TRL tests the delta-capped ratio)."""
    pairs = {"entropy": "entropy", "kl": "kl"}
    token_level = args.importance_sampling_level == "token"
    if args.loss_type == "vespo":
        pairs["vespo/phi_mean"] = "vespo/phi_seq_mean"
    elif args.loss_type == "cispo" and token_level:
        pairs["clip_fraction/high"] = "cispo_clip_ratio"
    elif args.loss_type not in ("cispo", "sapo") and token_level:
        epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        pairs["clip_fraction/low"] = "clip_ratio/low_mean"
        if args.delta is None or args.delta > 1 + epsilon_high:
            pairs["clip_fraction/high"] = "clip_ratio/high_mean"
    return {ours: trl_metrics[theirs] for ours, theirs in pairs.items() if theirs in trl_metrics}
