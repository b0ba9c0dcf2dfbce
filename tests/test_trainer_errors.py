"""Bad input to the trainer layer: clear errors that name the row, field or option, and nothing
half-written."""

import json
import os

import pytest
from helpers import preference_rows, small_llama

from fastalign.trainer import (CheckpointError, DataError, DPOConfig, DPOTrainer, byte_tokenizer,
                               load_model_and_tokenizer, load_preferences, tiny_llama)


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


@pytest.mark.parametrize("bad,message", [
    ({"prompt": "p", "chosen": "c"}, r"line 2: missing field\(s\) rejected"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "line 2: chosen is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "line 2: chosen must be text or a list"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": "r"},
     "line 2: prompt, chosen and rejected must be all text or all messages"),
])
def test_bad_rows_are_named(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", [preference_rows(1)[0], bad])
    with pytest.raises(DataError, match=message):
        load_preferences(path)


def test_unreadable_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preferences(str(tmp_path / "missing.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p"\n')
    with pytest.raises(DataError, match="line 1: not valid JSON"):
        load_preferences(str(tmp_path / "broken.jsonl"))
    # Rows of a list are counted from 1, as the lines of a file are: the second row is row 2.
    with pytest.raises(DataError, match="row 2: missing"):
        load_preferences([preference_rows(1)[0], {"prompt": "only"}])


def test_prompt_longer_than_the_limit(tmp_path):
    data = preference_rows(2)
    data[1]["prompt"] = "x" * 300
    with pytest.raises(DataError, match="row 2: the prompt is 300 tokens, max_length is 256"):
        DPOTrainer(small_llama(), byte_tokenizer(),
                   DPOConfig(output_dir=str(tmp_path), max_length=256), data)


def test_tokenizer_without_pad_token_or_chat_template(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        DPOTrainer(small_llama(), tokenizer, DPOConfig(output_dir=str(tmp_path)), preference_rows(2))
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    chat = [{"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}]}]
    with pytest.raises(ValueError, match="no chat_template"):
        DPOTrainer(small_llama(), tokenizer, DPOConfig(output_dir=str(tmp_path)), chat)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(PermissionError, match="output_dir .* is not writable"):
        DPOTrainer(small_llama(), byte_tokenizer(), DPOConfig(output_dir=str(locked / "run")),
                   preference_rows(2))


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="is not writable"):
        DPOTrainer(small_llama(), byte_tokenizer(), DPOConfig(output_dir=str(tmp_path / "file")),
                   preference_rows(2))


@pytest.mark.parametrize("option,message", [
    (dict(loss_type="dpo"), "loss_type must be one of sigmoid"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(max_steps=2.5), "max_steps must be an integer or None, got 2.5"),
    (dict(lr_schedule="step"), "lr_schedule must be one of linear"),
    (dict(reference="none"), "reference must be one of auto, copy"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(lora_r=-1), "lora_r must be an integer >= 0"),
    (dict(lora_alpha=0.0), "lora_alpha must be > 0"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(lora_target_modules=" , "), "lora_target_modules must name modules"),
    (dict(gradient_checkpointing="yes"), "gradient_checkpointing must be true or false"),
])
def test_config_errors(option, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(**option)
    with pytest.raises(ValueError, match="unknown DPOConfig option"):
        DPOConfig.from_dict({"learning_rat": 1e-3})


def test_adapters_reference_needs_peft(tmp_path):
    with pytest.raises(ValueError, match="reference='adapters' needs a PEFT model"):
        DPOTrainer(small_llama(), byte_tokenizer(),
                   DPOConfig(output_dir=str(tmp_path), reference="adapters"), preference_rows(2))


def trained(tmp_path, steps=2, **options):
    trainer = DPOTrainer(small_llama(), byte_tokenizer(),
                         DPOConfig(output_dir=str(tmp_path / "run"), batch_size=2, max_steps=steps,
                                   save_steps=steps, progress=False, **options), preference_rows(4),
                         ref_model=small_llama(1))
    trainer.train()
    return tmp_path / "run" / f"checkpoint-{steps}"


def test_resume_from_a_corrupt_or_missing_checkpoint(tmp_path):
    checkpoint = trained(tmp_path)
    fresh = DPOTrainer(small_llama(), byte_tokenizer(),
                       DPOConfig(output_dir=str(tmp_path / "run"), batch_size=2, max_steps=4,
                                 progress=False), preference_rows(4), ref_model=small_llama(1))
    (checkpoint / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="trainer_state.pt is corrupt"):
        fresh.resume(checkpoint)
    (checkpoint / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint: trainer_state.pt"):
        fresh.resume(checkpoint)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fresh.resume(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        fresh.resume("latest")  # the only one left is incomplete


def test_resume_from_a_mismatched_checkpoint(tmp_path):
    checkpoint = trained(tmp_path)
    other = DPOTrainer(small_llama(), byte_tokenizer(),
                       DPOConfig(output_dir=str(tmp_path / "other"), batch_size=3, max_steps=4,
                                 progress=False), preference_rows(4), ref_model=small_llama(1))
    with pytest.raises(CheckpointError, match="global batch of 2 rows per micro-batch and this "
                                              "run's is 3 .*pass --batch-size so that "
                                              "batch_size x processes = 2"):
        other.resume(checkpoint)
    wider = DPOTrainer(tiny_llama(vocab_size=1000, hidden_size=64, num_layers=1), byte_tokenizer(),
                       DPOConfig(output_dir=str(tmp_path / "wide"), batch_size=2, progress=False),
                       preference_rows(4), ref_model=small_llama(1))
    with pytest.raises(CheckpointError, match="model is"):
        wider.resume(checkpoint)


def test_model_not_available_offline(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model': no such file or directory; "
                                                "pass a directory saved with save_pretrained"):
        load_model_and_tokenizer(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no model of that name in the local Hugging "
                                                "Face cache .* or 'tiny' \\(the built-in model\\)"):
        load_model_and_tokenizer("someone/not-in-the-cache")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty-dir' is a directory without a model in "
                                                "it \\(no config.json or adapter_config.json\\)"):
        load_model_and_tokenizer(str(tmp_path / "empty-dir"))
    (tmp_path / "empty-dir" / "config.json").write_text("{}")  # a config, but no model: its reason
    with pytest.raises(FileNotFoundError, match="cannot load model .* offline"):
        load_model_and_tokenizer(str(tmp_path / "empty-dir"))
