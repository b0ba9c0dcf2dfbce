"""GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300) on the thin trainer layer: sample
groups of completions per prompt, score them with Python reward functions, normalize rewards
within each group into advantages, and take clipped policy-gradient steps whose log-probs come
from ``linear_logprobs`` (no logits). No value model.

    from fastalign.trainer import GRPOConfig, GRPOTrainer
    def brevity(prompts, completions):
        return [-len(c) / 100 for c in completions]
    GRPOTrainer(model, tokenizer, GRPOConfig(num_generations=8), prompts, [brevity]).train()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...losses import group_advantages
from ...nn import FusedPolicyLoss
from ..core.config import RLConfig, check_at_least, check_one_of, option
from ..core.loop import Trainer
from ..core.spec import TrainerSpec, progress_of
from ..models.adapter import IGNORE_INDEX, CausalLMAdapter, FrozenReference, completion_targets
from .best_of_n import RewardModelFunction
from .rl_options import REWARD_MODEL_HELP, REWARDS_HELP, RLOptions
from .rollout import (Rollouts, decoding_progress, generate_rollouts, held_out_reward_columns,
                      reward_columns, reward_name, check_rollout_dtype, sampler_copy)


# TRL's GRPOConfig.loss_type -> (policy_loss's loss_type, its aggregation), as TRL 1.16's
# GRPOTrainer._compute_loss reads them.
GRPO_LOSS_TYPES = {
    "grpo": ("clip", "seq_mean_token_mean"), "bnpo": ("clip", "token_mean"),
    "dapo": ("clip", "token_mean"), "dr_grpo": ("clip", "seq_mean_token_sum_norm"),
    "cispo": ("cispo", "token_mean"), "sapo": ("sapo", "seq_mean_token_mean"),
    "luspo": ("luspo", "seq_mean_token_sum"), "vespo": ("vespo", "token_mean")}
# CISPO's clip_high is the absolute cap of its ratio, not a clip range above 1.
CISPO_CLIP_HIGH = 5.0


@dataclass
class GRPOConfig(RLConfig):
    """GRPO: ``batch_size`` prompts per step, ``num_generations`` completions each; advantages
    are group-normalized rewards; ``num_iterations`` optimizer updates per batch of rollouts
    (importance ratios against the rollouts' log-probs); ``beta`` > 0 adds the KL estimate to a
    frozen reference (``monitor_kl`` keeps one to log the KL even at ``beta = 0``). ``loss_type``
    picks the aggregation: grpo (mean of sequence means), bnpo / dapo (token mean), dr_grpo (sum
    over batch x max_new_tokens). ``evaluate`` scores held-out greedy completions with the
    reward functions (``eval_rewards/...``, weighted sum ``eval_reward``)."""
    output_dir: str = option(
        "fastalign-grpo", "where the model, checkpoints, metrics.jsonl and metrics.png go")
    batch_size: int = option(4, "prompts per micro-batch (each sampled num_generations times)")
    num_generations: int = option(4, "completions per prompt (G), a group")
    loss_type: str = option(
        "grpo", "TRL's loss types: grpo (mean of sequence means), bnpo / dapo (token mean), "
                "dr_grpo (sum over batch x max_new_tokens) of the clipped surrogate; cispo "
                "(clip_high: the ratio's cap, default 5), sapo, luspo, vespo")
    beta: float = option(0.0, "weight of the KL estimate to the frozen reference (0: no "
                              "reference unless --monitor-kl)")
    num_iterations: int = option(1, "optimizer updates per batch of rollouts")
    scale_rewards: str = option("group", "advantage scale: group std, batch std or none (Dr. GRPO)")
    monitor_kl: bool = option(False, "keep a reference to log the KL even when beta is 0")

    def policy_loss_options(self, **more) -> dict:
        """``FusedPolicyLoss``'s options of this config (TRL's ``loss_type`` mapped)."""
        loss_type, aggregation = GRPO_LOSS_TYPES[self.loss_type]
        if loss_type == "cispo" and self.clip_high is None:
            more = {"clip_high": CISPO_CLIP_HIGH, **more}
        return super().policy_loss_options(loss_type, aggregation, kl_coef=self.beta,
                                           max_length=self.max_new_tokens, **more)

    def __post_init__(self):
        super().__post_init__()
        check_one_of("loss_type", self.loss_type, tuple(GRPO_LOSS_TYPES))
        self.policy_loss_options()  # checks the policy loss's options together
        check_one_of("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        check_at_least(self, 1, ["num_iterations"])
        check_at_least(self, 2, ["num_generations"])  # a group of one has no relative reward
        check_at_least(self, 0, ["beta"])  # 0: no KL term


class GRPOTrainer(Trainer):
    """Args:
        model: the policy, a ``transformers`` causal LM (or PEFT model around one).
        tokenizer: its tokenizer (a pad token is required).
        config: a ``GRPOConfig``.
        prompts: a list of prompts (text or chat messages), or of rows with a ``"prompt"``
            whose other fields (e.g. ``answer``) the reward functions get by name.
        reward_funcs: callables ``f(prompts, completions, **fields) -> list[float]`` (one
            reward per completion; prompts repeated to match; see ``rollout.reward_columns``)
            and/or reward models (sequence classifiers with one output, frozen; scored through
            ``reward_tokenizer``, default ``tokenizer``), summed with ``reward_weights``.
        eval_prompts: held-out prompts (as ``prompts``), scored on greedy completions by
            ``evaluate`` every ``config.eval_steps`` steps and at the end.
        ref_model: the frozen reference for ``beta > 0`` or ``monitor_kl`` (default: a PEFT
            model's base with its adapters disabled, else a copy of ``model``).
    """

    plot_panels = [("loss", ["loss"]), ("reward", ["reward", "reward_std", "eval_reward"]),
                   ("KL to the reference", ["kl"])]
    progress_bar_metrics = (("loss", "loss", ".4f"), ("reward", "reward", ".3f"),
                            ("eval_reward", "eval_reward", ".3f"))

    def __init__(self, model, tokenizer, config: GRPOConfig | None, prompts: list,
                 reward_funcs: list, *, reward_weights: list[float] | None = None,
                 reward_tokenizer=None, ref_model=None, eval_prompts: list | None = None):
        config = config or GRPOConfig()
        if not prompts:
            raise ValueError("prompts is empty")
        if not reward_funcs or not all(callable(f) for f in reward_funcs):
            raise ValueError("reward_funcs must be a non-empty list of callables "
                             "f(prompts, completions) -> list of floats")
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ValueError(f"reward_weights has {len(reward_weights)} entries for "
                             f"{len(reward_funcs)} reward functions")
        if reward_weights is not None and not all(
                isinstance(w, (int, float)) and math.isfinite(w) for w in reward_weights):
            raise ValueError(f"reward_weights must be finite numbers, got {reward_weights}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set one first, e.g. "
                             "tokenizer.pad_token = tokenizer.eos_token")
        super().__init__(model, tokenizer, config, list(prompts), list(eval_prompts or []))
        model = self.model  # with config.lora_r, the PEFT model around the one given
        check_rollout_dtype(self)
        self.reward_funcs = [RewardModelFunction(f, reward_tokenizer or tokenizer)
                             if isinstance(f, torch.nn.Module) else f for f in reward_funcs]
        self.reward_weights = list(reward_weights or [1.0] * len(reward_funcs))
        self.policy = CausalLMAdapter(model, padding_free=config.padding_free)
        self.loss = FusedPolicyLoss(
            ignore_index=IGNORE_INDEX, softcap=self.policy.softcap, **config.scoring,
            **config.policy_loss_options())
        self.reference = (
            FrozenReference(model, ref_model, padding_free=config.padding_free)
            if config.beta > 0 or config.monitor_kl else None)

    def on_wrapped(self, root):
        self.policy.root = root
        if self.reference is not None:
            self.reference.place(self.processes, root, self.config.precision)

    def rollout(self, prompts: list, seeds: list | None = None
                ) -> tuple[Rollouts, torch.Tensor, torch.Tensor]:
        """Rollouts of ``prompts`` (sampled with ``seeds``, one per prompt, see
        ``generate_rollouts``), their rewards ``[R]`` (the weighted sum of the reward
        functions; each function's mean is kept in ``self.reward_means`` for the metrics) and
        group advantages ``[R]``. On one process; ``prepare_step`` does the same over all."""
        rollouts, columns = self._sample(prompts, seeds)
        self.reward_means = {f"rewards/{reward_name(f)}": float(column.mean())
                             for f, column in zip(self.reward_funcs, columns)}
        rewards = torch.tensor(self.reward_weights) @ columns
        advantages = group_advantages(rewards, self.config.num_generations,
                                      scale=self.config.scale_rewards)
        return rollouts, rewards, advantages.to(self.device)

    def _sample(self, prompts: list, seeds: list | None) -> tuple[Rollouts, torch.Tensor]:
        """Rollouts of ``prompts`` and the reward functions' columns ``[F, R]``."""
        config = self.config
        count = len(prompts) * config.num_generations
        with decoding_progress(self, f"sampling {count} completions",
                               config.max_new_tokens) as bar:
            rollouts = generate_rollouts(
                self.model, self.tokenizer, prompts, num_generations=config.num_generations,
                max_new_tokens=config.max_new_tokens, **config.sampling, seeds=seeds,
                padding_free=config.padding_free,
                synced=self.processes.distributed and self.processes.parallelism == "fsdp",
                on_step=bar.update, sampler=sampler_copy(self.model, config.rollout_dtype),
                sampler_logprobs=config.keeps_sampler_logprobs)
        repeated = [prompts[i] for i in rollouts.prompt_index.tolist()]
        return rollouts, reward_columns(self.reward_funcs, repeated, rollouts.completions)

    def reference_logprobs(self, rollouts: Rollouts) -> torch.Tensor | None:
        if self.reference is None:
            return None
        return self.reference.completion_logprobs(**rollouts.model_inputs(),
                                                  **self.config.scoring)

    def prepare_step(self, micro_item_lists: list[list]) -> GRPOStep:
        """Rollouts of all this rank's prompts of the step at once, each sampled with a seed of
        its place in the step's global batch (the same completions on any number of processes
        and with any accumulation), rewards and group advantages (a prompt's group is on one
        rank; the rewards of all ranks are gathered, so ``scale_rewards="batch"`` sees the
        whole batch); the micro-batches are each prompt list's rows."""
        generations = self.config.num_generations
        prompts, seeds, real = self.seeded_prompts(micro_item_lists)
        rollouts, columns = self._sample(prompts, seeds)
        real = real.repeat_interleave(generations)  # a prompt's generations are adjacent
        # Every real rollout's reward columns [F, R_all], rank after rank: whole groups.
        everyone = self.processes.gather(columns[:, real].t().contiguous()).t()
        rewards = torch.tensor(self.reward_weights) @ everyone
        advantages = group_advantages(rewards, generations, scale=self.config.scale_rewards)
        counts = self.processes.gather_objects(int(real.sum()))
        offset = sum(counts[:self.processes.rank])
        local = torch.zeros(len(real))
        local[real] = advantages[offset:offset + counts[self.processes.rank]]
        lengths = self.processes.gather(
            rollouts.completion_mask[real.to(self.device)].sum(-1).float().cpu())
        bounds, start = [], 0
        for items in micro_item_lists:
            end = start + len(items) * generations
            bounds.append((start, end, not getattr(items, "padding", False)))
            start = end
        reward_means = {f"rewards/{reward_name(f)}": float(column.mean())
                        for f, column in zip(self.reward_funcs, everyone)}
        return GRPOStep(rollouts, rewards, local.to(self.device), self.reference_logprobs(rollouts),
                        bounds, reward_means, lengths)

    def updates(self, work: GRPOStep):
        """``num_iterations`` updates, each over the step's micro-batches of rollouts weighted
        by their share of the aggregation's normalizer over all ranks (tokens for a token
        mean, sequences otherwise), so their sum is the loss of all rollouts at once."""
        mask = work.rollouts.completion_mask[:, 1:]
        by_tokens = GRPO_LOSS_TYPES[self.config.loss_type][1] == "token_mean"
        sizes = [(mask[a:b].sum().float() if by_tokens else torch.tensor(float(b - a),
                                                                        device=mask.device))
                 * real for a, b, real in work.bounds]
        total = self.processes.sum(sum(sizes)).clamp(min=1)
        micro_batches = [(work.micro_batch(a, b), size / total)
                         for (a, b, _), size in zip(work.bounds, sizes)]
        for _ in range(self.config.num_iterations):
            yield micro_batches

    def compute_loss(self, batch: tuple[Rollouts, torch.Tensor, torch.Tensor | None]):
        """``FusedPolicyLoss`` (the config's loss type, + beta x KL, entropy bonus, rollout
        correction with the sampler's log-probs) of the policy on recorded rollouts:
        ``batch = (rollouts, advantages, ref_logprobs or None)``."""
        rollouts, advantages, ref_logprobs = batch
        targets = completion_targets(rollouts.input_ids, rollouts.completion_mask,
                                     rollouts.attention_mask)
        return self.policy.forward_with_head(
            lambda hidden, weight, bias: self.loss(
                hidden, weight, targets, advantages, bias=bias,
                old_logprobs=rollouts.old_logprobs, ref_logprobs=ref_logprobs,
                rollout_logprobs=rollouts.sampler_logprobs),
            rollouts.input_ids, rollouts.attention_mask, rollouts.position_ids)

    def step_metrics(self, work: GRPOStep) -> dict:
        """Of all ranks' rollouts."""
        return {"reward": work.rewards.mean(), "reward_std": work.rewards.std(),
                **work.reward_means, "completion_length": work.lengths.mean()}

    @torch.no_grad()
    def evaluate(self, prompts: list | None = None) -> dict:
        """The reward functions' means on greedy completions of the held-out prompts (default:
        ``eval_prompts``), ``eval_rewards/<name>`` and their weighted sum ``eval_reward``;
        ``{}`` without any. On several processes each rank completes its share."""
        prompts = self.eval_items if prompts is None else prompts
        if not prompts:
            return {}
        everyone = held_out_reward_columns(self, prompts, self.reward_funcs)  # [F, prompts]
        means = {f"eval_rewards/{reward_name(f)}": float(column.mean())
                 for f, column in zip(self.reward_funcs, everyone)}
        total = float((torch.tensor(self.reward_weights) @ everyone).mean())
        return {"eval_reward": total, **means}


@dataclass
class GRPOStep:
    """One step's rollouts on this rank ``[R, T]`` (a prompt's generations adjacent), their
    advantages ``[R]`` (0 on padding rows), reference log-probs (or None), each micro-batch's
    ``(start, end, real)`` rows; the rewards, the functions' means and the completion
    lengths of the real rollouts of all ranks."""
    rollouts: Rollouts
    rewards: torch.Tensor
    advantages: torch.Tensor
    ref_logprobs: torch.Tensor | None
    bounds: list[tuple[int, int, bool]]
    reward_means: dict
    lengths: torch.Tensor

    def micro_batch(self, start: int, end: int):
        ref = None if self.ref_logprobs is None else self.ref_logprobs[start:end]
        return self.rollouts.rows(start, end), self.advantages[start:end], ref


@dataclass
class GRPOOptions(RLOptions):
    rewards: str | None = option(None, REWARDS_HELP)
    reward_weights: str | None = option(
        None, "comma-separated weights, one per reward function, then one for --reward-model "
              "(default 1)")
    reward_model: str | None = option(None, REWARD_MODEL_HELP + ", scored after --rewards")


def _build(config: GRPOConfig, options: GRPOOptions) -> GRPOTrainer:
    model, tokenizer = options.seeded_policy(config)
    prompts, held_out = options.prompt_splits()
    functions, weights = options.reward_functions(options.rewards, options.reward_weights)
    return GRPOTrainer(model, tokenizer, config, prompts, functions, reward_weights=weights,
                       eval_prompts=held_out)


SPEC = TrainerSpec(
    name="grpo", help="GRPO with reward functions", config=GRPOConfig, options=GRPOOptions,
    build=_build, summary=progress_of("reward"), held_out="prompts, greedy",
    number_format=".3f",
    tiny_defaults=dict(learning_rate=1e-3, lr_schedule="constant", max_steps=30,
                       num_generations=8, max_new_tokens=24, beta=0.04))
