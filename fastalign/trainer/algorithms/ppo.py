"""PPO with a learned reward model (stage two of RLHF, Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155) on the thin trainer layer, with the four models of the recipe:

- the **policy** (trained), whose log-probs and entropy come from ``FusedPolicyLoss`` (no
  logits);
- the **reference** (frozen): per-token rewards carry ``-kl_coef`` x a KL estimate to it;
- the **reward model** (frozen, e.g. from ``RewardTrainer``): scores each finished completion;
- the **value model** (trained jointly): a value head on the policy's backbone (the default,
  one forward pass for both) or a separate sequence-classification model.

    from fastalign.trainer import PPOConfig, PPOTrainer
    PPOTrainer(policy, tokenizer, PPOConfig(), prompts, reward_model).train()

On several processes each rank samples and scores its own prompts (each completion from a seed
of its place in the global batch); whitening and the metrics use all ranks' rollouts, and every
update takes the same global mini-batch of rows as one process would, each rank running its
rows of it: the updates equal one process's with the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...losses import gae, kl_estimate, value_loss, whiten
from ...losses._reduce import masked_var
from ...nn import FusedPolicyLoss
from ..core.config import ConfigError, RLConfig, check_at_least, check_greater, option
from ..core.loop import Trainer
from ..core.spec import TrainerSpec, progress_of
from ..models.adapter import IGNORE_INDEX, CausalLMAdapter, FrozenReference, completion_targets
from .best_of_n import RewardModelFunction, check_reward_model, score_with_reward_model
from .rewards import reward_function
from .rl_options import REWARD_MODEL_HELP, RLOptions
from .rollout import (Rollouts, check_rollout_dtype, decoding_progress, generate_rollouts,
                      held_out_reward_columns, reward_name, sampler_copy)

VALUE_HEAD_FILE = "value_head.safetensors"  # weight [1, D], bias [1]


@dataclass
class PPOConfig(RLConfig):
    """PPO with a learned reward model (Ouyang et al. 2022): ``batch_size`` prompts are rolled
    out per step (one completion each); per-token rewards are ``-kl_coef`` x the KL estimate to
    the reference plus the reward model's score on the last completion token; GAE (``gamma``,
    ``lam``) and whitened advantages; then ``ppo_epochs`` passes over the rollouts in
    ``mini_batch_size`` rows, each an optimizer update of the clipped policy loss plus
    ``vf_coef`` x the clipped value loss. ``missing_eos_penalty`` (when set) is subtracted from
    the score of completions cut at ``max_new_tokens`` without a stop token. ``evaluate``
    scores held-out greedy completions with the reward model (``eval_score``) and any
    ``eval_reward_funcs`` (``eval_rewards/...``, measured, not trained on)."""
    output_dir: str = option(
        "fastalign-ppo", "where the model, checkpoints, metrics.jsonl and metrics.png go")
    batch_size: int = option(8, "prompts rolled out per step (one completion each)")
    mini_batch_size: int = option(4, "rollouts per PPO update")
    ppo_epochs: int = option(4, "passes over each batch of rollouts")
    kl_coef: float = option(0.05, "weight of the per-token KL penalty in the rewards")
    kl_estimator: str = option("k1", "k1, k2 or k3 estimate of the KL to the reference")
    gamma: float = option(1.0, "discount of future rewards (GAE)")
    lam: float = option(0.95, "GAE lambda: bias/variance of the advantages")
    value_clip: float = option(0.2, "clip range of the value loss")
    vf_coef: float = option(0.1, "weight of the value loss")
    whiten_rewards: bool = option(False, "normalize the per-token rewards (keeping their mean)")
    missing_eos_penalty: float | None = option(
        None, "subtracted from the score of completions without a stop token")

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, ["mini_batch_size", "ppo_epochs"])
        self.policy_loss_options(aggregation="token_mean")  # checks them together
        if self.mini_batch_size > self.batch_size:
            raise ConfigError(f"mini_batch_size ({self.mini_batch_size}) must be <= batch_size "
                              f"({self.batch_size}), the rollouts of one step")
        check_at_least(self, 0, ["kl_coef", "vf_coef"])
        check_greater(self, 0, ["value_clip"])
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


@dataclass
class Experience:
    """One step's rollouts and everything PPO derives from them before updating, all
    ``[R, T-1]`` over next-token positions (``mask`` = a completion token follows) but
    ``scores`` ``[R]``."""
    rollouts: Rollouts
    targets: torch.Tensor
    mask: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    real: torch.Tensor  # [R] bool: False on a padding row (see core.loop.Share)


class PPOTrainer(Trainer):
    """Args:
        model: the policy, a ``transformers`` causal LM (or PEFT model around one).
        tokenizer: its tokenizer (a pad token is required).
        config: a ``PPOConfig``.
        prompts: a list of prompts (text or chat messages).
        reward_model: a sequence-classification model with one output (frozen here).
        reward_tokenizer: the reward model's tokenizer (default: ``tokenizer``); completions
            are re-tokenized with it, so the two models may have different vocabularies.
        ref_model: the frozen reference (default: a PEFT model's base with its adapters
            disabled, else a copy of ``model``).
        value_model: a sequence-classification model whose ``score`` head gives a value per
            token (trained jointly), or None (default) for a value head on the policy's backbone.
        eval_prompts: held-out prompts, whose greedy completions ``evaluate`` scores every
            ``config.eval_steps`` steps and at the end.
        eval_reward_funcs: reward functions (as GRPO's, e.g. a verifier) that ``evaluate``
            scores those completions with beside the reward model: a check of what the reward
            model teaches, never trained on.
    """

    plot_panels = [("reward model score", ["score", "eval_score"]),
                   ("KL to the reference", ["kl"]), ("losses", ["policy_loss", "value_loss"]),
                   ("value fit", ["explained_variance"])]
    progress_bar_metrics = (("score", "score", ".3f"), ("kl", "kl", ".3f"),
                            ("eval_score", "eval_score", ".3f"))

    def __init__(self, model, tokenizer, config: PPOConfig | None, prompts: list, reward_model,
                 *, reward_tokenizer=None, ref_model=None, value_model=None,
                 eval_prompts: list | None = None, eval_reward_funcs: list | None = None):
        config = config or PPOConfig()
        if not prompts:
            raise ValueError("prompts is empty")
        check_reward_model(reward_model)
        if not all(callable(f) for f in eval_reward_funcs or []):
            raise ValueError("eval_reward_funcs must be callables "
                             "f(prompts, completions) -> list of floats")
        if value_model is not None and not hasattr(value_model, "score"):
            raise TypeError(f"value_model ({type(value_model).__name__}) has no `score` head: "
                            "pass a *ForSequenceClassification model, or None for a value head "
                            "on the policy")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set one first, e.g. "
                             "tokenizer.pad_token = tokenizer.eos_token")
        super().__init__(model, tokenizer, config, list(prompts), list(eval_prompts or []))
        model = self.model  # with config.lora_r, the PEFT model around the one given
        if self.processes.distributed and value_model is not None:
            raise NotImplementedError(
                "a separate value_model is not supported on several processes yet; leave "
                "value_model=None (a value head on the policy, trained with it)")
        self.policy = CausalLMAdapter(model, padding_free=config.padding_free)
        if value_model is None:  # zero-initialized: values start at 0, the mean return early on
            hidden_size = self.policy.lm_head.weight.shape[1]
            self.value_module = torch.nn.Linear(hidden_size, 1, device=self.device)
            torch.nn.init.zeros_(self.value_module.weight)
            torch.nn.init.zeros_(self.value_module.bias)
        else:
            self.value_module = value_model
        self.shared_value_head = value_model is None
        self.value_root = self.value_module  # its DDP wrapper on several processes
        self.reward_model = reward_model.eval().requires_grad_(False)
        self.reward_tokenizer = reward_tokenizer or tokenizer
        self.eval_reward_funcs = list(eval_reward_funcs or [])
        self.reference = FrozenReference(model, ref_model, padding_free=config.padding_free)
        check_rollout_dtype(self)
        self.policy_loss = FusedPolicyLoss(
            **config.scoring, softcap=self.policy.softcap,
            ignore_index=IGNORE_INDEX, **config.policy_loss_options(aggregation="token_mean"))

    def on_wrapped(self, root):
        self.policy.root = root
        self.value_root = self.processes.wrap(self.value_module, self.config.precision,
                                              per_layer=False)
        self.reference.place(self.processes, root, self.config.precision)

    def wrapped_roots(self):
        return [self.root, self.value_root]

    def trained_modules(self):
        return [self.model, self.value_module]

    def extra_state(self):
        return {"value": self.processes.module_state(self.value_module)}

    def load_extra_state(self, state):
        self.processes.load_module_state(self.value_module, state["value"])

    def gathered_state(self):
        return {"model": self.processes.model_state(self.model),
                "value": self.processes.module_state(self.value_module)}

    def save_model(self, directory, state_dict=None):
        state = state_dict or {"model": None, "value": self.value_module.state_dict()}
        super().save_model(directory, state["model"])
        if self.shared_value_head:
            from safetensors.torch import save_file
            save_file(state["value"], directory / VALUE_HEAD_FILE)
        else:
            self.value_module.save_pretrained(directory / "value_model", safe_serialization=True)

    # -- values -------------------------------------------------------------------------------
    def values(self, inputs: dict, policy_hidden: torch.Tensor) -> torch.Tensor:
        """``[R, T-1]`` float32 value of each position (the state before the next token)."""
        if self.shared_value_head:
            return self.value_root(policy_hidden.to(self.value_module.weight.dtype)
                                   ).squeeze(-1).float()
        hidden = self.value_module.base_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"], use_cache=False).last_hidden_state
        return self.value_module.score(hidden[:, :-1]).squeeze(-1).float()

    # -- experience ---------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list, seeds: list | None = None,
                real: torch.Tensor | None = None) -> Experience:
        """Samples one completion per prompt (with ``seeds``, see ``generate_rollouts``) and
        computes scores, per-token rewards, values, GAE advantages (whitened over the ``real``
        rows of all ranks: default all) and returns."""
        config = self.config
        processes = self.processes
        with decoding_progress(self, f"sampling {len(prompts)} completions",
                               config.max_new_tokens) as bar:
            rollouts = generate_rollouts(
                self.model, self.tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                **config.sampling, logprobs=False, seeds=seeds,
                synced=processes.distributed and processes.parallelism == "fsdp",
                on_step=bar.update, sampler=sampler_copy(self.model, config.rollout_dtype),
                sampler_logprobs=config.keeps_sampler_logprobs)
        inputs = rollouts.model_inputs()
        targets = completion_targets(rollouts.input_ids, rollouts.completion_mask,
                                     rollouts.attention_mask)
        mask = (targets != IGNORE_INDEX).float()
        real = torch.ones(len(prompts), dtype=torch.bool) if real is None else real
        whole = mask * real.to(mask.device)[:, None]  # the rows whitening and metrics see
        # One pass of the model gives the old log-probs and (with the shared head) the values,
        # in eval mode as the tokens were sampled.
        was_training = self.model.training
        self.model.eval()
        rollouts.old_logprobs, values = self.policy.forward_with_head(
            lambda hidden, weight, bias: (
                self.policy.head_logprobs(hidden, weight, bias, targets, **config.scoring),
                self.values(inputs, hidden) if self.shared_value_head else None),
            rollouts.input_ids, rollouts.attention_mask, rollouts.position_ids)
        if values is None:
            values = self.values(inputs, None)
        values = values * mask
        self.model.train(was_training)
        scores = score_with_reward_model(self.reward_model, self.reward_tokenizer, prompts,
                                         rollouts.completions).to(self.device)
        if config.missing_eos_penalty is not None:
            stopped = ((rollouts.input_ids == self.tokenizer.eos_token_id)
                       & rollouts.completion_mask.bool()).any(-1)
            scores = scores - config.missing_eos_penalty * (~stopped).float()
        ref_logprobs = self.reference.completion_logprobs(**inputs, **config.scoring)
        kl = kl_estimate(rollouts.old_logprobs, ref_logprobs, config.kl_estimator) * mask
        rewards = -config.kl_coef * kl
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        rewards[torch.arange(len(prompts), device=mask.device), last] += scores
        if config.whiten_rewards:
            rewards = whiten(rewards, whole, shift_mean=False, processes=processes)
        advantages, returns = gae(rewards, values, mask, gamma=config.gamma, lam=config.lam)
        return Experience(rollouts, targets, mask, ref_logprobs, kl, values, scores, rewards,
                          whiten(advantages, whole, processes=processes), returns, real)

    # -- the update ---------------------------------------------------------------------------
    def prepare_step(self, micro_item_lists: list[list]) -> Experience:
        """The rollouts of all this rank's prompts of the step, one completion each, sampled
        with seeds of their places in the global batch, and what PPO derives from them."""
        return self.rollout(*self.seeded_prompts(micro_item_lists))

    def updates(self, experience: Experience):
        """``ppo_epochs`` shuffled passes over the rollouts in mini-batches of
        ``mini_batch_size x world size x gradient_accumulation_steps`` rows, each one update of
        ``gradient_accumulation_steps`` micro-batches per rank weighted by their share of its
        tokens (both losses are token means)."""
        config, accumulation = self.config, self.config.gradient_accumulation_steps
        processes = self.processes
        # The real rows of all ranks, numbered rank after rank: this rank holds [first, end).
        counts = processes.gather_objects(int(experience.real.sum()))
        first = sum(counts[:processes.rank])
        end = first + counts[processes.rank]
        local = experience.real.nonzero().squeeze(-1).to(self.device)  # local row of each
        rows_per_update = config.mini_batch_size * processes.world_size * accumulation
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.step)
        for _ in range(config.ppo_epochs):
            order = torch.randperm(sum(counts), generator=generator).to(self.device)
            for start in range(0, len(order), rows_per_update):
                rows = order[start:start + rows_per_update]
                mine = local[rows[(rows >= first) & (rows < end)] - first]
                tokens = processes.sum(experience.mask[mine].sum()).clamp(min=1)
                # The same number of micro-batches on every rank (FSDP2's collectives):
                # an empty one reruns row 0 with weight 0.
                padding = ((experience, torch.zeros(1, dtype=torch.long, device=self.device)),
                           torch.zeros((), device=self.device))
                parts = [part for part in mine.tensor_split(accumulation)
                         if len(part) or processes.distributed]  # one process: no padding
                yield [((experience, part), experience.mask[part].sum() / tokens) if len(part)
                       else padding for part in parts]

    def compute_loss(self, batch: tuple[Experience, torch.Tensor]):
        """Clipped policy loss + ``vf_coef`` x clipped value loss on rows ``batch[1]`` of the
        rollouts ``batch[0]``."""
        experience, rows = batch
        config = self.config
        inputs = {name: value[rows] for name, value in experience.rollouts.model_inputs().items()}
        sampler = experience.rollouts.sampler_logprobs

        def head_fn(hidden, weight, bias):
            policy = self.policy_loss(
                hidden, weight, experience.targets[rows], experience.advantages[rows],
                bias=bias, old_logprobs=experience.rollouts.old_logprobs[rows],
                rollout_logprobs=None if sampler is None else sampler[rows])
            return policy, self.values(inputs, hidden) if self.shared_value_head else None

        (loss, metrics), values = self.policy.forward_with_head(
            head_fn, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
        if values is None:
            values = self.values(inputs, None)
        v_loss, v_metrics = value_loss(values, experience.values[rows], experience.returns[rows],
                                       experience.mask[rows], clip=config.value_clip)
        metrics = {"policy_loss": loss.detach(), "value_loss": v_loss.detach(),
                   "value_clip_fraction": v_metrics["clip_fraction"],
                   "values/mean": v_metrics["values/mean"], **metrics}
        return loss + config.vf_coef * v_loss, metrics

    def step_metrics(self, experience: Experience) -> dict:
        return self.experience_metrics(experience)

    def experience_metrics(self, experience: Experience) -> dict:
        """What the rollouts say before the update: reward-model score, KL to the reference
        (the sequence sum of the estimate), the total reward, how well values fit returns."""
        real = experience.real.to(self.device)
        gather = self.processes.gather
        mask = experience.mask * real[:, None]
        residual = (experience.returns - experience.values) * mask
        explained = 1 - (masked_var(residual, mask, self.processes)
                         / masked_var(experience.returns, mask, self.processes).clamp(min=1e-8))
        scores, kl = gather(experience.scores[real]), gather(experience.kl.sum(-1)[real])
        return {"score": scores.mean(), "kl": kl.mean(),
                "reward": (scores - self.config.kl_coef * kl).mean(),
                "explained_variance": explained,
                "completion_length": gather(mask.sum(-1)[real]).mean()}

    @torch.no_grad()
    def evaluate(self, prompts: list | None = None) -> dict:
        """Means over greedy completions of the held-out prompts (default: ``eval_prompts``):
        the reward model's score ``eval_score`` and each of ``eval_reward_funcs``
        (``eval_rewards/<name>``); ``{}`` without prompts. On several processes each rank
        completes its share."""
        prompts = self.eval_items if prompts is None else prompts
        if not prompts:
            return {}
        scorer = RewardModelFunction(self.reward_model, self.reward_tokenizer)
        columns = held_out_reward_columns(self, prompts, [scorer, *self.eval_reward_funcs])
        return {"eval_score": float(columns[0].mean()),
                **{f"eval_rewards/{reward_name(f)}": float(column.mean())
                   for f, column in zip(self.eval_reward_funcs, columns[1:])}}

@dataclass
class PPOOptions(RLOptions):
    eval_rewards: str | None = option(
        None, "comma-separated reward functions (as grpo's --rewards, e.g. "
              "correct_answer,answer_format) that score the held-out completions beside the "
              "reward model: measured, not trained on")
    reward_model: str | None = option(None, REWARD_MODEL_HELP, required=True)


def _build(config: PPOConfig, options: PPOOptions) -> PPOTrainer:
    if not options.reward_model:
        raise ValueError("PPO needs --reward-model (e.g. the output of fastalign train rm)")
    model, tokenizer = options.seeded_policy(config)
    prompts, held_out = options.prompt_splits()
    checks = [reward_function(name.strip()) for name in (options.eval_rewards or "").split(",")
              if name.strip()]
    if checks and not held_out:
        raise ValueError("--eval-rewards scores held-out prompts and there are none: pass "
                         "--eval-prompts FILE, or --prompts with 'test' rows (arithmetic)")
    scorer, reward_tokenizer = options.scorer()
    return PPOTrainer(model, tokenizer, config, prompts, scorer, reward_tokenizer=reward_tokenizer,
                      eval_prompts=held_out, eval_reward_funcs=checks)


SPEC = TrainerSpec(
    name="ppo", help="PPO with a reward model", config=PPOConfig, options=PPOOptions,
    build=_build, summary=progress_of("score"), held_out="prompts, greedy",
    number_format=".3f",
    tiny_defaults=dict(learning_rate=1e-3, lr_schedule="constant", max_steps=30, batch_size=16,
                       mini_batch_size=8, ppo_epochs=2, max_new_tokens=24, kl_coef=0.05))
