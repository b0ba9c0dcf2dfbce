"""One GRPO training step (CPU, or a GPU with --device cuda): fastalign's GRPOTrainer beside TRL's GRPOTrainer, same
model, prompts, reward and settings; time and peak memory, each in a fresh process.

The step is what either trainer does per optimizer update: sample G completions of each prompt
(``generate``), score them, recompute log-probs, the clipped loss, backward, AdamW. Model: the
tiny Llama (hidden 128, 2 layers, V = 128256, untrained: it almost never samples EOS, so
completions run to the full length; the CSV records the lengths each trainer got), fp32, 1
prompt x G = 8 completions of 512 tokens, beta = 0 (no reference, TRL's default). Both run one
warm-up step (AdamW's state exists afterwards); time is the median of the measured steps,
memory the peak resident set one step adds. ``--model smollm2``: SmolLM2-135M-Instruct
(``make real``) instead of the tiny Llama.

    python bench/bench_grpo_step.py --csv bench/results/grpo_step_cpu.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _workers  # noqa: E402
import harness  # noqa: E402

from fastalign import _measure  # noqa: E402

PROVIDERS = ("fastalign", "trl")


def worker(spec: dict) -> dict:
    import tempfile

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    prompts = _workers.random_prompts(spec["prompts"] * (spec["repeats"] + 2), spec["prompt"],
                                      _workers.trainer_tokenizer(spec))
    with tempfile.TemporaryDirectory() as out:
        make_step = (_workers.grpo_fastalign_step if spec["provider"] == "fastalign"
                     else _workers.grpo_trl_step)
        step = make_step(spec, prompts, out)
        length = step()  # warm-up: AdamW state, lazy initialisation
        if spec["measure"] == "memory":
            return {"peak_bytes": _measure.peak_extra_bytes(step, device),
                    "completion_length": length}
        return {"seconds": _measure.median_seconds(step, device, repeats=spec["repeats"],
                                                   warmup=0)}


def add_options(parser) -> None:
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=512, help="max completion tokens")
    harness.add_step_options(parser, hidden=128, layers=2, repeats=2, named_models=True)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: resident set "
                        "on the CPU, allocated memory on the GPU)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)


def logits_mb(args) -> float:
    """The fp32 logits of all completions of the step."""
    return args.prompts * args.generations * args.completion * args.vocab * 4 / 2**20


def run(args) -> list[dict]:
    harness.named_model_shape(args)
    spec = dict(prompts=args.prompts, generations=args.generations, prompt=args.prompt,
                completion=args.completion, hidden=args.hidden, layers=args.layers,
                vocab=args.vocab, repeats=args.repeats, device=args.device, model=args.model)
    stamp = harness.stamp(torch.device(args.device))
    results = []
    for provider in args.providers:
        print(f"{provider}: one GRPO step, {args.prompts} prompt(s) x G={args.generations}, "
              f"{args.completion} completion tokens, hidden {args.hidden}, {args.layers} layers, "
              f"V={args.vocab} ...", flush=True)
        measured, reply = harness.measure_trainer_step(__file__, dict(spec, provider=provider))
        results.append(dict(op="grpo_step", provider=provider, model=args.model,
                            prompts=args.prompts,
                            generations=args.generations, prompt=args.prompt,
                            completion=args.completion,
                            completion_length=round(reply.get("completion_length", float("nan")),
                                                    1),
                            hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                            logits_mb=round(logits_mb(args), 1), **measured, **stamp))
    return results


BENCH = harness.Bench(
    doc=__doc__, options=add_options, worker=worker, run=run,
    report=lambda rows, args: harness.report_trainer_steps(
        rows, f"fp32 logits of the completions: {logits_mb(args):.0f} MB",
        extra="completion_length"))


if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
