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

import argparse
import copy
import json
import random
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastalign import _measure  # noqa: E402

PROVIDERS = ("fastalign", "fastalign_packed", "fastalign_checkpointed", "trl")


def _rows(pairs: int, prompt_tokens: int, completion_tokens: int, tokenizer,
          mix: bool = False) -> list[dict]:
    """Random words of the given token counts (``mix``: each between a quarter of them and
    all; the EOS the trainers append is the completion's last token)."""
    rng = random.Random(0)

    def text(n):
        return harness.random_text(rng, rng.randint(max(1, n // 4), n) if mix else n, tokenizer)

    return [dict(prompt=text(prompt_tokens), chosen=text(completion_tokens - 1),
                 rejected=text(completion_tokens - 1)) for _ in range(pairs)]


def _fastalign_step(spec, rows, out):
    from fastalign.trainer import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=out, batch_size=spec["pairs"], learning_rate=1e-6,
                       max_steps=100, max_grad_norm=None, progress=False, reference="copy",
                       max_length=2048, padding_free=spec["provider"] == "fastalign_packed",
                       gradient_checkpointing=spec["provider"] == "fastalign_checkpointed")
    model, tokenizer = harness.trainer_model(spec)
    trainer = DPOTrainer(model, tokenizer, config, rows)
    return trainer.training_step


def _trl_step(spec, rows, out):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=out, per_device_train_batch_size=spec["pairs"],
                         learning_rate=1e-6, report_to=[],
                         use_cpu=spec.get("device", "cpu") == "cpu", bf16=False,
                         max_length=2048, max_grad_norm=0.0)
        model, tokenizer = harness.trainer_model(spec)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])

    def step():
        trainer.model.train()
        loss = trainer.training_step(trainer.model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _worker(spec: dict) -> dict:
    import tempfile

    torch.manual_seed(0)
    rows = _rows(spec["pairs"], spec["prompt"], spec["completion"],
                 harness.trainer_model(dict(spec, vocab=300, hidden=8, layers=1))[1],
                 spec["length_mix"])
    with tempfile.TemporaryDirectory() as out:
        step = (_trl_step if spec["provider"] == "trl" else _fastalign_step)(spec, rows, out)
        step()  # warm-up: AdamW state, lazy initialisation
        if spec["measure"] == "memory":
            return {"peak_bytes": _measure.peak_extra_bytes(step, torch.device("cpu"))}
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return {"seconds": sorted(times)[len(times) // 2]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per pair")
    parser.add_argument("--completion", type=int, default=256, help="completion tokens per side")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny", help="tiny (built in) or smollm2 (make real)")
    parser.add_argument("--length-mix", action="store_true",
                        help="each pair's lengths drawn between a quarter of the given and all")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    harness.named_model_shape(args)
    spec = dict(pairs=args.pairs, prompt=args.prompt, completion=args.completion,
                hidden=args.hidden, layers=args.layers, vocab=args.vocab, repeats=args.repeats,
                model=args.model, length_mix=args.length_mix)
    stamp = harness.stamp(torch.device("cpu"))
    tokens = 2 * args.pairs * (args.prompt + args.completion)
    logits_mb = tokens * args.vocab * 4 / 2**20
    results = []
    for provider in args.providers:
        shape = (f"model {args.model}" if args.model != "tiny" else
                 f"hidden {args.hidden}, {args.layers} layers, V={args.vocab}")
        print(f"{provider}: one DPO step, {args.pairs} pairs x {args.prompt + args.completion} "
              f"tokens{' at most' if args.length_mix else ''}, {shape} ...", flush=True)
        measured = harness.measure_trainer_step(__file__, dict(spec, provider=provider))
        results.append(dict(op="dpo_step", provider=provider, model=args.model,
                            length_mix=args.length_mix, pairs=args.pairs,
                            seq=args.prompt + args.completion, hidden=args.hidden,
                            layers=args.layers, vocab=args.vocab, logits_mb=round(logits_mb, 1),
                            time_ms=round(measured["seconds"] * 1e3, 1),
                            peak_mb=round(measured["peak_bytes"] / 2**20, 1),
                            error=measured["error"][:200], **stamp))
    harness.report_trainer_steps(results, f"fp32 logits of the batch: {logits_mb:.0f} MB",
                                 args.csv)
    return harness.exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
