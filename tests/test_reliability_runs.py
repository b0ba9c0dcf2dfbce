"""Reliability, round three (docs/reliability.md): what --overwrite may remove, resumes that
must not change the model or mix runs, checkpoints edited or cut short by a full disk, data that
mixes kinds, a stalled rank. Each test fails on the code before its fix."""

import json

import pytest
import torch
from helpers import dpo_trainer as dpo
from helpers import preference_rows, small_llama

from fastalign.cli import _config, _parser
from fastalign.trainer.registry import TRAINERS
from fastalign.cli import main as cli_main
from fastalign.trainer import CheckpointError, DataError, DPOConfig, load_preferences
from fastalign.trainer.core.checkpoint import MANIFEST_FILE, STATE_FILE, file_sha256
from fastalign.trainer.core.config import ConfigError
from fastalign.trainer.core.run_dir import OutputDirInUse


def test_overwrite_removes_nothing_outside_the_output_directory(tmp_path):
    """The run marker lists the final model's files; an edited marker naming an absolute path,
    a ``..`` path or a link out of the directory must not make --overwrite delete them."""
    out, outside = tmp_path / "run", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    for name in ("victim_abs", "victim_up", "linked_dir"):
        (outside / name).mkdir()
        (outside / name / "keep.txt").write_text("not fastalign's")
    (out / "checkpoint-7").symlink_to(outside / "linked_dir")   # a link in the checkpoints' name
    (out / "model_link").symlink_to(outside / "linked_dir")
    (out / "fastalign_run.json").write_text(json.dumps({"final_files": [
        str(outside / "victim_abs"), "../outside/victim_up", "model_link", "/", "", 3]}))
    with pytest.raises(OutputDirInUse) as refused:
        dpo(out, max_steps=1).train()
    assert "fastalign_run.json" in str(refused.value)
    for name in ("victim", "outside", "model_link", "checkpoint-7"):
        assert name not in str(refused.value)  # not listed as the run's
    dpo(out, max_steps=1, overwrite=True).train()
    for name in ("victim_abs", "victim_up", "linked_dir"):
        assert (outside / name / "keep.txt").read_text() == "not fastalign's"
    assert (out / "model_link").is_symlink() and (out / "checkpoint-7").is_symlink()
    assert (out / "model.safetensors").is_file()  # the new run's final model


def test_resume_refuses_another_model_of_the_same_shapes(tmp_path):
    """The DPO reference (and a LoRA base) is rebuilt from the model given on resume: one with
    the same shapes but other weights would continue the run silently against another
    reference (step-3 loss 0.68470 instead of 0.69215 at 4dac746)."""
    dpo(tmp_path, max_steps=2, save_steps=1).train()
    other = small_llama(seed=5)  # same shapes, other weights
    with pytest.raises(CheckpointError, match=r"continues a run of another model: it started "
                                              r"from 'LlamaForCausalLM' \(weights [0-9a-f]{16}\)"
                                              r".*resume with the --model the run started from"):
        dpo(tmp_path, model=other, max_steps=3).train(resume_from="latest")
    dpo(tmp_path, max_steps=3).train(resume_from="latest")  # the same model resumes


def test_the_fingerprint_reads_parameters_past_float32s_exact_integers():
    """A real model's embedding has more than 2^24 elements (SmolLM2's 49152 x 576): sampled
    positions in float32 rounded past its end (IndexError on every trainer of such a model,
    at 83c13f3). Two such models that differ only at their last element differ."""
    from fastalign.trainer.core.checkpoint import model_fingerprint

    big = torch.nn.Linear(1, 2**24 + 4, bias=False)  # last position 2^24 + 3: not a float32
    torch.nn.init.zeros_(big.weight)
    before = model_fingerprint(big)
    with torch.no_grad():
        big.weight[-1] = 1.0
    assert model_fingerprint(big) != before
    small = small_llama(seed=0)  # fingerprints of small tensors are those recorded before
    assert model_fingerprint(small) == model_fingerprint(small_llama(seed=0))


def test_checkpoints_from_before_the_base_model_was_recorded_still_resume(tmp_path):
    dpo(tmp_path, max_steps=1, save_steps=1).train()
    manifest_path = tmp_path / "checkpoint-1" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    for key in ("base_model", "base_model_name"):
        del manifest["setup"][key]
    manifest_path.write_text(json.dumps(manifest))
    trainer = dpo(tmp_path, max_steps=2)
    trainer.train(resume_from="latest")
    assert trainer.step == 2


def test_resuming_an_earlier_checkpoint_sets_the_abandoned_branch_aside(tmp_path, capsys):
    """Run A saves checkpoints 1-3; run B resumes checkpoint-1 with another learning rate. At
    4dac746 A's checkpoint-3 stayed, so a later resume="latest" continued A, at A's learning
    rate, over B's final model, and metrics.jsonl read steps 1, 2, 4."""
    dpo(tmp_path, max_steps=3, save_steps=1).train()
    branch = dpo(tmp_path, max_steps=2, save_steps=1, learning_rate=1e-3)
    branch.train(resume_from=tmp_path / "checkpoint-1")
    err = capsys.readouterr().err
    assert "resuming from step 1 starts a new branch of the run: its later checkpoints " \
           "(checkpoint-2, checkpoint-3) were moved to" in err
    (aside,) = tmp_path.glob("abandoned-*-after-step-1")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    later = dpo(tmp_path, max_steps=4, save_steps=1, learning_rate=1e-3)
    later.train(resume_from="latest")  # B's checkpoint-2, at B's learning rate
    assert later.resumed_changes == {"max_steps": (2, 4)}
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    # --overwrite cleans the set-aside branch too: it is fastalign's.
    dpo(tmp_path, max_steps=1, overwrite=True).train()
    assert not list(tmp_path.glob("abandoned-*"))


