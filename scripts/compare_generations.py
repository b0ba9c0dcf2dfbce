"""Greedy answers of several models to the held-out arithmetic problems, side by side, with
each model's accuracy (docs/real_model.md).

    python scripts/compare_generations.py smollm2 runs/dpo-arith-0 --show 4

A model is a name ``load_model_and_tokenizer`` takes (``smollm2``, a directory) or a run's
output directory holding a LoRA adapter (loaded onto the base its config names).
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path


def load(name: str):
    from fastalign.trainer import load_model_and_tokenizer

    adapter = Path(name) / "adapter_config.json"
    if not adapter.is_file():
        return load_model_and_tokenizer(name)
    from peft import PeftModel

    from fastalign.trainer.models.lora import quiet_peft

    base = json.loads(adapter.read_text())["base_model_name_or_path"]
    model, tokenizer = load_model_and_tokenizer(base)
    with quiet_peft():
        return PeftModel.from_pretrained(model, name).merge_and_unload(), tokenizer


def main() -> None:
    import torch

    from fastalign.trainer.core.bundled import load_prompts
    from fastalign.trainer.algorithms.rewards import answer_format, correct_answer
    from fastalign.trainer.algorithms.rollout import generate_rollouts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prompts", default="arithmetic")
    parser.add_argument("--count", type=int, default=100, help="held-out problems")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--show", type=int, default=3, help="problems shown side by side")
    args = parser.parse_args()
    rows = load_prompts(args.prompts, split="test")[:args.count]
    answers = {}
    for name in args.models:
        torch.manual_seed(0)
        model, tokenizer = load(name)
        started, texts = time.time(), []
        for start in range(0, len(rows), 32):
            texts += generate_rollouts(model, tokenizer, rows[start:start + 32],
                                       max_new_tokens=args.max_new_tokens, logprobs=False,
                                       greedy=True).completions
        truth = [row["answer"] for row in rows]
        right, formed = correct_answer(None, texts, truth), answer_format(None, texts)
        both = sum(r * f for r, f in zip(right, formed)) / len(rows)
        print(f"{name}: correct {sum(right) / len(rows):.3f}, in the 'Answer: N' form "
              f"{sum(formed) / len(rows):.3f}, both {both:.3f} on {len(rows)} held-out problems "
              f"({time.time() - started:.0f} s)")
        answers[name] = texts
    for index, row in enumerate(rows[:args.show]):
        print(f"\n### {row['prompt'][0]['content']}  (answer {row['answer']})")
        for name in args.models:
            shown = textwrap.shorten(answers[name][index].replace("\n", " / "), 200)
            print(f"- {name}: {shown}")


if __name__ == "__main__":
    main()
