"""Resident memory of a GRPO run on SmolLM2-135M-Instruct, phase by phase: the held-out greedy
evaluation before training, one training step, the evaluation after it.

The README's GRPO command (LoRA r16, 4 prompts x 8 completions of up to 48 tokens, 100 held-out
arithmetic problems) with ``--max-steps 1``, each configuration in a fresh process:

    python bench/bench_rl_eval_memory.py --csv bench/results/rl_eval_memory_cpu.csv

``release off`` is the trainer as it was before freed memory was handed back to the system
between training and evaluation (``fastalign/trainer/core/memory.py``); ``micro-batch 8`` runs the
same step as 4 micro-batches of one prompt's 8 rollouts (``--batch-size 1
--gradient-accumulation-steps 4``). Per phase: the peak resident set (VmHWM, reset at the phase's
start through /proc/self/clear_refs), the resident set at its start, its seconds. Needs
``make real``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

import torch

import harness

CONFIGURATIONS = {"release off": dict(release=False, micro_prompts=4),
                  "release on": dict(release=True, micro_prompts=4),
                  "release on, micro-batch 8": dict(release=True, micro_prompts=1)}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def _phase(name: str, call, rows: list) -> object:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak resident set starts again from the current one
    start_mb, started = _status_mb("VmRSS"), time.perf_counter()
    result = call()
    rows.append(dict(phase=name, rss_start_mb=round(start_mb),
                     peak_rss_mb=round(_status_mb("VmHWM")),
                     seconds=round(time.perf_counter() - started, 1)))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return result


def worker(spec: dict) -> list[dict]:
    from fastalign.trainer.core.bundled import load_prompts
    from fastalign.trainer import GRPOConfig, GRPOTrainer, load_model_and_tokenizer
    from fastalign.trainer.core import loop
    from fastalign.trainer.algorithms.rewards import reward_function

    if not spec["release"]:
        loop.release_freed_memory = lambda device: None
    torch.manual_seed(0)
    rows: list[dict] = []
    model, tokenizer = _phase("load", lambda: load_model_and_tokenizer("smollm2"), rows)
    held_out = load_prompts("arithmetic", split="test")[:spec["eval_prompts"]]
    config = GRPOConfig(
        output_dir=spec["output"], overwrite=True, progress=False, lora_r=16,
        learning_rate=3e-4, lr_schedule="constant", batch_size=spec["micro_prompts"],
        gradient_accumulation_steps=4 // spec["micro_prompts"], num_generations=8,
        max_new_tokens=48, temperature=0.7, max_steps=1)
    trainer = GRPOTrainer(model, tokenizer, config, load_prompts("arithmetic"),
                          [reward_function("correct_answer"), reward_function("answer_format")],
                          reward_weights=[1.0, 0.5], eval_prompts=held_out)
    _phase("evaluation before training", trainer.evaluate, rows)
    _phase("one training step", trainer.train, rows)
    _phase("evaluation after training", trainer.evaluate, rows)
    return rows


def add_options(parser) -> None:
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out problems (100)")
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS),
                        choices=list(CONFIGURATIONS))


def run(args) -> list[dict]:
    results = []
    stamp = harness.stamp(torch.device("cpu"))
    for name in args.configurations:
        print(f"{name} ...", flush=True)
        with tempfile.TemporaryDirectory() as output:
            spec = dict(CONFIGURATIONS[name], eval_prompts=args.eval_prompts, output=output)
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                  capture_output=True, text=True)
        if done.returncode != 0:
            results.append(dict(configuration=name, phase="", error=done.stderr.strip()[-300:],
                                **stamp))
            continue
        for row in json.loads(done.stdout.strip().splitlines()[-1]):
            results.append(dict(configuration=name, **row, eval_prompts=args.eval_prompts,
                                error="", **stamp))
    return results


def report(results: list[dict], args) -> None:
    harness.print_table(
        f"\n{'configuration':28} {'phase':28} {'RSS at start':>13} {'peak RSS':>9} {'s':>7}",
        results, name=lambda row: f"{row['configuration']:28}",
        cells=lambda row: f"{row['phase']:28} {row['rss_start_mb']:10} MB "
                          f"{row['peak_rss_mb']:6} MB {row['seconds']:7.1f}",
        failed="failed")


BENCH = harness.Bench(doc=__doc__, options=add_options, worker=worker, run=run, report=report)


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