@pytest.mark.parametrize("text_first", [True, False])
def test_preference_rows_mixing_text_and_messages_are_refused(tmp_path, text_first):
    """At 4dac746 one order raised an AttributeError traceback and the other was accepted."""
    text = {"prompt": "Hi", "chosen": "Hello there.", "rejected": "No."}
    chat = {"prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello there."}],
            "rejected": [{"role": "assistant", "content": "No."}]}
    rows = [text, chat] if text_first else [chat, text]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    text_line, chat_line = (1, 2) if text_first else (2, 1)
    with pytest.raises(DataError, match=f"mixes plain-text rows \\({path} line {text_line} is "
                                        f"one\\) and chat-message rows \\({path} line "
                                        f"{chat_line} is one\\)"):
        load_preferences(str(path))


def test_pairs_that_teach_nothing_and_repeated_rows_are_counted(tmp_path):
    rows = [{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
            {"prompt": "Yo", "chosen": "Hello.", "rejected": "No."},
            {"prompt": "Yo", "chosen": "Hello.", "rejected": "No."}]
    with pytest.warns(RuntimeWarning) as caught:
        load_preferences(rows)
    messages = sorted(str(w.message) for w in caught)
    assert messages == ["1 preference pair(s) have chosen == rejected (the first: row 1); they "
                        "teach nothing",
                        "1 preference row(s) repeat an earlier row exactly; each copy counts "
                        "again in training"]


def test_a_stalled_rank_fails_the_run_after_dist_timeout(monkeypatch):
    """torch's default would hold the other ranks for 30 minutes; the trainers pass
    ``dist_timeout`` (10 minutes by default, --dist-timeout) to init_process_group."""
    import datetime

    import torch.distributed as dist

    from fastalign.trainer.core.distributed import Processes

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    Processes.setup("ddp", torch.device("cpu"), DPOConfig(dist_timeout=42.5).dist_timeout)
    assert seen == {"timeout": datetime.timedelta(seconds=42.5)}
    assert DPOConfig().dist_timeout == 600
    with pytest.raises(ConfigError, match="dist_timeout must be > 0"):
        DPOConfig(dist_timeout=0)
    options = _config(_parser().parse_args(["train", "dpo", "--dist-timeout", "90"]), TRAINERS["dpo"])
    assert options.dist_timeout == 90


def test_a_full_disk_during_a_checkpoint_is_named_and_the_earlier_one_resumes(tmp_path,
                                                                               monkeypatch):
    from collections import namedtuple

    from fastalign.trainer.core import checkpoint

    trainer = dpo(tmp_path, max_steps=2, save_steps=1)

    def full(*args, **kwargs):
        if trainer.step == 2:  # checkpoint-1 is written whole, then the disk fills up
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        return real_save(*args, **kwargs)

    real_save = torch.save
    monkeypatch.setattr(checkpoint.torch, "save", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(OSError, match=f"the disk of {tmp_path} is full: writing checkpoint-2 "
                                      "\\(trainer_state.pt\\) failed; the earlier checkpoints "
                                      "are whole"):
        trainer.train()
    monkeypatch.undo()
    assert not list(tmp_path.glob(".checkpoint-*"))  # the partial one is gone
    resumed = dpo(tmp_path, max_steps=2, save_steps=1)
    resumed.train(resume_from="latest")
    assert resumed.step == 2


@pytest.mark.parametrize("tamper, message", [
    (lambda m: m.update(step=7), "records step 7 for checkpoint-1: the manifest was edited"),
    (lambda m: m["sha256"].pop(STATE_FILE), f"records no checksum of {STATE_FILE}"),
    (lambda m: m["sha256"].pop("model.safetensors"), "records no checksum of model.safetensors"),
])
def test_an_edited_checkpoint_manifest_is_refused(tmp_path, tamper, message):
    dpo(tmp_path, max_steps=1, save_steps=1).train()
    path = tmp_path / "checkpoint-1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    tamper(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        dpo(tmp_path, max_steps=2).train(resume_from="latest")


def test_a_trainer_state_without_rng_states_is_refused(tmp_path):
    dpo(tmp_path, max_steps=1, save_steps=1).train()
    checkpoint = tmp_path / "checkpoint-1"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    del state["rng"]
    torch.save(state, checkpoint / STATE_FILE)
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    manifest["sha256"][STATE_FILE] = file_sha256(checkpoint / STATE_FILE)
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="holds no RNG states"):
        dpo(tmp_path, max_steps=2).train(resume_from="latest")


def test_a_too_long_prompt_is_named_by_its_file_line(tmp_path, capsys):
    rows = preference_rows(2) + [{"prompt": "x" * 300, "chosen": "a", "rejected": "b"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit, match=f"fastalign: error: {data} line 3: the prompt is 300 "
                                         "tokens, max_length is 64"):
        cli_main(["train", "dpo", "--data", str(data), "--max-length", "64",
                  "--output", str(tmp_path / "run")])
