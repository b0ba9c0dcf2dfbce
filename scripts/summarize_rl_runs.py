"""The table of docs/real_model.md's RL-loss runs (scripts/real_rl_losses.sh), from their logs
and metrics in bench/results/real_model/: one row per run, then the mean over seeds per arm.

    python scripts/summarize_rl_runs.py [RESULTS_DIR]

Per run: held-out correctness, answer form and reward after training (the log's last
``held-out`` line), the training reward over the first and the last five steps, the entropy and
the bf16 sampler's mismatch KL (``rollout/mismatch_kl``) at the first and the last step, and the
wall time the log's ``time`` reports.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

NAME = re.compile(r"rl-(?P<arm>.+?)(?:-it(?P<iterations>\d+))?-(?P<seed>\d+)\.log$")
HELD_OUT = re.compile(r"after training: reward ([\d.]+).*correct_answer ([\d.]+).*"
                      r"answer_format ([\d.]+)")
WALL = re.compile(r"^real\s+(\d+)m([\d.]+)s", re.M)


def run_row(log: Path) -> dict | None:
    """The numbers of one run, or None where its log has no held-out score after training."""
    match, text = NAME.search(log.name), log.read_text(errors="replace")
    held_out = HELD_OUT.findall(text)
    if not match or not held_out:
        return None
    reward, correct, form = (float(v) for v in held_out[-1])
    steps = [json.loads(line) for line in
             log.with_suffix(".metrics.jsonl").read_text().splitlines() if line.strip()]
    wall = WALL.search(text)
    mismatch = [s["rollout/mismatch_kl"] for s in steps if "rollout/mismatch_kl" in s]
    return dict(arm=match["arm"], iterations=int(match["iterations"] or 1),
                seed=int(match["seed"]), correct=correct, form=form, reward=reward,
                train=(statistics.mean(s["reward"] for s in steps[:5]),
                       statistics.mean(s["reward"] for s in steps[-5:])),
                entropy=(steps[0]["entropy"], steps[-1]["entropy"]),
                mismatch=(mismatch[0], mismatch[-1]) if mismatch else None,
                wall_min=int(wall[1]) + float(wall[2]) / 60 if wall else None)


def pair(values, digits: int) -> str:
    return "" if values is None else " -> ".join(f"{v:.{digits}f}" for v in values)


def main(results: Path) -> None:
    rows = sorted(filter(None, map(run_row, results.glob("rl-*.log"))),
                  key=lambda r: (r["iterations"], r["arm"], r["seed"]))
    print("| arm | updates per batch | seed | correct | form | held-out reward | training reward "
          "| entropy | mismatch KL | wall (min) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        wall = "" if r["wall_min"] is None else f"{r['wall_min']:.1f}"
        print(f"| {r['arm']} | {r['iterations']} | {r['seed']} | {r['correct']:.2f} | "
              f"{r['form']:.2f} | {r['reward']:.3f} | {pair(r['train'], 2)} | "
              f"{pair(r['entropy'], 2)} | {pair(r['mismatch'], 4)} | {wall} |")
    print("\n| arm | updates per batch | seeds | correct (mean) | form (mean) | held-out reward (mean) |")
    print("| --- | --- | --- | --- | --- | --- |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["iterations"]), []).append(r)
    for (arm, iterations), runs in groups.items():
        mean = {k: statistics.mean(r[k] for r in runs) for k in ("correct", "form", "reward")}
        seeds = ", ".join(str(r["seed"]) for r in runs)
        print(f"| {arm} | {iterations} | {seeds} | {mean['correct']:.3f} | {mean['form']:.3f} | "
              f"{mean['reward']:.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/real_model"))
