"""Sweeps the tiles of the linear_logprobs Triton kernels on a GPU, beside cuBLAS.

For each (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) it times the fused forward over
the whole vocabulary and the backward's logits-gradient kernel over one vocabulary slice, and
prints TFLOP/s (2 N D V flops for the forward, 2 N D cols for the slice) against a cuBLAS
matmul of the same shape, so the defaults in kernels/linear_logprobs.py come from numbers:

    python bench/tune_linear_logprobs.py --csv bench/results/tune_linear_logprobs.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastalign.kernels import linear_logprobs as kernel  # noqa: E402

# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages): common tensor-core tilings.
CONFIGS = [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
           (256, 128, 64, 8, 3)]


def set_tiles(prefix: str, config) -> None:
    for name, value in zip(("BLOCK_N", "BLOCK_V", "BLOCK_D", "NUM_WARPS", "NUM_STAGES"), config):
        setattr(kernel, f"{prefix}_{name}", value)


def sweep(tokens: int, hidden_dim: int, vocab: int, dtype, device) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_dim, device=device, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_dim, device=device, generator=gen) * hidden_dim ** -0.5).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    stats = torch.zeros(tokens, 2, device=device)
    ones = torch.ones(tokens, device=device)
    cols = kernel.tile_cols(tokens, vocab)
    options = dict(inv_temperature=1.0, softcap=None)
    cublas_ms = triton.testing.do_bench(lambda: hidden @ weight.T, warmup=5, rep=30)
    cublas = 2 * tokens * hidden_dim * vocab / (cublas_ms * 1e-3) / 1e12
    rows = [dict(kernel="cublas_mm", time_ms=round(cublas_ms, 3), tflops=round(cublas, 1))]
    for config in CONFIGS:
        set_tiles("FORWARD", config)
        set_tiles("GRAD", config)
        runs = {
            "forward": (lambda: kernel.linear_logprobs_partials(
                hidden, weight, None, targets, return_entropy=False, **options), vocab),
            "grad_slice": (lambda: kernel.linear_logprobs_grad_tile(
                hidden, weight, None, targets, stats, None, ones, None, 0, cols, **options), cols),
        }
        for name, (call, columns) in runs.items():
            try:
                ms = triton.testing.do_bench(call, warmup=5, rep=30)
            except Exception as error:  # e.g. out of shared memory for this tiling
                rows.append(dict(kernel=name, config=str(config), error=str(error)[:120]))
                continue
            tflops = 2 * tokens * hidden_dim * columns / (ms * 1e-3) / 1e12
            rows.append(dict(kernel=name, config=str(config), time_ms=round(ms, 3),
                             tflops=round(tflops, 1), of_cublas=round(tflops / cublas, 3)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    stamp = harness.stamp(device)
    rows = [dict(row, tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                 **stamp)
            for row in sweep(args.tokens, args.hidden, args.vocab, getattr(torch, args.dtype), device)]
    print(f"cuBLAS {rows[0]['tflops']} TFLOP/s on {stamp['device']} "
          f"(N={args.tokens}, D={args.hidden}, V={args.vocab}, {args.dtype})")
    for name in ("forward", "grad_slice"):
        best = sorted((r for r in rows if r["kernel"] == name and "tflops" in r),
                      key=lambda r: -r["tflops"])[:3]
        print(f"{name:10} best: " + "; ".join(
            f"{r['config']} {r['time_ms']:.2f} ms {r['tflops']} TFLOP/s ({r['of_cublas']:.0%} of cuBLAS)"
            for r in best))
    if args.csv:
        harness.write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
