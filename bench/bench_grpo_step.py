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

import argparse
import json
import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastalign import _measure  # noqa: E402

PROVIDERS = ("fastalign", "trl")


def _prompts(count: int, tokens: int, tokenizer) -> list[str]:
    """Random lowercase words of ``tokens`` tokens each."""
    rng = random.Random(0)
    return [harness.random_text(rng, tokens, tokenizer) for _ in range(count)]


def length_reward(prompts, completions, **_):
    """Any reward that differs within a group will do (the advantages are then non-zero)."""
    return [float(len(set(text))) for text in completions]


def _fastalign_step(spec, prompts, out):
    from fastalign.trainer import GRPOConfig, GRPOTrainer

    config = GRPOConfig(output_dir=out, batch_size=spec["prompts"],
                        num_generations=spec["generations"], max_new_tokens=spec["completion"],
                        learning_rate=1e-6, max_steps=100, max_grad_norm=None, beta=0.0,
                        progress=False)
    trainer = GRPOTrainer(*harness.trainer_model(spec), config, prompts, [length_reward])

    def step():
        return trainer.training_step()["completion_length"]

    return step


def _trl_step(spec, prompts, out):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = spec["prompts"] * spec["generations"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=rows,
                          num_generations=spec["generations"], steps_per_generation=1,
                          max_completion_length=spec["completion"], learning_rate=1e-6,
                          beta=0.0, temperature=1.0, top_p=1.0, report_to=[],
                          use_cpu=spec["device"] == "cpu",
                          bf16=False, max_grad_norm=0.0, logging_steps=10**6)
        model, tokenizer = harness.trainer_model(spec)
        trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                              processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    batches = iter(trainer.get_train_dataloader())

    def step():
        trainer.model.train()
        inputs = next(batches)
        trainer.training_step(trainer.model, inputs, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        mask = trainer._buffered_inputs[0]["completion_mask"]
        return float(mask.sum(-1).float().mean())

    return step


def _worker(spec: dict) -> dict:
    import tempfile

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    prompts = _prompts(spec["prompts"] * (spec["repeats"] + 2), spec["prompt"],
                       harness.trainer_model(dict(spec, vocab=300, hidden=8, layers=1))[1])
    with tempfile.TemporaryDirectory() as out:
        step = (_fastalign_step if spec["provider"] == "fastalign" else _trl_step)(
            spec, prompts, out)
        length = step()  # warm-up: AdamW state, lazy initialisation
        if spec["measure"] == "memory":
            return {"peak_bytes": _measure.peak_extra_bytes(step, device),
                    "completion_length": length}
        return {"seconds": _measure.median_seconds(step, device, repeats=spec["repeats"],
                                                   warmup=0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=512, help="max completion tokens")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="tiny", help="tiny (built in) or smollm2 (make real)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: resident set "
                        "on the CPU, allocated memory on the GPU)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    harness.named_model_shape(args)
    spec = dict(prompts=args.prompts, generations=args.generations, prompt=args.prompt,
                completion=args.completion, hidden=args.hidden, layers=args.layers,
                vocab=args.vocab, repeats=args.repeats, device=args.device, model=args.model)
    stamp = harness.stamp(torch.device(args.device))
    rows = args.prompts * args.generations
    logits_mb = rows * args.completion * args.vocab * 4 / 2**20
    results = []
    for provider in args.providers:
        print(f"{provider}: one GRPO step, {args.prompts} prompt(s) x G={args.generations}, "
              f"{args.completion} completion tokens, hidden {args.hidden}, {args.layers} layers, "
              f"V={args.vocab} ...", flush=True)
        measured = harness.measure_trainer_step(__file__, dict(spec, provider=provider))
        results.append(dict(op="grpo_step", provider=provider, model=args.model,
                            prompts=args.prompts,
                            generations=args.generations, prompt=args.prompt,
                            completion=args.completion,
                            completion_length=round(measured.get("completion_length", float("nan")),
                                                    1),
                            hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                            logits_mb=round(logits_mb, 1),
                            time_ms=round(measured["seconds"] * 1e3, 1),
                            peak_mb=round(measured["peak_bytes"] / 2**20, 1),
                            error=measured["error"][:200], **stamp))
    harness.report_trainer_steps(results, f"fp32 logits of the completions: {logits_mb:.0f} MB",
                                 args.csv, extra="completion_length")
    return harness.exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
