"""DPOTrainer: the first batch's loss against TRL's DPOTrainer and a float64 reference,
gradient accumulation, the reference options, exact resume, and what it writes."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import preference_rows, small_llama

from fastalign.trainer import DPOConfig, DPOTrainer, byte_tokenizer
from fastalign.trainer.core.data import collate_pairs, tokenize_pairs

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


def config(tmp_path, **options):
    return DPOConfig(output_dir=str(tmp_path / "out"), batch_size=4, progress=False, **options)


def float64_loss(policy, reference, data, loss_type, beta=0.1):
    """The DPO loss from the models' float64 copies: backbone, lm_head, log_softmax."""
    tokenizer = byte_tokenizer()
    chosen, rejected = collate_pairs(tokenize_pairs(data, tokenizer), tokenizer.pad_token_id)

    def sums(model, side):
        exact = copy.deepcopy(model).double()
        with torch.no_grad():
            hidden = exact.model(input_ids=side["input_ids"],
                                 attention_mask=side["attention_mask"]).last_hidden_state
            logprobs = torch.log_softmax(exact.lm_head(hidden)[:, :-1], -1)
        picked = logprobs.gather(-1, side["input_ids"][:, 1:, None]).squeeze(-1)
        mask = (side["completion_mask"][:, 1:] * side["attention_mask"][:, 1:]).double()
        return (picked * mask).sum(-1), mask.sum(-1)

    (pc, nc), (pr, nr) = sums(policy, chosen), sums(policy, rejected)
    (rc, _), (rr, _) = sums(reference, chosen), sums(reference, rejected)
    if loss_type == "ipo":
        delta = (pc - rc) / nc - (pr - rr) / nr
        return ((delta - 1 / (2 * beta)) ** 2).mean().item()
    return (-F.logsigmoid(beta * ((pc - rc) - (pr - rr)))).mean().item()


