"""Training configurations: dataclasses with defaults, checked on creation, loadable from YAML.

Every option is checked when a config is built: its type (an ``int`` option takes no 2.5, a
float no NaN or infinity, a bool no "yes"), then its range. A bad value is a ``ConfigError``
(a ``ValueError``) naming the option, so a run never starts on a setting that would train on
NaN, backwards or not at all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ...losses.dpo import LOSS_TYPES

SCHEDULES = ("linear", "cosine", "constant")
NONFINITE_POLICIES = ("stop", "skip")
REPORTERS = ("none", "tensorboard")
PRECISIONS = ("fp32", "bf16")
REFERENCES = ("auto", "copy", "adapters", "precomputed")
PARALLELISMS = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """What every trainer shares. ``max_steps`` counts optimizer steps (each of
    ``gradient_accumulation_steps`` micro-batches of ``batch_size`` pairs per process); when it
    is None, ``epochs`` passes over the training data. On several processes (``torchrun``) the
    global batch is ``batch_size x world size x gradient_accumulation_steps`` and
    ``parallelism`` picks the engine: DDP, or FSDP2 sharding. ``lora_r > 0`` trains LoRA
    adapters (PEFT) on ``lora_target_modules`` instead of the whole model, and
    ``gradient_checkpointing`` recomputes activations in the backward (``trainer.models.lora``);
    ``padding_free`` packs each batch's sequences into fewer rows (``trainer.models.packing``)."""
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
    precision: str = "fp32"
    logging_steps: int = 1
    save_steps: int | None = None
    seed: int = 0
    progress: bool = True

    overwrite: bool = False
    on_nonfinite: str = "stop"
    report_to: str = "none"
    parallelism: str = "ddp"
    dist_timeout: float = 600.0
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    gradient_checkpointing: bool = False
    padding_free: bool = False

    def __post_init__(self):
        _check_types(self)
        _check_at_least(self, 1, ["batch_size", "gradient_accumulation_steps", "logging_steps",
                                  "max_steps", "save_steps"])
        _check_at_least(self, 0, ["warmup_steps", "weight_decay", "seed"])
        _check_greater(self, 0, ["learning_rate", "epochs"])
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ConfigError(f"max_grad_norm must be > 0 (the clipping norm), or 0 / None for "
                              f"no clipping, got {self.max_grad_norm!r}")
        _check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        _check_choice("report_to", self.report_to, REPORTERS)
        _check_choice("parallelism", self.parallelism, PARALLELISMS)
        _check_greater(self, 0, ["dist_timeout"])
        _check_at_least(self, 0, ["lora_r"])
        _check_greater(self, 0, ["lora_alpha"])
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.lora_target_modules.replace(",", "").strip():
            raise ConfigError("lora_target_modules must name modules (comma-separated, e.g. "
                              "q_proj,v_proj) or be all-linear, got an empty value")

    @classmethod
    def from_dict(cls, values: dict):
        """A config from a dict (e.g. a parsed YAML file): unknown keys are an error, and
        numbers written as text are read as numbers (YAML 1.1, PyYAML's dialect, reads
        ``1e-3`` as the string "1e-3")."""
        if not isinstance(values, dict):
            raise ConfigError(f"a {cls.__name__} needs a mapping of options, got "
                              f"{type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(fields))}")
        coerced = {name: _from_text(fields[name], value) for name, value in values.items()}
        return cls(**coerced)

    def to_dict(self) -> dict:
        """The options as plain data (saved with checkpoints, compared on resume)."""
        return dataclasses.asdict(self)


@dataclass
class PreferenceConfig(TrainConfig):
    """What the trainers on preference pairs (DPO, reward model) add: the length limit of
    prompt + completion, and evaluation on held-out pairs."""
    max_length: int = 1024
    eval_batch_size: int = 16
    eval_steps: int | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_at_least(self, 1, ["max_length", "eval_batch_size", "eval_steps"])


@dataclass
class DPOConfig(PreferenceConfig):
    """DPO: ``loss_type`` is any of ``fastalign.losses.dpo_loss``'s (IPO gets length-averaged
    log-probs, as TRL's); the reference is a frozen ``copy`` of the model, the model with its
    LoRA ``adapters`` disabled, or ``precomputed`` once over the data and cached on disk;
    ``auto`` (the default) is ``adapters`` for a LoRA model, else ``copy``."""
    output_dir: str = "fastalign-dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("reference", self.reference, REFERENCES)
        _check_greater(self, 0, ["beta"])
        if not 0 <= self.label_smoothing < 0.5:  # robust DPO divides by 1 - 2 * smoothing
            raise ConfigError(f"label_smoothing must be in [0, 0.5) (the assumed share of "
                              f"flipped labels), got {self.label_smoothing!r}")


