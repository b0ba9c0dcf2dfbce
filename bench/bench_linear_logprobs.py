"""Benchmark of the fused-linear ops (log-probs, KL) from hidden states and LM heads: providers x
modes x shapes.

``logprobs[n] = log_softmax(hidden @ weight.T)[n, targets[n]]`` with hidden [N, D], weight [V, D]
(seeded, logits of std ~2) and valid targets [N]. Shapes: llama3 (D=4096, V=128256), gemma2
(D=2304, V=256000), cpu (D=256, V=128256, the CPU acceptance shape).

--op logprobs (the default), providers:
  torch_eager  hidden @ weight.T, log_softmax in float32 + gather (materializes [N, V] logits)
  trl          TRL's trl.kernels.ChunkedLogProbFunction, chunk 32768 (TRL's default; Triton fold
               on CUDA, torch ops on CPU)
  liger        Liger-Kernel's LigerFusedLinearCrossEntropyFunction, reduction="none" (CUDA only)
  cce          Apple's cut_cross_entropy.linear_cross_entropy, reduction="none" (CUDA only)
  fastalign    fastalign.linear_logprobs
  fastalign_cublas  the same on the Triton backend's cuBLAS path (FASTALIGN_CUDA_MATMUL=cublas:
               torch GEMMs per vocabulary slice, Triton row kernels after them; on the CPU the
               backend's own path, as fastalign)
  matmul_floor the GEMMs alone, into outputs allocated before (fwd: the logits; fwd_bwd: 4 GEMMs,
               the logits, their recomputation, dHidden, dWeight): the bound on time
  fastalign_min_p / fastalign_top_k   the same renormalized over a sampler's support (min_p 0.05 /
               top_k 50: bench/_workers.py), beside plain fastalign for their cost
--op kl: exact per-token KL(policy || reference) from two (hidden, head) pairs, providers:
  torch_eager  both models' float32 log_softmax, sum p (log p - log q)
  trl          TRL's trl.kernels.ChunkedDivergenceFunction with beta = 1 (reverse KL)
  liger        Liger's LigerFusedLinearJSDFunction with jsd_beta = 1 (a scalar token mean; CUDA)
  fastalign    fastalign.linear_kl
``--baseline REV ...`` (CPU) also runs the fastalign provider from those git revisions, in the
same run, named ``fastalign@REV`` (bench/harness.py ``stage_revisions``).
Modes: fwd (no grad, e.g. the reference model) and fwd_bwd (gradient w.r.t. hidden and weight).

Time is the median of several calls (CUDA: triton.testing.do_bench; the CSV adds TFLOP/s from
2NDV flops for fwd, 8NDV for fwd_bwd). Memory is the peak beyond the inputs, the gradients
included (floor_mb: the size of dHidden + dWeight, which any implementation must return):
CUDA max_memory_allocated; CPU the peak resident set of a fresh subprocess per measurement (see
fastalign/_measure.py). Rows go to a CSV stamped with device, commit and date, and a PNG plot.

    python bench/bench_linear_logprobs.py                        # CPU: shape cpu, N=2048, float32
    python bench/bench_linear_logprobs.py --device cuda --shapes llama3 gemma2 --tokens 8192
    python bench/bench_linear_logprobs.py --op kl                # linear_kl on the CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
# The providers live in _workers.py, since bench_native_cpu.py runs them too; under these
# names test_bench_linear_logprobs.py times them.
from _workers import CUDA_ONLY, MODES, LINEAR_PROVIDERS as PROVIDERS  # noqa: E402
from _workers import linear_call as make_call  # noqa: E402

from fastalign import _measure  # noqa: E402

SHAPES = {"llama3": (4096, 128256), "gemma2": (2304, 256000), "cpu": (256, 128256)}  # (D, V)
DTYPES = _measure.DTYPES
RESULTS = Path(__file__).parent / "results"


def measure(spec: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        result = harness.measure_cuda(make_call, spec)
        if "time_ms" in result:
            flops = (2 if spec["mode"] == "fwd" else 8) * spec["tokens"] * spec["hidden"] * spec["vocab"]
            result["tflops"] = flops / (result["time_ms"] * 1e-3) / 1e12
        return result
    if spec["provider"] in CUDA_ONLY:  # no subprocesses for a known skip
        return {"error": f"{spec['provider']} needs CUDA (Triton kernels only)"}
    return harness.measure_cpu(str(Path(__file__).resolve()), spec)


def add_options(parser) -> None:
    parser.add_argument("--op", default="logprobs", choices=list(PROVIDERS),
                        help="logprobs: linear_logprobs and its peers; kl: linear_kl and its peers")
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="default: cpu on CPU, llama3 gemma2 on CUDA")
    parser.add_argument("--tokens", type=int, default=None, help="N; default 2048 on CPU, 8192 on CUDA")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--providers", nargs="+", default=None,
                        choices=sorted({p for names in PROVIDERS.values() for p in names}),
                        help="default: every provider of --op")
    harness.add_sweep_options(parser, MODES)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = args.shapes or (["llama3", "gemma2"] if cuda else ["cpu"])
    tokens = args.tokens or (8192 if cuda else 2048)
    dtypes = args.dtypes or (["bfloat16"] if cuda else ["float32"])
    op_name = f"linear_{args.op}"
    stamp = harness.stamp(device)
    if args.baseline and cuda:
        raise harness.UsageError("--baseline measures in CPU workers; run it without --device cuda")
    trees = harness.stage_revisions(args.baseline)
    configs = [spec
               for d in dtypes for m in args.modes for s in shapes
               for p in args.providers or PROVIDERS[args.op]
               for spec in harness.per_revision(
                   dict(op=args.op, provider=p, mode=m, dtype=d, shape=s, tokens=tokens,
                        hidden=SHAPES[s][0], vocab=SHAPES[s][1], repeats=args.repeats),
                   trees, own=p == "fastalign")]
    results = harness.measure_rounds(
        configs, lambda spec: measure(spec, device), args.rounds,
        lambda spec: f"{spec['provider']} {spec['mode']} {spec['dtype']} {spec['shape']} "
                     f"N={tokens} D={spec['hidden']} V={spec['vocab']}")
    rows = []
    for spec, result in zip(configs, results):
        itemsize = DTYPES[spec["dtype"]].itemsize
        logits_mb = tokens * spec["vocab"] * itemsize / 2**20
        floor_mb = (tokens + spec["vocab"]) * spec["hidden"] * itemsize / 2**20 if spec["mode"] == "fwd_bwd" else 0
        rows.append({"op": op_name, **{k: spec[k] for k in ("provider", "mode", "dtype", "shape")},
                     "n_rows": tokens, **{k: spec[k] for k in ("hidden", "vocab")},
                     "logits_mb": round(logits_mb, 1), "floor_mb": round(floor_mb, 1), "time_ms": None,
                     "peak_mb": None, **({"tflops": None} if cuda else {}), "error": "", **result, **stamp})
    return rows


BENCH = harness.Bench(
    doc=__doc__, options=add_options, worker=harness.call_worker(make_call), run=run,
    results=lambda args: RESULTS / f"linear_{args.op}_{args.device}.csv",
    plot_title=lambda rows, args: f"linear_{args.op}, N={rows[0]['n_rows']}, {rows[0]['device']}",
    baseline=True)


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
