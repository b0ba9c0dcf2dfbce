"""The built-in demo: per-token log-probs over a large vocabulary, naive torch vs fastalign.

    python -m fastalign.demo                  # 2 x 1024 tokens, Llama-3 vocabulary (128256), fp32
    python -m fastalign.demo --vocab 256000 --dtype bfloat16

Runs forward + backward of ``log_softmax(logits).gather(targets)`` both ways on random logits
(no downloads), and prints time, peak extra memory and the largest difference between the two.
On CPU each measurement runs in a fresh process so that the peak resident set is its own.
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
    "naive torch (log_softmax + gather)": "naive",
    "fastalign.token_logprobs": "fastalign",
}


def _inputs(spec: dict, device: torch.device):
    logits, targets = _measure.random_logits(spec["batch"], spec["seq"], spec["vocab"],
                                             spec["dtype"], device)
    return logits.requires_grad_(), targets


def _forward_backward(way: str, logits, targets):
    if way == "naive":
        logprobs = token_logprobs_reference(logits, targets, compute_dtype=torch.float32)
    else:
        logprobs = fastalign.token_logprobs(logits, targets)
    (grad,) = torch.autograd.grad(logprobs.sum(), logits)
    return logprobs.detach(), grad


def _measure_one(spec: dict, device: torch.device, what: str) -> dict:
    logits, targets = _inputs(spec, device)
    call = lambda: _forward_backward(spec["way"], logits, targets)  # noqa: E731
    if what == "time":
        return {"seconds": _measure.median_seconds(call, device, repeats=spec["repeats"])}
    call()  # fault in the inputs' pages and any lazy initialization first
    return {"peak_bytes": _measure.peak_extra_bytes(call, device)}


def _measure_way(spec: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        return {**_measure_one(spec, device, "time"), **_measure_one(spec, device, "memory")}
    command = ["-m", "fastalign.demo"]
    timing = _measure.run_worker(command, dict(spec, measure="time"), for_memory=False)
    memory = _measure.run_worker(command, dict(spec, measure="memory"), for_memory=True)
    return {**timing, **memory}


def _largest_differences(spec: dict, device: torch.device) -> tuple[float, float]:
    """Max |difference| of log-probs and of gradients between the two ways on a few rows."""
    logits, targets = _inputs(spec, device)
    naive = _forward_backward("naive", logits, targets)
    fused = _forward_backward("fastalign", logits, targets)
    return tuple((a.float() - b.float()).abs().max().item() for a, b in zip(naive, fused))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
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
    spec = dict(batch=args.batch, seq=args.seq, vocab=args.vocab, dtype=args.dtype,
                repeats=args.repeats, device=str(device))
    logits_mb = args.batch * args.seq * args.vocab * DTYPES[args.dtype].itemsize / 2**20
    backend = fastalign.select_backend(device)
    print(f"fastalign demo: log-probs of {args.batch}x{args.seq} tokens over a {args.vocab}-token "
          f"vocabulary, {args.dtype} logits ({logits_mb:.0f} MB) on {device}, forward + backward; "
          f"fastalign backend: {backend}\n")
    results = {}
    for label, way in WAYS.items():
        print(f"measuring {label} ...", flush=True)
        results[label] = _measure_way(dict(spec, way=way), device)
    check = dict(spec, seq=min(64, args.seq))
    max_lp, max_grad = _largest_differences(check, device)

    print(f"\n{'':36} {'time (ms)':>10} {'peak extra memory':>18} {'x logits':>9}")
    for label, result in results.items():
        if "error" in result:
            print(f"{label:36} failed: {result['error']}")
            continue
        peak_mb = result["peak_bytes"] / 2**20
        print(f"{label:36} {result['seconds'] * 1e3:10.1f} {peak_mb:15.0f} MB {peak_mb / logits_mb:9.2f}")
    naive, fused = (results[label] for label in WAYS)
    if "error" not in naive and "error" not in fused:
        print(f"\nfastalign: {naive['seconds'] / fused['seconds']:.1f}x the speed, "
              f"{naive['peak_bytes'] / max(fused['peak_bytes'], 1):.1f}x less memory "
              "(the gradient it returns is most of what it needs).")
    print(f"largest difference on {args.batch}x{check['seq']} rows: log-probs {max_lp:.2e}, "
          f"gradient {max_grad:.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
