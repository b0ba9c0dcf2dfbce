"""Freed CPU memory handed back to the operating system between training and evaluation.

A training step's activations are freed when its backward ends, but on Linux most of that
memory stays resident: glibc serves allocations below its mmap threshold (adaptive, up to 32 MiB)
from heap arenas and keeps their freed pages. A process whose GRPO step on SmolLM2 peaked at 6.0 GB
(32 rollouts in one micro-batch, fp32) held 5.8 GB through the greedy evaluation that followed,
which itself needs about 1.5 GB (bench/results/rl_eval_memory_cpu.csv). ``malloc_trim`` returns
those pages; the next step faults them in again, so the trainers call it only where a long phase
that needs less memory follows (evaluation, the end of training).
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

from ..._native import empty_cache


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory(device: torch.device) -> None:
    """On the CPU: frees the native backend's cached gradient block and hands every freed heap
    page back to the system. Elsewhere nothing (CUDA's caching allocator is another matter)."""
    if device.type != "cpu":
        return
    empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
