"""Writes fastalign/data/arithmetic_preferences.jsonl: preference pairs on which SmolLM2 starts
poorly, the DPO task of the real-model runs (docs/real_model.md).

    make real && .venv/bin/python scripts/make_arithmetic_preferences.py   # ~4 min on 2 cores

For bundled arithmetic problems (``arithmetic.jsonl``) the model answers greedily; where its
answer is wrong or not in the asked-for form, the pair is ``chosen`` = the worked answer in
that form ("6 x 9 = 54.\nAnswer: 54") and ``rejected`` = the model's own answer. Its own greedy text is what the
model finds most likely, so before training it prefers the rejected side on nearly every pair
(held-out preference accuracy near 0); DPO has to move it to the correct, well-formed answer.
The splits follow the problems' (no held-out problem is trained on).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = Path(__file__).parent.parent / "fastalign" / "data"


def main() -> None:
    import torch

    from fastalign.trainer import load_model_and_tokenizer
    from fastalign.trainer.algorithms.rewards import final_answer, stated_answer
    from fastalign.trainer.algorithms.rollout import generate_rollouts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--train", type=int, default=160, help="train problems to answer")
    parser.add_argument("--test", type=int, default=40, help="test problems to answer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--output", default=str(DATA / "arithmetic_preferences.jsonl"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    problems = [json.loads(line) for line in open(DATA / "arithmetic.jsonl", encoding="utf-8")]
    picked = ([p for p in problems if p["split"] == "train"][:args.train]
              + [p for p in problems if p["split"] == "test"][:args.test])
    started, answers = time.time(), []
    for start in range(0, len(picked), 32):
        chunk = picked[start:start + 32]
        answers += generate_rollouts(model, tokenizer, [p["prompt"] for p in chunk],
                                     max_new_tokens=args.max_new_tokens, logprobs=False,
                                     greedy=True).completions
        print(f"answered {len(answers)}/{len(picked)} ({time.time() - started:.0f} s)")
    pairs = [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["solution"]}],
              "rejected": [{"role": "assistant", "content": answer.strip()}],
              "split": p["split"]}
             for p, answer in zip(picked, answers)
             if stated_answer(answer) != p["answer"] or final_answer(answer) is None]
    with open(args.output, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(pair) + "\n" for pair in pairs)
    right = sum(stated_answer(a) == p["answer"] for p, a in zip(picked, answers))
    print(f"{args.model} answered {right}/{len(picked)} right (greedy), "
          f"{len(picked) - len(pairs)} right and in the asked-for form; wrote "
          f"{len(pairs)} pairs ({sum(p['split'] == 'train' for p in pairs)} train) to "
          f"{args.output}")


if __name__ == "__main__":
    main()
