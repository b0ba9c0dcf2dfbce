"""`fastalign merge` writes a model only from an adapter that fits its base: every tensor of the
adapter file loaded into the model and every adapter weight of the model from the file, all
finite; what it refuses (a pickle, an unreadable file, --output a file, a base it cannot load)
is one line naming the argument or file. A GGUF-based adapter records the GGUF file as its
base, so it merges after the cache is cleared."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastalign.cli import main as cli
from fastalign.trainer import (DPOConfig, byte_tokenizer, load_model_and_tokenizer,
                               load_reward_model, tiny_llama)
from fastalign.trainer.models.lora import prepare_model, quiet_peft
from fastalign.trainer.models.merge import merge_adapter

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"


def _small_base(path, reward=False):
    """A 1-layer Llama over 300 tokens (a 1-output reward model with ``reward``) saved with
    the byte tokenizer: a base `fastalign merge` loads by its directory."""
    if reward:
        from fastalign.trainer import tiny_reward_model
        model = tiny_reward_model(vocab_size=300, hidden_size=32, num_layers=1)
    else:
        model = tiny_llama(vocab_size=300, hidden_size=32, num_layers=1)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _adapter(base, path, *, trained=True, task_type="CAUSAL_LM"):
    """A LoRA adapter of ``base`` saved in ``path`` as fastalign saves one; ``trained``: its
    lora_B drawn at random (as after training), else zero (as initialised)."""
    load = load_model_and_tokenizer if task_type == "CAUSAL_LM" else load_reward_model
    model, _ = load(str(base))
    torch.manual_seed(1)
    with quiet_peft():
        wrapped = peft.get_peft_model(model, peft.LoraConfig(
            r=2, target_modules=["q_proj", "v_proj"], task_type=task_type))
    if trained:
        with torch.no_grad():
            for name, parameter in wrapped.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.5)
    wrapped.peft_config["default"].base_model_name_or_path = str(base)
    wrapped.save_pretrained(path, save_embedding_layers=False)
    return wrapped.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base directory, adapter directory, the adapter model) of a trained-looking adapter."""
    root = tmp_path_factory.mktemp("merge")
    base = _small_base(root / "base")
    return base, root / "adapter", _adapter(base, root / "adapter")


def _variant(trained, tmp_path, weights=None, raw=None):
    """A copy of the trained adapter with its weights file replaced."""
    _, adapter, _ = trained
    copy = tmp_path / "variant"
    shutil.copytree(adapter, copy)
    if raw is not None:
        (copy / WEIGHTS).write_bytes(raw)
    else:
        save_file(weights, copy / WEIGHTS)
    return copy


def test_a_fitting_adapter_merges_into_the_model_it_makes(trained, tmp_path):
    base, adapter, adapted = trained
    merge_adapter(adapter, tmp_path / "merged")
    merged, _ = load_model_and_tokenizer(str(tmp_path / "merged"))
    ids = torch.tensor([[1, 5, 9, 77, 200]])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, adapted(ids).logits,
                                   rtol=1e-5, atol=1e-5)
        plain, _ = load_model_and_tokenizer(str(base))
        assert not torch.allclose(merged(ids).logits, plain(ids).logits)


@pytest.mark.parametrize("change, message", [
    ("renamed", r"4 of its 4 tensors match no adapter weight of the model \(first: "
                r"base_model\.model\.model\.layer\.0\..*and 4 adapter weights of the model are "
                r"not in it \(first: base_model\.model\.model\.layers\.0\.self_attn\.q_proj"
                r"\.lora_A\.weight\)"),
    ("reprefixed", r"4 of its 4 tensors match no adapter weight of the model \(first: "
                   r"model\.layers\.0\."),
    ("partial", r"2 adapter weights of the model are not in it \(first: .*v_proj\.lora_A"),
    ("extra", r"1 of its 5 tensors matches no adapter weight of the model \(first: "
              r".*up_proj\.lora_A\.weight\)"),
    ("empty", r"holds no tensors"),
    ("nan", r"NaN or infinite values in 1 of its 4 tensors \(first: .*q_proj\.lora_B\.weight\)"),
    ("shape", r"does not fit the base .*size mismatch for .*q_proj\.lora_A"),
])
def test_an_adapter_that_does_not_fit_its_base_writes_nothing(trained, tmp_path, change,
                                                              message):
    """Before: PEFT loaded what matched and warned (or not, for NaN); the merge wrote the base
    unchanged (or NaN weights) and exited 0."""
    weights = load_file(trained[1] / WEIGHTS)
    first = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    weights = {
        "renamed": lambda: {k.replace("layers.0", "layer.0"): v for k, v in weights.items()},
        "reprefixed": lambda: {k.removeprefix("base_model.model."): v for k, v in weights.items()},
        "partial": lambda: {k: v for k, v in weights.items() if "v_proj" not in k},
        "extra": lambda: {**weights, first: torch.zeros(2, 32)},
        "empty": lambda: {},
        "nan": lambda: {k: v * float("nan") if "q_proj.lora_B" in k else v
                        for k, v in weights.items()},
        "shape": lambda: {k: torch.zeros(3, 32) if "q_proj.lora_A" in k else v
                          for k, v in weights.items()},
    }[change]()
    variant = _variant(trained, tmp_path, weights)
    with pytest.raises(SystemExit, match=message) as raised:
        cli(["merge", str(variant), "--output", str(tmp_path / "merged")])
    assert "\n" not in str(raised.value) and str(variant / WEIGHTS) in str(raised.value)
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["variant"]  # no partial output left


