"""Time and peak memory of one call, measured the same way by the demo and by ``bench/``.

CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
CPU: the process's peak resident set (VmHWM) above its resident set before the call, after
resetting the peak through ``/proc/self/clear_refs`` (Linux). For that number to mean anything,
run the call in a fresh process started by :func:`run_worker`, which fixes glibc's mmap threshold
so every buffer of 64 KiB or more is mapped on allocation and unmapped on free: otherwise a
buffer freed by an earlier call is reused from the heap without raising the resident set.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from ._native import empty_cache

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_logits(batch: int, seq: int, vocab: int, dtype: str, device: torch.device):
    """Seeded ``[batch, seq, vocab]`` logits (scale 2, as a trained head gives) and valid targets,
    the inputs every provider of the demo and the benchmarks sees."""
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, seq, vocab, device=device, generator=generator) * 2
    targets = torch.randint(0, vocab, (batch, seq), device=device, generator=generator)
    return logits.to(DTYPES[dtype]), targets


def random_head(tokens: int, hidden_dim: int, vocab: int, dtype: str, device: torch.device):
    """Seeded hidden states ``[tokens, D]``, an lm_head ``[V, D]`` giving logits of std ~2,
    valid targets ``[tokens]``, and a second (reference) model's hidden states and head: the
    inputs of the demo and of the fused-linear benchmarks."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=generator) * scale).to(DTYPES[dtype])

    hidden, weight = randn(tokens, hidden_dim), randn(vocab, hidden_dim, scale=2 / hidden_dim**0.5)
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    return (hidden, weight, targets, randn(tokens, hidden_dim),
            randn(vocab, hidden_dim, scale=2 / hidden_dim**0.5))


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory ``fn()`` needs beyond what is allocated when it starts (its outputs included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    # The native backend keeps the latest freed gradient's memory for the next one: give it
    # back first, so a call that needs a gradient shows its bytes instead of reusing resident ones.
    empty_cache()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the peak resident set to the current one
    except OSError as error:
        raise RuntimeError("peak CPU memory is measured through Linux's /proc/self/clear_refs, "
                           f"which this system does not offer ({error})") from error
    before = _proc_status_kib("VmRSS")
    result = fn()
    peak = _proc_status_kib("VmHWM")
    del result
    return (peak - before) * 1024


def median_seconds(fn: Callable[[], object], device: torch.device, *, repeats: int,
                   warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_worker(command: list[str], spec: dict, *, for_memory: bool, timeout: float = 1800) -> dict:
    """Runs ``python *command --worker JSON`` in a fresh process and returns the JSON it prints
    last; ``{"error": ..., "detail": ...}`` if it failed (out of memory, say): ``error`` in one
    line, ``detail`` the end of what the worker wrote to stderr (its traceback). ``for_memory``
    fixes the mmap threshold (see the module docstring); leave it off for timings, which it would
    slow down. ``spec["env"]``, if given, adds environment variables for the worker."""
    env = dict(os.environ, **(_MALLOC_ENV if for_memory else {}), **spec.get("env", {}))
    try:
        done = subprocess.run([sys.executable, *command, "--worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "detail": ""}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        stderr = done.stderr.strip().splitlines() or ["no output"]
        return {"error": f"exit {done.returncode}: {stderr[-1]}", "detail": "\n".join(stderr[-25:])}
    return json.loads(lines[-1])


def exit_on_failures(results: dict[str, dict], what: str) -> None:
    """Ends a command that reported ``results`` (label -> a worker's reply): when any of them
    failed, every failure's detail goes to stderr and the process exits with status 1, so a
    partly failed run never passes for a good one."""
    failed = {label: result for label, result in results.items() if "error" in result}
    if not failed:
        return
    for label, result in failed.items():
        print(f"\n{what} failed for {label}: {result['error']}", file=sys.stderr)
        if result.get("detail"):
            print(result["detail"], file=sys.stderr)
    sys.exit(1)