@dataclass
class RewardConfig(PreferenceConfig):
    """Reward model: Bradley-Terry loss, optional per-row ``margin`` column, centering."""
    output_dir: str = "fastalign-rm"
    center_rewards_coefficient: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check_at_least(self, 0, ["center_rewards_coefficient"])


GRPO_LOSS_TYPES = {  # loss_type -> policy_loss aggregation
    "grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm"}
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class RLConfig(TrainConfig):
    """What PPO and GRPO share: sampling (``max_new_tokens``, ``temperature``, ``top_p``; the
    log-probs are taken at the sampling temperature), the clip range of the ratio
    (``clip_low``; ``clip_high`` defaults to it) and the KL estimator. An optimizer step
    samples ``batch_size x gradient_accumulation_steps`` prompts; the updates on them run in
    micro-batches of ``batch_size`` prompts' rollouts (GRPO) or ``mini_batch_size`` rows (PPO),
    their gradients accumulated. With held-out prompts, every ``eval_steps`` steps (and at the
    end) their greedy completions are scored (``evaluate``), ``eval_batch_size`` at a time."""
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    clip_low: float = 0.2
    clip_high: float | None = None
    kl_estimator: str = "k3"
    eval_steps: int | None = None
    eval_batch_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_at_least(self, 1, ["max_new_tokens", "eval_steps", "eval_batch_size"])
        _check_greater(self, 0, ["temperature"])
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.clip_low < 1:  # the ratio's lower bound 1 - clip_low stays positive
            raise ConfigError(f"clip_low must be in [0, 1), got {self.clip_low!r}")
        _check_at_least(self, 0, ["clip_high"])


@dataclass
class GRPOConfig(RLConfig):
    """GRPO: ``batch_size`` prompts per step, ``num_generations`` completions each; advantages
    are group-normalized rewards; ``num_iterations`` optimizer updates per batch of rollouts
    (importance ratios against the rollouts' log-probs); ``beta`` > 0 adds the KL estimate to a
    frozen reference (``monitor_kl`` keeps one to log the KL even at ``beta = 0``). ``loss_type``
    picks the aggregation: grpo (mean of sequence means), bnpo / dapo (token mean), dr_grpo (sum
    over batch x max_new_tokens). ``evaluate`` scores held-out greedy completions with the
    reward functions (``eval_rewards/...``, weighted sum ``eval_reward``)."""
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
        _check_at_least(self, 1, ["num_iterations"])
        _check_at_least(self, 2, ["num_generations"])  # a group of one has no relative reward
        _check_at_least(self, 0, ["beta"])  # 0: no KL term


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
        _check_at_least(self, 1, ["mini_batch_size", "ppo_epochs"])
        if self.mini_batch_size > self.batch_size:
            raise ConfigError(f"mini_batch_size ({self.mini_batch_size}) must be <= batch_size "
                              f"({self.batch_size}), the rollouts of one step")
        _check_at_least(self, 0, ["kl_coef", "vf_coef"])
        _check_greater(self, 0, ["value_clip"])
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


class ConfigError(ValueError):
    """An option of the wrong type or out of its range; the message names it."""


# The annotation of each field (a string under `from __future__ import annotations`) -> the
# Python types its value may have. bool is an int to Python, so it is refused explicitly.
_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _kind(field) -> tuple[str, bool]:
    """``(base annotation, None allowed)`` of a dataclass field."""
    annotation = str(field.type).replace(" ", "")
    optional = annotation.endswith("|None")
    return annotation.removesuffix("|None"), optional


def _from_text(field, value):
    """A numeric option given as text (YAML's "1e-3") as its number; anything else as is."""
    base, _ = _kind(field)
    if isinstance(value, str) and base in ("int", "float"):
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"{field.name} must be a number, got {value!r}") from None
        return int(number) if base == "int" and number.is_integer() else number
    return value


def _check_types(config) -> None:
    """Every field of ``config`` holds a value of its annotated type (floats finite); integral
    ints given to float options become floats."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        base, optional = _kind(field)
        if value is None and optional:
            continue
        allowed = _KINDS[base]
        if isinstance(value, bool) and base != "bool" or not isinstance(value, allowed):
            what = {"int": "an integer", "float": "a number", "bool": "true or false",
                    "str": "text"}[base]
            none = " or None" if optional else ""
            raise ConfigError(f"{field.name} must be {what}{none}, got {value!r} "
                              f"({type(value).__name__})")
        if base == "float":
            if not math.isfinite(value):
                raise ConfigError(f"{field.name} must be a finite number, got {value!r}")
            setattr(config, field.name, float(value))


def _check_at_least(config, low, names: list[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= low:
            kind = "an integer " if isinstance(value, int) else ""  # float options hold floats
            raise ConfigError(f"{name} must be {kind}>= {low}, got {value!r}")


def _check_greater(config, low, names: list[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > low:
            raise ConfigError(f"{name} must be > {low}, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
