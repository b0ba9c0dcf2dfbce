"""Knowledge distillation: the student learns the teacher's next-token distribution over the
whole vocabulary on every completion token (Hinton et al. 2015), through
``FusedDistillationLoss``: neither model's ``[tokens, vocabulary]`` logits exist.

Off-policy steps train on the data's completions (``prompt``/``completion`` rows). With
``lmbda > 0`` that share of the steps is on-policy (GKD, Agarwal et al. 2024,
https://arxiv.org/abs/2306.13649): the student samples completions of the step's prompts and
the teacher scores every token of them. ``beta`` picks the divergence with TRL's convention: 0
forward KL(teacher || student), 1 reverse KL(student || teacher), in between the generalized
JSD. The teacher runs without gradient, once per micro-batch, inside the same forward as the
student (its head's output is the student's loss), so under FSDP2 its gathered head is used
while gathered; it is sharded like a reference model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ...nn import FusedDistillationLoss
from ..core.config import ConfigError, TrainConfig, check_at_least, check_greater, option
from ..core.data import _pad, load_completions, tokenize_completions
from ..core.loop import Trainer
from ..core.spec import RunOptions, TrainerSpec, progress_of
from ..models.adapter import IGNORE_INDEX, CausalLMAdapter, completion_targets
from .rewards import reward_function
from .rollout import decoding_progress, generate_rollouts, held_out_reward_columns, reward_name


@dataclass
class DistillConfig(TrainConfig):
    """Distillation: ``beta`` (0 forward KL, 1 reverse KL, between: generalized JSD) at
    ``temperature``, ``lmbda`` the share of on-policy steps (the student samples up to
    ``max_new_tokens`` tokens per prompt at ``temperature``), ``hard_label_weight`` x the
    cross-entropy of the data's tokens added on off-policy steps, the divergence weighted by
    ``divergence_weight``; with ``seq_kd`` the off-policy steps' completions are the
    teacher's samples. ``batch_size`` counts rows
    (prompts); the loss is the mean over a step's completion tokens. ``evaluate`` reports the
    held-out rows' divergence to the teacher, and any ``eval_reward_funcs`` on greedy
    completions of their prompts."""
    output_dir: str = "fastalign-distill"
    batch_size: int = option(8, "prompt/completion rows (or prompts, on-policy) per micro-batch")
    max_length: int = option(1024, "tokens of prompt + completion; completions are cut to fit")
    eval_batch_size: int = option(16, "rows per evaluation batch")
    beta: float = option(
        1.0, "divergence: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), "
             "in between the generalized JSD with mixture (1-beta) student + beta teacher")
    temperature: float = option(1.0, "softmax temperature of both models, and of sampling")
    lmbda: float = option(
        0.0, "share of on-policy steps: the student samples completions of the step's prompts "
             "and the teacher scores them (GKD's lambda; 0: the data's completions only)")
    max_new_tokens: int = option(64, "tokens sampled per on-policy completion at most")
    hard_label_weight: float = option(
        0.0, "weight of the cross-entropy of the data's completion tokens beside the "
             "divergence (off-policy steps)")
    divergence_weight: float = option(
        1.0, "weight of the divergence to the teacher; 0 (with hard_label_weight > 0 and "
             "lmbda 0): supervised fine-tuning on the completions alone, without the teacher's "
             "forward")
    seq_kd: bool = option(
        False, "off-policy steps train on the teacher's samples of the step's prompts instead "
               "of the data's completions (sequence-level KD, Kim & Rush 2016; TRL GKD's seq_kd)")

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, ["max_length", "eval_batch_size", "max_new_tokens"])
        check_greater(self, 0, ["temperature"])
        check_at_least(self, 0, ["hard_label_weight", "divergence_weight"])
        for name in ("beta", "lmbda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.divergence_weight == 0 and (self.hard_label_weight == 0 or self.lmbda > 0):
            raise ConfigError(
                "divergence_weight=0 trains on the hard labels alone: it needs "
                f"hard_label_weight > 0 (got {self.hard_label_weight}) and lmbda=0 (got "
                f"{self.lmbda}; on-policy steps have no labels, only the teacher's divergence)")


def check_same_vocabulary(student, teacher, tokenizer, teacher_tokenizer=None) -> None:
    """Refuses a teacher whose vocabulary is not the student's (the divergence compares the
    two distributions token by token), naming both models."""
    names = [str(getattr(m.config, "_name_or_path", "") or type(m).__name__)
             for m in (student, teacher)]
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the teacher {names[1]!r} has a vocabulary of {sizes[1]} tokens, the "
                         f"student {names[0]!r} {sizes[0]}: distillation compares the two "
                         "distributions token by token, so both need the same vocabulary")
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the teacher {names[1]!r} and the student {names[0]!r} have different "
                         "tokenizers (the same token id is another token); distil between "
                         "models of one tokenizer")


@dataclass
class DistillStep:
    """One step's micro-batches (``input_ids``, ``attention_mask``, ``completion_mask``,
    ``position_ids`` or None), each with its completion-token count, and whether the
    completions were sampled by the student."""
    batches: list[dict]
    tokens: list[torch.Tensor]
    on_policy: bool


class DistillTrainer(Trainer):
    """Distils ``teacher`` into ``model`` (see the module docstring). ``train_data``: rows of
    ``prompt`` and ``completion`` (a .jsonl path, a ``datasets.Dataset`` or a list of
    dicts); ``eval_data`` likewise, held out. ``eval_reward_funcs``: reward functions scored
    on greedy completions of the held-out prompts (e.g. a verifier), measured, not trained
    on."""

    plot_panels = [("divergence to the teacher", ["divergence", "eval_divergence"]),
                   ("top-1 agreement", ["agreement", "eval_agreement"]),
                   ("student entropy", ["entropy"])]
    progress_bar_metrics = (("div", "divergence", ".4f"), ("agree", "agreement", ".2f"),
                            ("eval_div", "eval_divergence", ".4f"))

    def __init__(self, model, tokenizer, config: DistillConfig | None = None, train_data=None,
                 eval_data=None, *, teacher, teacher_tokenizer=None,
                 eval_reward_funcs: list | None = None):
        config = config or DistillConfig()
        if train_data is None:
            raise ValueError("train_data is required: prompt/completion rows (a .jsonl path, a "
                             "datasets.Dataset or a list of dicts)")
        check_same_vocabulary(model, teacher, tokenizer, teacher_tokenizer)
        rows = load_completions(train_data)
        held_out = load_completions(eval_data) if eval_data is not None else []
        examples = self._examples(rows, tokenizer, config.max_length)
        super().__init__(model, tokenizer, config, examples,
                         self._examples(held_out, tokenizer, config.max_length))
        self.student = CausalLMAdapter(self.model, padding_free=config.padding_free)
        self.teacher = CausalLMAdapter(teacher.eval().requires_grad_(False),
                                       padding_free=config.padding_free)
        self.eval_reward_funcs = list(eval_reward_funcs or [])
        options = dict(beta=config.beta, temperature=config.temperature,
                       softcap=self.student.softcap, teacher_softcap=self.teacher.softcap,
                       ignore_index=IGNORE_INDEX)
        # divergence_weight x (divergence + hard_label_weight / divergence_weight x CE).
        relative = config.hard_label_weight / (config.divergence_weight or 1.0)
        self.loss = FusedDistillationLoss(hard_label_weight=relative, **options)
        self.on_policy_loss = FusedDistillationLoss(**options)

    @staticmethod
    def _examples(rows: list, tokenizer, max_length: int) -> list[dict]:
        """Each row's prompt (for sampling), token ids (for off-policy steps) and other fields
        (e.g. a verifier's ``answer``, for ``eval_reward_funcs``)."""
        ids = tokenize_completions(rows, tokenizer, max_length=max_length) if rows else []
        return [{"prompt": row["prompt"], "ids": pair,
                 "fields": {k: v for k, v in row.items() if k not in ("prompt", "completion")}}
                for row, pair in zip(rows, ids)]

    def on_wrapped(self, root):
        self.student.root = root
        self.processes.shard(self.teacher.model, self.config.precision, frozen=True)

    def _on_policy(self) -> bool:
        """Whether this step samples (the same answer on every rank: seeded by the step)."""
        draw = random.Random(f"{self.config.seed}/{self.step}/lmbda").random()
        return draw < self.config.lmbda

    def prepare_step(self, micro_item_lists: list[list]) -> DistillStep:
        """The step's micro-batches: the data's completions, or the student's (on-policy) or
        the teacher's (``seq_kd``) samples of each micro-batch's prompts; each weighted by its
        share of the step's completion tokens over all ranks (padding stand-ins weigh 0)."""
        on_policy = self._on_policy()
        if on_policy:
            batches = self._sampled(micro_item_lists, self.model, "the student")
        elif self.config.seq_kd:
            batches = self._sampled(micro_item_lists, self.teacher.model, "the teacher")
        else:
            batches = [{**_pad([item["ids"] for item in items], self.tokenizer.pad_token_id),
                        "position_ids": None} for items in micro_item_lists]
        batches = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}
                   for b in batches]
        tokens = [(b["completion_mask"][:, 1:].sum().float()
                   * (0.0 if getattr(items, "padding", False) else 1.0))
                  for b, items in zip(batches, micro_item_lists)]
        return DistillStep(batches, tokens, on_policy)

    def _sampled(self, micro_item_lists: list[list], sampler, who: str) -> list[dict]:
        """Completions of the micro-batches' prompts sampled by ``sampler`` (``who``)."""
        prompts, seeds, _ = self.seeded_prompts(micro_item_lists)
        config = self.config
        with decoding_progress(self, f"{who} samples {len(prompts)} completions",
                               config.max_new_tokens) as bar:
            rollouts = generate_rollouts(
                sampler, self.tokenizer, [item["prompt"] for item in prompts],
                max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                seeds=seeds, logprobs=False, on_step=bar.update,
                synced=self.processes.distributed and self.processes.parallelism == "fsdp")
        batches, start = [], 0
        for items in micro_item_lists:
            rows = rollouts.rows(start, start + len(items))
            start += len(items)
            batches.append({"input_ids": rows.input_ids, "attention_mask": rows.attention_mask,
                            "completion_mask": rows.completion_mask,
                            "position_ids": rows.position_ids,
                            "on_policy": sampler is self.model})
        return batches

    def updates(self, work: DistillStep):
        total = self.processes.sum(sum(work.tokens)).clamp(min=1)
        yield [(batch, tokens / total) for batch, tokens in zip(work.batches, work.tokens)]

    def step_metrics(self, work: DistillStep) -> dict:
        return {"on_policy": float(work.on_policy)}

    def compute_loss(self, batch: dict):
        """``FusedDistillationLoss`` of the student against the teacher on ``batch``'s
        completion tokens: the teacher's forward runs without gradient, and its head hands
        its hidden states and weights to the student's forward (with gradient, when the caller
        wants one), whose head computes the loss. The hard-label term applies to the data's
        (or with ``seq_kd`` the teacher's) completions, not to the student's own samples.
        With ``divergence_weight`` 0, training steps are supervised fine-tuning alone: no
        teacher forward."""
        targets = completion_targets(batch["input_ids"], batch["completion_mask"],
                                     batch["attention_mask"])
        inputs = (batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        loss = self.on_policy_loss if batch.get("on_policy") else self.loss
        grad_wanted = torch.is_grad_enabled()
        weight = self.config.divergence_weight
        if grad_wanted and weight == 0:
            per_token, counts = self.student.completion_logprobs(
                batch["input_ids"], batch["completion_mask"], batch["attention_mask"],
                position_ids=batch["position_ids"])
            nll = -per_token.sum() / counts.sum().clamp(min=1)
            return self.config.hard_label_weight * nll, {"hard_label_loss": nll.detach()}

        def student_against(teacher_hidden, teacher_weight, teacher_bias):
            with torch.set_grad_enabled(grad_wanted):
                return self.student.forward_with_head(
                    lambda hidden, weight, bias: loss(
                        hidden, weight, teacher_hidden, teacher_weight, targets, bias=bias,
                        teacher_bias=teacher_bias),
                    *inputs)

        with torch.no_grad():
            value, metrics = self.teacher.forward_with_head(student_against, *inputs)
        return (value if weight == 1 else value * weight), metrics

    @torch.no_grad()
    def evaluate(self, rows: list | None = None) -> dict:
        """Over the held-out rows (default: ``eval_data``): the divergence to the teacher,
        top-1 agreement and student entropy, means over their completion tokens (the data's);
        and each of ``eval_reward_funcs`` on greedy completions of their prompts. ``{}``
        without rows."""
        rows = self.eval_items if rows is None else rows
        if not rows:
            return {}
        was_training = self.model.training
        self.model.eval()
        sums, tokens = {}, 0.0
        size = self.config.eval_batch_size
        for start in range(0, len(rows), size):
            batch = {**_pad([row["ids"] for row in rows[start:start + size]],
                            self.tokenizer.pad_token_id), "position_ids": None}
            batch = {k: v if v is None else v.to(self.device) for k, v in batch.items()}
            count = float(batch["completion_mask"][:, 1:].sum())
            with self._autocast():
                _, metrics = self.compute_loss(batch)
            for name in ("divergence", "agreement", "entropy"):
                sums[name] = sums.get(name, 0.0) + float(metrics[name]) * count
            tokens += count
        self.model.train(was_training)
        result = {f"eval_{name}": value / max(tokens, 1.0) for name, value in sums.items()}
        if self.eval_reward_funcs:
            prompts = [{"prompt": row["prompt"], **row["fields"]} for row in rows]
            columns = held_out_reward_columns(self, prompts, self.eval_reward_funcs)
            result.update({f"eval_rewards/{reward_name(f)}": float(column.mean())
                           for f, column in zip(self.eval_reward_funcs, columns)})
        return result


@dataclass
class DistillOptions(RunOptions):
    """``fastalign train distill``: the student (``--model``), the teacher and the data."""
    teacher: str = option(
        "tiny", "the teacher: 'tiny' (the built-in model after its supervised warm start, the "
                "default), 'smollm2', a .gguf file or a model directory; same tokenizer as the "
                "student")
    data: str = option(
        "demo", "prompt/completion rows: a .jsonl file, 'demo' (the bundled prompts with "
                "their polite answers) or 'arithmetic' (the bundled word problems with worked "
                "solutions and their answers, for --eval-rewards correct_answer)")
    eval_data: str | None = option(
        None, "held-out prompt/completion rows (.jsonl; default: the 'test' rows of --data)")
    eval_rewards: str | None = option(
        None, "comma-separated reward functions scoring greedy completions of the held-out "
              "prompts (e.g. correct_answer with --data arithmetic rows): measured, not "
              "trained on")

    def named_models(self) -> list[tuple[str, str]]:
        return super().named_models() + [(self.teacher, "--teacher")]


def _build(config: DistillConfig, options: DistillOptions) -> DistillTrainer:
    from ..core.bundled import completion_splits
    from ..core.distributed import resolve_device
    from ..models.loading import load_model_and_tokenizer, load_policy

    train, held_out = completion_splits(options.data, options.eval_data)
    checks = [reward_function(name.strip()) for name in (options.eval_rewards or "").split(",")
              if name.strip()]
    if checks and not held_out:
        raise ValueError("--eval-rewards scores held-out prompts and there are none: pass "
                         "--eval-data FILE, or --data with 'test' rows")
    torch.manual_seed(config.seed)
    # The teacher is a trained model: the built-in one is the tiny model after its warm start.
    teacher, teacher_tokenizer = load_policy(options.teacher, options.device,
                                             progress=config.progress)
    student, tokenizer = load_model_and_tokenizer(options.model)
    return DistillTrainer(student.to(resolve_device(options.device)), tokenizer, config, train,
                          held_out, teacher=teacher, teacher_tokenizer=teacher_tokenizer,
                          eval_reward_funcs=checks)


SPEC = TrainerSpec(
    name="distill", help="distillation from a teacher (KL / JSD over the vocabulary)",
    config=DistillConfig, options=DistillOptions, build=_build,
    summary=progress_of("divergence"), held_out="rows", number_format=".4g",
    tiny_defaults=dict(learning_rate=5e-3, max_steps=20, beta=0.0))
