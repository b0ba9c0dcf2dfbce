"""Which matmul path ``linear_logprobs`` should take on this GPU, from a run of both: reads the
CSV of ``bench_linear_logprobs.py --providers fastalign fastalign_cublas ...`` (the fused Triton
tiles and the cuBLAS path, measured side by side: ``bench/gpu_check.sh`` runs them) and prints,
per batch size, each shape's forward + backward time on both paths, then the entry of
``fastalign.ops._backends.MEASURED_CUDA_MATMUL`` the measurements support: from the smallest
batch at which the cuBLAS path was faster on every shape measured there (and at every larger
batch measured), "cublas"; below it the table's default, the tiles.

    python bench/pick_cuda_matmul.py bench/results/linear_logprobs_cuda.csv --capability 9.0
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict

PATHS = {"fastalign": "tiles", "fastalign_cublas": "cublas"}


def read_times(path: str) -> dict:
    """``{(device, commit): {n_rows: {shape: {path: seconds}}}}`` of the fwd_bwd rows that
    measured a time."""
    runs = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            path_name = PATHS.get(row.get("provider", ""))
            if path_name is None or row.get("mode") != "fwd_bwd" or not row.get("time_ms"):
                continue
            run = runs[(row["device"], row["commit"])]
            run[int(row["n_rows"])][row["shape"]][path_name] = float(row["time_ms"]) / 1e3
    return runs


def choose(by_rows: dict) -> tuple[tuple[int, str], ...] | None:
    """The table's entries for one run: cuBLAS from the smallest measured batch from which on
    it won on every shape measured with both paths (nothing when it never did); None when no
    batch has both paths measured."""
    wins = {}
    for n_rows, shapes in by_rows.items():
        both = [times for times in shapes.values() if len(times) == 2]
        if both:
            wins[n_rows] = all(times["cublas"] < times["tiles"] for times in both)
    if not wins:
        return None
    start = None
    for n_rows in sorted(wins, reverse=True):
        if not wins[n_rows]:
            break
        start = n_rows
    return () if start is None else ((start, "cublas"),)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="bench_linear_logprobs.py's CSV from a CUDA run")
    parser.add_argument("--capability", default=None,
                        help="the GPU's compute capability, e.g. 9.0 (torch.cuda."
                             "get_device_capability()), to name the table's key")
    args = parser.parse_args(argv)
    runs = read_times(args.csv)
    if not runs:
        print(f"{args.csv}: no fwd_bwd rows of both fastalign and fastalign_cublas")
        return 1
    key = "(major, minor)"
    if args.capability:
        major, _, minor = args.capability.partition(".")
        key = f"({int(major)}, {int(minor or 0)})"
    for (device, commit), by_rows in runs.items():
        print(f"linear_logprobs fwd+bwd on {device} at {commit}: tiles vs cublas (ms)")
        for n_rows in sorted(by_rows):
            for shape, times in sorted(by_rows[n_rows].items()):
                cells = [f"{path} {times[path] * 1e3:.2f}" if path in times else f"{path} -"
                         for path in ("tiles", "cublas")]
                ratio = f"  cublas/tiles {times['cublas'] / times['tiles']:.2f}x" \
                    if len(times) == 2 else ""
                print(f"  N={n_rows:<6} {shape:<8} {'  '.join(cells)}{ratio}")
        entries = choose(by_rows)
        if entries is None:
            print(f"no entry for {device}: no batch has both paths measured")
        elif entries:
            print(f"MEASURED_CUDA_MATMUL[{key}] = {entries!r}  # {device}, sweep at {commit}")
        else:
            print(f"no entry for {device}: the cuBLAS path did not win (tiles stay)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
