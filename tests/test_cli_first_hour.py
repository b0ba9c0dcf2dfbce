"""What a new user of the command meets first: mistyped options, a model path that does not
exist, a used output directory, silent minutes. In process: no model is trained."""

import pytest
from helpers import preference_rows, small_llama, small_policy

from fastalign import cli
from fastalign.trainer.algorithms import rl_options
from fastalign.trainer import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, byte_tokenizer
from fastalign.trainer.models import loading as models


def run(argv, capsys):
    """``fastalign ARGV`` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    out, err = capsys.readouterr()
    code = ended.value.code
    return (code if isinstance(code, int) else 1), out, err + (code if isinstance(code, str) else "")


def test_a_mistyped_option_shows_the_subcommands_usage_and_the_closest_option(capsys):
    code, _, err = run(["train", "dpo", "--lerning-rate", "1e-3"], capsys)
    assert code == 2
    assert err.startswith("usage: fastalign train dpo ")  # not the top-level usage
    assert ("fastalign train dpo: error: unrecognized arguments: --lerning-rate 1e-3 "
            "(--lerning-rate: did you mean --learning-rate?)") in err
    code, _, err = run(["train", "grpo", "--num-generation", "4", "--frobnicate"], capsys)
    assert code == 2 and err.startswith("usage: fastalign train grpo ")
    assert err.rstrip().endswith("unrecognized arguments: --frobnicate")  # nothing close to it
    code, _, err = run(["bon", "--temprature", "0.5"], capsys)
    assert code == 2 and err.startswith("usage: fastalign bon ")
    assert "did you mean --temperature?" in err


@pytest.mark.parametrize("model, expected", [
    ("/nowhere/model-dir", "--model '/nowhere/model-dir': no such file or directory; pass a "
                           "directory saved with save_pretrained"),
    ("runs/dpo/final", "--model 'runs/dpo/final': no such file or directory"),
    ("missing.gguf", "--model 'missing.gguf': no such file or directory"),
    ("someone/some-model", "--model 'someone/some-model': no such file or directory, and no "
                           "model of that name in the local Hugging Face cache"),
])
def test_a_model_that_does_not_exist_is_named_before_anything_loads(model, expected, capsys,
                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(models, "_from_pretrained", pytest.fail)  # never reached
    code, _, err = run(["train", "dpo", "--model", model, "--output", str(tmp_path / "run")],
                       capsys)
    assert code == 1 and f"fastalign: error: {expected}" in err
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        models.load_model_and_tokenizer(model)


def test_a_reward_model_that_does_not_exist_is_named(capsys, tmp_path):
    code, _, err = run(["train", "ppo", "--model", "tiny", "--reward-model", str(tmp_path / "rm"),
                        "--output", str(tmp_path / "run")], capsys)
    assert code == 1 and f"--reward-model '{tmp_path / 'rm'}': no such file or directory" in err


def test_a_used_output_directory_is_refused_before_the_warm_start(capsys, tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # an earlier run's
    monkeypatch.setattr(rl_options.PromptOptions, "policy", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run(["train", "grpo", "--model", "tiny", "--output", str(tmp_path)], capsys)
    assert code == 1
    assert f"output_dir '{tmp_path}' already holds a run (metrics.jsonl)" in err
    # Resuming it, or --overwrite, gets past the check (to the model, stubbed out here).
    monkeypatch.setattr(rl_options.PromptOptions, "policy", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("reached the model")))
    code, _, err = run(["train", "grpo", "--model", "tiny", "--output", str(tmp_path),
                        "--overwrite"], capsys)
    assert "reached the model" in err


def test_the_held_out_evaluation_shows_its_progress(tmp_path, capsys):
    config = GRPOConfig(output_dir=str(tmp_path), batch_size=2, num_generations=2,
                        max_new_tokens=5, eval_batch_size=2, progress=True)
    trainer = GRPOTrainer(small_policy(), byte_tokenizer(), config, ["Hi", "Yo"],
                          [lambda prompts, completions: [1.0] * len(completions)],
                          eval_prompts=[f"Say {n}." for n in range(3)])
    capsys.readouterr()
    trainer.evaluate()
    err = capsys.readouterr().err
    assert "held-out evaluation, 3 prompts" in err
    assert "/10 [" in err  # 2 chunks (of 2 prompts, then 1) x 5 decoding steps
    config.progress = False
    trainer.evaluate()
    assert "held-out evaluation" not in capsys.readouterr().err


def test_the_preference_evaluation_shows_its_progress(tmp_path, capsys):
    rows = preference_rows(6)
    config = DPOConfig(output_dir=str(tmp_path), eval_batch_size=2, progress=True)
    trainer = DPOTrainer(small_llama(), byte_tokenizer(), config, rows[:2], rows[2:])
    capsys.readouterr()
    trainer.evaluate()
    assert "held-out evaluation, 4 rows" in capsys.readouterr().err


def test_errors_are_one_line_and_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(cli, "_train", disk_full)
    code, _, err = run(["train", "dpo"], capsys)
    assert code == 1 and err.strip() == (f"fastalign: error: [Errno 28] No space left on device: "
                                         f"'{tmp_path / 'out'}'")
    with pytest.raises(OSError, match="No space left"):
        cli.main(["train", "dpo", "--debug"])
    monkeypatch.setattr(cli, "_train", lambda args: (_ for _ in ()).throw(
        ImportError("fastalign merge needs the peft package: pip install peft")))
    code, _, err = run(["train", "dpo"], capsys)
    assert err.strip() == "fastalign: error: fastalign merge needs the peft package: pip install peft"


def test_an_rl_step_shows_its_sampling(tmp_path, capsys):
    config = GRPOConfig(output_dir=str(tmp_path), batch_size=2, num_generations=2,
                        max_new_tokens=4, max_steps=1, progress=True)
    trainer = GRPOTrainer(small_policy(), byte_tokenizer(), config, ["Hi", "Yo"],
                          [lambda prompts, completions: [float(len(c)) for c in completions]])
    capsys.readouterr()
    trainer.train()
    assert "sampling 4 completions" in capsys.readouterr().err


@pytest.mark.parametrize("name, unit", [("dpo", "pairs"), ("rm", "pairs"), ("grpo", "prompts"),
                                        ("ppo", "prompts"), ("distill", "rows")])
def test_each_trainers_batch_size_help_names_what_it_counts(name, unit):
    from fastalign.trainer.core.config import option_help
    from fastalign.trainer.registry import TRAINERS
    assert unit in option_help(TRAINERS[name].config, "batch_size")


def test_grpos_options_are_explained_as_grpos():
    """Its loss type and beta are the policy loss's, not DPO's (help once copied from DPO)."""
    from fastalign.trainer.algorithms.grpo import GRPOConfig
    from fastalign.trainer.core.config import option_help
    assert "dapo" in option_help(GRPOConfig, "loss_type")
    assert "DPO" not in option_help(GRPOConfig, "beta") + option_help(GRPOConfig, "loss_type")
