"""Checkpoints: the model (``save_pretrained``, safetensors) and tokenizer, plus the optimizer,
LR schedule, step and RNG states, written atomically and read back for an exact resume.

A checkpoint is built in a hidden ``.partial`` directory and renamed into place only when
complete, so an interrupted save never leaves a half-written ``checkpoint-N``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # what save_pretrained writes for a PEFT model
PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or from a different run set-up."""


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, tokenizer,
                    state: dict) -> Path:
    """Writes ``output_dir/checkpoint-{step}`` and returns its path."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    partial = output_dir / f".{PREFIX}{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    state = dict(state, step=step, rng=_rng_state())
    torch.save(state, partial / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, or None."""
    steps = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX):]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            steps.append((int(suffix), path))
    return max(steps)[1] if steps else None


def load_checkpoint(path: str | os.PathLike, model, expected: dict) -> dict:
    """Loads the weights of checkpoint ``path`` into ``model`` and returns its trainer state
    (optimizer, schedule, step), after restoring the RNG states.

    Raises:
        CheckpointError: a missing or unreadable file, weights that do not fit ``model``, or a
            checkpoint whose recorded set-up differs from ``expected`` (say which key).
    """
    path = Path(path)
    weights = path / (ADAPTER_FILE if _is_peft(model) else WEIGHTS_FILE)
    for file in (path / STATE_FILE, weights):
        if not file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint: {file.name} is missing")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which, not a pickle trace
        raise CheckpointError(f"{path / STATE_FILE} is corrupt or not a fastalign trainer "
                              f"state ({type(error).__name__}: {error})") from None
    recorded = state.get("setup", {})
    for key, value in expected.items():
        if recorded.get(key) != value:
            raise CheckpointError(
                f"{path} was written by a different set-up: {key} is {recorded.get(key)!r} "
                f"there and {value!r} now; resume with the same model, data and batch options")
    try:
        missing, unexpected = _load_weights(model, weights)
    except Exception as error:
        raise CheckpointError(f"{weights} cannot be read into the model "
                              f"({type(error).__name__}: {error})") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the model: missing {sorted(missing)[:5]},"
                              f" unexpected {sorted(unexpected)[:5]}")
    _set_rng_state(state["rng"])
    return state


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _load_weights(model, file: Path) -> tuple[list[str], list[str]]:
    """Loads ``file`` into ``model``; returns (missing, unexpected) names, tied parameters not
    counted as missing. A PEFT model's checkpoint holds its adapters only (the base is frozen)."""
    from safetensors.torch import load_file, load_model

    if _is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(file))
        return [], list(result.unexpected_keys)
    missing, unexpected = load_model(model, file, strict=False)
    return [name for name in missing if not _is_tied(model, name)], list(unexpected)


def _is_tied(model, name: str) -> bool:
    """``name`` is a parameter that shares its storage with another one (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    pointer = params[name].data_ptr()
    return any(other != name and p.data_ptr() == pointer for other, p in params.items())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
