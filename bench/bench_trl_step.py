"""One TRL training step, unpatched beside patched with fastalign.integrations.trl: the same
TRL trainer, model, data and settings, time and peak memory, each in a fresh process.

Steps (the tiny Llama, V = 128256, fp32, AdamW; one warm-up step first):
  dpo    TRL's DPOTrainer, 4 pairs of 512 tokens, a frozen reference copy (bench_dpo_step.py's)
  grpo   TRL's GRPOTrainer, 1 prompt x G=8 completions of up to 512 tokens (bench_grpo_step.py's)
  distill TRL's DistillationTrainer, 8 rows of 256 prompt + 256 sampled completion tokens, a
         teacher twice as wide (same vocabulary), TRL's default beta = 1 (reverse KL). TRL 1.16's
         trainer is on-policy only: its step samples the completions first, work the patch
         leaves alone; the CSV's ``sampling_ms`` is that part of the step
Providers: trl (TRL 1.16's own fused head) and trl+fastalign (built inside
``fastalign.integrations.trl.enabled()``).

    python bench/bench_trl_step.py --csv bench/results/trl_step_cpu.csv
    python bench/bench_trl_step.py --steps distill --repeats 1 --csv ...
    python bench/bench_trl_step.py --device cuda --csv bench/results/trl_step_cuda.csv
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _workers  # noqa: E402
import harness  # noqa: E402

from fastalign import _measure  # noqa: E402

PROVIDERS = ("trl", "trl+fastalign")
STEPS = ("dpo", "grpo", "distill")


def _patched(provider: str):
    if provider == "trl":
        return contextlib.nullcontext()
    import fastalign.integrations.trl as fatrl
    return fatrl.enabled()


def worker(spec: dict) -> dict:
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    tokenizer = _workers.trainer_tokenizer(spec)
    with tempfile.TemporaryDirectory() as out, _patched(spec["provider"]):
        if spec["step"] == "dpo":
            rows = _workers.preference_rows(spec["pairs"], spec["prompt"], spec["completion"],
                                            tokenizer)
            step = _workers.dpo_trl_step(spec, rows, out)
        elif spec["step"] == "distill":
            prompts = _workers.random_prompts(spec["rows"] * (spec["repeats"] + 2), spec["prompt"],
                                              tokenizer)
            step = _workers.distill_trl_step(spec, prompts, out)
        else:
            prompts = _workers.random_prompts(spec["repeats"] + 2, spec["prompt"], tokenizer)
            step = _workers.grpo_trl_step(dict(spec, prompts=1), prompts, out)
        step()  # warm-up: AdamW state, lazy initialisation
        if spec["measure"] == "memory":
            return {"peak_bytes": _measure.peak_extra_bytes(step, device)}
        reply = {"seconds": _measure.median_seconds(step, device, repeats=spec["repeats"],
                                                    warmup=0)}
        if hasattr(step, "sampling"):  # the timed steps' sampling, the warm-up's left out
            reply["sampling_seconds"] = statistics.median(step.sampling[1:])
        return reply


def add_options(parser) -> None:
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--pairs", type=int, default=4, help="DPO pairs")
    parser.add_argument("--prompt", type=int, default=256, help="DPO prompt tokens (GRPO: 64)")
    parser.add_argument("--completion", type=int, default=256,
                        help="DPO completion tokens per side (GRPO: --grpo-completion)")
    parser.add_argument("--generations", type=int, default=8, help="GRPO completions (G)")
    parser.add_argument("--grpo-completion", type=int, default=512)
    parser.add_argument("--distill-rows", type=int, default=8, help="distillation prompts per step")
    parser.add_argument("--distill-prompt", type=int, default=256)
    parser.add_argument("--distill-completion", type=int, default=256,
                        help="sampled completion tokens per row")
    parser.add_argument("--teacher-hidden", type=int, default=None,
                        help="the distillation teacher's width (default: twice --hidden)")
    parser.add_argument("--beta", type=float, default=1.0,
                        help="the distillation step's divergence (TRL's default 1: reverse KL)")
    harness.add_step_options(parser, hidden=256, layers=4, repeats=2, named_models=False)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)


def run(args) -> list[dict]:
    stamp = harness.stamp(torch.device(args.device))
    results = []
    for step in args.steps:
        if step == "dpo":
            shape = dict(pairs=args.pairs, prompt=args.prompt, completion=args.completion)
            label = f"{args.pairs} pairs x {args.prompt + args.completion} tokens"
        elif step == "distill":
            teacher = args.teacher_hidden or 2 * args.hidden
            shape = dict(rows=args.distill_rows, prompt=args.distill_prompt,
                         completion=args.distill_completion, teacher_hidden=teacher,
                         beta=args.beta)
            label = (f"{args.distill_rows} rows x {args.distill_prompt}+"
                     f"{args.distill_completion} tokens, teacher {teacher}, beta {args.beta:g}")
        else:
            shape = dict(generations=args.generations, prompt=64,
                         completion=args.grpo_completion)
            label = f"G={args.generations} x {args.grpo_completion} completion tokens"
        for provider in args.providers:
            spec = dict(shape, step=step, provider=provider, hidden=args.hidden,
                        layers=args.layers, vocab=args.vocab, repeats=args.repeats,
                        device=args.device)
            print(f"{provider}: one TRL {step} step, {label}, V={args.vocab} ...", flush=True)
            measured, reply = harness.measure_trainer_step(__file__, spec)
            # Last, so the CSV's earlier columns stay those of the dpo and grpo rows.
            sampling = {}
            if step == "distill":
                sampling["sampling_ms"] = round(reply.get("sampling_seconds", float("nan")) * 1e3,
                                                1)
            results.append(dict(op=f"trl_{step}_step", provider=provider, step=step,
                                shape=label, hidden=args.hidden, layers=args.layers,
                                vocab=args.vocab, **measured, **stamp, **sampling))
    return results


def report(results: list[dict], args) -> None:
    print(f"\n{'step':7} {'provider':14} {'time (ms)':>10} {'peak extra (MB)':>16} "
          f"{'sampling (ms)':>14}")
    for row in results:
        sampling = f"{row['sampling_ms']:14.0f}" if "sampling_ms" in row else " " * 14
        print(f"{row['step']:7} {row['provider']:14} {row['time_ms']:10.0f} "
              f"{row['peak_mb']:16.0f} {sampling}  {row['error']}")
    for step in args.steps:
        pair = [r for r in results if r["step"] == step and not r["error"]]
        if len(pair) == 2:
            trl, ours = pair
            print(f"{step}: patched / unpatched time {ours['time_ms'] / trl['time_ms']:.2f}x, "
                  f"peak memory {ours['peak_mb'] / trl['peak_mb']:.3f}x")
            if "sampling_ms" in ours:  # the part the patch serves: the step less its sampling
                rest = [row["time_ms"] - row["sampling_ms"] for row in (trl, ours)]
                print(f"{step} without its sampling: {rest[0]:.0f} ms -> {rest[1]:.0f} ms, "
                      f"{rest[1] / rest[0]:.2f}x")


BENCH = harness.Bench(doc=__doc__, options=add_options, worker=worker, run=run, report=report)


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
