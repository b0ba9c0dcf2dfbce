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


def _add_option_flags(parser, options_class, *, title: str, unset_default: bool) -> None:
    """One flag per field of the dataclass ``options_class`` (``--learning-rate`` for
    ``learning_rate``), with the field's help. ``unset_default``: flags default to None, so
    that the run's options can be layered (``_config``); otherwise to the field's default."""
    from .trainer.core.config import option_help, option_type

    group = parser.add_argument_group(title)
    for field in dataclasses.fields(options_class):
        flag = "--" + field.name.replace("_", "-")
        text = option_help(options_class, field.name)
        if "default" not in text:  # a help that explains its default says it already
            text += f" (default: {field.default})"
        default = None if unset_default else field.default
        kind, _ = option_type(field)
        if kind is bool:
            group.add_argument(flag, dest=field.name, default=default, help=text,
                               action=argparse.BooleanOptionalAction)
            continue
        group.add_argument(flag, dest=field.name, type=kind, default=default, help=text,
                           metavar=field.name.upper(), choices=field.metadata.get("choices"),
                           required=field.metadata.get("required", False))


def _parser() -> argparse.ArgumentParser:
    from .trainer.algorithms.rl_options import BestOfNOptions
    from .trainer.registry import TRAINERS

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
    train = commands.add_parser(
        "train", help="train: " + ", ".join(f"{spec.name} ({spec.help})"
                                            for spec in TRAINERS.values()))
    kinds = train.add_subparsers(dest="kind", required=True)
    for kind, spec in TRAINERS.items():
        sub = parser.leaves["train", kind] = kinds.add_parser(kind, help=spec.help)
        _add_option_flags(sub, spec.options, title="what the run loads", unset_default=False)
        sub.add_argument("--output", dest="output_dir_flag", default=None, metavar="DIR",
                         help="output directory (same as --output-dir)")
        sub.add_argument("--config", default=None, help="a YAML file of the options below")
        sub.add_argument("--resume", default=None,
                         help="a checkpoint directory, or 'latest' in the output directory")
        _add_option_flags(sub, spec.config, unset_default=True,
                          title=f"{spec.config.__name__} options (also YAML keys)")
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
    _add_option_flags(bon, BestOfNOptions, title="options", unset_default=False)
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


def _options(args, options_class):
    """The dataclass ``options_class`` of the parsed flags."""
    return options_class(**{field.name: getattr(args, field.name)
                            for field in dataclasses.fields(options_class)})


def check_before_loading(options, output_dir: str | None = None, resuming: bool = False,
                         overwrite: bool = False) -> None:
    """What can be refused before minutes of model loading, conversion or warm start: a
    model the options name that does not exist, an output directory that holds another run
    (the trainer refuses it too, later)."""
    from pathlib import Path

    from .trainer.core import run_dir
    from .trainer.models import loading

    for name, flag in options.named_models():
        loading.check_available(name, flag)
    if output_dir is not None:
        run_dir.refuse_if_used(Path(output_dir), resuming=resuming, overwrite=overwrite)


def _config(args, spec):
    """The run's options: the built-in run's settings (``--model tiny``) < the resumed
    checkpoint's options (``--resume``: a resumed run continues as it was) < ``--config`` <
    flags."""
    from .trainer.core.config import ConfigError

    config_class = spec.config
    given = _yaml_options(args.config) if args.config else {}
    from_file = set(given)
    for field in dataclasses.fields(config_class):
        value = getattr(args, field.name)
        if value is not None:
            given[field.name] = value
    if args.output_dir_flag:
        given["output_dir"] = args.output_dir_flag
    values = {}
    if args.model == "tiny" and spec.tiny_defaults:
        values.update(spec.tiny_defaults)
        shown = ", ".join(f"{k}={v}" for k, v in spec.tiny_defaults.items())
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


def _train(args) -> None:
    from .trainer.core.spec import run
    from .trainer.registry import TRAINERS

    spec = TRAINERS[args.kind]
    config = _config(args, spec)
    options = _options(args, spec.options)
    check_before_loading(options, output_dir=config.output_dir,
                         resuming=args.resume is not None, overwrite=config.overwrite)
    run(spec, spec.build(config, options), args.resume)


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
    """Destroys the process group a trainer joined (torch warns about one left behind), once
    every rank is done: a rank that tears gloo down while another is still inside the last
    collective can abort that one ("terminate called without an active exception", seen once
    in the two-rank trainer tests under load)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
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
            from .trainer.algorithms.rl_options import BestOfNOptions, run_best_of_n
            options = _options(args, BestOfNOptions)
            check_before_loading(options)
            return run_best_of_n(options)
        _train(args)
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        # A user's or the system's error (a bad option or file, a full disk, a missing
        # package) is one line naming what to do; anything else is a bug: its traceback.
        if debug:
            raise
        raise SystemExit(f"fastalign: error: {error}") from None


if __name__ == "__main__":
    main()
