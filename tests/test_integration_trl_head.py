"""fastalign.integrations.trl's head on its own (against the model's own float64 logits, LoRA
on lm_head, bf16 autocast beside TRL's head, generate(), a ZeRO-3 head) and its switch: enable /
disable, the supported versions, patch(trainer), the guard, the README example."""

import re
import warnings

import pytest
import torch
from helpers import forbid_trl_head, tiny_gemma2

pytest.importorskip("trl")
import fastalign.integrations.trl as fatrl  # noqa: E402
from fastalign.trainer import byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def always_disabled_after():
    yield
    fatrl.disable()


def _models_for_head(kind):
    import transformers
    from helpers import small_llama
    if kind == "gemma2":
        return tiny_gemma2(0)
    if kind == "cohere":  # logit_scale multiplies the logits
        torch.manual_seed(0)
        config = transformers.CohereConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2, logit_scale=0.25)
        model = transformers.CohereForCausalLM(config)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)
        return model
    model = small_llama(0, scale=10.0)
    if kind == "lora_head":
        peft = pytest.importorskip("peft")
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0,
                               init_lora_weights=False)
        model = peft.get_peft_model(model, lora)
    return model


@pytest.mark.parametrize("kind", ["tied_llama", "gemma2", "cohere", "lora_head"])
def test_fused_head_equals_the_models_own_logits(kind):
    """log_probs, entropy, mean logit, top-1 and log sum p^2 of the fused forward against the
    model's own logits in float64 (soft cap, logit scale, a LoRA adapter on lm_head folded in)."""
    model = _models_for_head(kind)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fatrl.add_fused_lm_head(base, temperature=0.8, outputs=fatrl.OUTPUTS)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 262, (2, 9), generator=gen)
    labels = input_ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    logits = model(input_ids=input_ids).logits[:, :-1].double() / 0.8
    log_p = torch.log_softmax(logits, -1)
    target = labels[:, 1:]
    mask = target != -100
    expected_lp = log_p.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(out.log_probs.double(), expected_lp, rtol=1e-5, atol=1e-5)
    entropy = -(log_p.exp() * log_p).sum(-1) * mask
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean_logits.double(), logits.mean(-1) * mask, rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(out.is_top1, (logits.argmax(-1) == target) & mask)
    torch.testing.assert_close(out.log_sum_sq_probs.double(),
                               torch.logsumexp(2 * log_p, -1) * mask, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.label_mask, mask)
    torch.testing.assert_close(out.loss.double(), -expected_lp.sum() / mask.sum(), rtol=1e-5,
                               atol=1e-6)
    # The LoRA delta is trained through the fold.
    out.loss.backward()
    if kind == "lora_head":
        grads = [p.grad for n, p in model.named_parameters() if "lm_head" in n and "lora" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_lora_head_with_dropout_is_refused():
    peft = pytest.importorskip("peft")
    from helpers import small_llama
    model = peft.get_peft_model(small_llama(0), peft.LoraConfig(
        r=4, target_modules=["lm_head"], lora_dropout=0.1))
    fatrl.add_fused_lm_head(model.get_base_model())
    model.train()
    ids = torch.randint(0, 262, (1, 5))
    with pytest.raises(ValueError, match="lm_head has dropout 0.1.*lora_dropout=0"):
        model(input_ids=ids, labels=ids, fused_lm_head=True)


def test_generate_and_plain_forward_are_unchanged():
    from helpers import small_llama
    model = small_llama(0, scale=10.0)
    ids = torch.randint(0, 262, (1, 4))
    before = model.generate(ids, max_new_tokens=5, do_sample=False)
    plain = model(input_ids=ids).logits
    fatrl.add_fused_lm_head(model, outputs=("log_probs",))
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), before)
    assert torch.equal(model(input_ids=ids).logits, plain)
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert out.entropy is None and out.mean_logits is None


def test_unknown_outputs_are_refused_when_the_trainer_is_built():
    from helpers import small_llama
    with pytest.raises(NotImplementedError, match="'top_k_probs'"):
        fatrl.add_fused_lm_head(small_llama(0), outputs=("log_probs", "top_k_probs"))


# ------------------------------------------------------------------ switch, patch, guard


