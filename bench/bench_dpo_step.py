"""One DPO training step on the CPU: fastalign's DPOTrainer beside TRL's DPOTrainer, same model,
data and settings, time and peak memory, each in a fresh process.

Model: the tiny Llama (hidden 256, 4 layers, V = 128256, untrained), fp32, or with ``--model
smollm2`` SmolLM2-135M-Instruct (``make real``); 4 pairs of 512 tokens (256 of prompt, 256 of
completion); reference = a frozen copy; AdamW. Both trainers run one warm-up step (AdamW's state
exists afterwards), then the measured steps: time is the median step, memory the peak resident
set one step adds (gradients, activations, logits). ``fastalign_packed`` is fastalign with
``padding_free=True``, ``fastalign_checkpointed`` with ``gradient_checkpointing=True``; ``--length-mix`` draws each pair's prompt and completion lengths between
a quarter of the given ones and all of them (a realistic spread: the padded batch then spends
compute on padding, the packed one does not).

    python bench/bench_dpo_step.py --csv bench/results/dpo_step_cpu.csv
    python bench/bench_dpo_step.py --model smollm2 --length-mix --pairs 8 --prompt 96 \
        --completion 96 --providers fastalign fastalign_packed --csv bench/results/packing_cpu.csv
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _workers  # noqa: E402
import harness  # noqa: E402

from fastalign import _measure  # noqa: E402

PROVIDERS = ("fastalign", "fastalign_packed", "fastalign_checkpointed", "trl")


def worker(spec: dict) -> dict:
    import tempfile

    torch.manual_seed(0)
    rows = _workers.preference_rows(spec["pairs"], spec["prompt"], spec["completion"],
                                    _workers.trainer_tokenizer(spec), spec["length_mix"])
    with tempfile.TemporaryDirectory() as out:
        make_step = (_workers.dpo_trl_step if spec["provider"] == "trl"
                     else _workers.dpo_fastalign_step)
        step = make_step(spec, rows, out)
        step()  # warm-up: AdamW state, lazy initialisation
        if spec["measure"] == "memory":
            return {"peak_bytes": _measure.peak_extra_bytes(step, torch.device("cpu"))}
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return {"seconds": sorted(times)[len(times) // 2]}


def add_options(parser) -> None:
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per pair")
    parser.add_argument("--completion", type=int, default=256, help="completion tokens per side")
    harness.add_step_options(parser, hidden=256, layers=4, repeats=3, named_models=True)
    parser.add_argument("--length-mix", action="store_true",
                        help="each pair's lengths drawn between a quarter of the given and all")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)


def logits_mb(args) -> float:
    """The fp32 logits of the whole batch, chosen and rejected."""
    return 2 * args.pairs * (args.prompt + args.completion) * args.vocab * 4 / 2**20


def run(args) -> list[dict]:
    harness.named_model_shape(args)
    spec = dict(pairs=args.pairs, prompt=args.prompt, completion=args.completion,
                hidden=args.hidden, layers=args.layers, vocab=args.vocab, repeats=args.repeats,
                model=args.model, length_mix=args.length_mix)
    stamp = harness.stamp(torch.device("cpu"))
    results = []
    for provider in args.providers:
        shape = (f"model {args.model}" if args.model != "tiny" else
                 f"hidden {args.hidden}, {args.layers} layers, V={args.vocab}")
        print(f"{provider}: one DPO step, {args.pairs} pairs x {args.prompt + args.completion} "
              f"tokens{' at most' if args.length_mix else ''}, {shape} ...", flush=True)
        measured, _ = harness.measure_trainer_step(__file__, dict(spec, provider=provider))
        results.append(dict(op="dpo_step", provider=provider, model=args.model,
                            length_mix=args.length_mix, pairs=args.pairs,
                            seq=args.prompt + args.completion, hidden=args.hidden,
                            layers=args.layers, vocab=args.vocab,
                            logits_mb=round(logits_mb(args), 1), **measured, **stamp))
    return results


BENCH = harness.Bench(
    doc=__doc__, options=add_options, worker=worker, run=run,
    report=lambda rows, args: harness.report_trainer_steps(
        rows, f"fp32 logits of the batch: {logits_mb(args):.0f} MB"))


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
