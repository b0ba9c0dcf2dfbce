"""CPU benchmark of the native C++ kernels: token_logprobs, token_kl and linear_logprobs against
torch eager, torch.compile, TRL and fastalign's own torch path, with the bandwidth floor.

Providers (the same seeded inputs for all; N = --tokens rows, V = --vocab):
  native          fastalign with FASTALIGN_BACKEND=native (csrc/)
                  (its gradient buffer is reused from call to call, see csrc/buffers.cpp; the
                  memory column counts it: the kept buffer is freed before each measurement)
  native_fresh    the same with FASTALIGN_NATIVE_GRAD_CACHE=0: every backward gets a fresh
                  huge-page gradient, faulted in by the kernel (fwd_bwd only)
  native_inplace  the same, token_logprobs(..., inplace_backward=True): the gradient overwrites
                  the logits, so the backward allocates nothing (fwd_bwd only)
  fastalign_torch fastalign with FASTALIGN_BACKEND=torch (the chunked pure-torch path)
  torch_eager     float32 log_softmax + gather / sum p (log p - log q) / hidden @ weight.T first
  torch_eager_thp the same with THP_MEM_ALLOC_ENABLE=1, torch's own huge-page switch for all of
                  its CPU allocations (token_logprobs fwd_bwd only): how much of eager's time is
                  page faults
  torch_compile   torch.compile of the eager function (token ops)
  trl             TRL's selective_log_softmax (token_logprobs), trl.kernels.ChunkedLogProbFunction
                  (linear_logprobs)
With ``--baseline REV [REV ...]`` the fastalign providers (native, native_fresh, native_inplace,
fastalign_torch) also run from those git revisions of this repository, in the same run and on
the same inputs: named ``native@REV``, each revision's package staged by ``git archive`` (its own
native build cache) and imported through ``PYTHONPATH`` ahead of the installed tree.
Modes: fwd (no grad) and fwd_bwd (gradient w.r.t. the logits / hidden and weight).

Besides time and peak memory (each in a fresh subprocess, see fastalign/_measure.py), every
token-op row carries the bandwidth floor: the bytes the op must move (fwd: read the logits once,
token_kl both logits; fwd_bwd: read them again and write the gradient) divided by this machine's
copy bandwidth, measured in the same run as ``dst.copy_(src)`` of a logits-sized tensor into
memory already touched. ``x_floor`` = time / floor. A fresh gradient also has to be faulted in
by the kernel: ``first_touch_ms`` (the time ``torch.empty_like(x).copy_(x)`` takes beyond the
warm copy) is recorded once per dtype so that cost can be read separately; ``native_inplace``
does not pay it.

    python bench/bench_native_cpu.py                 # N=4096, V=128256, float32 and bfloat16
    python bench/bench_native_cpu.py --ops token_logprobs --modes fwd_bwd
    python bench/bench_native_cpu.py --baseline 6b29097 --providers native fastalign_torch
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _workers  # noqa: E402
import harness  # noqa: E402

import fastalign  # noqa: E402
from fastalign import _measure  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = ("fwd", "fwd_bwd")
PROVIDERS = {
    "token_logprobs": ("native", "native_fresh", "native_inplace", "fastalign_torch",
                       "torch_eager", "torch_eager_thp", "torch_compile", "trl"),
    "token_kl": ("native", "native_fresh", "fastalign_torch", "torch_eager", "torch_compile"),
    "linear_logprobs": ("native", "fastalign_torch", "torch_eager", "trl"),
}
BACKEND_OF = {"native": "native", "native_fresh": "native", "native_inplace": "native",
              "fastalign_torch": "torch"}
# Set in the worker's environment before it starts (torch reads THP_MEM_ALLOC_ENABLE once).
PROVIDER_ENV = {"native_fresh": {"FASTALIGN_NATIVE_GRAD_CACHE": "0"},
                "torch_eager_thp": {"THP_MEM_ALLOC_ENABLE": "1"}}
BACKWARD_ONLY = ("native_inplace", "native_fresh", "torch_eager_thp")


def eager_kl(logits, ref_logits):
    log_p = torch.log_softmax(logits.float(), -1)
    log_q = torch.log_softmax(ref_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _token_op(op: str, provider: str):
    if provider in BACKEND_OF:
        os.environ["FASTALIGN_BACKEND"] = BACKEND_OF[provider]  # a fresh worker process each
        if op == "token_kl":
            return fastalign.token_kl
        inplace = provider == "native_inplace"
        return lambda logits, targets: fastalign.token_logprobs(logits, targets,
                                                                inplace_backward=inplace)
    if op == "token_logprobs":
        return _workers.token_op(provider.removesuffix("_thp"), torch.device("cpu"))
    if provider == "torch_compile":
        return torch.compile(eager_kl, dynamic=False)
    return eager_kl


def make_call(spec: dict, device: torch.device):
    """The inputs of one configuration and a closure running it once."""
    op, provider, mode = spec["op"], spec["provider"], spec["mode"]
    if op == "linear_logprobs":
        if provider in BACKEND_OF:
            os.environ["FASTALIGN_BACKEND"] = BACKEND_OF[provider]
            spec = dict(spec, provider="fastalign")
        return _workers.linear_call(dict(spec, op="logprobs"), device)
    logits, targets = _measure.random_logits(1, spec["tokens"], spec["vocab"], spec["dtype"], device)
    logits, targets = logits[0], targets[0]
    function = _token_op(op, provider)
    if op == "token_kl":
        generator = torch.Generator().manual_seed(1)
        noise = torch.randn(logits.shape, generator=generator)
        second = (logits.float() + noise).to(logits.dtype)
        del noise
    else:
        second = targets
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return function(logits, second)
        return call
    if provider == "native_inplace":
        # The gradient overwrites its input, as it would overwrite a model's output logits:
        # each call gets a fresh non-leaf copy, made by prepare() outside the timed region.
        leaf = logits.detach().requires_grad_()
        produced = []

        def prepare():
            produced.append(leaf * 1)

        def call():
            output = produced.pop() if produced else leaf * 1
            return torch.autograd.grad(function(output, second).sum(), output)
        call.prepare = prepare
        return call
    logits.requires_grad_()

    def call():
        return torch.autograd.grad(function(logits, second).sum(), logits)
    return call


def cpu_worker(spec: dict) -> dict:
    """Like harness.cpu_worker, but the in-place provider's input copy is made before each
    timed call (it stands for the model output the gradient overwrites). A provider of
    another revision (``native@REV``) runs as its base provider, from that revision's tree."""
    spec = harness.as_own_revision(spec)
    call = make_call(spec, torch.device("cpu"))
    prepare = getattr(call, "prepare", None)
    if prepare is None:
        return harness.cpu_worker(lambda s, d: call, spec)
    if spec["measure"] == "memory":
        prepare()
        call()
        prepare()
        return {"peak_mb": _measure.peak_extra_bytes(call, torch.device("cpu")) / 2**20}
    prepare()
    call()
    times = []
    for _ in range(spec["repeats"]):
        prepare()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"time_ms": statistics.median(times) * 1e3}


