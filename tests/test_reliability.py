"""The trainer layer against a hostile or careless user (docs/reliability.md): checkpoints and
caches that run no code and name a damaged file, one run per output directory, resumes that
say what changed, no NaN training and no non-finite model saved, options and data checked
where they are read, reward functions and final saves that fail cleanly."""

import json
import math
import os
import sys

import pytest
import torch
from helpers import dpo_trainer, preference_rows, small_llama

from fastalign.cli import _config, _parser
from fastalign.trainer.registry import TRAINERS
from fastalign.trainer.algorithms.rl_options import PromptOptions
from fastalign.trainer.core.bundled import load_prompts
from fastalign.trainer import (CheckpointError, DataError, DPOConfig, DPOTrainer, RewardConfig,
                               RewardTrainer, byte_tokenizer, load_preferences,
                               load_reward_model, tiny_llama, tiny_reward_model)
from fastalign.trainer.core.loop import NonFiniteError
from fastalign.trainer.core.checkpoint import MANIFEST_FILE, STATE_FILE, file_sha256
from fastalign.trainer.core.config import ConfigError
from fastalign.trainer.algorithms.rollout import RewardFunctionError, reward_columns
from fastalign.trainer.core.run_dir import OutputDirInUse


def dpo(out, *, model=None, **options):
    return dpo_trainer(out, model=model, **options)


class Payload:
    """Pickles to a call of os.system: what a planted trainer_state.pt would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite_with_checksum(checkpoint, name, data: bytes):
    """Replaces ``name`` in ``checkpoint`` and fixes its recorded checksum, as an attacker
    who knows the format would: only the loader itself stands in the way then."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    manifest["sha256"][name] = file_sha256(checkpoint / name)
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))


