"""Benchmark of the distillation loss from hidden states and LM heads: the mean over N tokens of
the divergence from a student's next-token distribution to a teacher's, forward + backward,
time and peak memory, beside TRL's and Liger's fused losses, eager torch and the matmul floor.

The student's hidden [N, D] and head [V, D], the teacher's hidden [N, D_t] and head [V, D_t]
(seeded, logits of std ~2). The gradient reaches the student's hidden and head only; it is
returned by ``torch.autograd.grad``, as in the other scripts, so the peak memory includes it.
``beta`` is TRL's: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), in
between the generalized JSD (``--betas``, default 0.5 1.0). Providers:
  fastalign           fastalign.FusedDistillationLoss(beta) (the student's gradient formed in
                      the forward); targets any ids, none ignored; ``--chunk-mb`` measures it
                      at each given chunk size (MiB of float32 logits per model) side by side
  fastalign_two_pass  fastalign.linear_divergence(...).mean() (the backward recomputes logits)
  trl                 TRL's trl.kernels.ChunkedDivergenceFunction, its per-token divergence's
                      mean (Triton on CUDA, torch ops on the CPU); skipped without TRL
  liger               Liger-Kernel's LigerFusedLinearJSDFunction (what LigerFusedLinearJSD
                      calls; it returns the token mean; Triton only: CUDA)
  torch_eager         both models' logits, float32 log_softmax, the divergence, backward
  matmul_floor        the four matmuls alone into outputs written before: both models' logits,
                      G @ W and G.T @ H with G an [N, V] tensor; measured once per run
  matmul_chunked      the same four matmuls in fastalign's chunks of rows (reused [rows, V]
                      buffers, the weight gradient accumulated per chunk), per ``--chunk-mb``:
                      how much of fastalign's time over the floor the chunking alone costs
Each provider runs in fresh processes (CPU: one for the time, one for the memory, see
harness.measure_cpu; CUDA: one for both) and reports the loss it computed, which must agree
across providers. The table adds fastalign over TRL (time, memory) and over the matmul floor
(time); ``--csv`` writes the rows.

    python bench/bench_divergence.py                # CPU: N=2048, D=256, D_t=512, V=128256, fp32
    python bench/bench_divergence.py --quick        # N=64, D=32, D_t=48, V=5000: seconds
    python bench/bench_divergence.py --device cuda  # N=8192, D=4096, D_t=8192, V=128256, bf16
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
# TRL's kernel loader, which also works on the GPU image that lacks TRL's trainer dependencies.
from _workers import CUDA_ONLY, _trl_kernel  # noqa: E402

import fastalign  # noqa: E402
from fastalign import _measure  # noqa: E402
from fastalign.ops.linear_loss import rows_per_chunk, split_rows  # noqa: E402

PROVIDERS = ("fastalign", "fastalign_two_pass", "trl", "liger", "torch_eager", "matmul_floor",
             "matmul_chunked")
FLOOR, CHUNKED_FLOOR = "matmul_floor", "matmul_chunked"
CHUNKED = ("fastalign", CHUNKED_FLOOR)  # the providers measured per --chunk-mb
PEER_PACKAGES = {"trl": "trl", "liger": "liger_kernel"}
# (N, D, D_t, V): the CPU goal; on CUDA a Llama-3.1-8B student of a 70B teacher (one vocabulary).
SHAPES = {"cpu": (2048, 256, 512, 128256), "cuda": (8192, 4096, 8192, 128256),
          "quick": (64, 32, 48, 5000)}


def make_inputs(spec: dict, device: torch.device):
    """The student's hidden [N, D] and head [V, D] (both requiring grad) and targets [N], the
    teacher's hidden [N, D_t] and head [V, D_t]."""
    n, vocab, dtype = spec["tokens"], spec["vocab"], spec["dtype"]
    hidden, weight, targets, _, _ = _measure.random_head(n, spec["hidden"], vocab, dtype, device)
    # The second model of another draw: not the student's tensors again even when D_t == D.
    *_, teacher_hidden, teacher_weight = _measure.random_head(n, spec["teacher_hidden"], vocab,
                                                              dtype, device)
    return hidden.requires_grad_(), weight.requires_grad_(), targets, teacher_hidden, teacher_weight


