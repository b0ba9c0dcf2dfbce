"""A short table from bench CSVs: per configuration, fastalign's time and memory and how many
times more each peer needs (time x / memory x), in the same run.

    python bench/summarize.py bench/results/token_logprobs_cuda.csv
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict


def summarize(path: str, baseline: str = "fastalign") -> None:
    with open(path) as source:
        rows = list(csv.DictReader(source))
    groups = defaultdict(dict)
    for row in rows:
        groups[(row["op"], row["dtype"], row["mode"], int(row["vocab"]), row["n_rows"])][row["provider"]] = row
    peers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != baseline))
    print(f"{path}  ({rows[0]['device']}, commit {rows[0]['commit']}, {rows[0]['date']})")
    print(f"{'op':15} {'dtype':9} {'mode':8} {'N':>6} {'V':>7} {baseline + ' ms':>13} {'MB':>8} "
          + " ".join(f"{p + ' t/m':>22}" for p in peers))
    for (op, dtype, mode, vocab, n_rows), by_provider in groups.items():
        base = by_provider.get(baseline)
        if base is None or base["error"]:
            print(f"{op:15} {dtype:9} {mode:8} {n_rows:>6} {vocab:>7} {baseline} failed: "
                  f"{base['error'] if base else 'missing'}")
            continue
        cells = []
        for peer in peers:
            row = by_provider.get(peer)
            if row is None:
                cells.append("-")
            elif row["error"]:
                cells.append(row["error"][:20])
            else:
                cells.append(f"{float(row['time_ms']) / float(base['time_ms']):.2f}x / "
                             f"{float(row['peak_mb']) / max(float(base['peak_mb']), 1e-3):.1f}x")
        print(f"{op:15} {dtype:9} {mode:8} {n_rows:>6} {vocab:>7} {float(base['time_ms']):13.3f} "
              f"{float(base['peak_mb']):8.1f} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    for csv_path in sys.argv[1:]:
        summarize(csv_path)
