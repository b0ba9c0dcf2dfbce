"""Benchmark of the fused-linear ops (log-probs, KL, JSD) from hidden states and LM heads:
providers x modes x shapes.

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
--op kl: exact per-token KL(policy || reference) from two (hidden, head) pairs, providers:
  torch_eager  both models' float32 log_softmax, sum p (log p - log q)
  trl          TRL's trl.kernels.ChunkedDivergenceFunction with beta = 1 (reverse KL)
  liger        Liger's LigerFusedLinearJSDFunction with jsd_beta = 1 (a scalar token mean; CUDA)
  fastalign    fastalign.linear_kl
--op jsd: TRL's generalized JSD at beta = 0.5 (DistillationTrainer's default) from a student's
and a teacher's (hidden, head) pair, providers:
  torch_eager  both models' float32 log_softmax, the mixture by logsumexp (TRL's unfused loss)
  trl          TRL's trl.kernels.ChunkedDivergenceFunction with beta = 0.5 (two passes)
  fastalign    fastalign.linear_divergence with beta = 0.5
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
    python bench/bench_linear_logprobs.py --op jsd               # linear_divergence, beta 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import summarize  # noqa: E402

from fastalign import _measure  # noqa: E402

# Providers per op: what each computes from (hidden, weight[, reference hidden and head]).
PROVIDERS = {"logprobs": ("torch_eager", "trl", "liger", "cce", "fastalign"),
             "kl": ("torch_eager", "trl", "liger", "fastalign"),
             "jsd": ("torch_eager", "trl", "fastalign")}
JSD_BETA = 0.5
CUDA_ONLY = ("liger", "cce")  # Triton kernels without a CPU path
MODES = ("fwd", "fwd_bwd")
SHAPES = {"llama3": (4096, 128256), "gemma2": (2304, 256000), "cpu": (256, 128256)}  # (D, V)
DTYPES = _measure.DTYPES
RESULTS = Path(__file__).parent / "results"
TRL_CHUNK_SIZE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


def eager_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def eager_kl(hidden, weight, ref_hidden, ref_weight):
    log_p = torch.log_softmax((hidden @ weight.T).float(), -1)
    log_q = torch.log_softmax((ref_hidden @ ref_weight.T).float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def eager_jsd(hidden, weight, ref_hidden, ref_weight):
    log_p = torch.log_softmax((hidden @ weight.T).float(), -1)
    log_q = torch.log_softmax((ref_hidden @ ref_weight.T).float(), -1)
    log_m = torch.logaddexp(log_p + torch.log1p(torch.tensor(-JSD_BETA)),
                            log_q + torch.log(torch.tensor(JSD_BETA)))
    return (JSD_BETA * (log_q.exp() * (log_q - log_m)).sum(-1)
            + (1 - JSD_BETA) * (log_p.exp() * (log_p - log_m)).sum(-1))


def _trl_kernel(module_name: str, attribute: str):
    """A class of ``trl.kernels.<module_name>``, loaded even where trl's own imports fail."""
    try:  # maybe_gather_lm_head_ctx comes from here; import it before measuring
        import trl.trainer.utils  # noqa: F401
    except Exception:
        # The GPU image lacks trl.trainer's dependencies (datasets). maybe_gather_lm_head_ctx only
        # all-gathers a ZeRO-3 sharded lm_head and is a no-op otherwise: stand in a nullcontext.
        shim = types.ModuleType("trl.trainer.utils")
        shim.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = shim
    try:
        module = importlib.import_module(f"trl.kernels.{module_name}")
    except Exception:  # trl/__init__ or trl.kernels pulling a dependency this image lacks
        path = Path(importlib.util.find_spec("trl").origin).parent / "kernels" / f"{module_name}.py"
        spec = importlib.util.spec_from_file_location(f"trl.kernels.{module_name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return getattr(module, attribute)


def make_op(op: str, provider: str, device: torch.device):
    """``logprobs``: ``f(hidden, weight, targets) -> [N]``; ``kl``, ``jsd``: ``f(hidden, weight,
    ref_hidden, ref_weight) -> [N]`` (Liger: the token mean). Peers are imported when asked."""
    if provider in CUDA_ONLY and device.type != "cuda":
        raise RuntimeError(f"{provider} needs CUDA (Triton kernels only)")
    if provider not in PROVIDERS[op]:
        raise ValueError(f"{provider} has no {op}; choose from {', '.join(PROVIDERS[op])}")
    import fastalign
    if op == "jsd":
        if provider == "torch_eager":
            return eager_jsd
        if provider == "trl":
            function = _trl_kernel("chunked_divergence", "ChunkedDivergenceFunction")
            return lambda h, w, rh, rw: function.apply(h, w, None, rh, rw, None, JSD_BETA)[0]
        return lambda h, w, rh, rw: fastalign.linear_divergence(h, w, rh, rw, beta=JSD_BETA)
    if op == "kl":
        if provider == "torch_eager":
            return eager_kl
        if provider == "trl":  # beta = 1: KL(student || teacher), returns (divergence, entropy)
            function = _trl_kernel("chunked_divergence", "ChunkedDivergenceFunction")
            return lambda h, w, rh, rw: function.apply(h, w, None, rh, rw, None, 1.0)[0]
        if provider == "liger":  # jsd_beta = 1: KL(student || teacher), a scalar token mean
            from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction
            return lambda h, w, rh, rw: LigerFusedLinearJSDFunction.apply(h, w, rh, rw, None, 1.0)
        return fastalign.linear_kl
    if provider == "torch_eager":
        return eager_logprobs
    if provider == "trl":
        function = _trl_kernel("chunked_logprob", "ChunkedLogProbFunction")
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
    return fastalign.linear_logprobs


def make_call(spec: dict, device: torch.device):
    """The inputs of one configuration and a closure running it once."""
    hidden, weight, targets, ref_hidden, ref_weight = _measure.random_head(
        spec["tokens"], spec["hidden"], spec["vocab"], spec["dtype"], device)
    op = make_op(spec["op"], spec["provider"], device)
    args = (hidden, weight, targets) if spec["op"] == "logprobs" else (hidden, weight, ref_hidden,
                                                                        ref_weight)
    if spec["mode"] == "fwd":
        def call():
            with torch.no_grad():
                return op(*args)
    else:
        hidden.requires_grad_()
        weight.requires_grad_()

        def call():
            return torch.autograd.grad(op(*args).sum(), (hidden, weight))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", default="logprobs", choices=list(PROVIDERS),
                        help="logprobs: linear_logprobs and its peers; kl: linear_kl and its "
                             "peers; jsd: linear_divergence (beta 0.5) and its peers")
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="default: cpu on CPU, llama3 gemma2 on CUDA")
    parser.add_argument("--tokens", type=int, default=None, help="N; default 2048 on CPU, 8192 on CUDA")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--providers", nargs="+", default=None,
                        choices=sorted({p for names in PROVIDERS.values() for p in names}),
                        help="default: every provider of --op")
    harness.add_run_arguments(parser, MODES)
    harness.add_baseline_argument(parser)
    args = parser.parse_args(argv)
    if harness.served_as_worker(args, make_call):
        return

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = args.shapes or (["llama3", "gemma2"] if cuda else ["cpu"])
    tokens = args.tokens or (8192 if cuda else 2048)
    dtypes = args.dtypes or (["bfloat16"] if cuda else ["float32"])
    op_name = f"linear_{args.op}"
    csv_path = args.csv or RESULTS / f"{op_name}_{device.type}.csv"
    plot_path = args.plot or csv_path.with_suffix(".png")
    stamp = harness.stamp(device)
    if args.baseline and cuda:
        parser.error("--baseline measures in CPU workers; run it without --device cuda")
    trees = harness.stage_revisions(args.baseline)
    configs = [spec
               for d in dtypes for m in args.modes for s in shapes
               for p in args.providers or PROVIDERS[args.op]
               for spec in harness.per_revision(
                   dict(op=args.op, provider=p, mode=m, dtype=d, shape=s, tokens=tokens,
                        hidden=SHAPES[s][0], vocab=SHAPES[s][1], repeats=args.repeats),
                   trees, own=p == "fastalign")]
    rows = []
    for index, spec in enumerate(configs, 1):
        print(f"[{index}/{len(configs)}] {spec['provider']} {spec['mode']} {spec['dtype']} "
              f"{spec['shape']} N={tokens} D={spec['hidden']} V={spec['vocab']}", flush=True)
        result = measure(spec, device)
        itemsize = DTYPES[spec["dtype"]].itemsize
        logits_mb = tokens * spec["vocab"] * itemsize / 2**20
        floor_mb = (tokens + spec["vocab"]) * spec["hidden"] * itemsize / 2**20 if spec["mode"] == "fwd_bwd" else 0
        rows.append({"op": op_name, **{k: spec[k] for k in ("provider", "mode", "dtype", "shape")},
                     "n_rows": tokens, **{k: spec[k] for k in ("hidden", "vocab")},
                     "logits_mb": round(logits_mb, 1), "floor_mb": round(floor_mb, 1), "time_ms": None,
                     "peak_mb": None, **({"tflops": None} if cuda else {}), "error": "", **result, **stamp})
    harness.write_csv(rows, csv_path)
    harness.plot(rows, plot_path, f"{op_name}, N={tokens}, {stamp['device']}")
    print(f"\nCSV: {csv_path}\nplot: {plot_path}\n")
    summarize.summarize(str(csv_path), markdown=False)
    return harness.exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
