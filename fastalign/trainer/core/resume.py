"""Checkpoints and resume, beside the loop (``loop.Trainer`` inherits them): what a checkpoint
holds (weights, optimizer, schedule, RNG of every rank, the trainer's extra state), writing it
from rank 0 with the gathered state, and restoring it, with the options that changed since
listed and applied. The file format is ``checkpoint.py``'s."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

from ..models.lora import save_options
from . import run_dir
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from .integrity import first_nonfinite

# Options that may differ between a run and its resumption without being reported: where it
# runs and how it shows progress, not what it computes.
UNREPORTED_ON_RESUME = ("output_dir", "progress", "overwrite", "parallelism", "dist_timeout")


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite, or a model with such weights: training
    stops before the optimizer step (``on_nonfinite="skip"`` skips the step instead) and such
    a model is never saved."""


class Checkpointing:
    """Saving and resuming a ``Trainer`` (its ``model``, ``optimizer``, ``scheduler``,
    ``processes``, ``step``; ``trained_modules``, ``extra_state`` and ``setup`` say what else
    is saved and what a checkpoint must match)."""

    def check_finite_model(self, what: str) -> None:
        """Raises ``NonFiniteError`` (on every rank) when a trained parameter holds NaN or
        infinity (in any rank's shard)."""
        bad = first_nonfinite((name, p) for module in self.trained_modules()
                              for name, p in module.named_parameters())
        bad = next((found for found in self.processes.gather_objects(bad) if found), None)
        if bad is not None:
            raise NonFiniteError(f"{what} holds non-finite weights ({bad}) after step "
                                 f"{self.step}; it was not saved")

    def gathered_state(self):
        """What ``save_model`` needs of sharded modules, gathered on rank 0 (every rank calls
        it): the model's full weights under FSDP2, else None."""
        return self.processes.model_state(self.model)

    def save_model(self, directory: Path, state_dict: dict | None = None) -> None:
        """The trained model (and tokenizer) in ``directory``, loadable with ``from_pretrained``;
        ``state_dict``: its full weights when the model is sharded (``gathered_state``)."""
        self.model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict,
                                   **save_options(self.model))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    def _trained(self) -> torch.nn.Module:
        """The trained modules as one, the names the optimizer state is keyed by."""
        modules = self.trained_modules()
        return modules[0] if len(modules) == 1 else torch.nn.ModuleList(modules)

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoint-{step}`` (rank 0, with the gathered state of every rank) and
        returns its path; every rank must call it."""
        self.check_finite_model(f"checkpoint-{self.step}")
        processes = self.processes
        model_state = processes.model_state(self.model)
        state = {"optimizer": processes.optimizer_state(self._trained(), self.optimizer),
                 "scheduler": self.scheduler.state_dict(), "extra": self.extra_state(),
                 "skipped_steps": self.skipped_steps,
                 "rng": processes.gather_objects(rng_state())}
        path = processes.on_main(lambda: save_checkpoint(
            self.output_dir, self.step, self.model, self.tokenizer, state, setup=self.setup(),
            config=self.config.to_dict(), model_state=model_state))
        processes.barrier()  # no rank reads or resumes from it before it is complete
        return path or self.output_dir / f"checkpoint-{self.step}"

    def resume(self, path: str | os.PathLike) -> None:
        """Restores weights, optimizer, schedule, step and RNG from a checkpoint. Options of
        this run that differ from the checkpoint's are applied (the learning rate and weight
        decay reach the restored optimizer) and listed on stderr and in ``resumed_changes``;
        what the checkpoint must match (model, data, global batch, seed) is checked instead.
        A checkpoint resumes on any number of processes and with either engine; each rank gets
        its own RNG state back when the number is the same."""
        if str(path) == "latest":
            found = latest_checkpoint(self.output_dir)
            if found is None:
                raise FileNotFoundError(f"resume_from='latest' but {self.output_dir} holds no "
                                        "checkpoint (save one with save_steps)")
            path = found
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
        _ = self.root  # wrapped (and, with FSDP2, sharded) before the weights go in
        loader = (functools.partial(self.processes.load_model_state, self.model)
                  if self.processes.sharded(self.model) else None)
        state = load_checkpoint(path, self.model, self.setup(), rank=self.processes.rank,
                                load_weights=loader)
        # The scheduler first: building it sets the optimizer's learning rate to step 0's,
        # which must not overwrite the one restored below.
        _ = self.scheduler
        self.processes.load_optimizer_state(self._trained(), self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_extra_state(state.get("extra", {}))
        self.step = state["step"]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._apply_changed_options(Path(path).name, state["config"])
        aside = self.processes.on_main(
            lambda: run_dir.set_aside_later_checkpoints(self.output_dir, self.step))
        if aside:
            folder, names = aside
            print(f"fastalign: resuming from step {self.step} starts a new branch of the run: "
                  f"its later checkpoints ({', '.join(names)}) were moved to {folder}/ (delete "
                  "it when you no longer need them)", file=sys.stderr)

    def _apply_changed_options(self, checkpoint: str, recorded: dict) -> None:
        current = self.config.to_dict()
        self.resumed_changes = {
            name: (recorded.get(name), value) for name, value in current.items()
            if name not in UNREPORTED_ON_RESUME and recorded.get(name) != value}
        if not self.resumed_changes:
            return
        shown = "; ".join(f"{name} {old!r} -> {new!r}"
                          for name, (old, new) in self.resumed_changes.items())
        if self.processes.is_main:
            print(f"fastalign: resuming {checkpoint} with options that differ from its run "
                  f"(checkpoint -> now; the new values apply): {shown}", file=sys.stderr)
        # The optimizer and schedule were restored with the checkpoint's learning rate and
        # weight decay: give them this run's, at the resumed step of this run's schedule.
        self.scheduler.base_lrs = [self.config.learning_rate] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.learning_rate
            group["weight_decay"] = self.config.weight_decay
            group["lr"] = self.config.learning_rate * self._lr_factor(self.step)
