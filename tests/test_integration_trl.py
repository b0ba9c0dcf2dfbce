"""fastalign.integrations.trl: TRL 1.16's trainers with fastalign's fused head. Each parity
test runs one training step of the same trainer twice, on the same model, data and seed:
unpatched TRL, and patched with TRL's own chunked function made to raise (so fastalign must
have served every call), and compares the loss, every logged metric and every gradient."""

import warnings

import pytest
import torch
from helpers import forbid_trl_head, small_policy, tiny_gemma2

pytest.importorskip("trl")
import fastalign.integrations.trl as fatrl  # noqa: E402
from fastalign.trainer import byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["the cat sat on", "a dog ran to", "my hat is", "one two three"]


@pytest.fixture(autouse=True)
def always_disabled_after():
    yield
    fatrl.disable()


def distinct_letters(prompts, completions, **_):
    return [float(len(set(text))) for text in completions]


def _saved_policy(tmp_path):
    """The RL tests' policy as a directory: with beta > 0, TRL loads its reference from the
    policy's path."""
    path = tmp_path / "policy"
    small_policy().save_pretrained(path)
    return str(path)


def _step_results(trainer, loss):
    """(loss, logged metrics, {name: gradient}) after one step's backward."""
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return float(loss), metrics, grads


def _rl_step(trainer_class, config_class, tmp_path, **settings):
    """One step of TRL's GRPOTrainer or RLOOTrainer (the same constructor and loop), seed 0:
    generation, rewards and the update's backward."""
    from datasets import Dataset

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = config_class(output_dir=str(tmp_path), per_device_train_batch_size=4,
                            num_generations=4, steps_per_generation=1, max_completion_length=6,
                            learning_rate=1e-3, top_p=1.0, report_to=[], use_cpu=True,
                            bf16=False, logging_steps=10**6, seed=0, **settings)
        trainer = trainer_class(model=_saved_policy(tmp_path), reward_funcs=[distinct_letters],
                                args=args, processing_class=byte_tokenizer(),
                                train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.current_gradient_accumulation_steps = 1
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    torch.manual_seed(1)
    return _step_results(trainer, trainer.training_step(trainer.model, inputs, None))


def _grpo_step(tmp_path, **options):
    from trl import GRPOConfig, GRPOTrainer
    return _rl_step(GRPOTrainer, GRPOConfig, tmp_path,
                    **{"temperature": 0.7, "beta": 0.1, **options})


def _unpatched_and_patched(step, tmp_path, monkeypatch, *args, **options):
    """``step`` run with TRL's own head, then built inside ``fatrl.enabled()`` with TRL's
    chunked function made to raise: (expected, actual)."""
    expected = step(tmp_path / "trl", *args, **options)
    forbid_trl_head(monkeypatch)
    with fatrl.enabled():
        actual = step(tmp_path / "fastalign", *args, **options)
    return expected, actual


# Wall-clock metrics: the one logged value that may differ between two runs.
TIMING_METRICS = {"step_time"}


def _assert_same_step(expected, actual, rtol=1e-5):
    loss, metrics, grads = actual
    ref_loss, ref_metrics, ref_grads = expected
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=1e-7)
    assert metrics.keys() == ref_metrics.keys() and len(ref_metrics) > len(TIMING_METRICS)
    for name, value in ref_metrics.items():
        if name in TIMING_METRICS:
            continue
        # atol 1e-5: margins and rewards are differences of log-prob sums, where both runs'
        # float32 roundings of the sums (~1e-7 of hundreds) survive the cancellation.
        torch.testing.assert_close(float(metrics[name]), float(value), rtol=rtol, atol=1e-5,
                                   msg=lambda m: f"metric {name}: {m}")
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        # Relative to the gradient's norm: elements far below it (an embedding row seen once)
        # carry only float32 rounding, which recomputation (checkpointing) reorders.
        error = float((grads[name] - grad).norm() / grad.norm().clamp(min=1e-30))
        assert error <= rtol, f"gradient of {name}: relative error {error:.2e}"