def eager_divergence(hidden, weight, teacher_hidden, teacher_weight, beta: float):
    """Per-token divergence from both models' full float32 log-softmaxes, the code a user writes
    first: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = (1 - beta) p_s + beta p_t; its ends
    are the plain KLs (computed directly: log(0) would make m's formula NaN there)."""
    log_p = torch.log_softmax((hidden @ weight.T).float(), -1)
    log_q = torch.log_softmax((teacher_hidden @ teacher_weight.T).float(), -1)
    if beta == 1.0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 0.0:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
    return (beta * (log_q.exp() * (log_q - log_m)).sum(-1)
            + (1 - beta) * (log_p.exp() * (log_p - log_m)).sum(-1))


def loss_function(provider: str, beta: float, hidden, weight, targets, teacher_hidden,
                  teacher_weight, chunk_mb: float | None = None):
    """A closure computing ``provider``'s mean per-token divergence (peers imported here, in
    the worker, so that the parent process never imports them); ``chunk_mb``: fastalign's
    chunk size, None for its default."""
    student, teacher = (hidden, weight), (teacher_hidden, teacher_weight)
    if provider == "fastalign":
        chunking = {} if chunk_mb is None else {"chunk_mb": chunk_mb}
        module = fastalign.FusedDistillationLoss(beta=beta, **chunking)
        return lambda: module(*student, *teacher, targets)[0]
    if provider == "fastalign_two_pass":
        return lambda: fastalign.linear_divergence(*student, *teacher, beta=beta).mean()
    if provider == "trl":
        function = _trl_kernel("chunked_divergence", "ChunkedDivergenceFunction")
        # (h_s, w_s, b_s, h_t, w_t, b_t, beta, temperature, student scale, student softcap,
        #  teacher scale, teacher softcap) -> (per-token divergence, per-token entropy)
        return lambda: function.apply(hidden, weight, None, teacher_hidden, teacher_weight, None,
                                      beta, 1.0, 1.0, None, 1.0, None)[0].mean()
    if provider == "liger":
        from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction
        # (student input, weight, teacher input, weight, labels, jsd_beta): Liger's jsd_beta
        # is TRL's beta (0 forward KL, 1 reverse KL, the same mixture).
        return lambda: LigerFusedLinearJSDFunction.apply(*student, *teacher, None, beta)
    if provider == "torch_eager":
        return lambda: eager_divergence(*student, *teacher, beta).mean()
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


def floor_call(hidden, weight, teacher_hidden, teacher_weight):
    """The four matmuls of any exact forward + backward, into outputs allocated here (their
    pages are faulted in by the warm-up call, outside the measurement); G is the logits
    buffer, since any [N, V] tensor does for the time."""
    grad = hidden.new_empty(hidden.shape[0], weight.shape[0])
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.empty_like(weight)

    def call():
        torch.mm(teacher_hidden, teacher_weight.T, out=grad)
        torch.mm(hidden, weight.T, out=grad)
        torch.mm(grad, weight, out=grad_hidden)
        torch.mm(grad.T, hidden, out=grad_weight)

    call.loss = None
    return call


def chunked_floor_call(hidden, weight, teacher_hidden, teacher_weight, chunk_mb: float | None):
    """``floor_call``'s four matmuls in chunks of rows as ``FusedDistillationLoss`` runs them:
    both logits products into reused ``[rows, V]`` buffers, the chunk's dHidden rows, and the
    weight gradient accumulated chunk by chunk."""
    chunk_mb = fastalign.nn.distill.DISTILL_CHUNK_MB if chunk_mb is None else chunk_mb
    # The same chunks of equal size: (start, end) row ranges.
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in
              split_rows(torch.arange(hidden.shape[0]), rows_per_chunk(chunk_mb, weight.shape[0]))]
    rows = max(end - start for start, end in bounds)
    tiles = [hidden.new_empty(rows, weight.shape[0]) for _ in range(2)]
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.empty_like(weight)

    def call():
        grad_weight.zero_()
        for start, end in bounds:
            tile, teacher_tile = (t[:end - start] for t in tiles)
            torch.mm(teacher_hidden[start:end], teacher_weight.T, out=teacher_tile)
            torch.mm(hidden[start:end], weight.T, out=tile)
            torch.mm(tile, weight, out=grad_hidden[start:end])
            grad_weight.addmm_(tile.T, hidden[start:end])

    call.loss, call.rows, call.outputs = None, rows, (grad_hidden, grad_weight)
    return call


