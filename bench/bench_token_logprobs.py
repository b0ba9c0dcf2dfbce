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

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import summarize  # noqa: E402

import fastalign  # noqa: E402
from fastalign import _measure  # noqa: E402
from fastalign.reference import token_logprobs_reference  # noqa: E402

PROVIDERS = ("torch_eager", "torch_compile", "trl", "fastalign")
MODES = ("fwd", "fwd_bwd")
DTYPES = _measure.DTYPES
RESULTS = Path(__file__).parent / "results"


def eager_logprobs(logits, targets):
    return token_logprobs_reference(logits, targets, compute_dtype=torch.float32)


def _trl_logprobs(device: torch.device):
    try:
        from trl.trainer.utils import selective_log_softmax
        return selective_log_softmax
    except Exception:  # ImportError, or whatever a missing optional dependency raises
        if device.type != "cuda":
            raise
        # The GPU image lacks TRL's heavier dependencies (datasets); on CUDA this is exactly
        # the kernel selective_log_softmax dispatches to.
        from trl.kernels import selective_log_softmax_and_entropy
        return lambda logits, targets: selective_log_softmax_and_entropy(logits, targets)[0]


def make_op(provider: str, device: torch.device):
    if provider == "torch_eager":
        return eager_logprobs
    if provider == "torch_compile":
        for limit in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, 64)
        return torch.compile(eager_logprobs, dynamic=False)
    if provider == "trl":
        return _trl_logprobs(device)
    if provider == "fastalign":
        return fastalign.token_logprobs
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


def make_call(spec: dict, device: torch.device):
    """The inputs of one configuration and a closure running it once."""
    logits, targets = _measure.random_logits(spec["batch"], spec["seq"], spec["vocab"],
                                             spec["dtype"], device)
    op = make_op(spec["provider"], device)
    if spec["mode"] == "fwd":
        def call():
            with torch.no_grad():
                return op(logits, targets)
    else:
        logits.requires_grad_()

        def call():
            return torch.autograd.grad(op(logits, targets).sum(), logits)
    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256, 256000])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--compile-vocab", type=int, nargs="+", default=None,
                        help="run torch_compile only at these V (each shape compiles anew)")
    harness.add_run_arguments(parser, MODES)
    args = parser.parse_args(argv)
    if harness.served_as_worker(args, make_call):
        return

    device = torch.device(args.device)
    tag = f"token_logprobs_{device.type}"
    csv_path = args.csv or RESULTS / f"{tag}.csv"
    plot_path = args.plot or csv_path.with_suffix(".png")
    stamp = harness.stamp(device)
    configs = [dict(provider=p, mode=m, dtype=d, vocab=v, batch=args.batch, seq=args.seq,
                    repeats=args.repeats)
               for d in args.dtypes for m in args.modes for v in args.vocab for p in args.providers
               if p != "torch_compile" or args.compile_vocab is None or v in args.compile_vocab]
    rows = []
    for index, spec in enumerate(configs, 1):
        print(f"[{index}/{len(configs)}] {spec['provider']} {spec['mode']} {spec['dtype']} "
              f"V={spec['vocab']}", flush=True)
        result = (harness.measure_cuda(make_call, spec) if device.type == "cuda"
                  else harness.measure_cpu(str(Path(__file__).resolve()), spec))
        n_rows = args.batch * args.seq
        logits_mb = n_rows * spec["vocab"] * DTYPES[spec["dtype"]].itemsize / 2**20
        rows.append({"op": "token_logprobs", **{k: spec[k] for k in ("provider", "mode", "dtype", "vocab")},
                     "n_rows": n_rows, "logits_mb": round(logits_mb, 1), "time_ms": None,
                     "peak_mb": None, "error": "", **result, **stamp})
    harness.write_csv(rows, csv_path)
    harness.plot(rows, plot_path, f"token_logprobs, N={args.batch}x{args.seq}, {stamp['device']}")
    print(f"\nCSV: {csv_path}\nplot: {plot_path}\n")
    summarize.summarize(str(csv_path), markdown=False)
    return harness.exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
