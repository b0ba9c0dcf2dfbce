"""``fastalign train grpo|ppo`` and ``fastalign bon`` end to end in subprocesses (tiny settings),
the built-in reward functions, and the commands' one-line errors."""

import json

import pytest
import torch
from helpers import run_cli

from fastalign.cli import main

from fastalign.trainer import byte_tokenizer, tiny_reward_model
from fastalign.trainer.algorithms.rewards import applause, enthusiasm, letters, reward_function

QUICK = ["--warm-start-steps", "2", "--max-steps", "2", "--batch-size", "2",
         "--max-new-tokens", "4", "--no-progress", "--device", "cpu"]


def test_built_in_rewards():
    completions = ["Gladly! Owls hunt at night!!", "", "!!!!", "ok."]
    assert enthusiasm(None, completions) == [1.0, 0.0, 1.0, 0.0]
    assert applause(None, completions) == [0.75, 0.0, 1.0, 0.0]
    assert letters(None, completions) == pytest.approx([25 / 28, 0.0, 0.0, 2 / 3])
    assert reward_function("letters") is letters
    assert reward_function("fastalign.trainer.algorithms.rewards:applause") is applause
    with pytest.raises(ValueError, match="unknown reward function 'claps': use one of"):
        reward_function("claps")
    with pytest.raises(ValueError, match="cannot be imported"):
        reward_function("fastalign.trainer.algorithms.rewards:missing")


@pytest.mark.slow
def test_train_grpo_logs_each_reward_and_the_kl(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about owls.\nName a fruit.\n")
    done = run_cli("train", "grpo", "--model", "tiny", "--prompts", str(prompts),
                     "--num-generations", "2", "--output", str(tmp_path / "run"),
                     "--gradient-accumulation-steps", "2", *QUICK)
    assert done.returncode == 0, done.stderr
    assert "--model tiny: the built-in run's settings" in done.stdout
    assert "done: 2 steps; mean reward over the first 1 logged steps" in done.stdout
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row["step"] for row in logged] == [1, 2]
    # 2 prompts, 2 per micro-batch, 2 micro-batches per step: each step is two epochs
    assert [row["epoch"] for row in logged] == [2.0, 4.0]
    assert {"rewards/enthusiasm", "rewards/letters", "kl", "reward"} <= set(logged[-1])
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_train_ppo_with_a_saved_reward_model_then_best_of_n(tmp_path):
    reward_dir = tmp_path / "rm"
    model = tiny_reward_model(hidden_size=32, num_layers=1)
    model.config.pad_token_id = byte_tokenizer().pad_token_id
    model.save_pretrained(reward_dir)
    byte_tokenizer().save_pretrained(reward_dir)
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"prompt": "Say 3.", "answer": 3}\n{"prompt": "Say 4.", "answer": 4}\n')
    done = run_cli("train", "ppo", "--model", "tiny", "--reward-model", str(reward_dir),
                     "--mini-batch-size", "1", "--ppo-epochs", "1", "--eval-prompts",
                     str(held_out), "--eval-rewards", "correct_answer,answer_format",
                     "--output", str(tmp_path / "run"), *QUICK)
    assert done.returncode == 0, done.stderr
    assert "done: 2 steps; mean score over the first 1 logged steps" in done.stdout
    for when in ("before", "after"):
        line = next(line for line in done.stdout.splitlines() if f"greedy) {when}" in line)
        assert line.startswith("held-out (2 prompts, greedy)")
        assert "score " in line and "rewards/correct_answer 0.000" in line, line
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert {"score", "kl", "value_loss", "explained_variance", "entropy"} <= set(logged[-1])
    assert (tmp_path / "run" / "value_head.safetensors").is_file()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about owls.\nName a fruit.\n")
    done = run_cli("bon", "--model", "tiny", "--warm-start-steps", "1", "--n", "3",
                     "--max-new-tokens", "4", "--reward-model", str(reward_dir), "--show", "1",
                     "--prompts", str(prompts), "--device", "cpu", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "Best-of-3 over 2 prompts (reward model" in done.stdout
    gain = float(done.stdout.split("(gain ")[1].split(")")[0])
    assert gain >= 0


@pytest.mark.parametrize("args,message", [
    (["train", "grpo", "--rewards", "claps"], "unknown reward function 'claps'"),
    (["train", "grpo", "--reward-weights", "1,2,3"], "--reward-weights has 3 weights for 2"),
    (["train", "grpo", "--prompts", "missing.txt"], "--prompts 'missing.txt' does not exist"),
    (["train", "grpo", "--device", "cuda:7"], "this machine has no CUDA GPU"),
    (["train", "ppo", "--reward-model", "missing-dir"],
     "--reward-model 'missing-dir': no such file or directory"),
    (["train", "ppo", "--reward-model", "runs/rm", "--eval-rewards", "correct_answer"],
     "--eval-rewards scores held-out prompts and there are none"),
    (["train", "ppo", "--reward-model", "runs/rm", "--eval-rewards", "claps"],
     "unknown reward function 'claps'"),
    (["bon", "--rewards", "letters", "--reward-model", "runs/rm"],
     "pass --rewards or --reward-model, not both"),
])
def test_errors_are_one_line_messages(args, message, tmp_path, monkeypatch):
    """In process: main() exits with the one line the shell shows. ``runs/rm`` stands for a
    reward model that exists (the error is elsewhere): a directory in the test's folder."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "rm").mkdir(parents=True)
    (tmp_path / "runs" / "rm" / "config.json").write_text("{}")
    output = ["--output", str(tmp_path / "run")] if args[0] == "train" else []
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--warm-start-steps", "0", *output])
    text = str(exit_info.value)
    assert text.startswith("fastalign: error:") and message in text and "\n" not in text


def test_ppo_needs_a_reward_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "ppo"])
    assert exit_info.value.code == 2 and "--reward-model" in capsys.readouterr().err


def test_prompt_files(tmp_path):
    from fastalign.trainer.core.bundled import load_prompts

    assert len(load_prompts("demo")) == 240
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Hi"}\n\n{"prompt": [{"role": "user", "content": "Yo"}]}\n')
    assert load_prompts(str(good)) == ["Hi", [{"role": "user", "content": "Yo"}]]
    text = tmp_path / "prompts.txt"
    text.write_text("one\n\ntwo\n")
    assert load_prompts(str(text)) == ["one", "two"]
    for content, message in [('{"prompt": "Hi"}\n{oops\n', "bad.jsonl line 2: not JSON"),
                             ('{"text": "Hi"}\n', "bad.jsonl line 1: a row needs a non-empty"),
                             ("\n", "holds no prompt")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            load_prompts(str(bad))
