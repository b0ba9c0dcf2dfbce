"""The RL commands of ``fastalign`` (see ``cli.py``): ``train grpo``, ``train ppo`` and ``bon``."""

from __future__ import annotations

import json
import math

import torch

WARM_START_STEPS = 20  # for --model tiny; see fastalign.trainer.models.tiny.warm_started_tiny


def policy(args, progress: bool = True):
    """``(model, tokenizer)`` of ``--model`` on ``--device``; ``tiny`` gets its supervised
    warm start there."""
    from .trainer.core.distributed import resolve_device
    from .trainer import load_model_and_tokenizer
    from .trainer.models.tiny import TINY, warm_started_tiny

    steps = args.warm_start_steps
    if args.model == TINY:
        steps = WARM_START_STEPS if steps is None else steps
        if steps > 0:
            return warm_started_tiny(steps=steps, progress=progress, device=resolve_device(args.device))
    elif steps:
        raise ValueError("--warm-start-steps is for --model tiny only (fine-tune other models "
                         "before RL)")
    model, tokenizer = load_model_and_tokenizer(args.model)
    return model.to(resolve_device(args.device)), tokenizer


def reward_model(args):
    from .trainer.core.distributed import resolve_device
    from .trainer import load_reward_model

    model, tokenizer = load_reward_model(args.reward_model, trained=True)
    return model.to(resolve_device(args.device)), tokenizer


BUNDLED_PROMPTS = {"arithmetic": "arithmetic.jsonl"}  # --prompts NAME: fastalign/data/FILE


def load_prompts(source: str, split: str | None = "train") -> list:
    """``demo`` (the bundled prompts), ``arithmetic`` (the bundled word problems, rows with an
    ``answer``), a ``.jsonl`` file of rows with a ``prompt`` (text or chat messages; a row's
    other fields go to the reward functions by name), or a text file with one prompt per line.
    Rows with a ``split`` field are kept where it is ``split`` (None: all); rows without one
    count as ``train``."""
    from importlib.resources import files

    from .trainer.core.data import read_lines
    from .trainer.models.tiny import demo_prompts

    if source == "demo":
        return demo_prompts() if split in ("train", None) else []
    if source in BUNDLED_PROMPTS:
        source = str(files("fastalign") / "data" / BUNDLED_PROMPTS[source])
    lines = read_lines(source, "--prompts", "'demo', 'arithmetic', a .jsonl file of rows with a "
                                            "'prompt', or a .txt file of one prompt per line")
    if source.endswith(".jsonl"):
        prompts = []
        for number, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source} line {number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict) or not row.get("prompt"):
                raise ValueError(f"{source} line {number}: a row needs a non-empty 'prompt'")
            row_split = row.pop("split", "train")
            if split is not None and row_split != split:
                continue
            prompts.append(row if len(row) > 1 else row["prompt"])
    else:
        prompts = [line.rstrip("\r\n") for _, line in lines] if split in ("train", None) else []
    if not prompts and split in ("train", None):
        raise ValueError(f"--prompts {source!r} holds no prompt")
    return prompts


def reward_functions(args) -> tuple[list, list[float] | None]:
    """``--rewards`` (default: the built-in ones unless ``--reward-model`` is given), then the
    ``--reward-model`` as one more reward function; ``--reward-weights``, one per function."""
    from .trainer.algorithms.best_of_n import RewardModelFunction
    from .trainer.algorithms.rewards import DEFAULT, reward_function

    names = args.rewards or ("" if args.reward_model else ",".join(DEFAULT))
    functions = [reward_function(name.strip()) for name in names.split(",") if name.strip()]
    if args.reward_model:
        functions.append(RewardModelFunction(*reward_model(args)))
    weights = None
    if getattr(args, "reward_weights", None):
        try:
            weights = [float(w) for w in args.reward_weights.split(",")]
        except ValueError:
            weights = []
        if not weights or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"--reward-weights must be comma-separated finite numbers, got "
                             f"{args.reward_weights!r}")
        if len(weights) != len(functions):
            raise ValueError(f"--reward-weights has {len(weights)} weights for "
                             f"{len(functions)} reward functions")
    return functions, weights


