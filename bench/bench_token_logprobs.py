"""Benchmark of per-token log-probs from logits: providers x modes x vocabulary sizes.

Providers (same [B, T, V] logits and targets, all valid):
  torch_eager    log_softmax in float32 + gather (fastalign.reference, the code users write)
  torch_compile  torch.compile of the same function
  trl            TRL's selective_log_softmax (on CUDA it dispatches to TRL's Triton kernel,
                 trl.kernels.selective_log_softmax_and_entropy, which is called directly when
                 trl.trainer.utils cannot be imported on the GPU image)
  fastalign      fastalign.token_logprobs (Triton on CUDA, the backend FASTALIGN_BACKEND picks)
Modes: fwd (logits without grad, e.g. the reference model) and fwd_bwd (gradient w.r.t. logits).

Time is the median of several calls (CUDA: triton.testing.do_bench). Memory is the peak beyond
the inputs (gradient included): CUDA max_memory_allocated; CPU the peak resident set of a fresh
subprocess per measurement (see fastalign/_measure.py). Rows go to a CSV stamped with device,
commit and date, and to a PNG plot.

    python bench/bench_token_logprobs.py                    # CPU, B=2 T=1024, V 32k/128k/256k
    python bench/bench_token_logprobs.py --device cuda --batch 8
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
# The providers live in _workers.py, since bench_native_cpu.py runs them too; under these
# names test_bench_token_logprobs.py times them.
from _workers import MODES, TOKEN_PROVIDERS as PROVIDERS, token_call as make_call  # noqa: E402

from fastalign import _measure  # noqa: E402

DTYPES = _measure.DTYPES
RESULTS = Path(__file__).parent / "results"


def add_options(parser) -> None:
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256, 256000])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--compile-vocab", type=int, nargs="+", default=None,
                        help="run torch_compile only at these V (each shape compiles anew)")
    harness.add_sweep_options(parser, MODES)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    stamp = harness.stamp(device)
    configs = [dict(provider=p, mode=m, dtype=d, vocab=v, batch=args.batch, seq=args.seq,
                    repeats=args.repeats)
               for d in args.dtypes for m in args.modes for v in args.vocab for p in args.providers
               if p != "torch_compile" or args.compile_vocab is None or v in args.compile_vocab]
    rows = []
    for index, spec in enumerate(configs, 1):
        print(f"[{index}/{len(configs)}] {spec['provider']} {spec['mode']} {spec['dtype']} "
              f"V={spec['vocab']}", flush=True)
        result = harness.measure(make_call, __file__, spec, device)
        n_rows = args.batch * args.seq
        logits_mb = n_rows * spec["vocab"] * DTYPES[spec["dtype"]].itemsize / 2**20
        rows.append({"op": "token_logprobs", **{k: spec[k] for k in ("provider", "mode", "dtype", "vocab")},
                     "n_rows": n_rows, "logits_mb": round(logits_mb, 1), "time_ms": None,
                     "peak_mb": None, "error": "", **result, **stamp})
    return rows


BENCH = harness.Bench(
    doc=__doc__, options=add_options, worker=harness.call_worker(make_call), run=run,
    results=lambda args: RESULTS / f"token_logprobs_{args.device}.csv",
    plot_title=lambda rows, args: f"token_logprobs, N={args.batch}x{args.seq}, {rows[0]['device']}")


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
