"""Sweeps the tile width and warps of the token_logprobs Triton kernels on a GPU.

Prints the achieved bandwidth of each (BLOCK_V, num_warps) for the forward and the backward
kernel, beside a measured device-to-device copy, so the defaults in
kernels/token_logprobs.py can be chosen from numbers:

    python bench/tune_token_logprobs.py --csv bench/results/tune_token_logprobs.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastalign import kernels  # noqa: E402
from fastalign._layout import RowLayout  # noqa: E402


def copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy of 4 GiB, counting bytes read plus bytes written."""
    source = torch.empty(2**30, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=5, rep=50)
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


def sweep(dtype, n_rows: int, vocab: int, device) -> list[dict]:
    """Time of each kernel at each (BLOCK_V, num_warps) on random [n_rows, vocab] logits."""
    logits = (torch.randn(n_rows, vocab, device=device) * 2).to(dtype)
    targets = torch.randint(0, vocab, (n_rows,), device=device)
    grad_out = torch.empty_like(logits)
    ones = torch.ones(n_rows, device=device)
    common = dict(inv_temperature=1.0, softcap=None, ignore_index=-100)
    layout = RowLayout(1, n_rows, 0, vocab)  # contiguous rows
    _, entropy, lse = kernels.token_logprobs_forward(logits, targets, layout, return_entropy=True,
                                                     **common)
    logits_bytes = logits.numel() * logits.element_size()
    rows = []
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            tiles = dict(block_v=block, num_warps=warps)
            runs = {  # kernel: (call, bytes it must move)
                "forward": (lambda: kernels.token_logprobs_forward(
                    logits, targets, layout, return_entropy=False, **tiles, **common), logits_bytes),
                "forward_entropy": (lambda: kernels.token_logprobs_forward(
                    logits, targets, layout, return_entropy=True, **tiles, **common), logits_bytes),
                "backward": (lambda: kernels.token_logprobs_backward(
                    logits, targets, layout, lse, entropy, ones, None, grad_out, layout, **tiles,
                    **common),
                    2 * logits_bytes),
            }
            for kernel, (call, moved) in runs.items():
                ms = triton.testing.do_bench(call, warmup=5, rep=30)
                rows.append(dict(kernel=kernel, dtype=str(dtype).removeprefix("torch."), rows=n_rows,
                                 vocab=vocab, block_v=block, num_warps=warps, time_ms=round(ms, 4),
                                 gbs=round(moved / (ms * 1e-3) / 1e9, 1)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    stamp = harness.stamp(device)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s (read + write) on {stamp['device']}")
    rows = [dict(row, copy_gbs=round(copy_gbs, 1), **stamp)
            for dtype_name in args.dtypes
            for row in sweep(getattr(torch, dtype_name), args.rows, args.vocab, device)]
    for kernel in ("forward", "forward_entropy", "backward"):
        for dtype_name in args.dtypes:
            best = sorted((r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype_name),
                          key=lambda r: r["time_ms"])[:3]
            print(f"{kernel:16} {dtype_name:9} best: " + "; ".join(
                f"BLOCK_V={r['block_v']} warps={r['num_warps']} {r['time_ms']:.3f} ms "
                f"{r['gbs']:.0f} GB/s ({r['gbs'] / copy_gbs:.0%} of copy)" for r in best))
    if args.csv:
        harness.write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
