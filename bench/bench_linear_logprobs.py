"""Benchmark of per-token log-probs from hidden states and an LM head: providers x modes x shapes.

``logprobs[n] = log_softmax(hidden @ weight.T)[n, targets[n]]`` with hidden [N, D], weight [V, D]
(seeded, logits of std ~2) and valid targets [N]. Shapes: llama3 (D=4096, V=128256), gemma2
(D=2304, V=256000), cpu (D=256, V=128256, the CPU acceptance shape).

Providers:
  torch_eager  hidden @ weight.T, log_softmax in float32 + gather (materializes [N, V] logits)
  trl          TRL's trl.kernels.ChunkedLogProbFunction, chunk 32768 (TRL's default; Triton fold
               on CUDA, torch ops on CPU)
  liger        Liger-Kernel's LigerFusedLinearCrossEntropyFunction, reduction="none" (CUDA only)
  cce          Apple's cut_cross_entropy.linear_cross_entropy, reduction="none" (CUDA only)
  fastalign    fastalign.linear_logprobs
Modes: fwd (no grad, e.g. the reference model) and fwd_bwd (gradient w.r.t. hidden and weight).

Time is the median of several calls (CUDA: triton.testing.do_bench; the CSV adds TFLOP/s from
2NDV flops for fwd, 8NDV for fwd_bwd). Memory is the peak beyond the inputs, the gradients
included (floor_mb: the size of dHidden + dWeight, which any implementation must return):
CUDA max_memory_allocated; CPU the peak resident set of a fresh subprocess per measurement (see
fastalign/_measure.py). Rows go to a CSV stamped with device, commit and date, and a PNG plot.

    python bench/bench_linear_logprobs.py                        # CPU: shape cpu, N=2048, float32
    python bench/bench_linear_logprobs.py --device cuda --shapes llama3 gemma2 --tokens 8192
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import summarize  # noqa: E402

from fastalign import _measure  # noqa: E402

PROVIDERS = ("torch_eager", "trl", "liger", "cce", "fastalign")
CUDA_ONLY = ("liger", "cce")  # Triton kernels without a CPU path
MODES = ("fwd", "fwd_bwd")
SHAPES = {"llama3": (4096, 128256), "gemma2": (2304, 256000), "cpu": (256, 128256)}  # (D, V)
DTYPES = _measure.DTYPES
RESULTS = Path(__file__).parent / "results"
TRL_CHUNK_SIZE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


def random_inputs(tokens: int, hidden: int, vocab: int, dtype: str, device: torch.device):
    """Seeded hidden [N, D], weight [V, D] scaled so the logits have std ~2, valid targets [N]."""
    generator = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, generator=generator).to(DTYPES[dtype])
    w = (torch.randn(vocab, hidden, device=device, generator=generator) * (2 / hidden**0.5)).to(DTYPES[dtype])
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    return h, w, targets


def eager_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _trl_function():
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except Exception:  # trl/__init__ or trl.kernels pulling a dependency this image lacks
        path = Path(importlib.util.find_spec("trl").origin).parent / "kernels" / "chunked_logprob.py"
        spec = importlib.util.spec_from_file_location("trl.kernels.chunked_logprob", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        ChunkedLogProbFunction = module.ChunkedLogProbFunction
    try:  # its backward imports maybe_gather_lm_head_ctx from here; import it before measuring
        import trl.trainer.utils  # noqa: F401
    except Exception:
        # The GPU image lacks trl.trainer's dependencies (datasets). maybe_gather_lm_head_ctx only
        # all-gathers a ZeRO-3 sharded lm_head and is a no-op otherwise: stand in a nullcontext.
        shim = types.ModuleType("trl.trainer.utils")
        shim.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = shim
    return ChunkedLogProbFunction


def make_op(provider: str, device: torch.device):
    """``op(hidden, weight, targets) -> logprobs [N]``; imports each peer only when asked for."""
    if provider in CUDA_ONLY and device.type != "cuda":
        raise RuntimeError(f"{provider} needs CUDA (Triton kernels only)")
    if provider == "torch_eager":
        return eager_logprobs
    if provider == "trl":
        function = _trl_function()
        return lambda h, w, t: function.apply(h, w, None, t, 1.0, TRL_CHUNK_SIZE, None, 1.0, ())[0]
    if provider == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        #  label_smoothing, reduction): per-token loss in float32
        return lambda h, w, t: -LigerFusedLinearCrossEntropyFunction.apply(
            h, w, t, None, None, -100, 0.0, 0.0, "none")[0]
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy
        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none").float()
    if provider == "fastalign":
        import fastalign
        return fastalign.linear_logprobs  # AttributeError (an error row) until it exists
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


def make_call(spec: dict, device: torch.device):
    """The inputs of one configuration and a closure running it once."""
    hidden, weight, targets = random_inputs(spec["tokens"], spec["hidden"], spec["vocab"],
                                            spec["dtype"], device)
    op = make_op(spec["provider"], device)
    if spec["mode"] == "fwd":
        def call():
            with torch.no_grad():
                return op(hidden, weight, targets)
    else:
        hidden.requires_grad_()
        weight.requires_grad_()

        def call():
            return torch.autograd.grad(op(hidden, weight, targets).sum(), (hidden, weight))
    return call


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="default: cpu on CPU, llama3 gemma2 on CUDA")
    parser.add_argument("--tokens", type=int, default=None, help="N; default 2048 on CPU, 8192 on CUDA")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per CPU measurement")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(harness.cpu_worker(make_call, json.loads(args.worker))))
        return

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = args.shapes or (["llama3", "gemma2"] if cuda else ["cpu"])
    tokens = args.tokens or (8192 if cuda else 2048)
    dtypes = args.dtypes or (["bfloat16"] if cuda else ["float32"])
    csv_path = args.csv or RESULTS / f"linear_logprobs_{device.type}.csv"
    plot_path = args.plot or csv_path.with_suffix(".png")
    stamp = harness.stamp(device)
    configs = [dict(provider=p, mode=m, dtype=d, shape=s, tokens=tokens, hidden=SHAPES[s][0],
                    vocab=SHAPES[s][1], repeats=args.repeats)
               for d in dtypes for m in args.modes for s in shapes for p in args.providers]
    rows = []
    for index, spec in enumerate(configs, 1):
        print(f"[{index}/{len(configs)}] {spec['provider']} {spec['mode']} {spec['dtype']} "
              f"{spec['shape']} N={tokens} D={spec['hidden']} V={spec['vocab']}", flush=True)
        result = measure(spec, device)
        itemsize = DTYPES[spec["dtype"]].itemsize
        logits_mb = tokens * spec["vocab"] * itemsize / 2**20
        floor_mb = (tokens + spec["vocab"]) * spec["hidden"] * itemsize / 2**20 if spec["mode"] == "fwd_bwd" else 0
        rows.append({"op": "linear_logprobs", **{k: spec[k] for k in ("provider", "mode", "dtype", "shape")},
                     "n_rows": tokens, **{k: spec[k] for k in ("hidden", "vocab")},
                     "logits_mb": round(logits_mb, 1), "floor_mb": round(floor_mb, 1), "time_ms": None,
                     "peak_mb": None, **({"tflops": None} if cuda else {}), "error": "", **result, **stamp})
    harness.write_csv(rows, csv_path)
    harness.plot(rows, plot_path, f"linear_logprobs, N={tokens}, {stamp['device']}")
    print(f"\nCSV: {csv_path}\nplot: {plot_path}\n")
    summarize.summarize(str(csv_path), markdown=False)


if __name__ == "__main__":
    main()