def make_call(spec: dict, device: torch.device):
    """The inputs of one configuration and a closure running it once. ``call.loss`` is the
    loss of its latest call, kept as a tensor: reading its value in the call would add a CUDA
    synchronization to every timed call."""
    provider = spec["provider"]
    if provider in CUDA_ONLY and device.type != "cuda":
        raise RuntimeError(f"{provider} needs CUDA (Triton kernels only)")
    hidden, weight, targets, teacher_hidden, teacher_weight = make_inputs(spec, device)
    if provider == FLOOR:
        return floor_call(hidden.detach(), weight.detach(), teacher_hidden, teacher_weight)
    if provider == CHUNKED_FLOOR:
        return chunked_floor_call(hidden.detach(), weight.detach(), teacher_hidden,
                                  teacher_weight, spec.get("chunk_mb"))
    loss_of = loss_function(provider, spec["beta"], hidden, weight, targets, teacher_hidden,
                            teacher_weight, spec.get("chunk_mb"))

    def call():
        loss = loss_of()
        grads = torch.autograd.grad(loss, (hidden, weight))
        call.loss = loss.detach()
        return grads

    call.loss = None
    return call


def worker(spec: dict) -> dict:
    """One provider in this fresh process, and the loss it computed: on CUDA its time and
    memory (harness.measure_cuda), on the CPU one of them (harness.cpu_worker)."""
    calls = []

    def build(spec, device):
        calls.append(make_call(spec, device))
        return calls[-1]

    if spec["device"] == "cuda":
        reply = harness.measure_cuda(build, spec)
    else:
        reply = harness.cpu_worker(build, spec)
    loss = calls[-1].loss if calls else None
    return {**reply, "loss": None if loss is None else float(loss)}


def measure(spec: dict) -> dict:
    """``time_ms``, ``peak_mb`` and ``loss`` of one provider, measured in fresh processes;
    else an ``error``, or ``skipped`` where the peer is not installed."""
    provider = spec["provider"]
    if provider in CUDA_ONLY and spec["device"] != "cuda":  # no subprocesses for a known skip
        return {"error": f"{provider} needs CUDA (Triton kernels only)"}
    package = PEER_PACKAGES.get(provider)
    if package and importlib.util.find_spec(package) is None:
        return {"skipped": f"{package} not installed"}
    script = str(Path(__file__).resolve())
    if spec["device"] == "cpu":
        return harness.measure_cpu(script, spec)
    reply = _measure.run_worker([script], dict(spec, measure="cuda"), for_memory=False)
    return {key: value for key, value in reply.items() if key != "detail"}