# -- 1. files read back never execute code ----------------------------------------------------
def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(tmp_path):
    dpo(tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    marker = tmp_path / "payload-ran"
    payload = tmp_path / "payload.pt"
    torch.save({"optimizer": Payload(marker)}, payload)
    rewrite_with_checksum(checkpoint, STATE_FILE, payload.read_bytes())
    with pytest.raises(CheckpointError, match="trainer_state.pt is corrupt or not a fastalign "
                                              "trainer state; it was not loaded"):
        dpo(tmp_path / "run", max_steps=4).train(resume_from="latest")
    assert not marker.exists()


def test_damaged_checkpoint_files_are_named(tmp_path):
    dpo(tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: still a valid file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt: its SHA-256"):
        dpo(tmp_path / "run", max_steps=4).resume(checkpoint)
    (checkpoint / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="fastalign_checkpoint.json is corrupt: not JSON"):
        dpo(tmp_path / "run", max_steps=4).resume(checkpoint)


def test_non_finite_weights_in_a_checkpoint_are_refused(tmp_path):
    dpo(tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    from safetensors.torch import load_file, save_file
    tensors = load_file(checkpoint / "model.safetensors")
    name = next(iter(tensors))
    tensors[name][0] = math.nan
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    rewrite_with_checksum(checkpoint, "model.safetensors",
                          (checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=f"holds non-finite weights \\({name}: nan\\)"):
        dpo(tmp_path / "run", max_steps=4).resume(checkpoint)


def test_a_damaged_reference_cache_is_recomputed(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fastalign.trainer.algorithms.dpo import REFERENCE_CACHE, _table_digest

    first = dpo(tmp_path, reference="precomputed")
    cache = tmp_path / REFERENCE_CACHE
    exact = dict(first.reference_logps)
    with safe_open(str(cache), framework="pt") as opened:
        meta, table = opened.metadata(), opened.get_tensor("logps")
    poisoned = table.clone()
    poisoned[0, 0] = math.nan  # checksum recomputed: only the finiteness check catches it
    save_file({"logps": poisoned}, str(cache), metadata=dict(meta, sha256=_table_digest(poisoned)))
    with pytest.warns(RuntimeWarning, match="reference cache .* is damaged \\(its values are not "
                                            "finite\\); recomputing it"):
        again = dpo(tmp_path, reference="precomputed")
    for key, value in exact.items():
        torch.testing.assert_close(again.reference_logps[key], value)
    cache.write_bytes(cache.read_bytes()[:-7])  # truncated
    with pytest.warns(RuntimeWarning, match="damaged \\(unreadable"):
        dpo(tmp_path, reference="precomputed")


# -- 3. one run per output directory; resumes say what changed ---------------------------------
def test_a_used_output_directory_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    dpo(out, max_steps=4, save_steps=2).train()
    with pytest.raises(OutputDirInUse, match="already holds a run .*checkpoint-2, checkpoint-4.*"
                                             "--resume latest.*--overwrite"):
        dpo(out, max_steps=2).train()
    assert (out / "checkpoint-4").is_dir()  # refused before anything was touched
    dpo(out, max_steps=1, save_steps=1, overwrite=True).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    (out / "notes.txt").write_text("mine")  # not fastalign's: overwrite leaves it
    dpo(out, max_steps=1, overwrite=True).train()
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_applies_and_reports_changed_options(tmp_path, capsys):
    out = tmp_path / "run"
    dpo(out, learning_rate=1e-3, lr_schedule="constant").train()
    resumed = dpo(out, max_steps=4, learning_rate=1e-4, lr_schedule="constant",
                  max_grad_norm=0.5)
    resumed.resume("latest")
    assert resumed.resumed_changes == {"learning_rate": (1e-3, 1e-4), "max_steps": (2, 4),
                                       "max_grad_norm": (1.0, 0.5)}
    assert "learning_rate 0.001 -> 0.0001" in capsys.readouterr().err
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [1e-4]
    resumed.train(resume_from="latest")
    assert [json.loads(line)["learning_rate"] for line in open(out / "metrics.jsonl")] == \
        [1e-3, 1e-3, 1e-4, 1e-4]


def test_the_command_line_resumes_with_the_checkpoints_options(tmp_path):
    out = tmp_path / "run"
    dpo(out, learning_rate=3e-3, beta=0.2).train()

    def options(*flags):
        return _config(_parser().parse_args(["train", "dpo", "--output", str(out), *flags]),
                       TRAINERS["dpo"])
    assert options("--resume", "latest").learning_rate == 3e-3  # not the default 1e-5
    assert options("--resume", "latest").beta == 0.2
    assert options("--resume", "latest", "--learning-rate", "1e-4").learning_rate == 1e-4
    assert options().learning_rate == 1e-3  # a new run: the built-in run's setting


# -- 4, 5. no NaN training, no non-finite model saved ------------------------------------------
def poisoned_model():
    model = small_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan
    return model


def test_a_non_finite_loss_stops_before_the_update_and_nothing_is_saved(tmp_path):
    trainer = dpo(tmp_path, model=poisoned_model(), save_steps=1)
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan .* stopped before the "
                                             "optimizer step.*--on-nonfinite skip"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "model.safetensors").exists()


def test_skipping_non_finite_steps_counts_them(tmp_path):
    trainer = dpo(tmp_path, model=poisoned_model(), on_nonfinite="skip", max_steps=3,
                  save_steps=None)
    norm_before = trainer.model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(NonFiniteError, match="the final model holds non-finite weights "
                                             "\\(model.norm.weight: nan\\)"):
        trainer.train()  # every step skipped, and the poisoned model itself is never written
    assert [json.loads(line)["skipped_steps"] for line in open(tmp_path / "metrics.jsonl")] == \
        [1, 2, 3]
    torch.testing.assert_close(trainer.model.model.layers[0].mlp.up_proj.weight, norm_before)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_rl_trainers_stop_at_a_non_finite_loss_too(tmp_path, kind):
    from fastalign.trainer import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
    from fastalign.trainer.algorithms.rewards import letters

    common = dict(output_dir=str(tmp_path), batch_size=2, max_new_tokens=4, max_steps=2,
                  progress=False)
    if kind == "grpo":
        trainer = GRPOTrainer(poisoned_model(), byte_tokenizer(),
                              GRPOConfig(num_generations=2, **common), ["a", "b"], [letters])
    else:
        trainer = PPOTrainer(poisoned_model(), byte_tokenizer(),
                             PPOConfig(mini_batch_size=2, ppo_epochs=1, **common), ["a", "b"],
                             tiny_reward_model(vocab_size=1000, hidden_size=32, num_layers=1))
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan"):
        trainer.train()
    assert not (tmp_path / "model.safetensors").exists()


def test_weights_that_become_non_finite_are_never_saved(tmp_path):
    trainer = dpo(tmp_path, save_steps=None)
    step = trainer.training_step

    def overflowing_step():  # the last update overflows a weight, its loss was finite
        metrics = step()
        if trainer.step == 2:
            with torch.no_grad():
                trainer.model.lm_head.weight[3, 1] = math.inf
        return metrics
    trainer.training_step = overflowing_step
    with pytest.raises(NonFiniteError, match="the final model holds non-finite weights "
                                             "\\(.*: inf\\) after step 2; it was not saved"):
        trainer.train()
    assert not (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("option,message", [
    (dict(beta=math.inf), "beta must be a finite number, got inf"),
    (dict(beta=math.nan), "beta must be a finite number, got nan"),
    (dict(learning_rate=-1e-3), "learning_rate must be > 0"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be > 0 .* got -1.0"),
    (dict(max_grad_norm=math.nan), "max_grad_norm must be a finite number"),
    (dict(label_smoothing=0.5), "label_smoothing must be in \\[0, 0.5\\)"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(batch_size=True), "batch_size must be an integer, got True"),
    (dict(on_nonfinite="ignore"), "on_nonfinite must be one of stop, skip"),
])
def test_numeric_options_are_checked_for_type_range_and_finiteness(option, message):
    with pytest.raises(ConfigError, match=message):
        DPOConfig(**option)


def test_reward_data_and_weights_must_be_finite(tmp_path):
    data = [dict(row, margin=1.0) for row in preference_rows(3)]
    data[1]["margin"] = math.nan
    with pytest.raises(DataError, match="row 2: margin must be a finite number, got nan"):
        RewardTrainer(tiny_reward_model(vocab_size=1000, hidden_size=32, num_layers=1),
                      byte_tokenizer(), RewardConfig(output_dir=str(tmp_path)), data)
    del data[1]["margin"]
    with pytest.raises(DataError, match="row 2: no margin, but 2 of the 3 rows have one"):
        RewardTrainer(tiny_reward_model(vocab_size=1000, hidden_size=32, num_layers=1),
                      byte_tokenizer(), RewardConfig(output_dir=str(tmp_path)), data)
    for weights in ("nan", "1,inf", "1,x"):
        with pytest.raises(ValueError, match="--reward-weights must be comma-separated finite"):
            PromptOptions().reward_functions("letters,enthusiasm", weights)


def test_bad_options_on_the_command_line_are_one_line_errors(tmp_path, capsys):
    from fastalign.cli import main

    for flags, message in [(["--max-grad-norm", "-1"], "max_grad_norm must be > 0"),
                           (["--beta", "inf"], "beta must be a finite number, got inf"),
                           (["--learning-rate", "nan"], "learning_rate must be a finite")]:
        with pytest.raises(SystemExit) as raised:
            main(["train", "dpo", "--output", str(tmp_path), *flags])
        assert str(raised.value).startswith(f"fastalign: error: {message}")
        assert "\n" not in str(raised.value)


def test_a_damaged_metrics_line_is_left_out_on_resume(tmp_path):
    from fastalign.trainer.core.metrics import MetricsLog

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n')
    with pytest.warns(RuntimeWarning, match="metrics.jsonl line 2 is not a metrics row"):
        log = MetricsLog(tmp_path, resume_step=2)
    assert log.rows() == [{"step": 1, "loss": 0.5}]


# -- 6. a reward model must be a trained one-output classifier ---------------------------------
def test_a_causal_lm_is_not_accepted_as_a_reward_model(tmp_path):
    tiny_llama(vocab_size=1000, hidden_size=32, num_layers=1).save_pretrained(tmp_path / "lm")
    byte_tokenizer().save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="is a LlamaForCausalLM, not a trained reward model"):
        load_reward_model(str(tmp_path / "lm"), trained=True)
    load_reward_model(str(tmp_path / "lm"))  # as the base of a reward model to train: fine
    classifier = tiny_reward_model(vocab_size=1000, hidden_size=32, num_layers=1)
    classifier.save_pretrained(tmp_path / "rm")
    byte_tokenizer().save_pretrained(tmp_path / "rm")
    model, _ = load_reward_model(str(tmp_path / "rm"), trained=True)
    torch.testing.assert_close(model.score.weight, classifier.score.weight)


# -- 7. options files: numbers as YAML writes them, one-line errors naming the key -------------
def yaml_config(tmp_path, text, kind="dpo"):
    path = tmp_path / "options.yaml"
    path.write_text(text)
    args = _parser().parse_args(["train", kind, "--config", str(path)])
    return _config(args, TRAINERS[kind])


def test_yaml_options_are_coerced_and_checked_at_load_time(tmp_path):
    assert yaml_config(tmp_path, "learning_rate: 1e-3\nbeta: 5e-2\n").learning_rate == 1e-3
    for text, message in [
        ("batch_size: 2.5\n", "options.yaml: batch_size must be an integer, got 2.5"),
        ("learning_rate: fast\n", "options.yaml: learning_rate must be a number, got 'fast'"),
        ("progress: 3\n", "options.yaml: progress must be true or false"),
        ("batch_size: [1, 2\n", "options.yaml line 2: not a valid options file"),
        ("- 1\n- 2\n", "must hold a mapping of options"),
        ("lerning_rate: 1\n", "options.yaml: unknown DPOConfig option\\(s\\): lerning_rate"),
    ]:
        with pytest.raises(ConfigError, match=message):
            yaml_config(tmp_path, text)


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "tag-ran"
    with pytest.raises(ConfigError, match="not a valid options file"):
        yaml_config(tmp_path, f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    assert not marker.exists()


# -- 10. text files, row numbers, reward functions, the final save ---------------------------
def test_text_files_non_utf8_and_bom(tmp_path):
    good = json.dumps(preference_rows(1)[0]) + "\n"
    path = tmp_path / "data.jsonl"
    path.write_bytes(good.encode() + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="data.jsonl line 2: not UTF-8 text \\(byte 0xe9 at "
                                        "column 16\\)"):
        load_preferences(str(path))
    path.write_bytes(b"\xef\xbb\xbf" + good.encode())  # what Windows editors write
    assert load_preferences(str(path))[0]["prompt"] == preference_rows(1)[0]["prompt"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xef\xbb\xbfName a fruit.\r\nTell me\xff\n")
    with pytest.raises(DataError, match="prompts.txt line 2: not UTF-8 text \\(byte 0xff"):
        load_prompts(str(prompts))
    prompts.write_bytes(b"\xef\xbb\xbfName a fruit.\r\n\nName a tree.\n")
    assert load_prompts(str(prompts)) == ["Name a fruit.", "Name a tree."]


def test_row_numbers_are_the_same_in_every_message(tmp_path):
    data = preference_rows(3)
    data[2]["prompt"] = "x" * 300
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in data) + "\n")
    for source, place in [(data, "row 3"), (str(path), "data.jsonl line 3")]:
        with pytest.raises(DataError, match=f"{place}: the prompt is 300 tokens"):
            DPOTrainer(small_llama(), byte_tokenizer(),
                       DPOConfig(output_dir=str(tmp_path / "out"), max_length=256), source)


def test_a_reward_function_that_raises_is_named_with_its_traceback():
    def picky(prompts, completions):
        return [1.0 / len(c) for c in completions]
    with pytest.raises(RewardFunctionError) as raised:
        reward_columns([picky], ["p", "p"], ["ok", ""])
    message = str(raised.value)
    assert message.startswith("reward function picky raised ZeroDivisionError")
    assert "in picky" in message and "1.0 / len(c)" in message


def test_an_interrupted_final_save_leaves_no_config_without_weights(tmp_path):
    trainer = dpo(tmp_path, save_steps=None)
    save = trainer.model.save_pretrained

    def killed_after_the_config(directory, **options):
        save(directory, **options)
        (directory / "model.safetensors").unlink()  # as if killed while writing the weights
        raise KeyboardInterrupt
    trainer.model.save_pretrained = killed_after_the_config
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "model.safetensors").exists()
    trainer.model.save_pretrained = save
    trainer.config.overwrite = True
    trainer.step = 0
    trainer.train()  # the next save cleans up the leftover and completes
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / ".final-model.partial").exists()


def test_metrics_reach_tensorboard_or_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")  # in the test extra; a GPU image may lack it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dpo(tmp_path / "tb", max_steps=3, save_steps=None, report_to="tensorboard").train()
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in open(tmp_path / "tb" / "metrics.jsonl")]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(
        [row["loss"] for row in logged])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(ValueError, match="report_to='tensorboard' needs the tensorboard "
                                         "package: pip install tensorboard"):
        dpo(tmp_path / "none", report_to="tensorboard").train()
    assert not (tmp_path / "none" / "fastalign_run.json").exists()  # refused before touching it
