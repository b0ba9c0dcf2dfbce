"""Shared plumbing of the bench scripts: stamps, CSV and a plot (summarize.py prints the table).

A result row is a dict with at least: op, provider, mode, dtype, shape fields, time_ms,
peak_mb (extra memory beyond the inputs), and an ``error`` for runs that failed (OOM).
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
import string
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

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


def trainer_model(spec: dict):
    """``(model, tokenizer)`` of the trainer-step benchmarks: ``spec["model"]`` by name
    (``smollm2``: ``make real``), or the tiny Llama of ``spec``'s shape with the byte
    tokenizer (``"tiny"``, the default)."""
    from fastalign.trainer import byte_tokenizer, load_model_and_tokenizer, tiny_llama

    device = spec.get("device", "cpu")
    if spec.get("model", "tiny") != "tiny":
        model, tokenizer = load_model_and_tokenizer(spec["model"])
        return model.to(device), tokenizer
    return tiny_llama(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                      num_layers=spec["layers"], max_positions=2048).to(device), byte_tokenizer()


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


def random_text(rng, tokens: int, tokenizer) -> str:
    """Lowercase words cut to ``tokens`` tokens of ``tokenizer``."""
    words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(5))
                     for _ in range(tokens))
    return tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][:tokens])


def measure_trainer_step(script: str, spec: dict) -> dict:
    """Time and peak memory of one training step of ``spec["provider"]``, each in a fresh
    process running ``script --worker``: the memory worker's reply (``peak_bytes`` and what
    else it reports), ``seconds`` from the timing worker, and ``error`` ("" when none)."""
    command = [str(Path(script).resolve())]
    timing = _measure.run_worker(command, dict(spec, measure="time"), for_memory=False)
    memory = _measure.run_worker(command, dict(spec, measure="memory"), for_memory=True)
    return dict(memory, seconds=timing.get("seconds", float("nan")),
                peak_bytes=memory.get("peak_bytes", float("nan")),
                error=timing.get("error") or memory.get("error") or "")


def report_trainer_steps(results: list[dict], note: str, csv_path: Path | None,
                         extra: str | None = None) -> None:
    """The table of a one-training-step benchmark (``bench_dpo_step``, ``bench_grpo_step``):
    time and peak memory per provider, the peer-over-fastalign ratios, then the CSV."""
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
    if csv_path:
        write_csv(results, csv_path)
        print(f"CSV: {csv_path}")


def finish(rows: list[dict], csv_path: Path | None) -> int:
    """A bench script's last lines: the CSV (when asked for), then its ``exit_code``."""
    if csv_path:
        write_csv(rows, csv_path)
        print(f"CSV: {csv_path}")
    return exit_code(rows)


def exit_code(rows: list[dict]) -> int:
    """A bench script's exit status: 1 when any row's measurement failed, with each failure
    on stderr, so a partly failed run never passes for a good one. Running out of memory at a
    shape is a result, not a failure; so is a provider that needs a device this run has not."""
    failed = [row for row in rows if row.get("error") and row["error"] != "out of memory"
              and "needs CUDA" not in row["error"]]
    for row in failed:
        print(f"failed: {row.get('provider', '?')}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


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


def measure_cpu(script: str, spec: dict) -> dict:
    """Time and memory of one CPU configuration, each in a fresh ``script --worker`` process."""
    timing = _measure.run_worker([script], dict(spec, measure="time"), for_memory=False)
    memory = _measure.run_worker([script], dict(spec, measure="memory"), for_memory=True)
    errors = [r["error"] for r in (timing, memory) if "error" in r]
    return {"error": errors[0]} if errors else {**timing, **memory}


def add_run_arguments(parser: argparse.ArgumentParser, modes) -> None:
    """The options every bench script shares: device, modes, repeats, outputs, worker."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=list(modes), choices=modes)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per CPU measurement")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def add_baseline_argument(parser: argparse.ArgumentParser) -> None:
    """``--baseline REV ...``: see :func:`stage_revisions` (CPU scripts that measure in
    workers)."""
    parser.add_argument("--baseline", nargs="+", default=[], metavar="REV",
                        help="also run fastalign's own providers from these git revisions of "
                             "this repository, in the same run, named provider@REV")


def served_as_worker(args, make_call) -> bool:
    """In a ``--worker`` process: measure the one configuration, print it, and say so."""
    if not args.worker:
        return False
    print(json.dumps(cpu_worker(make_call, as_own_revision(json.loads(args.worker)))))
    return True


# --baseline: fastalign's providers from other git revisions, beside this tree's, in one run.
REPO = Path(__file__).resolve().parent.parent


def _stage_revision(rev: str, root: Path) -> dict:
    """The worker environment that imports fastalign as of git revision ``rev``: its package
    (with ``kernels/`` and ``csrc/`` where the installed package has them) extracted under
    ``root``, first on ``PYTHONPATH`` (ahead of the installed tree), with its own native build
    cache, built here once so that no measurement includes a build."""
    target = root / rev
    if not (target / "fastalign").is_dir():
        archive = subprocess.run(["git", "archive", rev, "fastalign", "kernels", "csrc"],
                                 cwd=REPO, capture_output=True, check=True).stdout
        shutil.rmtree(target, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
        for folder in ("kernels", "csrc"):
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
