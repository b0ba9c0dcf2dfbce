"""The command options of the RL commands (``train grpo``, ``train ppo``, ``bon``): the prompt
set, the policy's warm start, reward functions and a reward model, and how they load."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..core.bundled import load_prompts
from ..core.spec import RunOptions
from ..core.config import option
from ..models.loading import load_policy, load_reward_model
from .best_of_n import RewardModelFunction, best_of_n
from .rewards import BUILT_IN, DEFAULT, reward_function

PROMPTS_HELP = ("'demo' (the bundled prompts, the default), 'arithmetic' (the bundled word "
                "problems, for --rewards correct_answer), a .jsonl file of rows with a 'prompt' "
                "(other fields go to the reward functions; rows with a 'split' train on "
                "'train'), or a .txt file of one prompt per line")
REWARDS_HELP = (f"comma-separated reward functions: built in ({', '.join(BUILT_IN)}) or "
                f"package.module:function (default without --reward-model: {','.join(DEFAULT)})")
REWARD_MODEL_HELP = "a reward model directory (e.g. the output of fastalign train rm)"


@dataclass
class PromptOptions(RunOptions):
    """A policy sampling from a prompt set, scored by rewards."""
    prompts: str = option("demo", PROMPTS_HELP)
    warm_start_steps: int | None = option(
        None, "supervised warm-start steps of --model tiny (default 20; 0: none)")
    reward_model: str | None = option(None, REWARD_MODEL_HELP)

    def named_models(self) -> list[tuple[str, str]]:
        named = super().named_models()
        return named + ([(self.reward_model, "--reward-model")] if self.reward_model else [])

    def policy(self, progress: bool = True):
        """``(model, tokenizer)`` of ``--model`` on ``--device`` (``tiny`` warm-started)."""
        return load_policy(self.model, self.device, warm_start_steps=self.warm_start_steps,
                           progress=progress)

    def scorer(self):
        """``(model, tokenizer)`` of ``--reward-model`` (trained) on ``--device``."""
        from ..core.distributed import resolve_device

        model, tokenizer = load_reward_model(self.reward_model, trained=True)
        return model.to(resolve_device(self.device)), tokenizer

    def reward_functions(self, rewards: str | None, weights: str | None = None):
        """``(functions, weights or None)``: ``rewards`` (default: the built-in ones unless
        ``--reward-model`` is given), then the reward model as one more function; ``weights``
        (comma-separated), one per function."""
        names = rewards or ("" if self.reward_model else ",".join(DEFAULT))
        functions = [reward_function(name.strip()) for name in names.split(",") if name.strip()]
        if self.reward_model:
            functions.append(RewardModelFunction(*self.scorer()))
        return functions, _weights(weights, len(functions))


@dataclass
class RLOptions(PromptOptions):
    """What the RL trainers add: held-out prompts."""
    eval_prompts: str | None = option(
        None, "held-out prompts scored on greedy completions before, every --eval-steps and "
              "after training (default: the 'test' rows of --prompts)")

    def seeded_policy(self, config):
        """``policy`` after seeding torch with ``config.seed``: every rank warms the tiny model
        up the same way, rank 0 showing it."""
        torch.manual_seed(config.seed)
        return self.policy(progress=config.progress and os.environ.get("RANK", "0") == "0")

    def prompt_splits(self) -> tuple[list, list]:
        """``(training prompts, held-out prompts)``."""
        held_out = (load_prompts(self.eval_prompts, split=None) if self.eval_prompts
                    else load_prompts(self.prompts, split="test"))
        return load_prompts(self.prompts), held_out


@dataclass
class BestOfNOptions(PromptOptions):
    """``fastalign bon``: sampling options (no trainer, no config)."""
    rewards: str | None = option(None, REWARDS_HELP)
    reward_model: str | None = option(None, REWARD_MODEL_HELP + " instead of --rewards")
    n: int = option(8, "samples per prompt")
    max_new_tokens: int = option(32, "tokens sampled per completion at most")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling: keep the most likely tokens holding this "
                               "probability")
    show: int = option(3, "best completions to print")
    seed: int = option(0, "seed of the sampling")
    split: str = option("train", "which rows of a --prompts file with a 'split' field: train or "
                                 "test", choices=("train", "test"))
    max_prompts: int | None = option(None, "the first N prompts only")
    progress: bool = option(True, "show the warm start's progress bar")


def run_best_of_n(options: BestOfNOptions) -> None:
    """Best-of-N over ``--prompts``: the mean reward of one sample and of the best of N."""
    from .rollout import prompt_text

    if options.rewards and options.reward_model:
        raise ValueError("pass --rewards or --reward-model, not both")
    if options.max_prompts is not None and options.max_prompts < 1:
        raise ValueError(f"--max-prompts must be >= 1, got {options.max_prompts}")
    torch.manual_seed(options.seed)
    model, tokenizer = options.policy(progress=options.progress)
    prompts = load_prompts(options.prompts, split=options.split)[:options.max_prompts]
    if not prompts:
        raise ValueError(f"--prompts {options.prompts!r} has no {options.split!r} rows")
    functions, _ = options.reward_functions(options.rewards)
    result = best_of_n(model, tokenizer, prompts, reward_funcs=functions, n=options.n,
                       max_new_tokens=options.max_new_tokens,
                       temperature=options.temperature, top_p=options.top_p)
    source = (f"reward model {options.reward_model}" if options.reward_model
              else f"rewards {options.rewards or ','.join(DEFAULT)}")
    print(f"Best-of-{options.n} over {len(prompts)} prompts ({source}): mean reward of one "
          f"sample {result.mean_reward:.3f}, of the best of {options.n} {result.best_reward:.3f} "
          f"(gain {result.gain:+.3f})")
    for prompt, completion, reward in list(zip(prompts, result.completions,
                                               result.rewards))[:options.show]:
        print(f"  {prompt_text(prompt)!r} -> {completion!r} (reward {reward:.3f})")


def _weights(text: str | None, count: int) -> list[float] | None:
    if not text:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--reward-weights must be comma-separated finite numbers, got {text!r}")
    if len(weights) != count:
        raise ValueError(f"--reward-weights has {len(weights)} weights for {count} reward "
                         "functions")
    return weights
