"""Shared plumbing of the bench scripts: their one ``main`` (the common options, the fresh
worker processes, the CSV, the table, the exit status), stamps, CSV and a plot (summarize.py
prints the kernel sweeps' table), and ``--baseline``'s staged revisions.

A result row is a dict with at least: op, provider, mode, dtype, shape fields, time_ms,
peak_mb (extra memory beyond the inputs), and an ``error`` for runs that failed (OOM).
What the workers build and run where several scripts share it is in _workers.py.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import summarize
from fastalign import _measure


def stamp(device: torch.device) -> dict:
    """Where and when: device name, commit, date and library versions, added to every row."""
    # The GPU machine gets a copy of the working tree without .git: gpu_check.sh passes it on.
    commit = os.environ.get("FASTALIGN_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": name, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "torch": torch.__version__, "triton": triton_version}


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def exit_code(rows: list[dict]) -> int:
    """A bench script's exit status: 1 when any row's measurement failed, with each failure
    on stderr, so a partly failed run never passes for a good one. Running out of memory at a
    shape is a result, not a failure; so is a provider that needs a device this run has not."""
    failed = [row for row in rows if row.get("error") and row["error"] != "out of memory"
              and "needs CUDA" not in row["error"]]
    for row in failed:
        print(f"failed: {row.get('provider', '?')}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def print_table(header: str, rows: list[dict], name: Callable[[dict], str],
                cells: Callable[[dict], str], failed: str = "error") -> None:
    """``header``, then a line per row: its ``name``, then its ``cells``, or for a row whose
    measurement failed (it has no numbers) ``failed: <error>``."""
    print(header)
    for row in rows:
        shown = f"{failed}: {row['error']}" if row["error"] else cells(row)
        print(f"{name(row)} {shown}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Time and peak memory against V, one panel per (dtype, mode), a line per provider."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((row["dtype"], row["mode"]) for row in rows))
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
    for column, (dtype, mode) in enumerate(panels):
        for metric, ax in zip(("time_ms", "peak_mb"), axes[:, column]):
            for provider in providers:
                points = sorted((row["vocab"], row[metric]) for row in rows
                                if (row["dtype"], row["mode"], row["provider"]) == (dtype, mode, provider)
                                and row.get(metric) not in (None, ""))
                if points:
                    ax.plot(*zip(*points), marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("vocabulary V")
            ax.set_ylabel("time (ms)" if metric == "time_ms" else "peak extra memory (MB)")
            ax.set_title(f"{dtype} {mode}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The one main of the bench scripts: each describes itself as a Bench, main does the rest.
class UsageError(Exception):
    """Raised by a script's ``run`` for options that do not go together, before it measures
    anything: reported the way argparse reports its own errors (usage, message, status 2)."""


@dataclass(frozen=True)
class Bench:
    """What one bench script adds to :func:`main`."""

    doc: str  # the script's docstring: its first paragraph is --help's description
    options: Callable[[argparse.ArgumentParser], None]  # the script's own options
    # One measurement in a fresh ``--worker`` process (the spec the script's run sent): the
    # reply, printed as the worker's last line of JSON; None when the worker printed its own.
    worker: Callable[[dict], object]
    run: Callable[[argparse.Namespace], list[dict]]  # the measurements: the CSV's rows
    # Its table (a kernel sweep's comes after summarize.py's table of the CSV).
    report: Callable[[list[dict], argparse.Namespace], None] | None = None
    # Kernel sweeps: the CSV written when --csv is not given. It is written before the tables,
    # since summarize.py's table reads it back; these scripts also take --plot.
    results: Callable[[argparse.Namespace], Path] | None = None
    plot_title: Callable[[list[dict], argparse.Namespace], str] | None = None  # draws a plot
    baseline: bool = False  # takes --baseline REV ... (see stage_revisions)


def main(bench: Bench, argv=None) -> int:
    """A bench script's command line: its options and the shared ones (--csv, --plot,
    --baseline), then in a ``--worker`` process the one measurement, otherwise its runs, the
    CSV, the tables and the exit status (:func:`exit_code`)."""
    parser = argparse.ArgumentParser(description=bench.doc.split("\n\n")[0])
    bench.options(parser)
    parser.add_argument("--csv", type=Path, default=None)
    if bench.results:
        parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    if bench.baseline:
        parser.add_argument("--baseline", nargs="+", default=[], metavar="REV",
                            help="also run fastalign's own providers from these git revisions "
                                 "of this repository, in the same run, named provider@REV")
    args = parser.parse_args(argv)
    if args.worker:
        reply = bench.worker(json.loads(args.worker))
        if reply is not None:
            print(json.dumps(reply))
        return 0
    try:
        rows = bench.run(args)
    except UsageError as error:
        parser.error(str(error))
    if bench.results:  # a kernel sweep: its CSV first, for summarize.py's table reads it back
        csv_path = args.csv or bench.results(args)
        write_csv(rows, csv_path)
        written = [f"CSV: {csv_path}"]
        if bench.plot_title:
            plot_path = args.plot or csv_path.with_suffix(".png")
            plot(rows, plot_path, bench.plot_title(rows, args))
            written.append(f"plot: {plot_path}")
        print("\n" + "\n".join(written) + "\n")
        summarize.summarize(str(csv_path), markdown=False)
    if bench.report:
        bench.report(rows, args)
    if args.csv and not bench.results:  # the others: the table, then the CSV when asked for
        write_csv(rows, args.csv)
        print(f"CSV: {args.csv}")
    return exit_code(rows)


def add_sweep_options(parser: argparse.ArgumentParser, modes) -> None:
    """The options of the kernel sweeps: device, modes, repeats."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=list(modes), choices=modes)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per CPU measurement")
    add_rounds_option(parser)


