"""The kernel demo (``fastalign bench``): per-token log-probs from hidden states over a large
vocabulary, three ways.

    python -m fastalign.kernel_demo    # 2048 tokens, D=256, Llama-3 vocabulary (128256), fp32
    python -m fastalign.kernel_demo --device cuda --hidden 4096 --dtype bfloat16 --tokens 8192

Runs forward + backward (gradients of hidden states and lm_head) of
``log_softmax(hidden @ weight.T)[target]`` on random inputs (no downloads):

1. naive torch: the matmul, then a float32 log_softmax and gather (what most trainers do);
2. ``fastalign.token_logprobs`` on the matmul's logits (no softmax in memory, gradient written
   over the logits);
3. ``fastalign.linear_logprobs`` from the hidden states (the logits never exist).

It prints time, peak extra memory (gradients included) and the largest differences from the
naive way. On CPU each measurement runs in a fresh process so the peak resident set is its own.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import fastalign
from fastalign import _measure
from fastalign.reference import token_logprobs_reference

DTYPES = _measure.DTYPES
WAYS = {
    "naive torch (matmul + log_softmax)": "naive",
    "fastalign.token_logprobs (on logits)": "token",
    "fastalign.linear_logprobs (no logits)": "linear",
}


def _inputs(spec: dict, device: torch.device):
    hidden, weight, targets, _, _ = _measure.random_head(spec["tokens"], spec["hidden"],
                                                         spec["vocab"], spec["dtype"], device)
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def _forward_backward(way: str, hidden, weight, targets):
    if way == "linear":
        logprobs = fastalign.linear_logprobs(hidden, weight, targets)
    else:
        logits = hidden @ weight.T
        if way == "naive":
            logprobs = token_logprobs_reference(logits, targets, compute_dtype=torch.float32)
        else:  # nothing reads these logits afterwards: their gradient may overwrite them
            logprobs = fastalign.token_logprobs(logits, targets, inplace_backward=True)
    grads = torch.autograd.grad(logprobs.sum(), (hidden, weight))
    return logprobs.detach(), *grads


def _measure_one(spec: dict, device: torch.device, what: str) -> dict:
    hidden, weight, targets = _inputs(spec, device)
    call = lambda: _forward_backward(spec["way"], hidden, weight, targets)  # noqa: E731
    if what == "time":
        return {"seconds": _measure.median_seconds(call, device, repeats=spec["repeats"])}
    call()  # fault in the inputs' pages and any lazy initialization first
    return {"peak_bytes": _measure.peak_extra_bytes(call, device)}


def _measure_way(spec: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        return {**_measure_one(spec, device, "time"), **_measure_one(spec, device, "memory")}
    command = ["-m", "fastalign.kernel_demo"]
    timing = _measure.run_worker(command, dict(spec, measure="time"), for_memory=False)
    memory = _measure.run_worker(command, dict(spec, measure="memory"), for_memory=True)
    return {**timing, **memory}


def _largest_differences(spec: dict, device: torch.device) -> dict[str, tuple[float, ...]]:
    """Max |difference| from the naive way of the log-probs and of both gradients."""
    inputs = _inputs(spec, device)
    naive = _forward_backward("naive", *inputs)
    return {way: tuple((a.float() - b.float()).abs().max().item()
                       for a, b in zip(naive, _forward_backward(way, *inputs)))
            for way in ("token", "linear")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256, help="D, the lm_head's input width")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(_measure_one(spec, torch.device(spec["device"]), spec["measure"])))
        return

    device = torch.device(args.device)
    spec = dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                repeats=args.repeats, device=str(device))
    itemsize = DTYPES[args.dtype].itemsize
    logits_mb = args.tokens * args.vocab * itemsize / 2**20
    grads_mb = (args.tokens + args.vocab) * args.hidden * itemsize / 2**20
    print(f"fastalign bench: log-probs of {args.tokens} tokens, D={args.hidden}, over a "
          f"{args.vocab}-token vocabulary, {args.dtype} on {device}, forward + backward; "
          f"fastalign backend: {fastalign.select_backend(device)}")
    print(f"the logits would take {logits_mb:.0f} MB; the gradients every way returns "
          f"(hidden + lm_head) {grads_mb:.0f} MB\n")
    results = {}
    for label, way in WAYS.items():
        print(f"measuring {label} ...", flush=True)
        results[label] = _measure_way(dict(spec, way=way), device)
    differences = _largest_differences(dict(spec, tokens=min(64, args.tokens)), device)

    print(f"\n{'':38} {'time (ms)':>10} {'peak extra memory':>18} {'x logits':>9}")
    for label, result in results.items():
        if "error" in result:
            print(f"{label:38} failed: {result['error']}")
            continue
        peak_mb = result["peak_bytes"] / 2**20
        print(f"{label:38} {result['seconds'] * 1e3:10.1f} {peak_mb:15.0f} MB {peak_mb / logits_mb:9.2f}")
    naive, _, linear = results.values()
    if "error" not in naive and "error" not in linear:
        print(f"\nlinear_logprobs: {naive['seconds'] / linear['seconds']:.1f}x the speed of the "
              f"naive way with {naive['peak_bytes'] / max(linear['peak_bytes'], 1):.0f}x less "
              "memory (the gradients it returns are most of what it needs).")
    print(f"largest differences from the naive way on {min(64, args.tokens)} tokens "
          "(log-probs, grad hidden, grad weight):")
    for way, values in differences.items():
        print(f"  {way:7} " + "  ".join(f"{value:.2e}" for value in values))
    sys.stdout.flush()
    _measure.exit_on_failures(results, "the measurement")


if __name__ == "__main__":
    main()
