"""What a trainer declares to be run by the ``fastalign`` command: a ``TrainerSpec``, the
``SPEC`` of its module, registered in ``trainer/registry.py``.

A run is read from two dataclasses whose fields carry their help (``config.option``): the
trainer's config (options that shape training: flags, YAML keys, saved with checkpoints) and
its command options (what the command loads: the model, the data, reward functions; flags
only). The command builds both, then ``spec.build(config, options)`` loads what the options
name and returns the trainer; ``run`` evaluates, trains and reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .bundled import preference_splits
from .config import option


@dataclass
class RunOptions:
    """The command options every run takes: the model and where it runs."""
    model: str = option("tiny", "'tiny' (built in, the default), 'smollm2' (SmolLM2-135M-Instruct: "
                                "make real), a .gguf file, or a local directory / cached Hugging "
                                "Face model")
    device: str | None = option(None, "where the models run: cpu, cuda, cuda:1, ... (default: "
                                      "cuda when available, else cpu)")

    def named_models(self) -> list[tuple[str, str]]:
        """``(value, flag)`` of every model the options name, checked before anything loads."""
        return [(self.model, "--model")]


@dataclass
class PreferenceOptions(RunOptions):
    """The trainers on preference pairs (DPO, reward model): the pairs."""
    data: str = option("demo", "prompt/chosen/rejected rows: a .jsonl file, 'demo' (the default) "
                               "for the bundled pairs, or 'arithmetic' for the bundled arithmetic "
                               "pairs (SmolLM2's own answers rejected)")
    eval_data: str | None = option(None, "held-out rows (.jsonl)")

    def load(self, load_model: Callable) -> tuple:
        """``(model on --device, tokenizer, training rows, held-out rows or None)``: the rows
        (``bundled.preference_splits``) first, so a bad data file is refused before the model
        (``load_model(name)``) loads."""
        from .distributed import resolve_device

        train, held_out = preference_splits(self.data, self.eval_data)
        model, tokenizer = load_model(self.model)
        return model.to(resolve_device(self.device)), tokenizer, train, held_out


@dataclass(frozen=True)
class TrainerSpec:
    """One trainer as the command sees it (``fastalign train NAME``)."""
    name: str
    help: str
    config: type  # its TrainConfig subclass
    options: type  # its RunOptions subclass
    # (config, options) -> the trainer, with the models and data the options name loaded.
    build: Callable
    # (trainer, history: the metrics rows logged by this run) -> the closing "done: ..." line.
    summary: Callable
    # Settings of the built-in run (--model tiny): the library defaults suit pretrained models
    # (learning rate 1e-5); an untrained tiny model needs larger steps to learn in minutes.
    tiny_defaults: dict = field(default_factory=dict)
    held_out: str = "rows"  # what its held-out items are, as the report names them
    shown_metrics: tuple[str, ...] | None = None  # eval metrics reported (None: every one)
    number_format: str = ".4g"  # of the reported metrics


def run(spec: TrainerSpec, trainer, resume: str | None) -> dict:
    """Held-out evaluation before (a fresh run), training, the summary, evaluation after;
    returns the last logged metrics."""
    before = {}
    label = f"held-out ({len(trainer.eval_items)} {spec.held_out})"
    if trainer.eval_items and resume is None:
        before = trainer.evaluate()
        print(f"{label} before training: {_shown(spec, before)}")
    last = trainer.train(resume_from=resume)
    print(spec.summary(trainer, trainer.history))
    if trainer.eval_items:
        after = last if any(name.startswith("eval_") for name in last) else trainer.evaluate()
        print(f"{label} after training: {_shown(spec, after, before)}")
    return last


def _shown(spec: TrainerSpec, metrics: dict, before: dict | None = None) -> str:
    before = before or {}
    return ", ".join(
        f"{name.removeprefix('eval_')} {value:{spec.number_format}}"
        + (f" (before {before[name]:{spec.number_format}})" if name in before else "")
        for name, value in metrics.items()
        if name.startswith("eval_") and (spec.shown_metrics is None
                                         or name in spec.shown_metrics))


def last_values(*names: str) -> Callable:
    """A summary of the last logged values of ``names``."""
    def summary(trainer, history: list[dict]) -> str:
        last = history[-1] if history else {}
        shown = ", ".join(f"{name} {last[name]:.4g}" for name in names if name in last)
        return (f"done: {trainer.step} steps; " + (f"{shown}; " if shown else "")
                + f"model in {trainer.output_dir}/")
    return summary


def progress_of(name: str) -> Callable:
    """A summary of ``name``'s mean over the first and the last logged steps of the run (RL:
    the sampled rewards are noisy step to step), and the last KL to the reference."""
    def summary(trainer, history: list[dict]) -> str:
        values = [row[name] for row in history if name in row]
        if not values:
            return f"done: {trainer.step} steps; model in {trainer.output_dir}/"
        window = min(10, max(1, len(values) // 2))
        first, last = sum(values[:window]) / window, sum(values[-window:]) / window
        kl = f", KL to the reference {history[-1]['kl']:.3f}" if "kl" in history[-1] else ""
        return (f"done: {trainer.step} steps; mean {name} over the first {window} logged steps "
                f"{first:.3f}, over the last {window} {last:.3f}{kl}; model in "
                f"{trainer.output_dir}/")
    return summary
