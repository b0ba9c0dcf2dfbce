"""Writes fastalign/data/arithmetic.jsonl: one-step arithmetic word problems with a known
answer, the verifiable-reward task of the real-model runs (docs/real_model.md).

    python scripts/make_arithmetic.py     # the bundled file (seed 0: 400 train, 100 test)

Each row is ``{"prompt": [chat messages], "answer": int, "solution": str, "split": "train" |
"test"}``: the user message states the problem and asks for the final answer as "Answer:
<number>", which is what the ``correct_answer`` and ``answer_format`` rewards read; ``solution``
is a worked answer in that form (the chosen side of ``make_arithmetic_preferences.py``).
Problems are drawn from eight phrasings of addition, subtraction and multiplication with small
numbers; no problem text is in both splits.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Tom", "Ana", "Sam", "Lea", "Ben", "Mia", "Omar", "Yuki", "Ivan", "Zoe"]
THINGS = ["apples", "books", "coins", "stickers", "pencils", "marbles", "cards", "shells"]
INSTRUCTION = "Give the final answer as 'Answer: <number>'."


def problem(rng: random.Random) -> tuple[str, int, str]:
    """One word problem, its answer and the expression that gives it."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    kind = rng.randrange(8)
    if kind < 3:
        text = [f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have "
                "now?",
                f"There are {a} {thing} in a box and {b} {thing} on the table. How many {thing} "
                "are there in all?",
                f"{name} collected {a} {thing} on Monday and {b} on Tuesday. How many {thing} "
                f"did {name} collect?"][kind]
        return text, a + b, f"{a} + {b}"
    big, small = max(a, b) + rng.randint(1, 9), min(a, b)
    if kind < 5:
        text = [f"{name} has {big} {thing} and gives away {small}. How many {thing} are left?",
                f"A shelf holds {big} {thing}. {name} takes {small} of them. How many {thing} "
                "stay on the shelf?"][kind - 3]
        return text, big - small, f"{big} - {small}"
    count, each = rng.randint(2, 9), rng.randint(2, 12)
    text = [f"{name} buys {count} bags with {each} {thing} in each bag. How many {thing} does "
            f"{name} buy?",
            f"Each of {count} friends has {each} {thing}. How many {thing} do they have "
            "together?",
            f"{name} puts {each} {thing} in each of {count} rows. How many {thing} are "
            "there?"][kind - 5]
    return text, count * each, f"{count} x {each}"


def rows(seed: int, train: int, test: int) -> list[dict]:
    rng = random.Random(seed)
    seen, made = set(), []
    while len(made) < train + test:
        text, answer, expression = problem(rng)
        if text in seen:
            continue
        seen.add(text)
        split = "train" if len(made) < train else "test"
        made.append({"prompt": [{"role": "user", "content": f"{text} {INSTRUCTION}"}],
                     "answer": answer, "solution": f"{expression} = {answer}.\nAnswer: {answer}",
                     "split": split})
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--output", default=str(Path(__file__).parent.parent / "fastalign"
                                                / "data" / "arithmetic.jsonl"))
    args = parser.parse_args()
    made = rows(args.seed, args.train, args.test)
    with open(args.output, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row) + "\n" for row in made)
    print(f"wrote {len(made)} problems ({args.train} train, {args.test} test) to {args.output}")


if __name__ == "__main__":
    main()