def copy_bandwidth(tokens: int, vocab: int, dtype: str) -> dict:
    """GB/s of a warm logits-sized copy (read + write), and the extra ms a fresh destination
    costs (page faults of memory touched for the first time)."""
    source = _measure.random_logits(1, tokens, vocab, dtype, torch.device("cpu"))[0]
    target = torch.empty_like(source).copy_(source)
    warm, fresh = [], []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        warm.append(time.perf_counter() - start)
    del target
    for _ in range(3):
        start = time.perf_counter()
        torch.empty_like(source).copy_(source)
        fresh.append(time.perf_counter() - start)
    warm_s, fresh_s = min(warm), statistics.median(fresh)
    return {"copy_gbps": 2 * source.numel() * source.element_size() / warm_s / 1e9,
            "first_touch_ms": max(0.0, fresh_s - warm_s) * 1e3}


def bytes_moved(op: str, mode: str, tokens: int, vocab: int, itemsize: int) -> int:
    """What a kernel must read and write: each logits tensor read once per pass, plus the
    gradient written once (token ops; the fused-linear op has no such floor)."""
    tensors = 2 if op == "token_kl" else 1
    one = tokens * vocab * itemsize
    return tensors * one if mode == "fwd" else 2 * tensors * one + one


def add_options(parser) -> None:
    parser.add_argument("--ops", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--linear-tokens", type=int, default=2048, help="N of linear_logprobs")
    parser.add_argument("--hidden-dim", type=int, default=256, help="D of linear_logprobs")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=list(_measure.DTYPES))
    parser.add_argument("--providers", nargs="+", default=None,
                        choices=sorted({p for names in PROVIDERS.values() for p in names}))
    harness.add_sweep_options(parser, MODES)


