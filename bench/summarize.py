"""A short table from bench CSVs: per configuration, fastalign's time and peak extra memory and
each peer's beside it (how many times fastalign's time / memory it needs), from the same run.
A run without fastalign compares against its first provider; CSVs with a ``shape`` column
(linear_logprobs) get a row per shape name instead of per V.

    python bench/summarize.py bench/results/token_logprobs_cuda.csv
    python bench/summarize.py --markdown bench/results/token_logprobs_cpu.csv   # for README.md
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

BASELINE = "fastalign"


def _groups(rows):
    """Rows by (dtype, mode, size): the ``shape`` name where the CSV has one (linear_logprobs),
    else V."""
    groups = defaultdict(dict)
    for row in rows:
        size = row["shape"] if row.get("shape") else int(row["vocab"])
        groups[(row["dtype"], row["mode"], size)][row["provider"]] = row
    return groups


def _ms(value) -> str:
    value = float(value)
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _mb(value) -> str:
    value = float(value)
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def _peer_cells(row, base, markdown: bool) -> list[str]:
    """Markdown: [time ms (time x), peak MB]; terminal: ["time x / memory x"]."""
    if row is None or row["error"]:
        text = "-" if row is None else row["error"][:24]
        return [text, ""] if markdown else [text]
    time_x = float(row["time_ms"]) / float(base["time_ms"])
    if markdown:
        return [f"{_ms(row['time_ms'])} ({time_x:.2f}x)", _mb(row["peak_mb"])]
    mem_x = float(row["peak_mb"]) / max(float(base["peak_mb"]), 1e-3)
    return [f"{time_x:.2f}x / {mem_x:.3g}x"]


def summarize(path: str, markdown: bool) -> None:
    with open(path) as source:
        rows = list(csv.DictReader(source))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    base_name = BASELINE if BASELINE in providers else providers[0]  # a run without fastalign
    peers = [p for p in providers if p != base_name]
    first = rows[0]
    size = "shape" if first.get("shape") else "V"
    if markdown:
        print(f"| dtype | mode | {size} | {base_name} ms | {base_name} MB (x logits) | "
              + " | ".join(f"{p} ms (x) | {p} MB" for p in peers) + " |")
        print("|" + " --- |" * (5 + 2 * len(peers)))
    else:
        print(f"{path}  ({first['device']}, commit {first['commit']}, {first['date']}, "
              f"N={first['n_rows']})")
        print(f"{'dtype':9} {'mode':8} {size:>7} {base_name + ' ms':>13} {'MB':>8} "
              + " ".join(f"{p + ' t/m':>24}" for p in peers))
    for (dtype, mode, vocab), by_provider in _groups(rows).items():
        base = by_provider.get(base_name)
        if base is None or base["error"]:
            print(f"{dtype} {mode} {vocab}: {base_name} failed: {base['error'] if base else 'missing'}")
            continue
        cells = [cell for p in peers for cell in _peer_cells(by_provider.get(p), base, markdown)]
        logits_mb = float(base["logits_mb"])  # 0.0 once rounded, for toy sizes
        ratio = f"{float(base['peak_mb']) / logits_mb:.3f}x" if logits_mb > 0 else "-"
        if markdown:
            print(f"| {dtype} | {mode} | {vocab} | {_ms(base['time_ms'])} | "
                  f"{_mb(base['peak_mb'])} ({ratio}) | " + " | ".join(cells) + " |")
        else:
            print(f"{dtype:9} {mode:8} {vocab:>7} {float(base['time_ms']):13.3f} "
                  f"{float(base['peak_mb']):8.1f} " + " ".join(f"{c:>24}" for c in cells))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    for path in args.csv:
        summarize(path, args.markdown)


if __name__ == "__main__":
    main()
