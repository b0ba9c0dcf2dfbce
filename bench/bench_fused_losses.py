"""Benchmark of the fused end-to-end losses: FusedDPOLoss and FusedPolicyLoss (forward +
backward from hidden states and an lm_head) beside the unfused torch composition and Liger's
chunked fused-linear losses, time and peak memory.

--op dpo: B preference pairs (2B sequences of T tokens, a prompt prefix ignored); the
  reference is a second (hidden, head) pair run under no_grad by every provider.
  torch_unfused  logits = hidden @ W.T, float32 log_softmax + gather, masked sums, dpo_loss
  trl            TRL's path: the logits, trl.trainer.utils.selective_log_softmax (row-chunked
                 log-softmax, as DPOTrainer and GRPOTrainer call it), masked sums, the loss
  liger          liger_kernel LigerFusedLinearDPOLoss (compiled=False on CPU, as its docs allow)
  fastalign      fastalign.FusedDPOLoss (gradient in forward: 3 matmul passes over the head)
  fastalign_two_pass  the same with gradient_in_forward=False (linear_logprobs, then the loss:
                 4 passes)
--op grpo: 2B sequences, one advantage each, old and reference per-token log-probs given.
  torch_unfused  logits, float32 log_softmax + gather, policy_loss (token_mean, k3 KL)
  liger          LigerFusedLinearGRPOLoss (loss_type="dapo": the same token mean; beta = kl)
  fastalign      fastalign.FusedPolicyLoss (gradient in forward)
  fastalign_two_pass  the same with gradient_in_forward=False
  fastalign_entropy   fastalign.FusedPolicyLoss with an entropy bonus (entropy_coef=0.01: the
                 entropy's gradient formed in the same pass), beside ``fastalign`` for its cost
  fastalign_min_p / fastalign_top_k   fastalign.FusedPolicyLoss scoring over a sampler's support
                 (min_p=0.05 / top_k=50: the chunk's row max, or its k-th value, found first),
                 beside ``fastalign`` for their cost
Gradients w.r.t. the policy's hidden states and head. Memory is the peak beyond the inputs,
gradients included (see bench_linear_logprobs.py for how it is measured). ``matmul_efficiency``:
the provider's head matmul FLOPs (per row and vocabulary entry, 2·D per pass: 3 passes for a
loss that forms its gradient in the forward or from the logits, 4 for the two-pass op, +1 for
DPO's reference; fastalign skips the ignored prompt rows, the others do not) over its time,
as a share of the rate of the three matmuls of a pass over the batch measured in the same run
(``matmul_gflops``): 1.0 is "as fast as three plain matmuls".

    python bench/bench_fused_losses.py --op dpo              # CPU: 4 pairs x 256 tokens, D=256, V=128256
    python bench/bench_fused_losses.py --op grpo --device cuda --pairs 4 --seq 1024 --hidden 4096
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import fastalign  # noqa: E402
from fastalign import _measure  # noqa: E402
from fastalign.losses import dpo_loss, policy_loss  # noqa: E402

PROVIDERS = ("torch_unfused", "trl", "liger", "fastalign_two_pass", "fastalign",
             "fastalign_entropy", "fastalign_min_p", "fastalign_top_k")
GRPO_ONLY = ("fastalign_entropy", "fastalign_min_p", "fastalign_top_k")
# The sampler options of the fastalign_min_p / fastalign_top_k providers.
SAMPLERS = {"fastalign_min_p": dict(min_p=0.05), "fastalign_top_k": dict(top_k=50)}
MODES = ("fwd_bwd",)
RESULTS = Path(__file__).parent / "results"
BETA, KL_COEF, ENTROPY_COEF = 0.1, 0.04, 0.01


def make_inputs(spec: dict, device: torch.device):
    rows, seq = 2 * spec["pairs"], spec["seq"]
    hidden, weight, targets, ref_hidden, ref_weight = _measure.random_head(
        rows * seq, spec["hidden"], spec["vocab"], spec["dtype"], device)
    targets = targets.view(rows, seq).clone()
    targets[:, : seq // 4] = -100  # the prompt
    return (hidden.view(rows, seq, -1).requires_grad_(), weight.requires_grad_(), targets,
            ref_hidden.view(rows, seq, -1), ref_weight)


def _unfused_logprobs(hidden, weight, targets):
    log_p = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    picked = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != -100)


def _trl_logprobs(hidden, weight, targets):
    from trl.trainer.utils import selective_log_softmax
    picked = selective_log_softmax(hidden @ weight.T, targets.clamp(min=0))
    return picked * (targets != -100)


def _most_likely(hidden, weight, targets, rows: int = 256) -> torch.Tensor:
    """``targets`` with each kept row's most likely token instead (a chunk of rows at a time)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    best = torch.cat([(flat[i:i + rows] @ weight.T).argmax(-1)
                      for i in range(0, flat.shape[0], rows)]).view(targets.shape)
    return torch.where(targets == -100, targets, best)