def add_rounds_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every configuration this many times, the rounds "
                             "interleaved, and keep each one's fastest time (a shared machine's "
                             "load drifts over minutes: every configuration then sees it alike)")


def measure_rounds(configs: list, measure_one: Callable[[object], dict], rounds: int,
                   describe: Callable[[object], str]) -> list[dict]:
    """``measure_one(config)`` of every configuration, ``rounds`` times: all configurations once,
    then all again, each keeping its fastest ``time_ms`` (its memory and other fields from its
    first round: they do not depend on the load), with ``rounds`` recorded."""
    if rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {rounds}")
    best: list[dict | None] = [None] * len(configs)
    for round_index in range(rounds):
        for index, config in enumerate(configs):
            where = f", round {round_index + 1}/{rounds}" if rounds > 1 else ""
            print(f"[{index + 1}/{len(configs)}{where}] {describe(config)}", flush=True)
            result = measure_one(config)
            kept = best[index]
            if kept is None or "error" in kept:
                best[index] = dict(result, rounds=rounds)
            elif result.get("time_ms") is not None and result["time_ms"] < kept["time_ms"]:
                kept["time_ms"] = result["time_ms"]
    return best


def add_step_options(parser: argparse.ArgumentParser, *, hidden: int, layers: int,
                     repeats: int, named_models: bool) -> None:
    """The options of the trainer-step benchmarks: the tiny Llama's shape, the measured steps
    and (``named_models``) ``--model``."""
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=repeats)
    if named_models:
        parser.add_argument("--model", default="tiny",
                            help="tiny (built in) or smollm2 (make real)")