def train_rl(args, config) -> None:
    from .trainer import GRPOTrainer, PPOTrainer
    from .trainer.algorithms.rewards import reward_function

    import os

    torch.manual_seed(config.seed)
    # Every rank warms the tiny model up the same way (same seed); rank 0 shows it.
    main_rank = os.environ.get("RANK", "0") == "0"
    model, tokenizer = policy(args, progress=config.progress and main_rank)
    prompts = load_prompts(args.prompts)
    held_out = (load_prompts(args.eval_prompts, split=None) if args.eval_prompts
                else load_prompts(args.prompts, split="test"))
    if args.kind == "grpo":
        functions, weights = reward_functions(args)
        trainer = GRPOTrainer(model, tokenizer, config, prompts, functions,
                              reward_weights=weights, eval_prompts=held_out)
        progress_key = "reward"
    else:
        checks = [reward_function(name.strip()) for name in (args.eval_rewards or "").split(",")
                  if name.strip()]
        if checks and not held_out:
            raise ValueError("--eval-rewards scores held-out prompts and there are none: pass "
                             "--eval-prompts FILE, or --prompts with 'test' rows (arithmetic)")
        scorer, reward_tokenizer = reward_model(args)
        trainer = PPOTrainer(model, tokenizer, config, prompts, scorer,
                             reward_tokenizer=reward_tokenizer, eval_prompts=held_out,
                             eval_reward_funcs=checks)
        progress_key = "score"
    before = None
    if held_out and args.resume is None:
        before = trainer.evaluate()
        print(f"held-out ({len(held_out)} prompts, greedy) before training: {_shown(before)}")
    trainer.train(resume_from=args.resume)
    with open(trainer.output_dir / "metrics.jsonl") as lines:
        rows = [json.loads(line) for line in lines]
    values = [row[progress_key] for row in rows if progress_key in row]
    window = min(10, max(1, len(values) // 2))
    first, last = sum(values[:window]) / window, sum(values[-window:]) / window
    kl = f", KL to the reference {rows[-1]['kl']:.3f}" if "kl" in rows[-1] else ""
    print(f"done: {trainer.step} steps; mean {progress_key} over the first {window} logged steps "
          f"{first:.3f}, over the last {window} {last:.3f}{kl}; model in {trainer.output_dir}/")
    if trainer.eval_items:
        after = (rows[-1] if any(k.startswith("eval_") for k in rows[-1])
                 else trainer.evaluate())
        print(f"held-out ({len(trainer.eval_items)} prompts, greedy) after training: "
              f"{_shown(after)}" + (f" (before: {_shown(before)})" if before else ""))


def _shown(metrics: dict) -> str:
    return ", ".join(f"{name.removeprefix('eval_')} {value:.3f}" for name, value in metrics.items()
                     if name.startswith("eval_"))


def best_of_n_command(args) -> None:
    from .trainer import best_of_n
    from .trainer.algorithms.rollout import prompt_text
    from .trainer.algorithms.rewards import DEFAULT

    if args.rewards and args.reward_model:
        raise ValueError("pass --rewards or --reward-model, not both")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be >= 1, got {args.max_prompts}")
    torch.manual_seed(args.seed)
    model, tokenizer = policy(args, progress=args.progress)
    prompts = load_prompts(args.prompts, split=args.split)[:args.max_prompts]
    if not prompts:
        raise ValueError(f"--prompts {args.prompts!r} has no {args.split!r} rows")
    options = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p)
    functions, _ = reward_functions(args)
    result = best_of_n(model, tokenizer, prompts, reward_funcs=functions, **options)
    source = (f"reward model {args.reward_model}" if args.reward_model
              else f"rewards {args.rewards or ','.join(DEFAULT)}")
    print(f"Best-of-{args.n} over {len(prompts)} prompts ({source}): mean reward of one sample "
          f"{result.mean_reward:.3f}, of the best of {args.n} {result.best_reward:.3f} "
          f"(gain {result.gain:+.3f})")
    for prompt, completion, reward in list(zip(prompts, result.completions,
                                               result.rewards))[:args.show]:
        print(f"  {prompt_text(prompt)!r} -> {completion!r} (reward {reward:.3f})")
