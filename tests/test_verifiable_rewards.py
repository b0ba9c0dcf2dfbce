"""Prompt rows whose fields reach the reward functions (a verifier's ``answer``), the bundled
arithmetic problems, and GRPO's held-out evaluation on greedy completions."""

import json

import pytest
import torch
from helpers import small_policy

from fastalign.trainer.core.bundled import load_prompts
from fastalign.trainer import GRPOConfig, GRPOTrainer, byte_tokenizer
from fastalign.trainer.algorithms.rewards import (answer_format, correct_answer, final_answer,
                                       reward_function, stated_answer)
from fastalign.trainer.algorithms.rollout import RewardFunctionError, prompt_columns, reward_columns


@pytest.mark.parametrize("text,final,stated", [
    ("6 x 9 = 54.\nAnswer: 54", 54, 54),
    ("Answer: 1,200 cards", 1200, 1200),
    ("first Answer: 3, no wait, Answer: **-4**", -4, -4),
    ("so she has 12 + 5 = 17 apples.", None, 17),
    ("Answer: many", None, None),
    ("no numbers at all", None, None),
])
def test_answers_are_read_from_the_completion(text, final, stated):
    assert final_answer(text) == final and stated_answer(text) == stated


def test_row_fields_reach_the_reward_functions_that_ask_for_them():
    rows = [{"prompt": "2+2?", "answer": 4}, {"prompt": "3+4?", "answer": 7, "level": 2}]
    assert prompt_columns(rows) == {"answer": [4, 7], "level": [None, 2]}
    seen = {}

    def everything(prompts, completions, **fields):
        seen.update(prompts=prompts, **fields)
        return [0.0] * len(completions)

    columns = reward_columns([correct_answer, answer_format, everything], rows,
                             ["Answer: 4", "it is 8"])
    assert columns.tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    assert seen == {"prompts": ["2+2?", "3+4?"], "answer": [4, 7], "level": [None, 2]}
    assert reward_function("correct_answer") is correct_answer
    with pytest.raises(RewardFunctionError, match="correct_answer needs an .answer. field"):
        reward_columns([correct_answer], ["2+2?"], ["4"])


def test_the_bundled_arithmetic_splits():
    train, test = load_prompts("arithmetic"), load_prompts("arithmetic", split="test")
    assert len(train) == 400 and len(test) == 100
    assert all(set(row) == {"prompt", "answer", "solution"} for row in train + test)
    texts = {row["prompt"][0]["content"] for row in train}
    assert not texts & {row["prompt"][0]["content"] for row in test}  # no problem in both
    for row in train[:50]:  # each worked solution states its own answer in the asked-for form
        assert correct_answer([row["prompt"]], [row["solution"]], [row["answer"]]) == [1.0]
    assert load_prompts("demo", split="test") == []


def test_prompt_files_keep_fields_and_honour_splits(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "a", "answer": 1, "split": "train"}, {"prompt": "b", "answer": 2, "split": "test"},
        {"prompt": "c"}]))
    assert load_prompts(str(path)) == [{"prompt": "a", "answer": 1}, "c"]
    assert load_prompts(str(path), split="test") == [{"prompt": "b", "answer": 2}]
    assert len(load_prompts(str(path), split=None)) == 3


def test_grpo_evaluates_held_out_prompts_on_greedy_completions(tmp_path):
    """``evaluate`` scores the greedy completion of each held-out row with its own fields; two
    calls agree (greedy), and the eval metrics are logged every eval_steps and at the end."""
    eval_rows = [{"prompt": f"Say {n}.", "answer": n} for n in range(5)]

    def says_its_answer(prompts, completions, answer):
        return [float(str(a) in c) for c, a in zip(completions, answer)]

    def length(prompts, completions):
        return [len(c) / 10 for c in completions]

    config = GRPOConfig(output_dir=str(tmp_path), batch_size=2, num_generations=2,
                        max_new_tokens=4, max_steps=2, eval_steps=1, eval_batch_size=2,
                        progress=False, learning_rate=1e-3)
    train_rows = [{"prompt": "Hi", "answer": 1}, {"prompt": "Yo", "answer": 2}]
    trainer = GRPOTrainer(small_policy(), byte_tokenizer(), config, train_rows,
                          [says_its_answer, length], reward_weights=[1.0, 2.0],
                          eval_prompts=eval_rows)
    first = trainer.evaluate()
    assert set(first) == {"eval_reward", "eval_rewards/says_its_answer", "eval_rewards/length"}
    assert first == trainer.evaluate()
    assert first["eval_rewards/length"] > 0
    expected = first["eval_rewards/says_its_answer"] + 2 * first["eval_rewards/length"]
    assert first["eval_reward"] == pytest.approx(expected)
    torch.manual_seed(0)
    trainer.train()
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [("eval_reward" in row) for row in logged] == [True, True]
