"""DPO training of a Hugging Face causal LM through fastalign's fused log-probs.

    from fastalign.trainer import DPOConfig, DPOTrainer
    trainer = DPOTrainer(model, tokenizer, DPOConfig(beta=0.1), "train.jsonl", "test.jsonl")
    trainer.train()

Chosen and rejected completions go through ONE concatenated forward of the policy, their
log-probs come from ``linear_logprobs`` (no logits), and the reference's from a frozen copy,
from the same model with its LoRA adapters disabled, or from a cache computed once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings

from dataclasses import dataclass

import torch

from ...losses.dpo import LOSS_TYPES
from ...nn import FusedDPOLoss
from ...ops import linear_logprobs
from ..core.config import (ConfigError, PreferenceConfig, check_greater, check_one_of,
                           option)
from ..core.data import collate_pairs, load_preferences, tokenize_pairs
from ..core.loop import Trainer, _digest
from ..core.resume import NonFiniteError
from ..core.spec import PreferenceOptions, TrainerSpec, last_values
from ..models.adapter import IGNORE_INDEX, CausalLMAdapter

REFERENCE_CACHE = "reference_logps.safetensors"


REFERENCES = ("auto", "copy", "adapters", "precomputed")


@dataclass
class DPOConfig(PreferenceConfig):
    """DPO: ``loss_type`` is any of ``fastalign.losses.dpo_loss``'s (IPO gets length-averaged
    log-probs, as TRL's); the reference is a frozen ``copy`` of the model, the model with its
    LoRA ``adapters`` disabled, or ``precomputed`` once over the data and cached on disk;
    ``auto`` (the default) is ``adapters`` for a LoRA model, else ``copy``."""
    output_dir: str = option(
        "fastalign-dpo", "where the model, checkpoints, metrics.jsonl and metrics.png go")
    beta: float = option(0.1, "DPO's beta: strength of the KL regularization to the reference")
    loss_type: str = option(
        "sigmoid", "sigmoid (DPO), ipo, hinge, robust, exo_pair, ...: fastalign.losses.dpo_loss")
    label_smoothing: float = option(0.0, "assumed share of flipped labels (cDPO / robust DPO)")
    reference: str = option(
        "auto", "copy (frozen copy), adapters (PEFT model with LoRA off), precomputed (once, "
        "cached on disk) or auto (adapters with LoRA, else copy)")

    def __post_init__(self):
        super().__post_init__()
        check_one_of("loss_type", self.loss_type, LOSS_TYPES)
        check_one_of("reference", self.reference, REFERENCES)
        check_greater(self, 0, ["beta"])
        if not 0 <= self.label_smoothing < 0.5:  # robust DPO divides by 1 - 2 * smoothing
            raise ConfigError(f"label_smoothing must be in [0, 0.5) (the assumed share of "
                              f"flipped labels), got {self.label_smoothing!r}")


class DPOTrainer(Trainer):
    """Args:
        model: a ``transformers`` causal LM (or PEFT model around one), the policy.
        tokenizer: its tokenizer (a pad token is required).
        config: a ``DPOConfig``.
        train_data, eval_data: JSONL paths, ``datasets.Dataset`` objects or lists of
            ``prompt``/``chosen``/``rejected`` rows (see ``fastalign.trainer.core.data``).
        ref_model: an explicit frozen reference; by default ``config.reference`` decides.
    """

    plot_panels = [("loss", ["loss", "eval_loss"]),
                   ("reward margin", ["rewards/margins", "eval_rewards/margins"]),
                   ("accuracy", ["rewards/accuracies", "eval_rewards/accuracies",
                                 "eval_preference_accuracy"])]
    progress_bar_metrics = (("loss", "loss", ".4f"), ("acc", "rewards/accuracies", ".2f"),
                            ("margin", "rewards/margins", ".3f"),
                            ("eval_acc", "eval_rewards/accuracies", ".2f"))

    def __init__(self, model, tokenizer, config: DPOConfig | None = None, train_data=None,
                 eval_data=None, *, ref_model=None):
        config = config or DPOConfig()
        if train_data is None:
            raise ValueError("train_data is required: a .jsonl path, a datasets.Dataset or a "
                             "list of prompt/chosen/rejected rows")
        train = tokenize_pairs(load_preferences(train_data), tokenizer,
                               max_length=config.max_length)
        held_out = (tokenize_pairs(load_preferences(eval_data), tokenizer,
                                   max_length=config.max_length) if eval_data is not None else [])
        super().__init__(model, tokenizer, config, _indexed(train), _indexed(held_out, "eval"))
        model = self.model  # with config.lora_r, the PEFT model around the one given
        self.policy = CausalLMAdapter(model, padding_free=config.padding_free)
        # IPO compares length-averaged log-probs (as TRL); FusedDPOLoss does that for it.
        self.loss = FusedDPOLoss(beta=config.beta, loss_type=config.loss_type,
                                 label_smoothing=config.label_smoothing,
                                 ignore_index=IGNORE_INDEX, softcap=self.policy.softcap)
        self.reference = None
        self.reference_logps = None
        self.reference_kind = "model" if ref_model is not None else config.reference
        if self.reference_kind == "auto":
            self.reference_kind = "adapters" if hasattr(model, "disable_adapter") else "copy"
        if ref_model is not None:
            self.reference = CausalLMAdapter(_frozen(ref_model),
                                            padding_free=config.padding_free)
        elif self.reference_kind == "copy":
            self.reference = CausalLMAdapter(_frozen(copy.deepcopy(model)),
                                            padding_free=config.padding_free)
        elif self.reference_kind == "adapters":
            if not hasattr(model, "disable_adapter"):
                raise ValueError("reference='adapters' needs a PEFT model with LoRA adapters; "
                                 f"{type(model).__name__} has none (use 'copy' or 'precomputed')")
        else:  # precomputed: from the model as it is now, before any step
            self.reference_logps = self._load_or_compute_reference()

    def on_wrapped(self, root):
        self.policy.root = root
        if self.reference is not None:  # sharded too under FSDP2, replicated under DDP
            self.processes.shard(self.reference.model, self.config.precision, frozen=True)

    # -- batches -----------------------------------------------------------------------------
    def collate(self, pairs):
        chosen, rejected = collate_pairs([pair for _, pair in pairs], self.tokenizer.pad_token_id)
        on_device = [{key: value.to(self.device) for key, value in side.items()}
                     for side in (chosen, rejected)]
        return [key for key, _ in pairs], *on_device

    def _sequence_logps(self, adapter, chosen, rejected):
        """Summed completion log-probs ``[2B]`` (chosen then rejected), one forward."""
        return torch.cat(adapter.preference_logprobs(chosen, rejected))

    def _reference(self, keys, input_ids, attention_mask, targets) -> dict:
        """``FusedDPOLoss``'s precomputed reference arguments: the cached sums, or those of a
        no-grad forward of the reference (its own root module), length-averaged for IPO as the
        loss averages the policy's."""
        if self.reference_logps is not None:
            values = torch.stack([self.reference_logps[key] for key in keys])  # [B, 2]
            sums = values.t().reshape(-1).to(self.device)
        else:
            adapter = self.reference or self.policy
            with adapter.reference_context(disable_adapters=self.reference is None):
                sums = adapter.forward_with_head(
                    lambda hidden, weight, bias: linear_logprobs(
                        hidden, weight, targets, bias=bias, temperature=self.loss.temperature,
                        softcap=self.loss.softcap, ignore_index=IGNORE_INDEX).sum(-1),
                    input_ids, attention_mask)
        if self.loss.average_logprobs:
            sums = sums / (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
        chosen, rejected = sums.chunk(2)
        return dict(ref_chosen_logps=chosen, ref_rejected_logps=rejected)

    def compute_loss(self, batch):
        """``FusedDPOLoss`` on one concatenated forward of the chosen and rejected rows, run
        inside the policy's head (``forward_with_head``)."""
        keys, chosen, rejected = batch
        input_ids, attention_mask, targets = self.policy.preference_inputs(chosen, rejected)
        reference = self._reference(keys, input_ids, attention_mask, targets)
        return self.policy.forward_with_head(
            lambda hidden, weight, bias: self.loss(hidden, weight, targets, bias=bias,
                                                   **reference),
            input_ids, attention_mask)

    def setup(self):
        return dict(super().setup(), eval_data=_digest(self.eval_items),
                    loss_type=self.config.loss_type, reference=self.reference_kind)

    # -- the precomputed reference ------------------------------------------------------------
    @torch.no_grad()
    def _load_or_compute_reference(self) -> dict:
        """``{pair key: [chosen, rejected] summed log-probs}`` of the model as it is now, cached
        in ``output_dir/reference_logps.safetensors`` under a fingerprint of the data and the
        initial weights: computed once, and read back by a resumed run (whose model has moved
        on). A cache that is unreadable, damaged (checksum) or not finite is recomputed."""
        path = self.output_dir / REFERENCE_CACHE
        # float64 sums without a float64 copy of the weights, one sync for all of them
        weights = torch.stack([p.detach().sum(dtype=torch.float64)
                               for p in self.model.parameters()]).tolist()
        keys = [key for key, _ in self.train_items + self.eval_items]
        data = _digest(([pair for _, pair in self.train_items + self.eval_items], weights))
        cached = _read_reference_cache(path, data, keys)
        if cached is not None:
            return dict(zip(keys, cached))
        logps = {}
        pairs = self.train_items + self.eval_items
        size = self.config.eval_batch_size
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(pairs), size):
            batch_keys, chosen, rejected = self.collate(pairs[start:start + size])
            with self._autocast():
                sums = self._sequence_logps(self.policy, chosen, rejected).float().cpu()
            for index, key in enumerate(batch_keys):
                logps[key] = torch.stack([sums[index], sums[index + len(batch_keys)]])
        self.model.train(was_training)
        table = torch.stack([logps[key] for key in keys])
        if not bool(torch.isfinite(table).all()):
            raise NonFiniteError("the reference log-probs of the initial model are not finite "
                                 "(its weights or the data give NaN or inf); nothing was cached")
        self.processes.on_main(lambda: _write_reference_cache(path, data, keys, table))
        return logps