def test_enable_disable_restore_trls_installer():
    import trl.trainer.dpo_trainer
    import trl.trainer.utils
    original = trl.trainer.utils.add_fused_lm_head
    with fatrl.enabled():
        assert trl.trainer.utils.add_fused_lm_head is fatrl.add_fused_lm_head
        assert trl.trainer.dpo_trainer.add_fused_lm_head is fatrl.add_fused_lm_head
        fatrl.enable()  # idempotent
    assert trl.trainer.utils.add_fused_lm_head is original
    assert trl.trainer.dpo_trainer.add_fused_lm_head is original
    assert not fatrl.is_enabled()


def test_unsupported_trl_version_is_refused(monkeypatch):
    import trl
    monkeypatch.setattr(trl, "__version__", "1.99.0")
    with pytest.raises(RuntimeError, match="supports TRL 1.16, not 1.99.0.*FASTALIGN_TRL_UNCHECKED"):
        fatrl.enable()
    assert not fatrl.is_enabled()
    monkeypatch.setenv("FASTALIGN_TRL_UNCHECKED", "1")
    with pytest.warns(RuntimeWarning, match="not 1.99.0"):
        fatrl.enable()
    assert fatrl.is_enabled()


def test_patch_a_built_trainer_and_the_guard(tmp_path, monkeypatch):
    """A trainer built without fastalign gets its head from patch() (TRL's chunked function
    forbidden, the step still runs); a forward replaced after that makes the guard warn."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from helpers import preference_rows, small_llama

    rows = [{"text": r["prompt"] + r["chosen"]} for r in preference_rows()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, bf16=False, max_length=256, max_steps=2,
                         logging_steps=10**6, save_strategy="no")
        trainer = SFTTrainer(model=small_llama(0), args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=byte_tokenizer())
    forbid_trl_head(monkeypatch)
    assert fatrl.patch(trainer) is trainer
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the guard must stay quiet
        warnings.filterwarnings("ignore", message="(?!fastalign)")
        trainer.train()

    # Something replaces the forward afterwards: TRL's head (made harmless here) serves it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=small_llama(0), args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=byte_tokenizer())
    fatrl.patch(trainer)
    trainer.model.forward = _plain_fused_forward(trainer.model)
    with pytest.warns(RuntimeWarning, match="served none of this SFTTrainer step"):
        trainer.train()


def _plain_fused_forward(model):
    """A forward that answers fused_lm_head=True calls without fastalign (TRL's loss from the
    model's own logits), as another library's patch would."""
    import types

    from trl.trainer.utils import FusedCausalLMOutput
    original = model.forward.__func__.fastalign_fused_head["original_forward"]

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        out = original(*args, **kwargs)
        if not fused_lm_head:
            return out
        log_p = torch.log_softmax(out.logits[:, :-1].float(), -1)
        target = labels[:, 1:]
        mask = target != -100
        lp = log_p.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * mask
        return FusedCausalLMOutput(loss=-lp.sum() / mask.sum(), log_probs=lp,
                                   entropy=torch.zeros_like(lp), is_top1=mask & False,
                                   label_mask=mask)
    return types.MethodType(forward, model)


def test_patch_refuses_a_trainer_without_trls_head():
    from helpers import small_llama

    class NotATrlTrainer:
        model = small_llama(0)
        ref_model = None
    with pytest.raises(ValueError, match="is not TRL's fused head"):
        fatrl.patch(NotATrlTrainer())


def test_the_trl_extra_pins_the_supported_versions():
    """pyproject's `trl` extra installs what SUPPORTED_TRL says is supported."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    (requirement,) = project["project"]["optional-dependencies"]["trl"]
    low, high = re.fullmatch(r"trl>=(\d+\.\d+),<(\d+\.\d+)", requirement).groups()
    major, minor = map(int, low.split("."))
    assert fatrl.SUPPORTED_TRL == tuple(f"{major}.{m}" for m in range(minor, int(high.split(".")[1])))


def _zero3_head_run(model, ids):
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    out.loss.backward()
    return out.log_probs.detach(), out.loss.detach(), model.lm_head.weight.grad


def test_deepspeed_zero3_head_is_gathered_in_forward_and_backward(monkeypatch):
    """A ZeRO-3 partitioned lm_head (a fake deepspeed: empty outside GatheredParameters) gives
    the unpartitioned head's log-probs, loss and head gradient, gathered once in forward and
    once in backward."""
    import transformers.integrations.deepspeed as ds
    from helpers import fake_deepspeed
    ids = torch.randint(0, 262, (2, 6), generator=torch.Generator().manual_seed(0))
    model = tiny_gemma2(0)
    fatrl.add_fused_lm_head(model, outputs=("log_probs",))
    expected = _zero3_head_run(model, ids)
    model = tiny_gemma2(0)
    fatrl.add_fused_lm_head(model, outputs=("log_probs",))
    fake = fake_deepspeed(monkeypatch)
    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
    fake.partition(model.lm_head.weight)
    actual = _zero3_head_run(model, ids)
    assert fake.enters == 2 and model.lm_head.weight.numel() == 0
    for name, a, e in zip(("log_probs", "loss", "lm_head grad"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_lora_on_a_deepspeed_zero3_head_is_refused_clearly(monkeypatch):
    peft = pytest.importorskip("peft")
    from helpers import fake_deepspeed
    lora = peft.LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_gemma2(0), lora)
    fatrl.add_fused_lm_head(model.get_base_model())
    fake_deepspeed(monkeypatch).partition(model.get_output_embeddings().get_base_layer().weight)
    ids = torch.randint(0, 262, (1, 5))
    with pytest.raises(NotImplementedError, match="LoRA adapter 'default' on lm_head cannot be "
                                                  "folded into a DeepSpeed ZeRO-3.*target_modules"):
        model(input_ids=ids, labels=ids, fused_lm_head=True)


@pytest.mark.parametrize("cast", [False, True], ids=["autocast", "cast_lm_head_to_fp32"])
def test_bf16_autocast_gradients_as_close_as_trls_head(cast):
    """Under CPU bf16 autocast both heads give gradients of the same dtypes, and fastalign's are
    as close to the float32 run's (no autocast) as TRL's own head's are."""
    from helpers import small_llama
    from trl.trainer.utils import add_fused_lm_head as trl_head

    ids = torch.randint(0, 262, (2, 9), generator=torch.Generator().manual_seed(0))

    def run(install, autocast):
        # Unscaled weights: bf16 errors stay rounding-sized (a model with large logits turns
        # them chaotic, and any two bf16 runs then differ by tens of percent).
        model = small_llama(0)
        install(model, temperature=0.9, cast_lm_head_to_fp32=cast,
                outputs=("log_probs", "entropy"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids, fused_lm_head=True)
            (out.loss + out.entropy.sum() * 0.1).backward()
        return out.log_probs.detach(), {n: p.grad for n, p in model.named_parameters()}

    exact_lp, exact = run(trl_head, autocast=False)
    trl_lp, trl_grads = run(trl_head, autocast=True)
    lp, grads = run(fatrl.add_fused_lm_head, autocast=True)
    error = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    assert error(lp, exact_lp) <= 1.5 * error(trl_lp, exact_lp) + 1e-3
    for name, grad in exact.items():
        assert grads[name].dtype == trl_grads[name].dtype, name
        assert error(grads[name], grad) <= 1.5 * error(trl_grads[name], grad) + 1e-3, name


def test_disable_restores_modules_first_imported_by_enable():
    """In a fresh process where no trainer module is imported yet, enable() imports them all
    before replacing anything, so disable() gives each TRL's own installer back."""
    import subprocess
    import sys
    code = ("import trl.trainer.utils as u; original = u.add_fused_lm_head\n"
            "import fastalign.integrations.trl as fatrl; fatrl.enable(); fatrl.disable()\n"
            "import trl.trainer.dpo_trainer as d, trl.trainer.sft_trainer as s\n"
            "assert d.add_fused_lm_head is original and s.add_fused_lm_head is original\n"
            "assert u.add_fused_lm_head is original\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_the_readme_example_runs_as_written(tmp_path):
    """README "Use fastalign inside TRL" points at examples/trl_dpo.py: it runs offline and
    trains through fastalign's head."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "trl_dpo.py"
    assert "examples/trl_dpo.py" in (script.parent.parent / "README.md").read_text()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final reward accuracy:" in done.stdout
    assert "served none" not in done.stderr  # the guard: fastalign served the steps