def make_call(spec: dict, device: torch.device):
    hidden, weight, targets, ref_hidden, ref_weight = make_inputs(spec, device)
    provider, op = spec["provider"], spec["op"]
    rows = targets.shape[0]
    gen = torch.Generator(device=device).manual_seed(1)
    advantages = torch.randn(rows, device=device, generator=gen)
    sampler = SAMPLERS.get(provider, {})
    with torch.no_grad():  # GRPO's old and reference per-token log-probs, given to everyone
        if sampler:  # tokens a sampler with these settings can draw: each row's most likely
            targets = _most_likely(hidden, weight, targets)
        old = fastalign.linear_logprobs(hidden, weight, targets, **sampler)
        ref = fastalign.linear_logprobs(ref_hidden, ref_weight, targets)

    one_pass = provider != "fastalign_two_pass"
    if op == "dpo" and provider.startswith("fastalign"):
        module = fastalign.FusedDPOLoss(beta=BETA, gradient_in_forward=one_pass)

        def loss():
            return module(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)[0]
    elif op == "dpo" and provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        module = LigerFusedLinearDPOLoss(beta=BETA, compiled=device.type == "cuda")

        def loss():
            return module(weight, hidden, targets, None, ref_hidden, ref_weight, None)[0]
    elif op == "dpo":
        logprobs_of = _trl_logprobs if provider == "trl" else _unfused_logprobs

        def loss():
            chosen, rejected = logprobs_of(hidden, weight, targets).sum(-1).chunk(2)
            with torch.no_grad():
                ref_c, ref_r = logprobs_of(ref_hidden, ref_weight, targets).sum(-1).chunk(2)
            return dpo_loss(chosen, rejected, ref_c, ref_r, beta=BETA)[0]
    elif provider.startswith("fastalign"):
        entropy_coef = ENTROPY_COEF if provider == "fastalign_entropy" else 0.0
        module = fastalign.FusedPolicyLoss(kl_coef=KL_COEF, gradient_in_forward=one_pass,
                                           entropy_coef=entropy_coef,
                                           **SAMPLERS.get(provider, {}))

        def loss():
            return module(hidden, weight, targets, advantages, old_logprobs=old,
                          ref_logprobs=ref)[0]
    elif provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        module = LigerFusedLinearGRPOLoss(beta=KL_COEF, compiled=device.type == "cuda",
                                          loss_type="dapo")
        mask = (targets != -100).long()

        def loss():
            return module(hidden, weight, targets.clamp(min=0), mask, advantages,
                          ref_per_token_logps=ref, old_per_token_logps=old)[0]
    else:
        logprobs_of = _trl_logprobs if provider == "trl" else _unfused_logprobs

        def loss():
            logprobs = logprobs_of(hidden, weight, targets)
            return policy_loss(logprobs, old, advantages, targets != -100, ref_logprobs=ref,
                               kl_coef=KL_COEF)[0]

    return lambda: torch.autograd.grad(loss(), (hidden, weight))


