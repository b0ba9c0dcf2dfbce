"""The ``fastalign`` command.

    fastalign demo                                  # DPO on the built-in tiny model (CPU, ~75 s)
    fastalign train dpo --model tiny --data demo --output runs/dpo
    fastalign train rm  --model tiny --data demo --output runs/rm --learning-rate 1e-3
    fastalign train grpo --model tiny --output runs/grpo              # rule rewards (CPU, ~3 min)
    fastalign train ppo --model tiny --reward-model runs/rm --output runs/ppo
    fastalign bon --model tiny --n 8                                  # Best-of-N, gain over N=1
    fastalign train dpo --config dpo.yaml --resume latest
    torchrun --nproc_per_node 2 -m fastalign train dpo --parallelism fsdp   # 2 processes
    fastalign bench                                 # the fused ops beside naive torch
    fastalign train dpo --model smollm2 --lora-r 8 --output runs/lora   # SmolLM2-135M, LoRA
    fastalign merge runs/lora --output runs/merged  # the adapter folded into its base

``--data demo`` is the bundled preference pairs. Rows with a ``split`` field are divided into
``train`` and ``test`` (held out) unless ``--eval-data`` is given. ``--prompts demo`` is their
prompts (the RL prompt set). With ``--model tiny`` the RL commands first give the untrained
model a short supervised warm start on the bundled answers (``--warm-start-steps``). Every
option of the ``*Config`` classes is a flag and a key of the ``--config`` YAML file; flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .trainer.core.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig

HELP = {
    "output_dir": "where the model, checkpoints, metrics.jsonl and metrics.png go",
    "learning_rate": "AdamW's peak learning rate",
    "batch_size": "pairs per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "epochs": "passes over the training data (when max_steps is not set)",
    "max_steps": "optimizer steps; overrides epochs",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "lr_schedule": "learning rate after warm-up: linear (to 0), cosine or constant",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (0: no clipping)",
    "max_length": "tokens of prompt + completion; completions are cut to fit",
    "precision": "fp32, or bf16 autocast",
    "eval_batch_size": "pairs (dpo, rm) or prompts (grpo, ppo) per evaluation batch",
    "eval_steps": "evaluate on the held-out data every N steps (and at the end)",
    "logging_steps": "write metrics every N steps",
    "save_steps": "write a checkpoint every N steps (and at the end)",
    "seed": "seed of the data order",
    "progress": "show a progress bar",
    "overwrite": "start over in an output directory that holds a run (removes what fastalign "
                 "wrote there); without it such a directory is refused unless --resume is given",
    "report_to": "also write the metrics as TensorBoard events in OUTPUT/tensorboard "
                 "(tensorboard; needs the tensorboard package) or not (none)",
    "on_nonfinite": "a NaN/inf loss or gradient norm: stop (before the update, nothing saved) "
                    "or skip the update (counted as skipped_steps)",
    "dist_timeout": "on several processes: seconds a rank waits for a stalled one before "
                    "the run fails (torch's own default: 1800)",
    "parallelism": "on several processes (torchrun): ddp (replicated model, gradients "
                   "all-reduced) or fsdp (FSDP2: parameters, gradients and optimizer state "
                   "sharded per decoder layer)",
    "beta": "DPO's beta: strength of the KL regularization to the reference",
    "loss_type": "sigmoid (DPO), ipo, hinge, robust, exo_pair, ...: fastalign.losses.dpo_loss",
    "label_smoothing": "assumed share of flipped labels (cDPO / robust DPO)",
    "reference": "copy (frozen copy), adapters (PEFT model with LoRA off), precomputed "
                 "(once, cached on disk) or auto (adapters with LoRA, else copy)",
    "lora_r": "rank of LoRA adapters to train instead of the whole model (0: no LoRA)",
    "lora_alpha": "LoRA scaling numerator (the update is alpha / r x B A)",
    "lora_dropout": "dropout on the LoRA adapters' input",
    "lora_target_modules": "comma-separated module names to adapt (q_proj,v_proj), or "
                           "all-linear (every linear layer but the output head)",
    "gradient_checkpointing": "recompute each layer's activations in the backward (less "
                              "memory, about a third more compute)",
    "padding_free": "pack each batch's sequences into fewer rows, kept apart by their "
                    "position ids: fewer, fuller rows (see docs/real_model.md)",
    "center_rewards_coefficient": "weight of the mean squared reward (keeps rewards near 0)",
    "num_generations": "completions per prompt (G), a group",
    "max_new_tokens": "tokens sampled per completion at most",
    "temperature": "sampling temperature (the log-probs are taken at the same temperature)",
    "top_p": "nucleus sampling: keep the most likely tokens holding this probability",
    "clip_low": "PPO clip range below 1 (ratio >= 1 - clip_low)",
    "clip_high": "clip range above 1 (default: clip_low; DAPO uses 0.28)",
    "kl_estimator": "k1, k2 or k3 estimate of the KL to the reference",
    "num_iterations": "optimizer updates per batch of rollouts",
    "scale_rewards": "advantage scale: group std, batch std or none (Dr. GRPO)",
    "monitor_kl": "keep a reference to log the KL even when beta is 0",
    "mini_batch_size": "rollouts per PPO update",
    "ppo_epochs": "passes over each batch of rollouts",
    "kl_coef": "weight of the per-token KL penalty in the rewards",
    "gamma": "discount of future rewards (GAE)",
    "lam": "GAE lambda: bias/variance of the advantages",
    "value_clip": "clip range of the value loss",
    "vf_coef": "weight of the value loss",
    "whiten_rewards": "normalize the per-token rewards (keeping their mean)",
    "missing_eos_penalty": "subtracted from the score of completions without a stop token",
}
CONFIGS = {"dpo": DPOConfig, "rm": RewardConfig, "grpo": GRPOConfig, "ppo": PPOConfig}
KIND_HELP = {"dpo": "DPO", "rm": "reward model (Bradley-Terry)",
             "grpo": "GRPO with reward functions", "ppo": "PPO with a reward model"}


def _add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    group = parser.add_argument_group(f"{config_class.__name__} options (also YAML keys)")
    for field in dataclasses.fields(config_class):
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        text = f"{HELP.get(field.name, '')} (default: {default})"
        if field.type in ("bool", bool):
            group.add_argument(flag, dest=field.name, default=None,
                               action=argparse.BooleanOptionalAction, help=text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(
            str(field.type), str)
        group.add_argument(flag, dest=field.name, type=kind, default=None, metavar=field.name.upper(),
                           help=text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show Python's traceback instead of one line (may "
                             "stand anywhere on the command line)")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.leaves = {}  # (command, kind) -> the parser that reports its unknown options
    commands.add_parser("demo", help="DPO on the built-in tiny model (the README's first command)",
                        add_help=False)
    commands.add_parser("bench", help="the fused ops beside naive torch (time, memory)",
                        add_help=False)
    train = commands.add_parser("train", help="train with DPO, a reward model, GRPO or PPO")
    kinds = train.add_subparsers(dest="kind", required=True)
    for kind, config_class in CONFIGS.items():
        sub = parser.leaves["train", kind] = kinds.add_parser(kind, help=KIND_HELP[kind])
        _add_model_flag(sub)
        if kind in ("dpo", "rm"):
            sub.add_argument("--data", default="demo",
                             help="prompt/chosen/rejected rows: a .jsonl file, 'demo' (the "
                                  "default) for the bundled pairs, or 'arithmetic' for the "
                                  "bundled arithmetic pairs (SmolLM2's own answers rejected)")
            sub.add_argument("--eval-data", default=None, help="held-out rows (.jsonl)")
        else:
            _add_rl_flags(sub, kind)
        sub.add_argument("--output", dest="output_dir_flag", default=None, metavar="DIR",
                         help="output directory (same as --output-dir)")
        sub.add_argument("--config", default=None, help="a YAML file of the options below")
        sub.add_argument("--resume", default=None,
                         help="a checkpoint directory, or 'latest' in the output directory")
        _add_config_flags(sub, config_class)
    merge = parser.leaves["merge", None] = commands.add_parser(
        "merge", help="fold a trained LoRA adapter into its base: a plain Hugging Face model "
                      "directory")
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR",
                       help="a run's output directory (or checkpoint) trained with --lora-r")
    merge.add_argument("--output", required=True, metavar="DIR", help="a new directory")
    merge.add_argument("--base", default=None,
                       help="the base model (default: the one the adapter's config names)")
    bon = parser.leaves["bon", None] = commands.add_parser(
        "bon", help="Best-of-N sampling: the reward gain over one sample")
    _add_model_flag(bon)
    _add_rl_flags(bon, "bon")
    bon.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    bon.add_argument("--max-new-tokens", type=int, default=32)
    bon.add_argument("--temperature", type=float, default=1.0)
    bon.add_argument("--top-p", type=float, default=1.0)
    bon.add_argument("--show", type=int, default=3, help="best completions to print")
    bon.add_argument("--seed", type=int, default=0)
    bon.add_argument("--split", default="train", choices=("train", "test"),
                     help="which rows of a --prompts file with a 'split' field (default train)")
    bon.add_argument("--max-prompts", type=int, default=None, help="the first N prompts only")
    bon.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction,
                     help="show the warm start's progress bar")
    return parser


def _parse(argv) -> argparse.Namespace:
    """``argv`` parsed; an unknown option is reported by the subcommand it was given to (its
    usage, and the options it has that come closest), not by the top-level parser."""
    import difflib

    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        leaf = parser.leaves[(args.command, getattr(args, "kind", None))]
        known = [flag for action in leaf._actions for flag in action.option_strings]
        closest = {flag: difflib.get_close_matches(flag.split("=")[0], known, n=1)
                   for flag in unknown if flag.startswith("-")}
        hints = [f"{flag}: did you mean {close[0]}?" for flag, close in closest.items() if close]
        leaf.error(f"unrecognized arguments: {' '.join(unknown)}"
                   + (f" ({'; '.join(hints)})" if hints else ""))
    return args


def _add_model_flag(parser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (built in, the default), 'smollm2' (SmolLM2-135M-Instruct: "
                             "make real), a .gguf file, or a local directory / cached Hugging "
                             "Face model")
    parser.add_argument("--device", default=None,
                        help="where the models run: cpu, cuda, cuda:1, ... (default: cuda when "
                             "available, else cpu)")


def check_before_loading(args, output_dir: str | None = None, overwrite: bool = False) -> None:
    """What can be refused before minutes of model loading, conversion or warm start: a
    ``--model`` or ``--reward-model`` that does not exist, an output directory that holds
    another run (the trainer refuses it too, later)."""
    from pathlib import Path

    from .trainer.models import loading
    from .trainer.core import run_dir

    loading.check_available(args.model, "--model")
    if getattr(args, "reward_model", None):
        loading.check_available(args.reward_model, "--reward-model")
    if output_dir is not None:
        run_dir.refuse_if_used(Path(output_dir), resuming=args.resume is not None,
                               overwrite=overwrite)


def _add_rl_flags(parser, kind: str) -> None:
    from .trainer.algorithms.rewards import BUILT_IN, DEFAULT

    parser.add_argument("--prompts", default="demo",
                        help="'demo' (the bundled prompts, the default), 'arithmetic' (the "
                             "bundled word problems, for --rewards correct_answer), a .jsonl "
                             "file of rows with a 'prompt' (other fields go to the reward "
                             "functions; rows with a 'split' train on 'train'), or a .txt file "
                             "of one prompt per line")
    if kind in ("grpo", "ppo"):
        parser.add_argument("--eval-prompts", default=None,
                            help="held-out prompts scored on greedy completions before, every "
                                 "--eval-steps and after training (default: the 'test' rows "
                                 "of --prompts)")
    if kind == "ppo":
        parser.add_argument("--eval-rewards", default=None,
                            help="comma-separated reward functions (as grpo's --rewards, e.g. "
                                 "correct_answer,answer_format) that score the held-out "
                                 "completions beside the reward model: measured, not trained "
                                 "on")
    parser.add_argument("--warm-start-steps", type=int, default=None,
                        help="supervised warm-start steps of --model tiny (default 20; 0: none)")
    if kind in ("grpo", "bon"):
        parser.add_argument("--rewards", default=None,
                            help=f"comma-separated reward functions: built in "
                                 f"({', '.join(BUILT_IN)}) or package.module:function "
                                 f"(default without --reward-model: {','.join(DEFAULT)})")
    if kind == "grpo":
        parser.add_argument("--reward-weights", default=None,
                            help="comma-separated weights, one per reward function, then one for "
                                 "--reward-model (default 1)")
    parser.add_argument("--reward-model", default=None, required=kind == "ppo",
                        help="a reward model directory (e.g. the output of fastalign train rm)"
                             + {"grpo": ", scored after --rewards",
                                "bon": " instead of --rewards", "ppo": ""}[kind])


# Settings of the built-in runs (--model tiny): the library defaults suit pretrained models
# (learning rate 1e-5); an untrained tiny model needs larger steps to learn in a few minutes.
TINY_DEFAULTS = {
    "dpo": dict(learning_rate=1e-3),
    "rm": dict(learning_rate=1e-3, epochs=3.0, eval_steps=30),
    "grpo": dict(learning_rate=1e-3, lr_schedule="constant", max_steps=30, num_generations=8,
                 max_new_tokens=24, beta=0.04),
    "ppo": dict(learning_rate=1e-3, lr_schedule="constant", max_steps=30, batch_size=16,
                mini_batch_size=8, ppo_epochs=2, max_new_tokens=24, kl_coef=0.05),
}


def _config(args, config_class):
    """The run's options: the built-in run's settings (``--model tiny``) < the resumed
    checkpoint's options (``--resume``: a resumed run continues as it was) < ``--config`` <
    flags."""
    from .trainer.core.config import ConfigError

    given = _yaml_options(args.config) if args.config else {}
    from_file = set(given)
    for field in dataclasses.fields(config_class):
        value = getattr(args, field.name)
        if value is not None:
            given[field.name] = value
    if args.output_dir_flag:
        given["output_dir"] = args.output_dir_flag
    values = {}
    if args.model == "tiny":
        values.update(TINY_DEFAULTS[args.kind])
        shown = ", ".join(f"{k}={v}" for k, v in TINY_DEFAULTS[args.kind].items())
        print(f"--model tiny: the built-in run's settings {shown} (flags and --config win)")
    if args.resume:
        output_dir = given.get("output_dir", config_class.output_dir)
        values.update(_resumed_options(args.resume, output_dir, config_class))
    values.update(given)
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None
    try:
        return config_class.from_dict(values)
    except ConfigError as error:  # name the file when the bad option came from it
        first = str(error).split()[0]
        from_yaml = first == "unknown" or first in from_file and getattr(args, first) is None
        raise ConfigError(f"{args.config}: {error}" if args.config and from_yaml
                          else str(error)) from None


def _yaml_options(path: str) -> dict:
    """The mapping of options in the YAML file ``path``; anything else is a one-line error."""
    import yaml

    from .trainer.core.config import ConfigError

    try:
        with open(path, encoding="utf-8-sig") as source:
            loaded = yaml.safe_load(source)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})"
                          ) from None
    except yaml.YAMLError as error:  # malformed, or a tag safe_load refuses (!!python/...)
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{line}: not a valid options file ({problem})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of options (key: value lines), got "
                          f"{type(loaded).__name__}")
    return loaded


def _resumed_options(resume: str, output_dir: str, config_class) -> dict:
    """The options saved with the checkpoint ``--resume`` names (none when it has no readable
    manifest: resuming then fails later with the reason)."""
    from pathlib import Path

    from .trainer.core.checkpoint import CheckpointError, latest_checkpoint, read_manifest

    path = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if path is None:
        return {}
    try:
        recorded = read_manifest(path)["config"]
    except CheckpointError:
        return {}
    names = {field.name for field in dataclasses.fields(config_class)}
    return {name: value for name, value in recorded.items()
            if name in names and name not in ("output_dir", "overwrite")}


def _data(args):
    from importlib.resources import files

    from .trainer import load_preferences

    bundled = {"demo": "demo_preferences.jsonl", "arithmetic": "arithmetic_preferences.jsonl"}
    path = (str(files("fastalign") / "data" / bundled[args.data]) if args.data in bundled
            else args.data)
    rows = load_preferences(path)
    if args.eval_data:
        return rows, load_preferences(args.eval_data)
    if any("split" in row for row in rows):
        train = [row for row in rows if row.get("split", "train") == "train"]
        held_out = [row for row in rows if row.get("split") == "test"]
        return train, held_out or None
    return rows, None


def _train(args) -> None:
    from .trainer import DPOTrainer, RewardTrainer, load_model_and_tokenizer, load_reward_model
    from .trainer.core.distributed import resolve_device

    config = _config(args, CONFIGS[args.kind])
    check_before_loading(args, output_dir=config.output_dir, overwrite=config.overwrite)
    if args.kind in ("grpo", "ppo"):
        from .cli_rl import train_rl
        return train_rl(args, config)
    train, held_out = _data(args)
    device = resolve_device(args.device)
    if args.kind == "dpo":
        model, tokenizer = load_model_and_tokenizer(args.model)
        trainer = DPOTrainer(model.to(device), tokenizer, config, train, held_out)
    else:
        model, tokenizer = load_reward_model(args.model)
        trainer = RewardTrainer(model.to(device), tokenizer, config, train, held_out)
    held = ("eval_loss", "eval_rewards/accuracies", "eval_preference_accuracy", "eval_accuracy")
    before = trainer.evaluate() if held_out and args.resume is None else {}
    if before:
        print("held-out before training: " + ", ".join(
            f"{k.removeprefix('eval_')} {v:.4g}" for k, v in before.items() if k in held))
    last = trainer.train(resume_from=args.resume)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                      if k in ("loss", "rewards/accuracies", "accuracy"))
    print(f"done: {trainer.step} steps; " + (f"{shown}; " if shown else "")
          + f"model in {trainer.output_dir}/")
    if held_out:
        after = last if "eval_loss" in last else trainer.evaluate()
        print("held-out after training: " + ", ".join(
            f"{k.removeprefix('eval_')} {v:.4g}" + (f" (before {before[k]:.4g})" if k in before
                                                     else "")
            for k, v in after.items() if k in held))


def main(argv=None) -> None:
    import contextlib
    import os

    # Under torchrun, rank 0 alone speaks (its trainer alone logs and draws the progress bar).
    quiet = os.environ.get("RANK", "0") != "0"
    with open(os.devnull, "w") if quiet else contextlib.nullcontext(sys.stdout) as out:
        with contextlib.redirect_stdout(out):
            _main(sys.argv[1:] if argv is None else argv)
    _leave_process_group()


def _leave_process_group() -> None:
    """Destroys the process group a trainer joined (torch warns about one left behind)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _main(argv) -> None:
    if argv[:1] == ["demo"]:
        from .demo import main as demo
        return demo(argv[1:])
    if argv[:1] == ["bench"]:
        from .kernel_demo import main as bench
        return bench(argv[1:])
    # --debug, anywhere on the line: a failure shows its Python traceback, not one line.
    debug = "--debug" in argv
    args = _parse([arg for arg in argv if arg != "--debug"])
    try:
        if args.command == "merge":
            from .trainer.models.merge import merge_adapter
            merged = merge_adapter(args.adapter_dir, args.output, base=args.base)
            return print(f"merged {args.adapter_dir} into its base: {merged}/")
        if args.command == "bon":
            from .cli_rl import best_of_n_command
            check_before_loading(args)
            return best_of_n_command(args)
        _train(args)
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        # A user's or the system's error (a bad option or file, a full disk, a missing
        # package) is one line naming what to do; anything else is a bug: its traceback.
        if debug:
            raise
        raise SystemExit(f"fastalign: error: {error}") from None


if __name__ == "__main__":
    main()
