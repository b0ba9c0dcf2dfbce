"""Reward-model training (stage one of RLHF): a sequence-classification model scores
``prompt + completion``; the Bradley-Terry ``reward_loss`` (optional per-row ``margin``,
optional centering) pushes chosen above rejected. The reward model the RL trainers and
Best-of-N use.

    from fastalign.trainer import RewardConfig, RewardTrainer
    RewardTrainer(model, tokenizer, RewardConfig(), "train.jsonl", "test.jsonl").train()

``model`` is a ``transformers`` ``*ForSequenceClassification`` with ``num_labels=1`` (it scores
the last non-padding token); ``tiny.tiny_reward_model()`` builds the built-in one. No vocabulary
projection happens here, so no fused op is needed: the head is a ``[D, 1]`` matrix.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from ...losses import reward_loss
from ..core.config import PreferenceConfig, check_at_least, option
from ..core.data import DataError, _pad, load_preferences, tokenize_pairs, where
from ..core.loop import Trainer
from ..core.spec import PreferenceOptions, TrainerSpec, last_values
from ..models.lora import is_peft
from ..models.packing import Packing, check_packing_supported


@dataclass
class RewardConfig(PreferenceConfig):
    """Reward model: Bradley-Terry loss, optional per-row ``margin`` column, centering."""
    output_dir: str = option(
        "fastalign-rm", "where the model, checkpoints, metrics.jsonl and metrics.png go")
    center_rewards_coefficient: float = option(
        0.0, "weight of the mean squared reward (keeps rewards near 0)")

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 0, ["center_rewards_coefficient"])


class RewardTrainer(Trainer):
    """Args:
        model: a sequence-classification model with ``num_labels=1``.
        tokenizer: its tokenizer (a pad token is required).
        config: a ``RewardConfig``.
        train_data, eval_data: as for ``DPOTrainer``; rows may carry a numeric ``margin``.
    """

    plot_panels = [("loss", ["loss", "eval_loss"]), ("reward margin", ["margin", "eval_margin"]),
                   ("accuracy", ["accuracy", "eval_accuracy"])]
    progress_bar_metrics = (("loss", "loss", ".4f"), ("acc", "accuracy", ".2f"))

    def __init__(self, model, tokenizer, config: RewardConfig | None = None, train_data=None,
                 eval_data=None):
        config = config or RewardConfig()
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError("a reward model needs exactly one output per sequence: build it "
                             "with num_labels=1 (e.g. AutoModelForSequenceClassification."
                             f"from_pretrained(..., num_labels=1)); got "
                             f"num_labels={getattr(model.config, 'num_labels', None)}")
        if train_data is None:
            raise ValueError("train_data is required: a .jsonl path, a datasets.Dataset or a "
                             "list of prompt/chosen/rejected rows")
        if tokenizer.pad_token_id is not None:  # the head finds the last token through it
            model.config.pad_token_id = tokenizer.pad_token_id
        splits = [_with_margins(load_preferences(data), tokenizer, config.max_length)
                  for data in (train_data, eval_data) if data is not None]
        super().__init__(model, tokenizer, config, splits[0], splits[1] if len(splits) > 1 else [])
        if config.padding_free:
            check_packing_supported(model)

    def identifying_module(self, model):
        # The score head of a reward model to train is new (random, unseeded): not identity.
        return model.base_model

    def collate(self, items):
        batch = _pad([(pair.prompt, pair.chosen) for pair, _ in items]
                     + [(pair.prompt, pair.rejected) for pair, _ in items],
                     self.tokenizer.pad_token_id)
        margins = [margin for _, margin in items]
        margin = (torch.tensor(margins, dtype=torch.float32, device=self.device)
                  if any(m is not None for m in margins) else None)
        return (batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                margin)

    def compute_loss(self, batch):
        input_ids, attention_mask, margin = batch
        if self.config.padding_free:
            rewards = self._packed_rewards(input_ids, attention_mask)
        else:
            rewards = self.root(input_ids=input_ids, attention_mask=attention_mask,
                                use_cache=False).logits.squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        return reward_loss(chosen, rejected, margin=margin,
                           center_coef=self.config.center_rewards_coefficient)

    def _packed_rewards(self, input_ids, attention_mask) -> torch.Tensor:
        """``[2B]`` rewards of a padding-free forward (``packing.py``): inside the model's
        forward, its score head runs on each row's last token that is not the pad token (the
        token transformers' classifiers pool), its output for the packed row is left unused."""
        packing = Packing(attention_mask)
        inner = self.model.get_base_model() if is_peft(self.model) else self.model
        head, scores = inner.score, []
        pad_id = inner.config.pad_token_id
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (columns * (input_ids != pad_id)).argmax(-1)

        def pooled_score(hidden):
            rows = packing.unpack(hidden)[torch.arange(len(last), device=last.device), last]
            scores.append(type(head).forward(head, rows))
            return hidden.new_zeros(*hidden.shape[:-1], 1)

        head.forward = pooled_score  # the instance attribute shadows the class's forward
        try:
            self.root(input_ids=packing.pack(input_ids), position_ids=packing.position_ids,
                      use_cache=False)
        finally:
            del head.forward
        return scores[0].squeeze(-1).float()


def _with_margins(rows, tokenizer, max_length):
    """``(tokenized pair, margin or None)`` items; ``margin`` is a finite number on every row
    or on none (a batch mixing both would have no margin to give the others)."""
    with_margin = [index for index, row in enumerate(rows) if "margin" in row]
    if with_margin and len(with_margin) < len(rows):
        missing = next(i for i in range(len(rows)) if "margin" not in rows[i])
        raise DataError(f"{where(rows[missing], missing)}: no margin, but {len(with_margin)} of "
                        f"the {len(rows)} rows have one; give every row a margin (0 for none) "
                        "or none of them")
    for index in with_margin:
        margin = rows[index]["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) \
                or not math.isfinite(margin):
            raise DataError(f"{where(rows[index], index)}: margin must be a finite number, got "
                            f"{margin!r}")
    pairs = tokenize_pairs(rows, tokenizer, max_length=max_length)
    return [(pair, float(row["margin"]) if "margin" in row else None)
            for pair, row in zip(pairs, rows)]


def _build(config: RewardConfig, options: PreferenceOptions) -> RewardTrainer:
    from ..models.loading import load_reward_model

    model, tokenizer, train, held_out = options.load(load_reward_model)
    return RewardTrainer(model, tokenizer, config, train, held_out)


SPEC = TrainerSpec(
    name="rm", help="reward model (Bradley-Terry)", config=RewardConfig,
    options=PreferenceOptions, build=_build, summary=last_values("loss", "accuracy"),
    tiny_defaults=dict(learning_rate=1e-3, epochs=3.0, eval_steps=30), held_out="pairs",
    shown_metrics=("eval_loss", "eval_accuracy"))