def matmul_gflops(spec: dict, device: torch.device) -> float:
    """The machine's matmul rate on the three matmuls of one fused-linear pass over the batch
    (``[N, D] @ [D, V]``, ``[N, V] @ [V, D]``, ``[V, N] @ [N, D]``, into outputs written once
    before: no page faults), in the benchmark's dtype, the best of 3: ``6 N D V`` FLOPs over
    their time, so ``matmul_efficiency`` 1.0 means "as fast as those three matmuls"."""
    import time

    dtype = _measure.DTYPES[spec["dtype"]]
    n, d, v = 2 * spec["pairs"] * spec["seq"], spec["hidden"], spec["vocab"]
    hidden = torch.randn(n, d, device=device).to(dtype)
    weight = torch.randn(v, d, device=device).to(dtype)
    logits = torch.zeros(n, v, device=device, dtype=dtype)
    grad_hidden = torch.zeros(n, d, device=device, dtype=dtype)
    grad_weight = torch.zeros(v, d, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(hidden, weight.t(), out=logits)
        torch.mm(logits, weight, out=grad_hidden)
        torch.mm(logits.t(), hidden, out=grad_weight)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 6 * n * d * v / best / 1e9


def head_flops(spec: dict, provider: str) -> float:
    """The matmul FLOPs of one forward + backward (see the module docstring)."""
    tokens = 2 * spec["pairs"] * spec["seq"]
    rows = tokens - 2 * spec["pairs"] * (spec["seq"] // 4) if provider.startswith("fastalign") \
        else tokens
    passes = 4 if provider == "fastalign_two_pass" else 3
    passes += 1 if spec["op"] == "dpo" else 0
    return passes * 2 * rows * spec["hidden"] * spec["vocab"]


def add_options(parser) -> None:
    parser.add_argument("--op", default="dpo", choices=["dpo", "grpo"])
    parser.add_argument("--pairs", type=int, default=4, help="B: 2B sequences")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default=None, choices=list(_measure.DTYPES),
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    harness.add_sweep_options(parser, MODES)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    name = f"fused_{args.op}"
    stamp = harness.stamp(device)
    tokens = 2 * args.pairs * args.seq
    itemsize = _measure.DTYPES[dtype].itemsize
    rows = []
    rate = None
    providers = [p for p in args.providers if args.op == "grpo" or p not in GRPO_ONLY]
    specs = [dict(op=args.op, provider=provider, mode="fwd_bwd", dtype=dtype, pairs=args.pairs,
                  seq=args.seq, hidden=args.hidden, vocab=args.vocab, repeats=args.repeats)
             for provider in providers]
    results = harness.measure_rounds(
        specs, lambda spec: harness.measure(make_call, __file__, spec, device), args.rounds,
        lambda spec: f"{spec['provider']} {args.op} {dtype} N={tokens}")
    for provider, spec, result in zip(providers, specs, results):
        rows.append({"op": name, "provider": provider, "mode": "fwd_bwd", "dtype": dtype,
                     "shape": f"{2 * args.pairs}x{args.seq}", "n_rows": tokens,
                     "hidden": args.hidden, "vocab": args.vocab,
                     "logits_mb": round(tokens * args.vocab * itemsize / 2**20, 1),
                     "floor_mb": round((tokens + args.vocab) * args.hidden * itemsize / 2**20, 1),
                     "time_ms": None, "peak_mb": None, "error": "",
                     **result, **stamp})
        rate = rate or matmul_gflops(spec, device)  # after the first worker: a warm machine
        seconds = (rows[-1]["time_ms"] or float("nan")) / 1e3
        rows[-1]["matmul_gflops"] = round(rate, 1)
        rows[-1]["matmul_efficiency"] = round(head_flops(spec, provider) / seconds / 1e9 / rate,
                                              3)
    return rows


BENCH = harness.Bench(doc=__doc__, options=add_options, worker=harness.call_worker(make_call),
                      run=run, results=lambda args: RESULTS / f"fused_{args.op}_{args.device}.csv")


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
