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

from ...losses.policy import KL_ESTIMATORS

SCHEDULES = ("linear", "cosine", "constant")
NONFINITE_POLICIES = ("stop", "skip")
REPORTERS = ("none", "tensorboard")
PRECISIONS = ("fp32", "bf16")
PARALLELISMS = ("ddp", "fsdp")


def option(default, help: str, **metadata):
    """A config field with its help text, which the ``fastalign`` command shows for its flag
    (``--learning-rate``) and YAML key; ``metadata`` may add ``required=True`` (a flag the
    command needs) for the command options of ``trainer.registry``."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def option_help(config_class, name: str) -> str:
    """The help of field ``name``: its own, or that of the nearest base class that has one (a
    subclass that only changes a default, ``output_dir: str = "fastalign-dpo"``, keeps it)."""
    for klass in config_class.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and "help" in field.metadata:
            return field.metadata["help"]
    return ""


def option_type(field) -> tuple[type, bool]:
    """``(int, float, bool or str; None allowed)`` of a config field, read from its annotation
    (a string under ``from __future__ import annotations``)."""
    base, optional = _kind(field)
    return {"int": int, "float": float, "bool": bool, "str": str}[base], optional


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
    output_dir: str = option(
        "fastalign-output", "where the model, checkpoints, metrics.jsonl and metrics.png go")
    learning_rate: float = option(1e-5, "AdamW's peak learning rate")
    batch_size: int = option(8, "pairs per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(1.0, "passes over the training data (when max_steps is not set)")
    max_steps: int | None = option(None, "optimizer steps; overrides epochs")
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up")
    lr_schedule: str = option(
        "linear", "learning rate after warm-up: linear (to 0), cosine or constant")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (0: no clipping)")
    precision: str = option("fp32", "fp32, or bf16 autocast")
    logging_steps: int = option(1, "write metrics every N steps")
    save_steps: int | None = option(None, "write a checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed of the data order")
    progress: bool = option(True, "show a progress bar")
    eval_steps: int | None = option(
        None, "evaluate on the held-out data every N steps (and at the end)")

    overwrite: bool = option(
        False, "start over in an output directory that holds a run (removes what fastalign wrote "
        "there); without it such a directory is refused unless --resume is given")
    on_nonfinite: str = option(
        "stop", "a NaN/inf loss or gradient norm: stop (before the update, nothing saved) or skip "
        "the update (counted as skipped_steps)")
    report_to: str = option(
        "none", "also write the metrics as TensorBoard events in OUTPUT/tensorboard (tensorboard; "
        "needs the tensorboard package) or not (none)")
    parallelism: str = option(
        "ddp", "on several processes (torchrun): ddp (replicated model, gradients all-reduced) "
        "or fsdp (FSDP2: parameters, gradients and optimizer state sharded per decoder "
        "layer)")
    dist_timeout: float = option(
        600.0, "on several processes: seconds a rank waits for a stalled one before the run "
        "fails (torch's own default: 1800)")
    lora_r: int = option(
        0, "rank of LoRA adapters to train instead of the whole model (0: no LoRA)")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (the update is alpha / r x B A)")
    lora_dropout: float = option(0.0, "dropout on the LoRA adapters' input")
    lora_target_modules: str = option(
        "all-linear", "comma-separated module names to adapt (q_proj,v_proj), or all-linear (every "
        "linear layer but the output head)")
    gradient_checkpointing: bool = option(
        False, "recompute each layer's activations in the backward (less memory, about a third "
        "more compute)")
    padding_free: bool = option(
        False, "pack each batch's sequences into fewer rows, kept apart by their position ids: "
        "fewer, fuller rows (see docs/real_model.md)")

    def __post_init__(self):
        _check_types(self)
        check_at_least(self, 1, ["batch_size", "gradient_accumulation_steps", "logging_steps",
                                  "max_steps", "save_steps", "eval_steps"])
        check_at_least(self, 0, ["warmup_steps", "weight_decay", "seed"])
        check_greater(self, 0, ["learning_rate", "epochs"])
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ConfigError(f"max_grad_norm must be > 0 (the clipping norm), or 0 / None for "
                              f"no clipping, got {self.max_grad_norm!r}")
        check_one_of("lr_schedule", self.lr_schedule, SCHEDULES)
        check_one_of("precision", self.precision, PRECISIONS)
        check_one_of("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        check_one_of("report_to", self.report_to, REPORTERS)
        check_one_of("parallelism", self.parallelism, PARALLELISMS)
        check_greater(self, 0, ["dist_timeout"])
        check_at_least(self, 0, ["lora_r"])
        check_greater(self, 0, ["lora_alpha"])
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
    max_length: int = option(1024, "tokens of prompt + completion; completions are cut to fit")
    eval_batch_size: int = option(16, "pairs per evaluation batch")

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, ["max_length", "eval_batch_size"])




@dataclass
class RLConfig(TrainConfig):
    """What PPO and GRPO share: sampling (``max_new_tokens``, ``temperature``, ``top_p``; the
    log-probs are taken at the sampling temperature), the clip range of the ratio
    (``clip_low``; ``clip_high`` defaults to it) and the KL estimator. An optimizer step
    samples ``batch_size x gradient_accumulation_steps`` prompts; the updates on them run in
    micro-batches of ``batch_size`` prompts' rollouts (GRPO) or ``mini_batch_size`` rows (PPO),
    their gradients accumulated. With held-out prompts, every ``eval_steps`` steps (and at the
    end) their greedy completions are scored (``evaluate``), ``eval_batch_size`` at a time."""
    max_new_tokens: int = option(32, "tokens sampled per completion at most")
    temperature: float = option(
        1.0, "sampling temperature (the log-probs are taken at the same temperature)")
    top_p: float = option(
        1.0, "nucleus sampling: keep the most likely tokens holding this probability")
    top_k: int | None = option(None, "sample from the top_k most likely tokens only")
    min_p: float | None = option(
        None, "sample only the tokens with probability >= min_p x the most likely one's")
    processed_logprobs: bool = option(
        False, "take every log-prob (rollouts, policy, reference) of the distribution the "
               "sampler drew from: renormalized over its top_k / min_p support (vLLM's "
               "logprobs_mode processed_logprobs); exact, not with top_p < 1")
    clip_low: float = option(0.2, "PPO clip range below 1 (ratio >= 1 - clip_low)")
    clip_high: float | None = option(
        None, "clip range above 1 (default: clip_low; DAPO uses 0.28)")
    kl_estimator: str = option("k3", "k1, k2 or k3 estimate of the KL to the reference")
    batch_size: int = option(8, "prompts per micro-batch")
    eval_batch_size: int = option(32, "prompts per evaluation batch")
    # The policy loss's options, under TRL's GRPOConfig names where it has them
    # (fastalign.losses.policy_loss says what each does).
    importance_sampling_level: str = option(
        "token", "importance ratio per token, or per sequence (GSPO: exp of the mean log-ratio)")
    delta: float | None = option(
        None, "cap of the unclipped ratio (two-sided clipping, INTELLECT-2); > 1")
    sapo_temperature_pos: float = option(1.0, "SAPO's gate temperature where A > 0")
    sapo_temperature_neg: float = option(1.05, "SAPO's gate temperature where A < 0")
    vespo_k_pos: float = option(2.0, "VESPO's Gamma shape k where A >= 0")
    vespo_lambda_pos: float = option(3.0, "VESPO's Gamma rate lambda where A >= 0")
    vespo_k_neg: float = option(3.0, "VESPO's Gamma shape k where A < 0")
    vespo_lambda_neg: float = option(2.0, "VESPO's Gamma rate lambda where A < 0")
    entropy_coef: float = option(
        0.0, "entropy bonus: the loss minus entropy_coef x the mean entropy of the policy over "
             "the tokens it acts on (differentiated)")
    top_entropy_quantile: float = option(
        1.0, "train only on the tokens whose entropy is in this top share (0.2: the fifth of "
             "the tokens with the highest entropy)")
    rollout_correction: str | None = option(
        None, "correct for the sampler's log-probs differing from the trainer's: "
              "token_truncate, token_mask, sequence_truncate, sequence_mask, icepop or "
              "sequence_geometric_mask (see --rollout-dtype)")
    rollout_clip_min: float | None = option(
        None, "lower bound of the rollout importance ratio (icepop and the geometric mask: "
              "1 / rollout_clip_max by default)")
    rollout_clip_max: float | None = option(3.0, "upper bound of the rollout importance ratio")
    off_policy_mask_threshold: float | None = option(
        None, "drop negative-advantage sequences whose mean KL from the sampler exceeds this "
              "(DeepSeek-V3.2's off-policy sequence mask)")
    use_bias_correction_kl: bool = option(
        False, "multiply the KL penalty by the importance ratio")
    rollout_dtype: str | None = option(
        None, "sample from a copy of the policy in this precision (bf16 or fp16), as an "
              "inference engine in lower precision would, keeping the sampler's log-probs "
              "for --rollout-correction")

    def policy_loss_options(self, loss_type: str = "clip", aggregation: str | None = None,
                            **more) -> dict:
        """The options of ``FusedPolicyLoss`` this config sets (checked)."""
        from ...losses.policy import resolve_policy_options
        options = dict(
            loss_type=loss_type, aggregation=aggregation, clip_low=self.clip_low,
            clip_high=self.clip_high, delta=self.delta, level=self.importance_sampling_level,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg, vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg, entropy_coef=self.entropy_coef,
            top_entropy_quantile=self.top_entropy_quantile,
            rollout_correction=self.rollout_correction, rollout_clip_min=self.rollout_clip_min,
            rollout_clip_max=self.rollout_clip_max,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            use_bias_correction_kl=self.use_bias_correction_kl, kl_estimator=self.kl_estimator)
        options.update(more)
        try:
            resolve_policy_options(**options)
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from None
        return options

    @property
    def scoring(self) -> dict:
        """The options every log-prob of the run is taken with: the sampling temperature, and
        with ``processed_logprobs`` the sampler's ``top_k`` / ``min_p``."""
        processed = self.processed_logprobs
        return dict(temperature=self.temperature, top_k=self.top_k if processed else None,
                    min_p=self.min_p if processed else None)

    @property
    def sampling(self) -> dict:
        """``generate_rollouts``' sampler options of this config."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    min_p=self.min_p, processed_logprobs=self.processed_logprobs)

    @property
    def keeps_sampler_logprobs(self) -> bool:
        """Whether rollouts keep the sampler's own log-probs beside the trainer's."""
        return self.rollout_correction is not None or self.rollout_dtype is not None

    def __post_init__(self):
        super().__post_init__()
        check_one_of("importance_sampling_level", self.importance_sampling_level,
                     ("token", "sequence"))
        if self.rollout_dtype is not None:
            check_one_of("rollout_dtype", self.rollout_dtype, ("bf16", "fp16"))
        check_one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_at_least(self, 1, ["max_new_tokens", "eval_batch_size"])
        check_greater(self, 0, ["temperature"])
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_at_least(self, 1, ["top_k"])
        if self.min_p is not None and not 0 < self.min_p <= 1:
            raise ConfigError(f"min_p must be in (0, 1], got {self.min_p!r}")
        if self.processed_logprobs and self.top_p < 1:
            raise ConfigError(
                "processed_logprobs cannot score a top_p < 1 sampler exactly (the nucleus needs "
                "each row's probabilities sorted); sample with top_k / min_p instead, or leave "
                "processed_logprobs off")
        if not 0 <= self.clip_low < 1:  # the ratio's lower bound 1 - clip_low stays positive
            raise ConfigError(f"clip_low must be in [0, 1), got {self.clip_low!r}")
        check_at_least(self, 0, ["clip_high"])


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


def check_at_least(config, low, names: list[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= low:
            kind = "an integer " if isinstance(value, int) else ""  # float options hold floats
            raise ConfigError(f"{name} must be {kind}>= {low}, got {value!r}")


def check_greater(config, low, names: list[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > low:
            raise ConfigError(f"{name} must be > {low}, got {value!r}")


def check_one_of(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
