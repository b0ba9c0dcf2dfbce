"""Reward hacking, and the KL penalty holding it back: the seed's clapping audience, made concrete.

The proxy reward is ``applause`` (every "!" counts, no cap); the true goal is ``letters`` (the
share of letters and spaces: text, not symbols), logged at weight 0 so it is watched but never
optimized. Two GRPO runs of the built-in tiny model from the same warm start differ only in the
KL coefficient ``beta`` (the reference is the warm-started model; ``--monitor-kl`` logs the KL
at beta = 0 too). Prints a Markdown table of the first and last 10 steps of each run and a few
completions of each final model (docs/reward_hacking.md is its output).

    python scripts/reward_hacking.py --betas 0 0.5 --output runs/hacking     # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

METRICS = [("rewards/applause", "proxy: applause"), ("rewards/letters", "true goal: letters"),
           ("kl", "KL to reference (per token)")]


def run(beta: float, output: Path, steps: int) -> list[dict]:
    command = [sys.executable, "-m", "fastalign", "train", "grpo", "--model", "tiny",
               "--rewards", "applause,letters", "--reward-weights", "1,0", "--beta", str(beta),
               "--monitor-kl", "--max-steps", str(steps), "--output", str(output),
               "--no-progress", "--device", "cpu", "--overwrite"]  # a rerun replaces the last
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    with open(output / "metrics.jsonl") as lines:
        return [json.loads(line) for line in lines]


def samples(output: Path, count: int) -> list[str]:
    from transformers import AutoModelForCausalLM

    from fastalign.trainer import byte_tokenizer
    from fastalign.trainer.algorithms.rollout import generate_rollouts
    from fastalign.trainer.core.bundled import demo_prompts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(output)
    return generate_rollouts(model, byte_tokenizer(), demo_prompts()[:count],
                             max_new_tokens=24).completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path("runs/hacking"))
    args = parser.parse_args()
    table = ["| beta | steps | " + " | ".join(name for _, name in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    shown = []
    for beta in args.betas:
        output = args.output / f"beta-{beta:g}"
        rows = run(beta, output, args.steps)
        window = min(10, len(rows) // 2)
        for label, part in (("first", rows[:window]), ("last", rows[-window:])):
            means = [sum(row[key] for row in part) / len(part) for key, _ in METRICS]
            table.append(f"| {beta:g} | {label} {window} | "
                         + " | ".join(f"{m:.3f}" for m in means) + " |")
        shown.append((beta, samples(output, 3)))
    print("\n" + "\n".join(table) + "\n")
    for beta, texts in shown:
        print(f"beta = {beta:g}, final model:")
        for text in texts:
            print(f"    {text!r}")


if __name__ == "__main__":
    main()
