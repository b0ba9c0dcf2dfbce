"""The output directory of a run: one run per directory, and a final model that is whole or
absent.

A second run into a directory that already holds one would mix them (its metrics truncated,
the first run's checkpoints left for a later ``resume="latest"`` to continue under other
options), so a used directory is refused unless the run resumes it or is told to start over
(``overwrite``), which removes what fastalign wrote there and nothing else. The marker
``fastalign_run.json`` records the trainer, the options and the final model's files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .checkpoint import PREFIX
from .metrics import METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR

RUN_FILE = "fastalign_run.json"
FINAL_PARTIAL = ".final-model.partial"
# Written last, so that a directory with a config holds the weights that go with it.
CONFIG_FILES = ("adapter_config.json", "config.json")


# Where a resume from an earlier checkpoint moves the later ones of the run it leaves.
ABANDONED = "abandoned-"


class OutputDirInUse(ValueError):
    """``output_dir`` holds another run and neither resume nor overwrite was asked for."""


def run_artifacts(directory: Path) -> list[Path]:
    """What fastalign wrote into ``directory`` for a run: checkpoints (complete or partial),
    metrics, the run marker and the final model files it records. Only paths inside
    ``directory`` reached without a symbolic link count: the marker is a file anyone can edit,
    and ``overwrite`` removes what this returns."""
    found = [p for p in directory.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit()]
    found += list(directory.glob(f".{PREFIX}*.partial")) + list(directory.glob(f"{ABANDONED}*"))
    found += [directory / name for name in (METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR, RUN_FILE,
                                            FINAL_PARTIAL)]
    final_files = _read_marker(directory).get("final_files", [])
    found += [directory / name for name in (final_files if isinstance(final_files, list) else [])
              if isinstance(name, str) and name]
    return sorted({path for path in found if _inside(directory, path)})


def _inside(directory: Path, path: Path) -> bool:
    """Whether ``path`` exists strictly inside ``directory`` with no symbolic link on the way
    (an absolute path, ``..`` or a link in a marker's list would point elsewhere)."""
    try:
        relative = path.relative_to(directory)  # an absolute name in the marker replaced it
    except ValueError:
        return False
    if not relative.parts or ".." in relative.parts:
        return False
    current = directory
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            return False
    return current.exists()


def refuse_if_used(directory: Path, *, resuming: bool, overwrite: bool) -> list[Path]:
    """What fastalign wrote in ``directory`` for an earlier run (``run_artifacts``), where
    starting a new run there was asked for properly (``resuming`` it or ``overwrite``).

    Raises:
        OutputDirInUse: the directory holds another run; the message says what to pass.
    """
    used = run_artifacts(directory)
    if used and not resuming and not overwrite:
        shown = ", ".join(p.name for p in used[:4]) + (", ..." if len(used) > 4 else "")
        raise OutputDirInUse(
            f"output_dir {os.fspath(directory)!r} already holds a run ({shown}); resume it "
            "(--resume latest, or train(resume_from='latest')), start over with --overwrite "
            "(overwrite=True: removes what fastalign wrote there), or choose another "
            "output directory")
    return used


def prepare(directory: Path, *, trainer: str, config: dict, resuming: bool,
            overwrite: bool) -> None:
    """Refuses a used ``directory`` (unless ``resuming`` or ``overwrite``), cleans it for an
    ``overwrite``, and writes the run marker.

    Raises:
        OutputDirInUse: the directory holds another run; the message says what to pass.
    """
    used = refuse_if_used(directory, resuming=resuming, overwrite=overwrite)
    if used and not resuming:
        for path in used:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    marker = _read_marker(directory) if resuming else {}
    marker.update(trainer=trainer, config=config, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    _write_marker(directory, marker)


def set_aside_later_checkpoints(directory: Path, step: int) -> tuple[Path, list[str]] | None:
    """Moves the checkpoints (complete or partial) of ``directory`` past ``step`` into a new
    ``abandoned-<time>`` folder there and returns it with their names; None when there are
    none. A run resumed from an earlier checkpoint is a new branch: left in place, the old
    branch's later checkpoints would be what ``resume="latest"`` continues next."""
    later = [p for p in directory.glob(f"{PREFIX}*")
             if p.name[len(PREFIX):].isdigit() and int(p.name[len(PREFIX):]) > step]
    later += [p for p in directory.glob(f".{PREFIX}*.partial")
              if p.name[len(PREFIX) + 1:-len(".partial")].isdigit()
              and int(p.name[len(PREFIX) + 1:-len(".partial")]) > step]
    later = [p for p in later if _inside(directory, p)]
    if not later:
        return None
    aside = directory / f"{ABANDONED}{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}"
    aside.mkdir()
    for path in sorted(later):
        os.replace(path, aside / path.name)
    return aside, sorted(p.name for p in later)


def save_final_model(directory: Path, save) -> None:
    """Calls ``save(partial_dir)`` (``save_pretrained`` and the like), then moves its files
    into ``directory``: the configs last, with any old config removed first, so an
    interrupted save leaves no config that lacks its weights."""
    partial = directory / FINAL_PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save(partial)
    names = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
    for name in CONFIG_FILES:
        (directory / name).unlink(missing_ok=True)
    for name in sorted(names, key=lambda n: n in CONFIG_FILES):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial / name, directory / name)
    shutil.rmtree(partial, ignore_errors=True)
    marker = _read_marker(directory)
    marker["final_files"] = sorted(set(marker.get("final_files", [])) | set(names))
    _write_marker(directory, marker)


def _read_marker(directory: Path) -> dict:
    try:
        marker = json.loads((directory / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # no marker, or a damaged one: it only lists files, nothing is run from it
    return marker if isinstance(marker, dict) else {}


def _write_marker(directory: Path, marker: dict) -> None:
    tmp = directory / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, directory / RUN_FILE)