# Measuring: CUDA in this process, the CPU in fresh worker processes (see fastalign/_measure.py).
def measure_cuda(make_call, spec: dict) -> dict:
    """Time (``do_bench``) and peak extra memory of ``make_call(spec, cuda)()``; a failing
    provider (missing peer, out of memory) becomes an ``error`` instead of stopping the run."""
    import triton.testing

    device = torch.device("cuda")
    try:
        call = make_call(spec, device)
        call()  # compile / autotune outside the measurement
        time_ms = triton.testing.do_bench(call, warmup=25, rep=100)
        peak = _measure.peak_extra_bytes(call, device)
        return {"time_ms": time_ms, "peak_mb": peak / 2**20}
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as error:  # a peer that fails to import or run must not stop the others
        return {"error": f"{type(error).__name__}: {error}"[:200]}
    finally:
        torch.cuda.empty_cache()


def cpu_worker(make_call, spec: dict) -> dict:
    """One CPU measurement in this (fresh) process: time or peak memory, as ``spec`` says."""
    device = torch.device("cpu")
    call = make_call(spec, device)
    if spec["measure"] == "time":
        seconds = _measure.median_seconds(call, device, repeats=spec["repeats"], warmup=1)
        return {"time_ms": seconds * 1e3}
    call()  # compile, import lazy modules, fault in the lazily mapped pages of the inputs
    return {"peak_mb": _measure.peak_extra_bytes(call, device) / 2**20}


def call_worker(make_call) -> Callable[[dict], dict]:
    """The ``Bench.worker`` of a kernel sweep: :func:`cpu_worker` of ``make_call``, for this
    tree's fastalign or a staged revision's (:func:`as_own_revision`)."""
    return lambda spec: cpu_worker(make_call, as_own_revision(spec))


def measure_cpu(script: str, spec: dict) -> dict:
    """Time and memory of one CPU configuration, each in a fresh ``script --worker`` process."""
    timing = _measure.run_worker([script], dict(spec, measure="time"), for_memory=False)
    memory = _measure.run_worker([script], dict(spec, measure="memory"), for_memory=True)
    errors = [r["error"] for r in (timing, memory) if "error" in r]
    return {"error": errors[0]} if errors else {**timing, **memory}


def measure(make_call, script: str, spec: dict, device: torch.device) -> dict:
    """One configuration of a kernel sweep: on CUDA here (:func:`measure_cuda`), on the CPU in
    fresh ``script --worker`` processes (:func:`measure_cpu`)."""
    if device.type == "cuda":
        return measure_cuda(make_call, spec)
    return measure_cpu(str(Path(script).resolve()), spec)


# The trainer-step benchmarks (the steps themselves are in _workers.py).
def named_model_shape(args) -> None:
    """Sets ``args.hidden``, ``layers`` and ``vocab`` from the config of ``args.model`` when it
    is not the tiny one, so the CSV and the logits figure describe the model measured."""
    if args.model == "tiny":
        return
    from transformers import AutoConfig

    from fastalign.trainer.models.loading import local_path

    config = AutoConfig.from_pretrained(local_path(args.model), local_files_only=True)
    args.hidden, args.layers = config.hidden_size, config.num_hidden_layers
    args.vocab = config.vocab_size


def measure_trainer_step(script: str, spec: dict) -> tuple[dict, dict]:
    """Time and peak memory of one training step of ``spec["provider"]``, each in a fresh
    process running ``script --worker``: the CSV's ``time_ms``, ``peak_mb`` and ``error`` (""
    when none), in that order, and both workers' whole replies in one dict (what else they
    report; the memory worker's keys over the timing worker's)."""
    command = [str(Path(script).resolve())]
    timing = _measure.run_worker(command, dict(spec, measure="time"), for_memory=False)
    memory = _measure.run_worker(command, dict(spec, measure="memory"), for_memory=True)
    error = timing.get("error") or memory.get("error") or ""
    return dict(time_ms=round(timing.get("seconds", float("nan")) * 1e3, 1),
                peak_mb=round(memory.get("peak_bytes", float("nan")) / 2**20, 1),
                error=error[:200]), {**timing, **memory}


