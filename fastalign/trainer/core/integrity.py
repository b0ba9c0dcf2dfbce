"""Whether what fastalign reads back is whole and finite: a file's SHA-256 (checkpoints, the GGUF
cache), the first tensor holding NaN or infinity (checkpoints, models, GGUF conversions)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def file_sha256(file: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(file, "rb") as source:
        for block in iter(lambda: source.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def first_nonfinite(named_tensors) -> str | None:
    """``"name: nan"`` (or inf) for the first tensor holding a non-finite value, else None.
    One device sync for all of them."""
    # An FSDP2 parameter is checked in this rank's shard (the trainer gathers the verdicts).
    named = [(name, t.to_local() if hasattr(t, "to_local") else t)
             for name, t in named_tensors if t.is_floating_point()]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    for (name, tensor), finite in zip(named, flags.tolist()):
        if not finite:
            kind = "nan" if bool(torch.isnan(tensor).any()) else "inf"
            return f"{name}: {kind}"
    return None