def _read_reference_cache(path, data: str, keys: list[str]) -> torch.Tensor | None:
    """The ``[pairs, 2]`` table cached at ``path`` for ``data`` and ``keys``, or None when there
    is none for them; a damaged one is reported and ignored (it is then recomputed)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as cache:
            meta, table = cache.metadata() or {}, cache.get_tensor("logps")
    except Exception as error:
        problem = f"unreadable ({type(error).__name__})"
    else:
        if meta.get("data") != data or meta.get("keys") != json.dumps(keys):
            return None  # another data set or initial model: not this run's cache
        if meta.get("sha256") != _table_digest(table):
            problem = "its checksum does not match its values"
        elif table.shape != (len(keys), 2) or not bool(torch.isfinite(table).all()):
            problem = "its values are not finite"
        else:
            return table
    warnings.warn(f"the reference cache {path} is damaged ({problem}); recomputing it",
                  RuntimeWarning, stacklevel=3)
    return None


def _write_reference_cache(path, data: str, keys: list[str], table: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({"logps": table.contiguous()}, str(tmp),
              metadata={"data": data, "keys": json.dumps(keys), "sha256": _table_digest(table)})
    tmp.replace(path)


def _table_digest(table: torch.Tensor) -> str:
    return hashlib.sha256(table.float().contiguous().numpy().tobytes()).hexdigest()


def _indexed(pairs, prefix="train"):
    """``(key, pair)`` items: the key names the pair in the reference cache."""
    return [(f"{prefix}-{index}", pair) for index, pair in enumerate(pairs)]


def _frozen(model):
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _build(config: DPOConfig, options: PreferenceOptions) -> DPOTrainer:
    from ..models.loading import load_model_and_tokenizer

    model, tokenizer, train, held_out = options.load(load_model_and_tokenizer)
    return DPOTrainer(model, tokenizer, config, train, held_out)


SPEC = TrainerSpec(
    name="dpo", help="DPO", config=DPOConfig, options=PreferenceOptions, build=_build,
    summary=last_values("loss", "rewards/accuracies"), tiny_defaults=dict(learning_rate=1e-3),
    held_out="pairs",
    shown_metrics=("eval_loss", "eval_rewards/accuracies", "eval_preference_accuracy"))