def add_options(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--betas", nargs="+", type=float, default=[0.5, 1.0],
                        help="0 forward KL, 1 reverse KL, in between the generalized JSD")
    parser.add_argument("--quick", action="store_true",
                        help="the small shape N=64, D=32, D_t=48, V=5000 (a check that every "
                             "provider runs, in seconds)")
    parser.add_argument("--tokens", type=int, default=None, help="N (default: per device)")
    parser.add_argument("--hidden", type=int, default=None, help="the student's width D")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="the teacher's D_t")
    parser.add_argument("--vocab", type=int, default=None, help="V")
    parser.add_argument("--dtype", default=None, choices=list(_measure.DTYPES),
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per CPU measurement")
    parser.add_argument("--chunk-mb", nargs="+", type=float, default=[None],
                        help="fastalign's chunk size(s), MiB of float32 logits per model, each "
                             "measured side by side (default: FusedDistillationLoss's default)")
    harness.add_rounds_option(parser)


def run(args) -> list[dict]:
    if any(not 0.0 <= beta <= 1.0 for beta in args.betas):
        raise harness.UsageError(f"--betas must lie in [0, 1], got {args.betas}")
    if any(chunk_mb is not None and not chunk_mb > 0 for chunk_mb in args.chunk_mb):
        raise harness.UsageError(f"--chunk-mb must be positive, got {args.chunk_mb}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise harness.UsageError("--device cuda: this machine has no CUDA device")
    given = (args.tokens, args.hidden, args.teacher_hidden, args.vocab)
    n, d, d_teacher, vocab = (g or default for g, default in
                              zip(given, SHAPES["quick" if args.quick else args.device]))
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    stamp = harness.stamp(torch.device(args.device))
    # The floors once (no beta; the chunked one per chunk size), then every other provider per
    # beta (fastalign per chunk size).
    configs = [(FLOOR, None, None)] if FLOOR in args.providers else []
    if CHUNKED_FLOOR in args.providers:
        configs += [(CHUNKED_FLOOR, None, chunk_mb) for chunk_mb in args.chunk_mb]
    configs += [(p, beta, chunk_mb) for beta in args.betas for p in args.providers
                if p not in (FLOOR, CHUNKED_FLOOR)
                for chunk_mb in (args.chunk_mb if p in CHUNKED else [None])]
    specs = [dict(provider=provider, beta=beta, chunk_mb=chunk_mb, tokens=n, hidden=d,
                  teacher_hidden=d_teacher, vocab=vocab, dtype=dtype, device=args.device,
                  repeats=args.repeats)
             for provider, beta, chunk_mb in configs]
    results = harness.measure_rounds(
        specs, measure, args.rounds,
        lambda spec: f"{spec['provider']} beta={spec['beta']} N={n} D={d} D_t={d_teacher} "
                     f"V={vocab} {dtype}"
                     + (f" chunk_mb={spec['chunk_mb']:g}" if spec["chunk_mb"] else ""))
    rows = []
    for (provider, beta, chunk_mb), result in zip(configs, results):
        for key, digits in (("time_ms", 3), ("peak_mb", 1)):
            if result.get(key) is not None:
                result[key] = round(result[key], digits)
        rows.append({"op": "distill_divergence", "provider": provider, "beta": beta,
                     "chunk_mb": chunk_mb, "mode": "fwd_bwd", "n": n, "d": d, "d_teacher": d_teacher, "vocab": vocab,
                     "dtype": dtype, "time_ms": None, "peak_mb": None, "loss": None,
                     "error": "", "skipped": "", **result, **stamp})
    return rows


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


def _label(row: dict) -> str:
    """The provider, with fastalign's chunk size where one was given."""
    chunk_mb = row.get("chunk_mb")
    return row["provider"] + (f"@{chunk_mb:g}MiB" if chunk_mb else "")


def report(rows: list[dict], args) -> None:
    """Time, peak extra memory and loss per provider and beta, then per beta fastalign (each
    chunk size) over TRL and over the floor, and how far apart the providers' losses are."""
    first = rows[0]
    logits_mb = first["n"] * first["vocab"] * _measure.DTYPES[first["dtype"]].itemsize / 2**20
    print(f"\ndistillation loss, forward + backward: N={first['n']} D={first['d']} "
          f"D_t={first['d_teacher']} V={first['vocab']} {first['dtype']}, {first['device']} "
          f"(one model's logits: {logits_mb:.0f} MB)")
    print(f"{'provider':20} {'beta':>5} {'time (s)':>10} {'peak extra (MB)':>16} {'loss':>12}")
    measured = {}
    for row in rows:
        beta = "" if row["beta"] is None else f"{row['beta']:g}"
        if row["error"] or row["skipped"]:
            why = f"error: {row['error']}" if row["error"] else f"skipped: {row['skipped']}"
            print(f"{_label(row):20} {beta:>5}  {why}")
            continue
        measured[_label(row), row["beta"]] = row
        loss = "" if row["loss"] is None else f"{row['loss']:.6g}"
        print(f"{_label(row):20} {beta:>5} {row['time_ms'] / 1e3:10.3f} "
              f"{row['peak_mb']:16.1f} {loss:>12}")
    floor = measured.get((FLOOR, None))
    for (label, _), row in measured.items():
        if row["provider"] == CHUNKED_FLOOR and floor:
            print(f"{label} / matmul_floor: time {_ratio(row['time_ms'], floor['time_ms'])} "
                  f"(the chunking's cost alone)")
    for beta in args.betas:
        parts = []
        trl = measured.get(("trl", beta))
        ours = {label: row for (label, b), row in measured.items()
                if b == beta and row["provider"] == "fastalign"}
        for label, row in ours.items():
            if trl:
                parts.append(f"{label} / trl: time {_ratio(row['time_ms'], trl['time_ms'])}, "
                             f"memory {_ratio(row['peak_mb'], trl['peak_mb'])}")
            if floor:
                parts.append(f"{label} / matmul_floor: time "
                             f"{_ratio(row['time_ms'], floor['time_ms'])}")
        losses = [row["loss"] for (_, b), row in measured.items() if b == beta]
        if len(losses) > 1:
            spread = (max(losses) - min(losses)) / abs(statistics.median(losses))
            parts.append(f"the {len(losses)} losses agree within {spread:.1e} (relative)")
        if parts:
            print(f"beta {beta:g}: " + "; ".join(parts))


BENCH = harness.Bench(doc=__doc__, options=add_options, worker=worker, run=run, report=report)


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
