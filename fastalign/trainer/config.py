"""Training configurations: dataclasses with defaults, checked on creation, loadable from YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..losses.dpo import LOSS_TYPES

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")
REFERENCES = ("copy", "adapters", "precomputed")


@dataclass
class TrainConfig:
    """What every trainer shares. ``max_steps`` counts optimizer steps (each of
    ``gradient_accumulation_steps`` micro-batches of ``batch_size`` pairs); when it is None,
    ``epochs`` passes over the training data."""
    output_dir: str = "fastalign-output"
    learning_rate: float = 1e-5
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_steps: int = 0
    lr_schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 1024
    precision: str = "fp32"
    eval_batch_size: int = 16
    eval_steps: int | None = None
    logging_steps: int = 1
    save_steps: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        positive = ["learning_rate", "batch_size", "gradient_accumulation_steps", "epochs",
                    "max_length", "eval_batch_size", "logging_steps"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("max_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0")
        _check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _check_choice("precision", self.precision, PRECISIONS)

    @classmethod
    def from_dict(cls, values: dict):
        """A config from a dict (e.g. a parsed YAML file); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(names))}")
        return cls(**values)


@dataclass
class DPOConfig(TrainConfig):
    """DPO: ``loss_type`` is any of ``fastalign.losses.dpo_loss``'s (IPO gets length-averaged
    log-probs, as TRL's); the reference is a frozen ``copy`` of the model, the model with its
    LoRA ``adapters`` disabled, or ``precomputed`` once over the data and cached on disk."""
    output_dir: str = "fastalign-dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "copy"

    def __post_init__(self):
        super().__post_init__()
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("reference", self.reference, REFERENCES)
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta!r}")


@dataclass
class RewardConfig(TrainConfig):
    """Reward model: Bradley-Terry loss, optional per-row ``margin`` column, centering."""
    output_dir: str = "fastalign-rm"
    center_rewards_coefficient: float = 0.0


GRPO_LOSS_TYPES = {  # loss_type -> policy_loss aggregation
    "grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm"}
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class RLConfig(TrainConfig):
    """What PPO and GRPO share: sampling (``max_new_tokens``, ``temperature``, ``top_p``; the
    log-probs are taken at the sampling temperature), the clip range of the ratio
    (``clip_low``; ``clip_high`` defaults to it) and the KL estimator."""
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    clip_low: float = 0.2
    clip_high: float | None = None
    kl_estimator: str = "k3"

    def __post_init__(self):
        super().__post_init__()
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_positive_ints(self, ["max_new_tokens"])
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class GRPOConfig(RLConfig):
    """GRPO: ``batch_size`` prompts per step, ``num_generations`` completions each; advantages
    are group-normalized rewards; ``num_iterations`` optimizer updates per batch of rollouts
    (importance ratios against the rollouts' log-probs); ``beta`` > 0 adds the KL estimate to a
    frozen reference (``monitor_kl`` keeps one to log the KL even at ``beta = 0``). ``loss_type``
    picks the aggregation: grpo (mean of sequence means), bnpo / dapo (token mean), dr_grpo (sum
    over batch x max_new_tokens)."""
    output_dir: str = "fastalign-grpo"
    batch_size: int = 4
    num_generations: int = 4
    loss_type: str = "grpo"
    beta: float = 0.0
    num_iterations: int = 1
    scale_rewards: str = "group"
    monitor_kl: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_choice("loss_type", self.loss_type, tuple(GRPO_LOSS_TYPES))
        _check_choice("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        _check_positive_ints(self, ["num_generations", "num_iterations"])
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (0: no KL term), got {self.beta!r}")


@dataclass
class PPOConfig(RLConfig):
    """PPO with a learned reward model (Ouyang et al. 2022): ``batch_size`` prompts are rolled
    out per step (one completion each); per-token rewards are ``-kl_coef`` x the KL estimate to
    the reference plus the reward model's score on the last completion token; GAE (``gamma``,
    ``lam``) and whitened advantages; then ``ppo_epochs`` passes over the rollouts in
    ``mini_batch_size`` rows, each an optimizer update of the clipped policy loss plus
    ``vf_coef`` x the clipped value loss. ``missing_eos_penalty`` (when set) is subtracted from
    the score of completions cut at ``max_new_tokens`` without a stop token."""
    output_dir: str = "fastalign-ppo"
    batch_size: int = 8
    mini_batch_size: int = 4
    ppo_epochs: int = 4
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_positive_ints(self, ["mini_batch_size", "ppo_epochs"])
        if self.mini_batch_size > self.batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be <= batch_size "
                             f"({self.batch_size}), the rollouts of one step")
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError("kl_coef and vf_coef must be >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma!r} and "
                             f"{self.lam!r}")


def _check_positive_ints(config, names: list[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
