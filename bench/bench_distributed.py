"""Per-rank memory and time of one DPO step on several processes, DDP beside FSDP2: fastalign's
DPOTrainer on the tiny Llama (V = 128256, D = 128, 2 layers, fp32, AdamW, a frozen reference
copy), ``batch_size`` pairs per rank, each engine in a fresh ``torchrun`` launch.

Per rank: the training state it holds after the step (parameters and AdamW moments of its
shard or replica, MB; the gradients are freed by then), the peak memory of the measured step (CPU: the process's peak resident set,
VmHWM, reset before the step; CUDA: ``max_memory_allocated``) and the step's time (after a
warm-up step that creates the optimizer state).

    python bench/bench_distributed.py --csv bench/results/distributed_dpo_cpu.csv
    python bench/bench_distributed.py --device cuda --nproc 8 --csv bench/results/distributed_dpo_cuda.csv
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastalign import _measure  # noqa: E402

ENGINES = ("ddp", "fsdp")


def _state_bytes(trainer) -> int:
    """Bytes of this rank's parameters, gradients (if any) and optimizer state (local
    shards)."""
    def local(tensor):
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor
    total = 0
    for parameter in trainer.parameters:
        total += local(parameter).nbytes
        if parameter.grad is not None:
            total += local(parameter.grad).nbytes
        for value in trainer.optimizer.state.get(parameter, {}).values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += local(value).nbytes
    return total


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _measure._proc_status_kib("VmHWM") * 1024


def worker(spec: dict) -> None:
    from fastalign.trainer import DPOConfig, DPOTrainer, tiny_llama
    from fastalign.trainer.core.distributed import local_device
    from fastalign.trainer import demo_preferences
    from fastalign.trainer.models.tokenizer import byte_tokenizer

    device = local_device(torch.device(spec["device"]))
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, batch_size=spec["batch_size"], max_steps=3,
                           max_length=spec["max_length"], parallelism=spec["engine"],
                           progress=False, learning_rate=1e-4)
        trainer = DPOTrainer(tiny_llama().to(device), byte_tokenizer(), config,
                             demo_preferences("train"))
        trainer.training_step()  # warm-up: the optimizer state exists from here on
        _reset_peak(device)
        start = time.perf_counter()
        loss = trainer.training_step()["loss"]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        mine = {"rank": trainer.processes.rank, "seconds": seconds,
                "peak_mb": _peak_bytes(device) / 2**20,
                "state_mb": _state_bytes(trainer) / 2**20, "loss": loss}
        everyone = trainer.processes.gather_objects(mine)
    if trainer.processes.is_main:
        print(json.dumps(everyone))
    import torch.distributed as dist
    dist.destroy_process_group()


def launch(spec: dict, nproc: int) -> list[dict] | dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), str(Path(__file__).resolve()), "--worker",
               json.dumps(spec)]
    env = dict(os.environ, **_measure._MALLOC_ENV)
    if spec["device"] == "cpu":  # the cores shared out between the ranks
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def add_options(parser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per rank")
    parser.add_argument("--max-length", type=int, default=256)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for engine in ENGINES:
        spec = {"device": args.device, "engine": engine, "batch_size": args.batch_size,
                "max_length": args.max_length}
        result = launch(spec, args.nproc)
        base = dict(harness.stamp(device), op="dpo_step", provider=f"fastalign-{engine}",
                    nproc=args.nproc, batch_size_per_rank=args.batch_size,
                    max_length=args.max_length, vocab=128256)
        if isinstance(result, dict):
            rows.append(dict(base, rank="", error=result["error"]))
            continue
        rows += [dict(base, **rank, error="") for rank in result]
    return rows


def report(rows: list[dict], args) -> None:
    harness.print_table(
        f"\n{'engine':14} {'rank':>4} {'state (MB)':>11} {'step peak (MB)':>15} "
        f"{'step (ms)':>10}   ({args.nproc} processes on {args.device})", rows,
        name=lambda row: f"{row['provider']:14}",
        cells=lambda row: f"{row['rank']:>4} {row['state_mb']:11.1f} {row['peak_mb']:15.1f} "
                          f"{row['seconds'] * 1e3:10.0f}")
    by_engine = {engine: [r for r in rows if r["provider"] == f"fastalign-{engine}"
                          and not r["error"]] for engine in ENGINES}
    if all(by_engine.values()):
        worst = {key: [max(r[key] for r in by_engine[e]) for e in ENGINES]
                 for key in ("state_mb", "peak_mb")}
        print(f"\nFSDP2 / DDP, worst rank: training state "
              f"{worst['state_mb'][1] / worst['state_mb'][0]:.2f}x, step peak "
              f"{worst['peak_mb'][1] / worst['peak_mb'][0]:.2f}x")


# The worker runs under torchrun and prints its own reply (the main rank's, for all ranks).
BENCH = harness.Bench(doc=__doc__, options=add_options, worker=worker, run=run, report=report)


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