def test_non_finite_merged_weights_are_refused(trained, tmp_path, monkeypatch):
    """Finite adapter weights can still overflow (or meet a damaged base): nothing written."""
    base, adapter, _ = trained
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    weights = load_file(broken / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name][0, 0] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"gives NaN or infinite values in .*q_proj\.weight"):
        merge_adapter(adapter, tmp_path / "merged", base=str(broken))
    assert not (tmp_path / "merged").exists()


def test_an_untrained_adapter_merges_into_its_base_with_a_warning(trained, tmp_path):
    base = trained[0]
    _adapter(base, tmp_path / "fresh", trained=False)
    with pytest.warns(UserWarning, match="every lora_B weight is zero"):
        merge_adapter(tmp_path / "fresh", tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    plain = load_file(base / "model.safetensors")
    for name, tensor in plain.items():
        assert torch.equal(merged[name], tensor), name


def test_a_reward_adapter_without_its_score_head_is_refused(tmp_path):
    base = _small_base(tmp_path / "rm", reward=True)
    _adapter(base, tmp_path / "adapter", task_type="SEQ_CLS")
    weights = load_file(tmp_path / "adapter" / WEIGHTS)
    assert "base_model.model.score.weight" in weights
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")  # whole: it merges
    del weights["base_model.model.score.weight"]
    save_file(weights, tmp_path / "adapter" / WEIGHTS)
    with pytest.raises(ValueError, match=r"does not fit the base .*it lacks "
                                         r"base_model\.model\.score\.weight"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged2")


def test_what_merge_refuses_is_one_line_naming_the_argument(trained, tmp_path, capsys):
    base, adapter, _ = trained

    def refused(*args):
        with pytest.raises(SystemExit) as raised:
            cli(["merge", *map(str, args)])
        message = str(raised.value)
        assert message.startswith("fastalign: error: ") and "\n" not in message
        return message

    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    torch.save(load_file(pickled / WEIGHTS), pickled / "adapter_model.bin")
    (pickled / WEIGHTS).unlink()
    message = refused(pickled, "--output", tmp_path / "m")
    assert "adapter_model.bin is a pickle, which fastalign never loads" in message
    assert f"convert it to {WEIGHTS}" in message

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(adapter / "adapter_config.json", no_weights)
    assert f"has adapter_config.json but no {WEIGHTS}" in refused(no_weights, "--output",
                                                                   tmp_path / "m")

    assert "is not a readable safetensors file" in refused(
        _variant(trained, tmp_path, raw=b""), "--output", tmp_path / "m")

    (tmp_path / "a_file").write_text("x")
    assert f"--output {tmp_path / 'a_file'} is a file, not a directory" in refused(
        adapter, "--output", tmp_path / "a_file")

    message = refused(adapter, "--output", tmp_path / "m", "--base", tmp_path / "nope")
    assert message.startswith(f"fastalign: error: --base '{tmp_path / 'nope'}': no such file")

    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    message = refused(moved, "--output", tmp_path / "m")
    assert f"records the base model '{tmp_path / 'gone'}': no such file" in message
    assert message.endswith("as --base MODEL")
    assert not (tmp_path / "m").exists()
    merge_adapter(moved, tmp_path / "m", base=str(base))  # with --base it merges


def test_a_gguf_based_adapter_records_the_file_and_merges_once_the_cache_is_gone(
        tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from gguf_writer import tiny_llama_and_gguf

    monkeypatch.setenv("FASTALIGN_CACHE", str(tmp_path / "cache"))
    tiny_llama_and_gguf(tmp_path / "tiny.gguf", layers=1)
    monkeypatch.chdir(tmp_path)
    model, tokenizer = load_model_and_tokenizer("tiny.gguf")  # relative: recorded absolute
    lora = prepare_model(model, DPOConfig(output_dir=str(tmp_path / "run"), lora_r=2,
                                          lora_target_modules="q_proj,v_proj"))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    lora.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(tmp_path / "tiny.gguf")

    shutil.rmtree(tmp_path / "cache")
    monkeypatch.chdir(tmp_path / "adapter")  # elsewhere: the absolute path still finds it
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged, _ = load_model_and_tokenizer(str(tmp_path / "merged"))
    ids = torch.tensor([tokenizer.encode("the hello there")])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, lora.eval()(ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_a_model_loaded_from_a_converted_gguf_directory_records_the_file(tmp_path,
                                                                         monkeypatch):
    """A reward model (loaded by its converted directory) is recorded by the GGUF file too."""
    pytest.importorskip("gguf")
    from gguf_writer import tiny_llama_and_gguf

    from fastalign.trainer.models.lora import base_name
    from fastalign.trainer.models.loading import converted_gguf, load_reward_model

    monkeypatch.setenv("FASTALIGN_CACHE", str(tmp_path / "cache"))
    tiny_llama_and_gguf(tmp_path / "tiny.gguf", layers=1)
    model, _ = load_reward_model(str(tmp_path / "tiny.gguf"))
    assert model.config._name_or_path == str(converted_gguf(tmp_path / "tiny.gguf"))
    assert base_name(model) == str(tmp_path / "tiny.gguf")
