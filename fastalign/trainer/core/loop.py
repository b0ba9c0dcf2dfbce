"""The trainer core every trainer shares: data order, micro-batches and gradient accumulation,
AdamW with a warmed-up LR schedule, clipping, non-finite guards, autocast, evaluation and
metrics; checkpoints and exact resume come from ``resume.Checkpointing``.

A trainer supplies what it trains on and its loss; the core owns the loop. One optimizer step:

    micro_item_lists = A lists of ``batch_size`` items (pairs, prompts) from the seeded order
    work = prepare_step(micro_item_lists)       # DPO/RM: collated batches; RL: the rollouts
    for micro_batches in updates(work):         # DPO/RM: one update; GRPO: num_iterations;
        for batch, weight in micro_batches:     #   PPO: ppo_epochs x mini-batches
            (compute_loss(batch)[0] * weight).backward()
        clip, then the optimizer update (only when loss and gradient norm are finite)
    metrics: the updates' mean, plus step_metrics(work); the LR schedule advances once

``weight`` is each micro-batch's share of the update's loss normalizer, so an update's gradient
is that of one batch holding all its micro-batches (A = ``gradient_accumulation_steps``).

On several processes (``distributed.Processes``) each list is the rank's share of a global
micro-batch of ``batch_size x world size`` items, the normalizer is global (summed over ranks)
and each rank's loss is scaled by the world size before backward, since DDP and FSDP2 average
gradients: an update equals the single-process one of the global batch. A rank whose share is
empty (a short last batch) runs a copy of the first item with weight 0, so that no rank waits
alone in a collective. Metrics are reduced over ranks; rank 0 alone writes files, logs and
draws the progress bar.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.lora import prepare_model
from . import run_dir
from .checkpoint import model_fingerprint
from .config import TrainConfig
from .distributed import Processes
from .memory import release_freed_memory
from .metrics import MetricsLog, check_reporter
from .resume import Checkpointing, NonFiniteError

class Share(list):
    """A rank's items of a global micro-batch, and where they start in it. ``padding``: a
    stand-in for a rank the batch has no item for (a copy of its first item), run with weight
    0 so that the collectives of every rank match."""

    def __init__(self, items, start: int, padding: bool = False):
        super().__init__(items)
        self.start, self.padding = start, padding


class Trainer(Checkpointing):
    """Base class of the trainers (``trainer/algorithms/``); checkpoints and resume in
    ``resume.Checkpointing``."""

    plot_panels: list[tuple[str, list[str]]] = [("loss", ["loss", "eval_loss"])]
    # (name on the bar, metric, format): what the progress bar shows of a step, when present.
    progress_bar_metrics: tuple[tuple[str, str, str], ...] = (("loss", "loss", ".4f"),)

    def __init__(self, model, tokenizer, config: TrainConfig, train_items: list,
                 eval_items: list | None = None):
        # The model as given, before LoRA: what a resume must start from again (the DPO
        # reference and a LoRA base are rebuilt from it).
        self.base_model = {"base_model": model_fingerprint(self.identifying_module(model)),
                           "base_model_name": str(getattr(model.config, "_name_or_path", "")
                                                  or type(model).__name__)}
        model = prepare_model(model, config)  # LoRA adapters, gradient checkpointing
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.train_items, self.eval_items = train_items, eval_items or []
        self.output_dir = _writable_dir(config.output_dir)
        self.device = next(model.parameters()).device
        self.processes = Processes.setup(config.parallelism, self.device, config.dist_timeout)
        self.global_batch_size = config.batch_size * self.processes.world_size
        self.micro_per_epoch = math.ceil(len(train_items) / self.global_batch_size)
        self.total_steps = config.max_steps or max(1, math.ceil(
            config.epochs * self.micro_per_epoch / config.gradient_accumulation_steps))
        self.step = 0
        self.skipped_steps = 0  # optimizer updates skipped for a non-finite loss or gradient
        self.resumed_changes: dict = {}  # option -> (checkpoint's value, this run's value)
        self.history: list[dict] = []  # the metrics rows this process's train() logged

    # Built on first use, so a subclass may add trained modules (PPO's value head) after this
    # class's __init__ has run, and (on several processes) after the wrapping below, which
    # FSDP2 does in place, replacing the parameters by sharded ones.
    @functools.cached_property
    def root(self) -> torch.nn.Module:
        """The module forward passes run through: the model, its DDP wrapper, or the model
        sharded in place by FSDP2 (``Processes.wrap``)."""
        root = self.processes.wrap(self.model, self.config.precision)
        self.on_wrapped(root)
        return root

    def on_wrapped(self, root: torch.nn.Module) -> None:
        """Called once the model is wrapped: point adapters at ``root``, shard frozen models."""

    def wrapped_roots(self) -> list[torch.nn.Module]:
        """Every trained module's wrapper (PPO adds its value head's)."""
        return [self.root]

    @functools.cached_property
    def parameters(self) -> list[torch.nn.Parameter]:
        _ = self.root
        parameters = [p for module in self.trained_modules() for p in module.parameters()
                      if p.requires_grad]
        if not parameters:
            raise ValueError("the model has no trainable parameters "
                             "(requires_grad=False everywhere)")
        return parameters

    @functools.cached_property
    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters, lr=self.config.learning_rate,
                                 weight_decay=self.config.weight_decay)

    @functools.cached_property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    # -- to override ----------------------------------------------------------------------------
    def prepare_step(self, micro_item_lists: list[list]):
        """What one optimizer step works on, from its A lists of items. Default: each list
        collated into a batch, weighted by its share of the step's items."""
        sizes = [0 if getattr(items, "padding", False) else len(items)
                 for items in micro_item_lists]
        total = float(self.processes.sum(torch.tensor(float(sum(sizes)))))
        return [(self.collate(items), size / total)
                for items, size in zip(micro_item_lists, sizes)]

    def updates(self, work):
        """The optimizer updates of one step, each a list of ``(batch, weight)`` micro-batches.
        Default: one update over ``work`` as ``prepare_step`` made it."""
        yield work

    def step_metrics(self, work) -> dict:
        """Metrics of the step's data beside the updates' (e.g. rollout rewards)."""
        return {}

    def collate(self, items: list):
        raise NotImplementedError

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def trained_modules(self) -> list[torch.nn.Module]:
        """What the optimizer trains: the model, and e.g. PPO's value head. Their state beyond
        the model's goes into checkpoints through ``extra_state``."""
        return [self.model]

    def extra_state(self) -> dict:
        """Trained state outside the model, saved in checkpoints (e.g. a value head)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    @functools.cached_property
    def data_digest(self) -> str:
        """A fingerprint of the training data (once: it does not change during a run)."""
        return _digest(self.train_items)

    def identifying_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part of the given model that identifies it (``base_model``): all of it; a
        reward model's backbone only, its score head being freshly initialised."""
        return model

    def setup(self) -> dict:
        """What a resumed checkpoint must match: model shapes, the weights the run started
        from, data, batching (the global batch: a run may resume on another number of
        processes with the same global batch)."""
        shapes = [(name, tuple(p.shape)) for name, p in self.model.named_parameters()]
        return {"model": _digest(shapes), **self.base_model, "train_data": self.data_digest,
                "batch_size": self.global_batch_size,
                "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
                "seed": self.config.seed}

    # -- the loop ----------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        warmup, total = self.config.warmup_steps, self.total_steps
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if self.config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if self.config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    def _micro_batch(self, index: int) -> list:
        """Global micro-batch ``index`` of the run: epochs follow each other, each in its own
        seeded order, so any step's data is known without replaying the ones before it
        (resume), whatever the number of processes."""
        epoch, position = divmod(index, self.micro_per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_items), generator=generator)
        size = self.global_batch_size
        return [self.train_items[i] for i in order[position * size:(position + 1) * size].tolist()]

    def _local_share(self, items: list) -> Share:
        """This rank's share of a global micro-batch."""
        start, end = self.processes.share_bounds(len(items))
        return Share(items[start:end], start) if end > start else Share(items[:1], 0, True)

    def seeded_prompts(self, micro_item_lists: list[list]):
        """``(prompts, seeds, real [P] bool)`` of this rank's shares of the step (RL trainers):
        each prompt's sampling seed names its place in the step's global batch, so a completion
        is the same on any number of processes and with any accumulation; ``real`` is False on
        ``Share.padding`` stand-ins."""
        prompts, seeds, real = [], [], []
        for index, items in enumerate(micro_item_lists):
            start = getattr(items, "start", 0)
            prompts += items
            seeds += [f"{self.config.seed}/{self.step}/{index * self.global_batch_size + start + i}"
                      for i in range(len(items))]
            real += [not getattr(items, "padding", False)] * len(items)
        return prompts, seeds, torch.tensor(real, dtype=torch.bool)

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def training_step(self) -> dict:
        """One optimizer step (see the module docstring): its ``gradient_accumulation_steps``
        micro-batches of items, ``prepare_step``, then each of ``updates``; returns its
        metrics, one device sync per update."""
        _ = self.root
        self.model.train()
        accumulation = self.config.gradient_accumulation_steps
        work = self.prepare_step([self._local_share(self._micro_batch(self.step * accumulation
                                                                      + j))
                                  for j in range(accumulation)])
        sums, updates = defaultdict(float), 0
        # DDP and FSDP2 average the ranks' gradients; each rank's share is of the global
        # normalizer, so its loss is scaled back up to make the average the global gradient.
        scale = self.processes.world_size
        for micro_batches in self.updates(work):
            # Tensors until the end of the update: one device sync, not one per metric.
            update = defaultdict(float)
            for index, (batch, weight) in enumerate(micro_batches):
                with self.processes.no_sync(self.wrapped_roots(),
                                            last=index == len(micro_batches) - 1):
                    with self._autocast():
                        loss, metrics = self.compute_loss(batch)
                    (loss * (weight * scale)).backward()
                for name, value in {"loss": loss.detach(), **metrics}.items():
                    update[name] = update[name] + value * weight
            update = self._reduced(update)
            update["grad_norm"] = self.clip_gradients()
            update = {name: float(value) for name, value in update.items()}
            self.optimizer_step(update["loss"], update["grad_norm"])
            for name, value in update.items():
                sums[name] += value
            updates += 1
        logged = {name: value / updates for name, value in sums.items()}
        logged.update({name: float(value) for name, value in self.step_metrics(work).items()})
        logged["learning_rate"] = self.optimizer.param_groups[0]["lr"]  # this step's
        self.scheduler_step()
        self.step += 1
        logged["epoch"] = self.step * accumulation / self.micro_per_epoch
        return self.with_skip_count(logged)

    def _reduced(self, update: dict) -> dict:
        """An update's weighted metric sums, summed over ranks (their weights are shares of
        the global normalizer), in one collective."""
        if not self.processes.distributed:
            return update
        names = sorted(update)
        values = torch.stack([torch.as_tensor(update[name], dtype=torch.float32,
                                              device=self.device).reshape(()) for name in names])
        return dict(zip(names, self.processes.sum(values).unbind()))

    def clip_gradients(self) -> torch.Tensor:
        """Clips the trained parameters' gradients to ``max_grad_norm`` (0 / None: no
        clipping) and returns their total norm before clipping (over all shards)."""
        norm = torch.nn.utils.clip_grad_norm_(self.parameters,
                                              self.config.max_grad_norm or math.inf)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def optimizer_step(self, loss: float, grad_norm: float) -> bool:
        """The optimizer update, only when ``loss`` and ``grad_norm`` are finite; returns
        whether it ran. Otherwise ``on_nonfinite="stop"`` raises (nothing of this step is
        applied, nothing is saved) and ``"skip"`` drops the gradients and counts the skip.
        Gradients are zeroed either way."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            return True
        if self.config.on_nonfinite == "stop":
            raise NonFiniteError(
                f"step {self.step + 1}: the loss is {loss:g} and the gradient norm "
                f"{grad_norm:g}; stopped before the optimizer step, and the final model was "
                "not saved. Check the data and the options (learning rate, beta, reward "
                "weights), or pass --on-nonfinite skip to skip such steps")
        self.skipped_steps += 1
        return False

    def scheduler_step(self) -> None:
        """Advances the LR schedule by one step, also after a skipped update (the schedule
        follows the run's steps), without torch's warning about an optimizer not stepped."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                    category=UserWarning)
            self.scheduler.step()

    def with_skip_count(self, metrics: dict) -> dict:
        if self.config.on_nonfinite == "skip":
            metrics["skipped_steps"] = float(self.skipped_steps)
        return metrics

    @torch.no_grad()
    def evaluate(self, pairs: list | None = None) -> dict:
        """Mean metrics over ``pairs`` (default: the evaluation data), names prefixed ``eval_``;
        ``{}`` without any (the RL trainers: their rollouts are the progress signal)."""
        pairs = self.eval_items if pairs is None else pairs
        if not pairs:
            return {}
        was_training = self.model.training
        self.model.eval()
        sums = defaultdict(float)
        size = self.config.eval_batch_size
        starts = range(0, len(pairs), size)
        shown = self.config.progress and self.processes.is_main and len(starts) > 1
        for start in tqdm(starts, desc=f"held-out evaluation, {len(pairs)} rows", unit="batch",
                          leave=False, disable=not shown):
            chunk = pairs[start:start + size]
            with self._autocast():
                loss, metrics = self.compute_loss(self.collate(chunk))
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums[name] + value * (len(chunk) / len(pairs))
        self.model.train(was_training)
        return {f"eval_{name}": float(value) for name, value in sums.items()}

    def train(self, resume_from: str | os.PathLike | None = None) -> dict:
        """Runs to ``total_steps`` and saves the final model in ``output_dir``; returns the last
        logged metrics. ``resume_from``: a checkpoint directory, or ``"latest"``."""
        main, processes = self.processes.is_main, self.processes
        check_reporter(self.config.report_to)
        processes.on_main(lambda: run_dir.prepare(
            self.output_dir, trainer=type(self).__name__, config=self.config.to_dict(),
            resuming=resume_from is not None, overwrite=self.config.overwrite))
        if resume_from is not None:
            self.resume(resume_from)
        log = processes.on_main(lambda: MetricsLog(self.output_dir, resume_step=self.step,
                                                   report_to=self.config.report_to))
        last: dict = {}
        with tqdm(total=self.total_steps, initial=self.step,
                  disable=not (self.config.progress and main), desc=type(self).__name__,
                  unit="step", dynamic_ncols=True) as bar:
            while self.step < self.total_steps:
                metrics = self.training_step()
                done = self.step == self.total_steps
                eval_steps = self.config.eval_steps
                evaluated = bool(eval_steps) and (self.step % eval_steps == 0 or done)
                if evaluated:
                    release_freed_memory(self.device)
                    metrics.update(self.evaluate())
                if self.step % self.config.logging_steps == 0 or done or evaluated:
                    if main:
                        log.log(self.step, metrics)
                    last = metrics
                    self.history.append({"step": self.step, **metrics})
                bar.set_postfix(self.progress_metrics(metrics), refresh=False)
                bar.update(1)
                if self.config.save_steps and (self.step % self.config.save_steps == 0 or done):
                    self.save_checkpoint()
        if main:
            log.close()
        release_freed_memory(self.device)  # what follows (saving, a final evaluation) needs less
        self.check_finite_model("the final model")
        state = self.gathered_state()  # every rank takes part in gathering it
        processes.on_main(lambda: run_dir.save_final_model(
            self.output_dir, lambda directory: self.save_model(directory, state)))
        processes.on_main(lambda: log.plot(self.plot_panels))
        return last

    def progress_metrics(self, metrics: dict) -> dict:
        """What the progress bar shows of a step's metrics (``progress_bar_metrics``)."""
        return {shown: f"{metrics[name]:{spec}}" for shown, name, spec in self.progress_bar_metrics
                if name in metrics}

def _digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _writable_dir(path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".fastalign-write-test-{os.getpid()}"  # one per process: ranks race
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"output_dir {os.fspath(path)!r} is not writable "
                              f"({error.strerror or error}); choose another output_dir") from None
    return path
