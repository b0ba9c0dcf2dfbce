"""``merge_adapter(adapter_dir, output)``: a trained LoRA adapter folded into its base, saved as
a plain Hugging Face model directory (``fastalign merge``), and nothing written when the adapter
does not fit that base or the result would not be finite.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from .lora import ADAPTER_CONFIG, quiet_peft

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"  # what older PEFT saved: never loaded (see merge_adapter)


def merge_adapter(adapter_dir, output, *, base: str | None = None) -> Path:
    """Folds the LoRA adapter in ``adapter_dir`` (a trainer's output or checkpoint) into its
    base model, ``base`` or the one its ``adapter_config.json`` names, and saves the result as
    a plain Hugging Face directory ``output`` (with the tokenizer found beside the adapter,
    else the base's). Returns ``output``.

    Nothing is written unless every weight of the adapter file went into a module of the base
    and every adapter weight the base's modules take came from the file (an adapter of another
    model, or one whose names were changed, would otherwise merge into an unchanged base), and
    the merged weights are finite. An adapter whose ``lora_B`` are all zero (saved before its
    first step) merges into the base unchanged, with a warning.

    Raises:
        FileNotFoundError: no adapter in ``adapter_dir``, or a base that cannot be loaded.
        ValueError: no base recorded and none given; ``output`` not empty, or a file; the
            adapter's weights a pickle (``adapter_model.bin``), unreadable, not finite, or not
            those of the base's modules; merged weights not finite.
        ImportError: no ``peft`` package.
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no LoRA adapter ({ADAPTER_CONFIG} is "
                                "missing): pass the output directory of a run with --lora-r")
    weights_path = _adapter_weights_path(adapter_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a directory; choose a new directory")
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} is not empty; choose a new directory")
    try:
        from peft import PeftConfig
    except ImportError:
        raise ImportError('fastalign merge needs the peft package: pip install "fastalign[real]" '
                          "(or pip install peft)") from None
    try:
        recorded = json.loads(config_path.read_text(encoding="utf-8"))
        adapter_config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as error:  # not JSON, not a PEFT config, fields this PEFT does not know
        raise ValueError(f"{config_path} is not a readable PEFT adapter config "
                         f"({type(error).__name__}: {_first_line(error)}); pass the output "
                         "directory of a run with --lora-r") from None
    if not base and not recorded.get("base_model_name_or_path"):
        raise ValueError(f"{config_path} names no base model (it was trained "
                         "from one built in memory, e.g. a warm-started tiny model): pass "
                         "--base MODEL")
    weights = _read_adapter_weights(weights_path)
    model, tokenizer = _load_base(base, recorded, config_path)
    base = base or recorded["base_model_name_or_path"]
    with quiet_peft():
        merged = _with_adapter(model, adapter_config, weights, weights_path,
                               base).merge_and_unload()
    _check_finite(merged, adapter_dir, base)
    _warn_if_unchanged(weights, weights_path)
    if any(adapter_dir.glob("tokenizer*.json")):
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(adapter_dir, local_files_only=True)
        except Exception as error:  # damaged tokenizer files fail anywhere in the reader
            raise ValueError(f"cannot read the tokenizer in {adapter_dir} "
                             f"({type(error).__name__}: {_first_line(error)}); remove its "
                             "tokenizer*.json files to save the base's tokenizer instead") from None
    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        merged.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        if output.exists():
            output.rmdir()
        partial.rename(output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return output


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else ""


def _adapter_weights_path(adapter_dir: Path) -> Path:
    """``adapter_dir``'s safetensors weights; a pickle (``adapter_model.bin``) is refused."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if path.is_file():
        return path
    pickled = adapter_dir / PICKLED_WEIGHTS
    if pickled.is_file():
        raise ValueError(
            f"{pickled} is a pickle, which fastalign never loads (unpickling can run code): "
            f"convert it to {ADAPTER_WEIGHTS} where you trust it, e.g. python -c \"import "
            f"torch, safetensors.torch as st; st.save_file(torch.load('{pickled}', "
            f"weights_only=True), '{path}')\"")
    raise FileNotFoundError(f"{adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: "
                            "pass a run's output directory or one of its checkpoint-* "
                            "directories (saved whole)")


def _read_adapter_weights(path: Path) -> dict:
    """The tensors of ``path``, refused when unreadable, empty, or not finite."""
    from safetensors.torch import load_file

    try:
        weights = load_file(path)
    except Exception as error:  # SafetensorError: truncated, not safetensors at all...
        raise ValueError(f"{path} is not a readable safetensors file ({_first_line(error)}): "
                         "it is damaged or was not written whole; merge another "
                         "checkpoint") from None
    if not weights:
        raise ValueError(f"{path} holds no tensors, so it would merge into an unchanged base: "
                         "merge another checkpoint, or save the adapter again")
    bad = [name for name, tensor in weights.items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"{path}: NaN or infinite values in {len(bad)} of its "
                         f"{len(weights)} tensors (first: {sorted(bad)[0]}), so the merged model "
                         "would too: merge an earlier checkpoint (checkpoint-*) from before "
                         "the training diverged")
    return weights


def _load_base(base: str | None, recorded: dict, config_path: Path):
    """``(model, tokenizer)`` of the base: ``base`` (``--base``) or the one ``config_path``
    records; one that cannot be loaded is named as the argument or the record it came from."""
    from .loading import check_available, load_model_and_tokenizer, load_reward_model

    name = base or recorded["base_model_name_or_path"]
    what = "--base" if base else f"{config_path} records the base model"
    load = load_reward_model if recorded.get("task_type") == "SEQ_CLS" else load_model_and_tokenizer
    try:
        check_available(name, what)
        return load(name)
    except (FileNotFoundError, ValueError, ImportError) as error:
        text = str(error)
        if text.startswith("--model "):  # the loaders' messages name the training commands'
            text = ("--base" if base else "base model") + text[len("--model"):]
        elif not base and isinstance(error, FileNotFoundError):  # say where to pass one
            text += (" as --base MODEL" if text.endswith("(the built-in model)")
                     else "; pass the model it was trained from as --base MODEL")
        raise type(error)(text) from None


def _with_adapter(model, adapter_config, weights: dict, weights_path: Path, base: str):
    """``model`` with the adapter of ``adapter_config`` and ``weights`` loaded, checked to fit:
    every tensor of the file goes into the model, and every adapter weight of the model comes
    from the file (PEFT itself loads what fits and only warns about what is missing)."""
    from peft import get_peft_model, set_peft_model_state_dict

    adapter_config.inference_mode = True
    adapter_config.base_model_name_or_path = None  # PEFT warns when it renames it
    with torch.random.fork_rng(devices=[]):  # adapters are initialised before they are loaded
        try:
            model = get_peft_model(model, adapter_config)
        except ValueError as error:  # e.g. its target modules are not in the base
            raise ValueError(f"{weights_path.parent} is not an adapter of the base {base!r} "
                             f"({_first_line(error)}): pass --base the model it was trained "
                             "from") from None
    try:
        result = set_peft_model_state_dict(model, weights)
    except KeyError as error:  # a saved module (a reward model's score head) is missing
        raise ValueError(f"{weights_path} does not fit the base {base!r}: it lacks "
                         f"{error.args[0]}; pass --base the model it was trained from, or "
                         "merge an adapter saved by fastalign (PEFT save_pretrained)") from None
    except RuntimeError as error:  # shapes differ: another model's adapter
        detail = next((line.strip() for line in str(error).splitlines()
                       if "size mismatch" in line), _first_line(error))
        raise ValueError(f"{weights_path} does not fit the base {base!r} ({detail}); pass "
                         "--base the model it was trained from") from None
    marker = ".default."  # PEFT names each adapter weight of the model by its adapter's name
    missing = sorted(key.replace(marker, ".") for key in result.missing_keys
                     if marker in f"{key}.")
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        problems = []
        if unexpected:
            problems.append(f"{len(unexpected)} of its {len(weights)} tensors "
                            f"{'matches' if len(unexpected) == 1 else 'match'} no adapter "
                            f"weight of the model (first: {unexpected[0]})")
        if missing:
            problems.append(f"{len(missing)} adapter "
                            f"{'weight' if len(missing) == 1 else 'weights'} of the model "
                            f"{'is' if len(missing) == 1 else 'are'} not in it "
                            f"(first: {missing[0]})")
        raise ValueError(f"{weights_path} does not fit the base {base!r}: "
                         f"{' and '.join(problems)}; pass --base the model it was trained from, "
                         "or merge an adapter saved by fastalign (PEFT save_pretrained) with "
                         "its names unchanged")
    return model


def _check_finite(model, adapter_dir: Path, base: str) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"merging {adapter_dir} into {base!r} gives NaN or infinite values "
                             f"in {name} (the base holds them, or the adapter overflows its "
                             "dtype); nothing was written")


def _warn_if_unchanged(weights: dict, weights_path: Path) -> None:
    """Warns when every ``lora_B`` is zero: the LoRA products are zero, the merge changes no
    weight (what PEFT initialises; an adapter saved before its first optimizer step)."""
    ups = [tensor for name, tensor in weights.items() if ".lora_B" in name
           or ".lora_embedding_B" in name]
    if ups and not any(tensor.any() for tensor in ups):
        warnings.warn(f"{weights_path}: every lora_B weight is zero (as initialised), so the "
                      "LoRA weights of the merged model equal its base's: was the adapter "
                      "saved before its first training step?", stacklevel=3)
