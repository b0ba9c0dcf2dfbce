"""The ``fastalign`` command.

    fastalign demo                                  # DPO on the built-in tiny model (CPU, ~2 min)
    fastalign train dpo --model tiny --data demo --output runs/dpo
    fastalign train rm  --model PATH --data prefs.jsonl --eval-data test.jsonl --output runs/rm
    fastalign train dpo --config dpo.yaml --resume latest
    fastalign bench                                 # the fused ops beside naive torch

``--data demo`` is the bundled preference pairs. Rows with a ``split`` field are divided into
``train`` and ``test`` (held out) unless ``--eval-data`` is given. Every option of
``DPOConfig`` / ``RewardConfig`` is a flag and a key of the ``--config`` YAML file; flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .trainer.config import DPOConfig, RewardConfig

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
    "eval_batch_size": "pairs per evaluation batch",
    "eval_steps": "evaluate on the held-out data every N steps (and at the end)",
    "logging_steps": "write metrics every N steps",
    "save_steps": "write a checkpoint every N steps (and at the end)",
    "seed": "seed of the data order",
    "progress": "show a progress bar",
    "beta": "DPO's beta: strength of the KL regularization to the reference",
    "loss_type": "sigmoid (DPO), ipo, hinge, robust, exo_pair, ...: fastalign.losses.dpo_loss",
    "label_smoothing": "assumed share of flipped labels (cDPO / robust DPO)",
    "reference": "copy (frozen copy), adapters (PEFT model with LoRA off) or precomputed "
                 "(once, cached on disk)",
    "center_rewards_coefficient": "weight of the mean squared reward (keeps rewards near 0)",
}
CONFIGS = {"dpo": DPOConfig, "rm": RewardConfig}


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
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="DPO on the built-in tiny model (the README's first command)",
                        add_help=False)
    commands.add_parser("bench", help="the fused ops beside naive torch (time, memory)",
                        add_help=False)
    train = commands.add_parser("train", help="train with DPO or a reward model")
    kinds = train.add_subparsers(dest="kind", required=True)
    for kind, config_class in CONFIGS.items():
        sub = kinds.add_parser(kind, help="DPO" if kind == "dpo" else "reward model (Bradley-Terry)")
        sub.add_argument("--model", default="tiny",
                         help="'tiny' (built in, the default), or a local directory / cached "
                              "Hugging Face model")
        sub.add_argument("--data", default="demo",
                         help="prompt/chosen/rejected rows: a .jsonl file, or 'demo' (the "
                              "default) for the bundled pairs")
        sub.add_argument("--eval-data", default=None, help="held-out rows (.jsonl)")
        sub.add_argument("--output", dest="output_dir_flag", default=None, metavar="DIR",
                         help="output directory (same as --output-dir)")
        sub.add_argument("--config", default=None, help="a YAML file of the options below")
        sub.add_argument("--resume", default=None,
                         help="a checkpoint directory, or 'latest' in the output directory")
        _add_config_flags(sub, config_class)
    return parser


def _config(args, config_class):
    values = {}
    if args.config:
        import yaml

        with open(args.config) as source:
            loaded = yaml.safe_load(source) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"fastalign: error: {args.config} must hold a mapping of options")
        values.update(loaded)
    for field in dataclasses.fields(config_class):
        value = getattr(args, field.name)
        if value is not None:
            values[field.name] = value
    if args.output_dir_flag:
        values["output_dir"] = args.output_dir_flag
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None
    return config_class.from_dict(values)


def _data(args):
    from importlib.resources import files

    from .trainer import load_preferences

    path = str(files("fastalign") / "data" / "demo_preferences.jsonl") if args.data == "demo" \
        else args.data
    rows = load_preferences(path)
    if args.eval_data:
        return rows, load_preferences(args.eval_data)
    if any("split" in row for row in rows):
        train = [row for row in rows if row.get("split", "train") == "train"]
        held_out = [row for row in rows if row.get("split") == "test"]
        return train, held_out or None
    return rows, None


def _train(args) -> None:
    from .trainer import (DPOTrainer, RewardTrainer, load_model_and_tokenizer,
                          tiny_reward_model)
    from .trainer.tokenizer import byte_tokenizer

    config = _config(args, CONFIGS[args.kind])
    train, held_out = _data(args)
    if args.kind == "dpo":
        model, tokenizer = load_model_and_tokenizer(args.model)
        trainer = DPOTrainer(model, tokenizer, config, train, held_out)
    else:
        if args.model == "tiny":
            model, tokenizer = tiny_reward_model(), byte_tokenizer()
        else:
            model, tokenizer = _reward_model(args.model)
        trainer = RewardTrainer(model, tokenizer, config, train, held_out)
    last = trainer.train(resume_from=args.resume)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                      if k in ("loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies",
                               "accuracy", "eval_accuracy"))
    print(f"done: {trainer.step} steps; {shown}; model in {trainer.output_dir}/")


def _reward_model(name):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1,
                                                                   local_files_only=True)
    except OSError as error:
        raise FileNotFoundError(f"cannot load model {name!r} offline: "
                                f"{str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from .demo import main as demo
        return demo(argv[1:])
    if argv[:1] == ["bench"]:
        from .kernel_demo import main as bench
        return bench(argv[1:])
    args = _parser().parse_args(argv)
    try:
        _train(args)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as error:
        raise SystemExit(f"fastalign: error: {error}") from None


if __name__ == "__main__":
    main()