def report_trainer_steps(results: list[dict], note: str, extra: str | None = None) -> None:
    """The table of a one-training-step benchmark (``bench_dpo_step``, ``bench_grpo_step``):
    time and peak memory per provider, then the peer-over-fastalign ratios."""
    head = f"{'provider':16} {'step (ms)':>10} {'peak extra (MB)':>16}"
    print(f"\n{head}{f' {extra:>12}' if extra else ''}   ({note})")
    for row in results:
        shown = f" {row[extra]:12.1f}" if extra else ""
        print(f"{row['provider']:16} {row['time_ms']:10.0f} {row['peak_mb']:16.0f}{shown}  "
              f"{row['error']}")
    by_name = {row["provider"]: row for row in results if not row["error"]}
    ours = by_name.get("fastalign")
    for name, label in (("trl", "TRL"), ("fastalign_packed", "padding-free"),
                        ("fastalign_checkpointed", "checkpointed")):
        if ours and name in by_name:
            other = by_name[name]
            print(f"{label} / fastalign: time {other['time_ms'] / ours['time_ms']:.2f}x, "
                  f"peak memory {other['peak_mb'] / ours['peak_mb']:.2f}x")


# --baseline: fastalign's providers from other git revisions, beside this tree's, in one run.
REPO = Path(__file__).resolve().parent.parent


def _stage_revision(rev: str, root: Path) -> dict:
    """The worker environment that imports fastalign as of git revision ``rev``: its package
    (with the top-level ``kernels/`` and ``csrc/`` of older revisions moved inside) extracted under
    ``root``, first on ``PYTHONPATH`` (ahead of the installed tree), with its own native build
    cache, built here once so that no measurement includes a build."""
    target = root / rev
    if not (target / "fastalign").is_dir():
        top_level = subprocess.run(["git", "ls-tree", "--name-only", rev], cwd=REPO,
                                   capture_output=True, check=True, text=True).stdout.split()
        moved = [folder for folder in ("kernels", "csrc") if folder in top_level]
        archive = subprocess.run(["git", "archive", rev, "fastalign", *moved],
                                 cwd=REPO, capture_output=True, check=True).stdout
        shutil.rmtree(target, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
        for folder in moved:
            shutil.move(str(target / folder), str(target / "fastalign" / folder))
    env = {"PYTHONPATH": str(target), "FASTALIGN_NATIVE_BUILD_DIR": str(target / ".native")}
    build = subprocess.run(
        [sys.executable, "-c", "from fastalign import _native; assert _native.extension()"],
        env=dict(os.environ, **env), cwd=root, capture_output=True, text=True)
    if build.returncode:
        raise SystemExit(f"--baseline {rev}: its native kernels did not build:\n{build.stderr}")
    return env


def stage_revisions(revisions: list[str]) -> dict[str, dict]:
    """``{revision: worker environment}``, this tree first (``""``, no extra environment)."""
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "fastalign-baselines"
    trees = {"": {}}
    for rev in revisions:
        print(f"staging {rev} and building its native kernels ...", flush=True)
        trees[rev] = _stage_revision(rev, root)
    return trees


def per_revision(spec: dict, trees: dict[str, dict], own: bool) -> list[dict]:
    """``spec`` for this tree, and for each other revision when the provider is fastalign's
    own (``own``), as provider ``name@REV``."""
    specs = []
    for rev, env in trees.items():
        if rev and not own:
            continue
        specs.append(dict(spec, provider=f"{spec['provider']}@{rev}" if rev else spec["provider"],
                          tree=env.get("PYTHONPATH", ""), env={**spec.get("env", {}), **env}))
    return specs


def as_own_revision(spec: dict) -> dict:
    """In a worker: ``spec`` with its base provider name, after checking that fastalign was
    imported from the revision the spec names (a wrong tree would be a silent mislabel)."""
    import fastalign
    tree = spec.get("tree")
    if tree and not Path(fastalign.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"fastalign was imported from {fastalign.__file__}, not from {tree}")
    return dict(spec, provider=spec["provider"].partition("@")[0])
