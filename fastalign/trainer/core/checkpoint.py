"""Checkpoints: the model (``save_pretrained``, safetensors) and tokenizer, plus the optimizer,
LR schedule, step and RNG states, written atomically and read back for an exact resume.

A checkpoint is built in a hidden ``.partial`` directory and renamed into place only when
complete, so an interrupted save never leaves a half-written ``checkpoint-N``.

Reading one back never executes code: the manifest ``fastalign_checkpoint.json`` (step, the
run's options, what the run must match, a SHA-256 of every other file) is JSON; the weights are
safetensors; ``trainer_state.pt`` (optimizer, schedule, RNG) is read with
``torch.load(weights_only=True)``, which admits tensors and plain containers only, so a pickle
payload planted in it is refused instead of run. The optimizer state is keyed by parameter
names and the weights are whole (gathered from FSDP2 shards), so a checkpoint resumes on any
number of processes; the RNG states are one per rank of the run that wrote it. Every file is checked against its recorded
checksum before it is read, and a damaged one is named.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from .integrity import file_sha256, first_nonfinite
from ..models.lora import is_peft, save_options

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "fastalign_checkpoint.json"
MANIFEST_FORMAT = 3  # 3: optimizer state keyed by parameter names, RNG per rank
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # what save_pretrained writes for a PEFT model
PREFIX = "checkpoint-"
DISK_FULL_BYTES = 64 << 20  # a failed write with less free than this: the disk was full


# Set-up keys a checkpoint shows but a resume does not compare, and keys that checkpoints
# written before fastalign recorded them lack (they resume as before).
SHOWN_ONLY = ("base_model_name",)
RECORDED_SINCE_FORMAT_3 = ("base_model", "base_model_name")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or from a different run set-up."""


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, tokenizer, state: dict,
                    *, setup: dict, config: dict, model_state: dict | None = None) -> Path:
    """Writes ``output_dir/checkpoint-{step}`` and returns its path. ``state`` holds tensors
    and plain containers only (it is read back with ``weights_only=True``), and ``rng``, the
    list of each rank's ``rng_state()`` (default: this process's); ``setup`` (what a resume
    must match) and ``config`` (the run's options) go into the JSON manifest;
    ``model_state``: the model's full weights when it is sharded."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    partial = output_dir / f".{PREFIX}{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    writing = "the model weights"
    try:
        partial.mkdir(parents=True)
        model.save_pretrained(partial, safe_serialization=True, state_dict=model_state,
                              **save_options(model))
        if tokenizer is not None:
            writing = "the tokenizer"
            tokenizer.save_pretrained(partial)
        writing = STATE_FILE
        torch.save(dict(state, rng=state.get("rng") or [rng_state()]), partial / STATE_FILE)
        writing = MANIFEST_FILE
        manifest = {"format": MANIFEST_FORMAT, "step": step, "setup": setup, "config": config,
                    "sha256": {name: file_sha256(partial / name) for name in _files(partial)}}
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    except (OSError, RuntimeError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        _raise_if_disk_full(error, output_dir, f"{final.name} ({writing})")
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def _raise_if_disk_full(error: BaseException, directory: Path, what: str) -> None:
    """A full disk surfaces as ENOSPC, or from torch.save's zip writer as "[enforce fail at
    inline_container.cc] unexpected pos": either way, say so (the checkpoint being written is
    removed; the earlier ones are whole)."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    try:
        full = full or shutil.disk_usage(directory).free < DISK_FULL_BYTES
    except OSError:
        pass
    if full:
        raise OSError(errno.ENOSPC, f"the disk of {directory} is full: writing {what} failed; "
                      "the earlier checkpoints are whole. Free space (or save fewer: "
                      "save_steps) and resume") from None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, or None."""
    steps = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX):]
        if suffix.isdigit() and all((path / name).is_file() for name in (MANIFEST_FILE,
                                                                            STATE_FILE)):
            steps.append((int(suffix), path))
    return max(steps)[1] if steps else None


def read_manifest(path: str | os.PathLike) -> dict:
    """The JSON manifest of checkpoint ``path`` (step, setup, config, checksums).

    Raises:
        CheckpointError: no manifest (an incomplete checkpoint, or one from an older fastalign)
            or one that is not a fastalign manifest.
    """
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST_FILE} is missing "
                              "(an interrupted save, or a checkpoint of an older fastalign)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is corrupt: not JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not all(
            isinstance(manifest.get(key), dict) for key in ("setup", "config", "sha256")):
        raise CheckpointError(f"{file} is not a fastalign checkpoint manifest of format "
                              f"{MANIFEST_FORMAT}")
    return manifest


def load_checkpoint(path: str | os.PathLike, model, expected: dict, *, rank: int = 0,
                    load_weights=None) -> dict:
    """Loads the weights of checkpoint ``path`` into ``model`` and returns its trainer state
    (optimizer, schedule, ``extra``, plus ``step`` and ``config`` from the manifest), after
    restoring the RNG states of rank ``rank`` (modulo the ranks that wrote it).
    ``load_weights(state_dict) -> (missing, unexpected)`` loads a sharded model's weights.

    Raises:
        CheckpointError: a missing, corrupt (checksum) or unreadable file, weights that do not
            fit ``model`` or are not finite, or a checkpoint whose recorded set-up differs from
            ``expected`` (say which key).
    """
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / (ADAPTER_FILE if is_peft(model) else WEIGHTS_FILE)
    for file in (path / STATE_FILE, weights):
        if not file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint: {file.name} is missing")
        if file.name not in manifest["sha256"]:  # a file nobody could check: edited in
            raise CheckpointError(f"{path / MANIFEST_FILE} records no checksum of {file.name}: "
                                  "the manifest was edited or damaged; resume from another "
                                  "checkpoint")
    step = manifest.get("step")
    named = path.name[len(PREFIX):] if path.name.startswith(PREFIX) else None
    if not isinstance(step, int) or step < 0 or (named and named.isdigit() and int(named) != step):
        raise CheckpointError(f"{path / MANIFEST_FILE} records step {step!r} for {path.name}: "
                              "the manifest was edited or damaged; resume from another checkpoint")
    _check_setup(path, manifest["setup"], expected)
    _verify_checksums(path, manifest["sha256"])
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign file, or a pickle that wants to run code: refuse
        raise CheckpointError(f"{path / STATE_FILE} is corrupt or not a fastalign trainer "
                              f"state; it was not loaded ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from None
    rng = state.get("rng") if isinstance(state, dict) else None
    if not isinstance(rng, list) or not rng:
        raise CheckpointError(f"{path / STATE_FILE} holds no RNG states: it is not a whole "
                              "fastalign trainer state; resume from another checkpoint")
    try:
        missing, unexpected = _load_weights(model, weights, load_weights)
    except Exception as error:
        raise CheckpointError(f"{weights} cannot be read into the model "
                              f"({type(error).__name__}: {error})") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the model: missing {sorted(missing)[:5]},"
                              f" unexpected {sorted(unexpected)[:5]}")
    bad = first_nonfinite(model.named_parameters())
    if bad is not None:
        raise CheckpointError(f"{weights} holds non-finite weights ({bad}); resume from an "
                              "earlier checkpoint")
    _set_rng_state(rng[rank % len(rng)])
    return dict(state, step=step, config=manifest["config"])


def _check_setup(path: Path, recorded: dict, expected: dict) -> None:
    """Raises when what the checkpoint's run was set up with differs from this run's."""
    for key, value in expected.items():
        if key in SHOWN_ONLY or (key not in recorded and key in RECORDED_SINCE_FORMAT_3):
            continue  # a name for the message; or a checkpoint from before it was recorded
        if recorded.get(key) == value:
            continue
        if key == "base_model":
            raise CheckpointError(
                f"{path} continues a run of another model: it started from "
                f"{recorded.get('base_model_name')!r} (weights {recorded.get(key)}), this run "
                f"from {expected.get('base_model_name')!r} (weights {value}); resume with the "
                "--model the run started from")
        if key == "batch_size":  # the global batch: another number of processes changes it
            raise CheckpointError(
                f"{path} was written with a global batch of {recorded.get(key)!r} rows per "
                f"micro-batch and this run's is {value!r} (batch_size x processes): pass "
                f"--batch-size so that batch_size x processes = {recorded.get(key)!r}")
        raise CheckpointError(
            f"{path} was written by a different set-up: {key} is {recorded.get(key)!r} "
            f"there and {value!r} now; resume with the same model, data and batch options")


def model_fingerprint(module: torch.nn.Module) -> str:
    """A digest of ``module``'s weights as loaded: every parameter's name, shape and up to 1024
    evenly spaced values (their exact float32 bytes, so the same on any device and number of
    processes). Two models of the same shapes (a GGUF's dequantized weights and the original,
    a fine-tune and its base) differ there; reading 1024 values a tensor costs no pass over the
    weights."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        flat = parameter.detach().reshape(-1)
        # float32 positions are exact up to 2^24 elements (and so kept there: fingerprints
        # recorded in earlier checkpoints stay valid); past it, where float32 would round the
        # last position beyond the tensor's end (a 49152 x 576 embedding), float64.
        exact = torch.float32 if flat.numel() <= 2**24 else torch.float64
        picked = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), 1024),
                                dtype=exact, device=flat.device).long()
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(flat[picked].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def _verify_checksums(path: Path, recorded: dict) -> None:
    for name, expected in recorded.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint: {name} is missing")
        if file_sha256(file) != expected:
            raise CheckpointError(
                f"{file} is corrupt: its SHA-256 differs from the one recorded when the "
                "checkpoint was saved (the file was changed or damaged); resume from another "
                "checkpoint")


def _load_weights(model, file: Path, load_weights=None) -> tuple[list[str], list[str]]:
    """Loads ``file`` into ``model``; returns (missing, unexpected) names, tied parameters not
    counted as missing. A PEFT model's checkpoint holds its adapters only (the base is frozen).
    ``load_weights``: how a sharded model takes the whole state dict."""
    from safetensors.torch import load_file, load_model

    if load_weights is not None:
        missing, unexpected = load_weights(load_file(file))
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
        return [name for name in missing if name not in tied], list(unexpected)
    if is_peft(model):
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