def run(args) -> list[dict]:
    device = torch.device("cpu")
    stamp = harness.stamp(device)
    bandwidth = {d: copy_bandwidth(args.tokens, args.vocab, d) for d in args.dtypes}
    for dtype, numbers in bandwidth.items():
        print(f"copy bandwidth {dtype}: {numbers['copy_gbps']:.1f} GB/s, first touch of a fresh "
              f"logits-sized buffer +{numbers['first_touch_ms']:.0f} ms")
    trees = harness.stage_revisions(args.baseline)
    configs = []
    for op in args.ops:
        dtypes = ["float32"] if op == "linear_logprobs" else args.dtypes
        for dtype in dtypes:
            for mode in args.modes:
                for provider in args.providers or PROVIDERS[op]:
                    if provider not in PROVIDERS[op] or (provider in BACKWARD_ONLY and mode == "fwd"):
                        continue
                    tokens = args.linear_tokens if op == "linear_logprobs" else args.tokens
                    configs += harness.per_revision(
                        dict(op=op, provider=provider, mode=mode, dtype=dtype, tokens=tokens,
                             vocab=args.vocab, hidden=args.hidden_dim, repeats=args.repeats,
                             env=PROVIDER_ENV.get(provider, {})),
                        trees, own=provider in BACKEND_OF)
    rows = []
    script = str(Path(__file__).resolve())
    for index, spec in enumerate(configs, 1):
        print(f"[{index}/{len(configs)}] {spec['op']} {spec['provider']} {spec['mode']} "
              f"{spec['dtype']}", flush=True)
        result = harness.measure_cpu(script, spec)
        itemsize = _measure.DTYPES[spec["dtype"]].itemsize
        # shape = the op: summarize.py then gives each op its own rows.
        row = {"op": spec["op"], "shape": spec["op"], "provider": spec["provider"],
               "mode": spec["mode"], "dtype": spec["dtype"], "vocab": args.vocab,
               "n_rows": spec["tokens"],
               "logits_mb": round(spec["tokens"] * args.vocab * itemsize / 2**20, 1),
               "hidden": spec["hidden"] if spec["op"] == "linear_logprobs" else "",
               "time_ms": None, "peak_mb": None, "error": "", **result}
        if spec["op"] != "linear_logprobs" and row["time_ms"]:
            moved = bytes_moved(spec["op"], spec["mode"], args.tokens, args.vocab, itemsize)
            floor_ms = moved / (bandwidth[spec["dtype"]]["copy_gbps"] * 1e9) * 1e3
            row.update(bytes_mb=round(moved / 2**20, 1),
                       gbps=round(moved / (row["time_ms"] / 1e3) / 1e9, 2),
                       copy_gbps=round(bandwidth[spec["dtype"]]["copy_gbps"], 2),
                       floor_ms=round(floor_ms, 1), x_floor=round(row["time_ms"] / floor_ms, 2),
                       first_touch_ms=round(bandwidth[spec["dtype"]]["first_touch_ms"], 1))
        rows.append({**row, **stamp})
        print(f"    {row.get('time_ms') or 0:.0f} ms, {row.get('peak_mb') or 0:.0f} MB "
              f"{row['error']}", flush=True)
    return rows


def print_floor_table(rows: list[dict]) -> None:
    """Achieved GB/s and time against the bandwidth floor, per token-op row."""
    print("\nop              dtype     mode     provider          ms      GB/s  floor ms  x floor")
    for row in rows:
        if row.get("floor_ms"):
            print(f"{row['op']:15} {row['dtype']:9} {row['mode']:8} {row['provider']:15} "
                  f"{row['time_ms']:8.0f} {row['gbps']:8.2f} {row['floor_ms']:9.0f} "
                  f"{row['x_floor']:8.2f}")


BENCH = harness.Bench(doc=__doc__, options=add_options, worker=cpu_worker, run=run,
                      report=lambda rows, args: print_floor_table(rows),
                      results=lambda args: RESULTS / "native_cpu.csv", baseline=True)


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