@pytest.mark.parametrize("options", [
    dict(),                                          # temperature 0.7, beta 0.1 (k3 KL)
    dict(top_entropy_quantile=0.5, beta=0.0),        # entropy-masked tokens
    dict(loss_type="dr_grpo", temperature=1.3),
], ids=["beta", "entropy_mask", "dr_grpo"])
def test_grpo_step_matches_unpatched_trl(tmp_path, monkeypatch, options):
    _assert_same_step(*_unpatched_and_patched(_grpo_step, tmp_path, monkeypatch, **options))


def _collated_step(trainer, rows):
    """(loss, logged metrics, gradients) of one compute_loss + backward on ``rows``."""
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return _step_results(trainer, loss)


def _dpo_step(tmp_path, kind, **options):
    from datasets import Dataset
    from helpers import preference_rows
    from trl import DPOConfig, DPOTrainer

    policy, reference = _dpo_models(kind)  # fresh models for each run
    torch.manual_seed(0)
    data = preference_rows()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.1,
                         report_to=[], use_cpu=True, bf16=False, max_length=1024,
                         **options)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=Dataset.from_list(data),
                             processing_class=byte_tokenizer())
    return _collated_step(trainer, len(data))


def _dpo_models(kind):
    from helpers import small_llama
    if kind == "gemma2":
        return tiny_gemma2(0), tiny_gemma2(1)
    policy, reference = small_llama(0, scale=10.0), small_llama(1, scale=10.0)
    if kind == "lora":
        peft = pytest.importorskip("peft")
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                               init_lora_weights=False)
        torch.manual_seed(0)  # the adapters' random initialisation, the same in both runs
        return peft.get_peft_model(policy, lora), None  # reference: the adapters off
    return policy, reference


@pytest.mark.parametrize("kind,options", [
    ("llama", dict(loss_type=["sigmoid"])),
    ("llama", dict(loss_type=["ipo"])),
    ("llama", dict(loss_type=["sigmoid"], use_weighting=True)),  # WPO: log_sum_sq_probs
    ("llama", dict(loss_type=["sigmoid"], precompute_ref_log_probs=True)),
    ("llama", dict(loss_type=["sigmoid"], gradient_checkpointing=True)),
    ("lora", dict(loss_type=["sigmoid"])),
    ("gemma2", dict(loss_type=["sigmoid"])),
], ids=["sigmoid", "ipo", "wpo", "precomputed_reference", "checkpointing", "lora",
        "gemma2_softcap"])
def test_dpo_step_matches_unpatched_trl(tmp_path, monkeypatch, kind, options):
    _assert_same_step(*_unpatched_and_patched(_dpo_step, tmp_path, monkeypatch, kind,
                                              **options))


def _rloo_step(tmp_path):
    from trl import RLOOConfig, RLOOTrainer
    return _rl_step(RLOOTrainer, RLOOConfig, tmp_path, temperature=0.8, beta=0.05)


def test_rloo_step_matches_unpatched_trl(tmp_path, monkeypatch):
    _assert_same_step(*_unpatched_and_patched(_rloo_step, tmp_path, monkeypatch))


def _kto_step(tmp_path):
    from datasets import Dataset
    from helpers import preference_rows, small_llama
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    rows = [dict(prompt=r["prompt"], completion=r[side], label=side == "chosen")
            for r in preference_rows() for side in ("chosen", "rejected")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.1,
                         report_to=[], use_cpu=True, bf16=False, max_length=1024)
        trainer = KTOTrainer(model=small_llama(0, scale=10.0), ref_model=small_llama(1, scale=10.0),
                             args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=byte_tokenizer())
    return _collated_step(trainer, 4)


def test_kto_step_matches_unpatched_trl(tmp_path, monkeypatch):
    _assert_same_step(*_unpatched_and_patched(_kto_step, tmp_path, monkeypatch))


def _sft_step(tmp_path):
    from datasets import Dataset
    from helpers import preference_rows, small_llama
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    rows = [{"text": r["prompt"] + r["chosen"]} for r in preference_rows()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, bf16=False, max_length=256)
        trainer = SFTTrainer(model=small_llama(0, scale=10.0), args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=byte_tokenizer())
    return _collated_step(trainer, 4)


def test_sft_step_matches_unpatched_trl(tmp_path, monkeypatch):
    _assert_same_step(*_unpatched_and_patched(_sft_step, tmp_path, monkeypatch))