@pytest.mark.parametrize("conversational", [False, True], ids=["text", "messages"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_first_batch_loss_matches_trl_and_float64(tmp_path, loss_type, conversational):
    """Same tiny models, data and settings as TRL 1.16's DPOTrainer (bf16=False: TRL's default
    bf16 autocast would change its numbers, not ours); both within 1e-4 of each other and ours
    within 1e-5 of the float64 loss."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    data = preference_rows(conversational=conversational)
    policy, reference = small_llama(0, scale=10.0), small_llama(1, scale=10.0)
    exact = float64_loss(policy, reference, data, loss_type)
    ours = DPOTrainer(policy, byte_tokenizer(), config(tmp_path, loss_type=loss_type), data,
                      ref_model=reference)
    our_loss, _ = ours.compute_loss(ours.collate(ours.train_items))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                             beta=0.1, loss_type=[loss_type], report_to=[], use_cpu=True,
                             bf16=False, max_length=1024)
        theirs = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                                train_dataset=datasets.Dataset.from_list(data),
                                processing_class=byte_tokenizer())
        inputs = theirs.data_collator([theirs.train_dataset[i] for i in range(len(data))])
        trl_loss = theirs.compute_loss(theirs.model, inputs).item()
    assert abs(our_loss.item() - trl_loss) <= 1e-4 * abs(trl_loss), (our_loss.item(), trl_loss)
    assert abs(our_loss.item() - exact) <= 1e-5 * abs(exact), (our_loss.item(), exact)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """8 pairs in one micro-batch, or 4 x 2 accumulated: the same gradient (each micro-batch's
    mean loss is weighted by its share of the pairs)."""
    data = preference_rows(8)
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = small_llama(0)
        trainer = DPOTrainer(model, byte_tokenizer(),
                             DPOConfig(output_dir=str(tmp_path / f"b{batch_size}"),
                                       batch_size=batch_size,
                                       gradient_accumulation_steps=accumulation,
                                       max_steps=1, learning_rate=1e-2, progress=False),
                             data, ref_model=small_llama(1))
        trainer.micro_per_epoch = 1  # every micro-batch reads the same seeded order
        trainer._micro_batch = (lambda index, t=trainer, b=batch_size:
                                t.train_items[(index * b) % 8:(index * b) % 8 + b])
        trainer.optimizer.zero_grad = lambda **_: None  # keep the step's gradient to compare
        trainer.training_step()
        results.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert results[0].abs().max() > 0
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_precomputed_reference_equals_a_frozen_copy(tmp_path):
    data = preference_rows(4)
    losses = []
    for reference in ("copy", "precomputed"):
        trainer = DPOTrainer(small_llama(0, scale=5.0), byte_tokenizer(),
                             config(tmp_path / reference, reference=reference), data)
        with torch.no_grad():
            for parameter in trainer.model.parameters():  # the policy moves on; the reference stays
                parameter.add_(0.01)
        losses.append(trainer.compute_loss(trainer.collate(trainer.train_items))[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert (tmp_path / "precomputed" / "out" / "reference_logps.safetensors").is_file()


def interrupt_after(trainer, steps):
    """Trains until the process is killed right after step ``steps`` (and its checkpoint)."""
    step = trainer.training_step

    def killed():
        if trainer.step == steps:
            raise KeyboardInterrupt
        return step()
    trainer.training_step = killed
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def test_resume_is_exact(tmp_path):
    """20 steps in one run, or 10, a checkpoint, a fresh process-like restart and 10 more:
    identical final weights (CPU, fp32)."""
    data = preference_rows(12)

    def trainer(out, steps):
        options = dict(output_dir=str(out), batch_size=4, max_steps=steps, learning_rate=1e-2,
                       warmup_steps=3, save_steps=10, progress=False, seed=3)
        return DPOTrainer(small_llama(0), byte_tokenizer(), DPOConfig(**options), data,
                          ref_model=small_llama(1))

    straight = trainer(tmp_path / "a", 20)
    straight.train()
    interrupt_after(trainer(tmp_path / "b", 20), 10)
    torch.manual_seed(12345)  # the resumed run must restore the RNG itself
    resumed = trainer(tmp_path / "b", 20)
    resumed.train(resume_from="latest")
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == list(range(1, 21))


def test_outputs_and_metric_names(tmp_path):
    trainer = DPOTrainer(small_llama(0), byte_tokenizer(),
                         config(tmp_path, max_steps=2, eval_steps=2, save_steps=2), preference_rows(8),
                         preference_rows(4))
    last = trainer.train()
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                 "rewards/margins", "logps/chosen", "logps/rejected", "learning_rate",
                 "grad_norm", "epoch", "eval_loss", "eval_rewards/accuracies"):
        assert name in last, name
    out = tmp_path / "out"
    for name in ("metrics.jsonl", "metrics.png", "model.safetensors", "config.json",
                 "checkpoint-2/trainer_state.pt", "checkpoint-2/model.safetensors",
                 "checkpoint-2/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".checkpoint-*"))  # no half-written checkpoint left behind


def test_lora_adapters_off_is_the_reference(tmp_path):
    """reference='adapters': the PEFT model with its LoRA adapters disabled is the reference,
    with no second copy: the loss equals the one against the base model itself."""
    peft = pytest.importorskip("peft")
    base = small_llama(0, scale=5.0)
    frozen_base = copy.deepcopy(base)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    data = preference_rows(4)
    with_adapters = DPOTrainer(lora, byte_tokenizer(), config(tmp_path / "a", reference="adapters"),
                               data)
    with_base = DPOTrainer(lora, byte_tokenizer(), config(tmp_path / "b"), data,
                           ref_model=frozen_base)
    batch = with_adapters.collate(with_adapters.train_items)
    loss, metrics = with_adapters.compute_loss(batch)
    expected, _ = with_base.compute_loss(batch)
    assert metrics["rewards/margins"] != 0  # the adapters change the model
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    lora_grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


def test_datasets_input_and_bf16_autocast(tmp_path):
    """A ``datasets.Dataset`` is read like a list of rows, and a bf16-autocast step gives the
    fp32 loss to bf16 precision."""
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list(preference_rows(4))
    losses = []
    for precision in ("fp32", "bf16"):
        trainer = DPOTrainer(small_llama(0, scale=5.0), byte_tokenizer(),
                             config(tmp_path / precision, precision=precision), data,
                             ref_model=small_llama(1, scale=5.0))
        with trainer._autocast():
            loss, _ = trainer.compute_loss(trainer.collate(trainer.train_items))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] > 0.1 and losses[1] == pytest.approx(losses[0], rel=0.05), losses
    assert losses[1] != losses[0]  # autocast did run in bf16


def test_lora_resume_is_exact(tmp_path):
    """A PEFT model's checkpoint holds its adapters (what save_pretrained writes); resuming
    from it continues exactly."""
    peft = pytest.importorskip("peft")

    def trainer(out, steps):
        torch.manual_seed(0)  # the random LoRA initialisation
        lora = peft.get_peft_model(small_llama(0), peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        return DPOTrainer(lora, byte_tokenizer(),
                          DPOConfig(output_dir=str(out), batch_size=4, max_steps=steps,
                                    learning_rate=1e-2, save_steps=2, progress=False,
                                    reference="adapters"), preference_rows(8))

    straight = trainer(tmp_path / "a", 4)
    straight.train()
    interrupt_after(trainer(tmp_path / "b", 4), 2)
    resumed = trainer(tmp_path / "b", 4)
    assert (tmp_path / "b" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    resumed.train(resume_from=tmp_path / "b" / "checkpoint-2")
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
